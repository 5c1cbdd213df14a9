"""The distillation set of one task: synthetic image-prompt pairs (or real reference images).

A synthetic folder is what ``gift-fast synth`` (``gift_fast.synth.engine``) writes,
in the reference implementation's layout::

    <root>/<Task>_Syn/image_text.csv     header "image,text": one row per image
    <root>/<Task>_Syn/<i>.jpeg           the images

The authors' own folders (their ``txt2img.py`` writes ``./data/synthetic/...`` paths
in the ``image`` column) are read too: each row is resolved by its file name inside
the CSV's folder. A folder made for another task order is refused
(``check_folder_sequence``; docs/PROTOCOL_PROMPTS.md).

``load_synthetic_set`` reads it the way the reference loader does: all-black
images (the safety checker's output) are dropped first, then the first N are
kept, and the ITA label of a pair is
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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from gift_fast.files import read_json

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


# A data set expected to supply at least this many of a folder's prompts must supply one (P(none) < e**-20).
MIN_EXPECTED_DRAWS = 20


class SyntheticFolderMismatch(ValueError):
    """A synthetic folder was made for another task sequence (order) than the run's."""


def _image_index(value: str) -> Optional[int]:
    name = str(value).replace("\\", "/").rsplit("/", 1)[-1]
    stem = name.rsplit(".", 1)[0]
    return int(stem) if stem.isdigit() else None


def read_synthetic_rows(folder: Path) -> List[tuple]:
    """``(path, prompt)`` of every row of ``folder/image_text.csv``, in image order.

    The ``image`` column may hold a bare file name (this project) or the path the authors'
    ``txt2img.py`` saw (``./data/synthetic/synthetic_data_a/Aircraft_Syn/0.jpeg``): each row is
    resolved by its file name inside the CSV's folder. Rows named ``<i>.<ext>`` are put in index
    order (the order the seeds made them)."""
    csv_path = folder / "image_text.csv"
    with open(csv_path, newline="", encoding="utf-8") as fh:
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
    out = [(folder / str(img).replace("\\", "/").rsplit("/", 1)[-1], text) for img, text in rows]
    idx = [_image_index(img) for img, _ in rows]
    if all(i is not None for i in idx):
        out = [row for _, row in sorted(zip(idx, out), key=lambda p: p[0])]
    return out


def check_folder_sequence(root: str | os.PathLike, task_name: str, sequence: Optional[Sequence[str]],
                          pool_sources: Optional[Sequence[tuple]] = None,
                          prompts: Optional[Sequence[str]] = None) -> None:
    """Refuse a synthetic folder made for another task sequence than ``sequence`` (the run's task names).

    The prompt pool of a task holds the classes of the tasks before it, so a folder made for Order I
    has other prompts than Order II needs. Checked, in this order of preference: the task manifest's
    ``pool_tasks`` (the tasks whose classes its pool held, less its ``pool_exclude``); the run
    manifest's ``order``; for a folder without manifests (the authors' layout), from its prompts:
    ``pool_sources`` is the run's pool of this task as ``(data set, its templated entries)`` pairs;
    every prompt must be in the pool, and a data set whose entries should account for at least
    ``MIN_EXPECTED_DRAWS`` of the prompts (uniform draws) must have at least one (the chance that
    it has none is below e**-20)."""
    if not sequence or task_name not in sequence:
        return
    folder = synthetic_folder(root, task_name)
    t = list(sequence).index(task_name)
    fix = ("Synthesize this sequence's own folder (gift-fast synth --order N / --task-file, --out DIR) and "
           "pass that to --synth")
    tm = read_json(folder / "manifest.json") or {}
    if isinstance(tm.get("pool_tasks"), list):
        exclude = set(tm.get("pool_exclude") or [])
        want = [n for n in sequence[:t] if n not in exclude]
        if tm["pool_tasks"] != want:
            made = tm.get("sequence") or tm["pool_tasks"]
            raise SyntheticFolderMismatch(
                f"{folder} was made for another task sequence: its {task_name} prompts come from a pool with the "
                f"classes of {tm['pool_tasks'] or 'no earlier task'} (sequence {made}), but in this run "
                f"{task_name} follows {want or 'no earlier task'}. {fix}")
        return
    rm = read_json(Path(root) / "manifest.json") or {}
    order = rm.get("order")
    if isinstance(order, list) and task_name in order:
        before = order[:order.index(task_name)]
        if before != list(sequence[:t]):
            raise SyntheticFolderMismatch(
                f"{folder} was made for the sequence {order} (manifest.json), where {task_name} follows "
                f"{before or 'no earlier task'}; in this run it follows {list(sequence[:t]) or 'no earlier task'}. "
                f"{fix}")
        return
    if pool_sources is not None and prompts is not None:
        parts = [(str(name), list(entries)) for name, entries in pool_sources]
        size = sum(len(e) for _, e in parts)
        allowed = {p for _, e in parts for p in e}
        foreign = [p for p in prompts if p not in allowed]
        if foreign:
            raise SyntheticFolderMismatch(
                f"{folder} has no manifest and {len(foreign)} of its {len(prompts)} prompts cannot come from this "
                f"run's pool for {task_name} (the classes of {[n for n, _ in parts]}), e.g. "
                f"{foreign[0]!r}: it was made for another task order. {fix}")
        drawn = set(prompts)
        for name, entries in parts:
            expected = len(prompts) * len(entries) / max(size, 1)
            if expected >= MIN_EXPECTED_DRAWS and not drawn & set(entries):
                raise SyntheticFolderMismatch(
                    f"{folder} has no manifest and none of its {len(prompts)} prompts comes from {name} (about "
                    f"{expected:.0f} would if it had been drawn from this run's pool for {task_name}, the classes of "
                    f"{[n for n, _ in parts]}): it was made for another task order. {fix}")


def load_synthetic_set(root: str | os.PathLike, task_name: str, *, image_size: int, limit: Optional[int] = None,
                       progress: bool = True, sequence: Optional[Sequence[str]] = None,
                       pool_sources: Optional[Sequence[tuple]] = None) -> DistillSet:
    """Read ``<root>/<task_name>_Syn`` (see the module doc): all-black images are dropped first,
    then ``limit`` keeps the first n of the rest (in image order), as the authors' loader does.

    The first n images of a folder are the first n its seeds produce, so a smaller set is a
    subset of a larger one (the paper's Fig. 3). ``sequence`` (the run's task names) and
    ``pool_sources`` (the run's prompt pool of this task, ``(data set, entries)`` pairs): refuse a
    folder made for another order (``check_folder_sequence``).
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
    if (read_json(folder / "manifest.json") or {}).get("prompts_only"):
        raise FileNotFoundError(
            f"{folder} holds prompts only (gift-fast synth --prompts-only): generate its images with "
            f"`gift-fast synth --prompts-from {root} --out OTHER_DIR ...` or rerun gift-fast synth without "
            f"--prompts-only into {root}")
    if limit is not None and limit <= 0:
        raise ValueError(f"images_per_task must be positive, got {limit}")
    rows = read_synthetic_rows(folder)
    if not rows:
        raise ValueError(f"{csv_path} lists no image")
    check_folder_sequence(root, task_name, sequence, pool_sources, [t for _, t in rows])
    missing = [str(p) for p, _ in rows if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of the {len(rows)} images listed in {csv_path} are missing in {folder}, e.g. "
            f"{missing[:3]}. The authors release prompts only: generate the images with "
            f"`gift-fast synth --prompts-from {root} --out OTHER_DIR ...`")
    want = len(rows) if limit is None else min(limit, len(rows))
    kept_pixels: List[np.ndarray] = []
    kept_texts: List[str] = []
    dropped = 0
    start = 0
    while len(kept_texts) < want and start < len(rows):
        # decode only as many rows as still needed; black ones are replaced by the next rows
        chunk = rows[start:start + (want - len(kept_texts))]
        start += len(chunk)
        pixels = _read_images([p for p, _ in chunk], image_size, progress, f"reading {task_name} synthetic images")
        keep = pixels.reshape(len(chunk), -1).max(axis=1) > 0      # the reference drops all-black images
        dropped += int((~keep).sum())
        kept_pixels.append(pixels[keep])
        kept_texts += [t for (_, t), k in zip(chunk, keep) if k]
    if not kept_texts:
        raise ValueError(f"every image in {folder} is black (safety checker output): nothing to distill on")
    prompts, labels = _distinct_ids(kept_texts)
    images = torch.from_numpy(np.ascontiguousarray(np.concatenate(kept_pixels).transpose(0, 3, 1, 2)))
    return DistillSet(images, labels, prompts, source=str(folder), dropped_black=dropped)


def _class_name(folder_name: str) -> str:
    return folder_name.replace("_", " ").strip()


def reference_pairs(root: str | os.PathLike, template: str = "a photo of a {}.") -> List[Tuple[Path, str]]:
    """The ``(image file, prompt)`` pairs of a ``--reference-images`` folder, in order: its ``image_text.csv``
    (header ``image,text``, paths relative to it), or an ImageFolder layout ``root/<class name>/<image>`` whose
    prompts are ``template.format(class name)`` (underscores read as spaces). What a run reads, and what a resume
    fingerprints (gift_fast.run_folder.reference_fingerprint)."""
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
    return pairs


def load_reference_set(root: str | os.PathLike, n: int, *, seed: int, task_index: int, image_size: int,
                       template: str = "a photo of a {}.", progress: bool = True) -> DistillSet:
    """``n`` real images for task ``task_index`` (Tab. 5): drawn without replacement, seeded.

    ``root`` is either a folder with ``image_text.csv`` (header ``image,text``, paths relative
    to it) or an ImageFolder layout ``root/<class name>/<image>`` whose prompts are
    ``template.format(class name)`` (underscores read as spaces).
    """
    pairs = reference_pairs(root, template)
    rng = np.random.default_rng([seed, task_index, 0x5245])
    pick = rng.choice(len(pairs), size=min(n, len(pairs)), replace=False)
    chosen = [pairs[i] for i in sorted(pick)]
    pixels = _read_images([p for p, _ in chosen], image_size, progress, "reading reference images")
    prompts, labels = _distinct_ids([t for _, t in chosen])
    images = torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))
    return DistillSet(images, labels, prompts, source=str(root))


__all__ = ["DistillSet", "load_synthetic_set", "load_reference_set", "reference_pairs", "synthetic_folder", "check_folder_sequence",
           "read_synthetic_rows", "SyntheticFolderMismatch"]
