"""The distillation set of one task: synthetic image-prompt pairs (or real reference images).

A synthetic folder is what ``gift-fast synth`` (``gift_fast.synth.engine``) writes,
in the reference implementation's layout::

    <root>/<Task>_Syn/image_text.csv     header "image,text": one row per image
    <root>/<Task>_Syn/<i>.jpeg           the images

``load_synthetic_set`` reads it the way the reference loader does: all-black
images (the safety checker's output) are dropped, and the ITA label of a pair is
the id of its prompt among the distinct prompts of the set (several images may
share a prompt). The images are decoded once, resized (shorter side, bicubic)
and centre-cropped to the model's input size, and kept as uint8; the set is fixed
and not augmented, so the teacher embeds it once per task.

``load_reference_set`` builds the same kind of set from real images (Tab. 5 of
the paper: distillation on ImageNet images instead of synthetic ones).
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".JPEG", ".JPG", ".PNG")


@dataclass
class DistillSet:
    """A fixed set of image-prompt pairs for the distillation of one task.

    images: uint8 [N, 3, S, S]; labels: int64 [N], the id of each image's prompt in
    ``prompts`` (the distinct prompts, in order of first appearance).
    """
    images: torch.Tensor
    labels: torch.Tensor
    prompts: List[str]
    source: str = ""
    dropped_black: int = 0

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def texts(self) -> List[str]:
        return [self.prompts[k] for k in self.labels.tolist()]


def _resize_center_crop(img, size: int) -> np.ndarray:
    """CLIP's eval geometry on a PIL image: shorter side to ``size`` (bicubic), centre crop; uint8 HWC."""
    from PIL import Image

    img = img.convert("RGB")
    w, h = img.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.uint8)


def _read_images(paths: Sequence[Path], size: int, progress: bool, desc: str) -> np.ndarray:
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image
    from tqdm.auto import tqdm

    def load(p: Path) -> np.ndarray:
        try:
            with Image.open(p) as im:
                return _resize_center_crop(im, size)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            # (a damaged file, not an image, or a "decompression bomb": huge dimensions in a small file)
            raise ValueError(f"cannot read image {p} ({type(e).__name__}: {e}): replace or remove it (and its "
                             f"row in image_text.csv), or generate the folder again") from None

    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for i, arr in enumerate(tqdm(pool.map(load, paths), total=len(paths), desc=desc, disable=not progress,
                                     leave=False)):
            out[i] = arr
    return out


def _distinct_ids(texts: Sequence[str]):
    prompts: List[str] = []
    index = {}
    labels = []
    for t in texts:
        if t not in index:
            index[t] = len(prompts)
            prompts.append(t)
        labels.append(index[t])
    return prompts, torch.tensor(labels, dtype=torch.int64)


def synthetic_folder(root: str | os.PathLike, task_name: str) -> Path:
    return Path(root) / f"{task_name}_Syn"


def load_synthetic_set(root: str | os.PathLike, task_name: str, *, image_size: int, limit: Optional[int] = None,
                       progress: bool = True) -> DistillSet:
    """Read ``<root>/<task_name>_Syn`` (see the module doc); ``limit`` keeps the first n rows.

    The first n rows of a folder are the first n images its seeds produce, so a
    smaller set is a subset of a larger one (the paper's Fig. 3).
    """
    folder = synthetic_folder(root, task_name)
    csv_path = folder / "image_text.csv"
    if not folder.is_dir():
        raise FileNotFoundError(
            f"no synthetic folder for task {task_name!r}: {folder} does not exist. Generate it with "
            f"`gift-fast synth --out {root} ...`, or train with --synth on-the-fly")
    if not csv_path.is_file():
        raise FileNotFoundError(
            f"{csv_path} is missing: the synthetic folder of {task_name!r} is incomplete (the engine writes the "
            f"CSV last). Run `gift-fast synth` again with the same arguments to finish it")
    with open(csv_path, newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or not {"image", "text"} <= set(reader.fieldnames):
            raise ValueError(f"{csv_path} must have the header 'image,text', got {reader.fieldnames}")
        rows = []
        for r in reader:
            if r.get("image") in (None, "") or r.get("text") is None:
                raise ValueError(f"{csv_path}, line {reader.line_num}: a row needs an image and a text (got "
                                 f"{[v for v in r.values() if v is not None]}): fix the row or generate the "
                                 f"folder again with `gift-fast synth`")
            rows.append((r["image"], r["text"]))
    if limit is not None:
        if limit <= 0:
            raise ValueError(f"images_per_task must be positive, got {limit}")
        rows = rows[:limit]
    if not rows:
        raise ValueError(f"{csv_path} lists no image")
    paths = [folder / name for name, _ in rows]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} images listed in {csv_path} are missing, e.g. {missing[:3]}")
    pixels = _read_images(paths, image_size, progress, f"reading {task_name} synthetic images")
    keep = pixels.reshape(len(rows), -1).max(axis=1) > 0            # the reference drops all-black images
    if not keep.any():
        raise ValueError(f"every image in {folder} is black (safety checker output): nothing to distill on")
    texts = [t for (_, t), k in zip(rows, keep) if k]
    prompts, labels = _distinct_ids(texts)
    images = torch.from_numpy(np.ascontiguousarray(pixels[keep].transpose(0, 3, 1, 2)))
    return DistillSet(images, labels, prompts, source=str(folder), dropped_black=int((~keep).sum()))


def _class_name(folder_name: str) -> str:
    return folder_name.replace("_", " ").strip()


def load_reference_set(root: str | os.PathLike, n: int, *, seed: int, task_index: int, image_size: int,
                       template: str = "a photo of a {}.", progress: bool = True) -> DistillSet:
    """``n`` real images for task ``task_index`` (Tab. 5): drawn without replacement, seeded.

    ``root`` is either a folder with ``image_text.csv`` (header ``image,text``, paths relative
    to it) or an ImageFolder layout ``root/<class name>/<image>`` whose prompts are
    ``template.format(class name)`` (underscores read as spaces).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--reference-images {root} is not a folder")
    csv_path = root / "image_text.csv"
    if csv_path.is_file():
        with open(csv_path, newline="") as fh:
            pairs = [(root / r["image"], r["text"]) for r in csv.DictReader(fh)]
    else:
        pairs = []
        for cls in sorted(d for d in root.iterdir() if d.is_dir()):
            for f in sorted(cls.iterdir()):
                if f.suffix in IMAGE_EXTENSIONS:
                    pairs.append((f, template.format(_class_name(cls.name))))
    if not pairs:
        raise FileNotFoundError(f"no images under {root}: expected image_text.csv or <class>/<image> folders")
    rng = np.random.default_rng([seed, task_index, 0x5245])
    pick = rng.choice(len(pairs), size=min(n, len(pairs)), replace=False)
    chosen = [pairs[i] for i in sorted(pick)]
    pixels = _read_images([p for p, _ in chosen], image_size, progress, "reading reference images")
    prompts, labels = _distinct_ids([t for _, t in chosen])
    images = torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))
    return DistillSet(images, labels, prompts, source=str(root))


def synthetic_fingerprint(root: str | os.PathLike, task_name: str) -> dict:
    """sha256 of ``<root>/<task>_Syn``'s manifest.json and image_text.csv (what a resume compares)."""
    from gift_fast.run_folder import synthetic_fingerprint as fingerprint

    return fingerprint(root, task_name)


__all__ = ["DistillSet", "load_synthetic_set", "load_reference_set", "synthetic_folder", "synthetic_fingerprint"]
