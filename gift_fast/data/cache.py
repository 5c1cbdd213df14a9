"""Decode and resize every image once: a uint8, memory-mapped cache of a data set's preprocessed pixels.

CLIP's evaluation preprocessing is deterministic (resize the shorter side to S
with bicubic filtering, center-crop S x S, RGB), so its output can be computed once
and stored as uint8 ``[N, 3, S, S]``; what remains per access is ``x / 255``, minus
the mean, over the std, which is exactly torchvision's ``ToTensor`` + ``Normalize``
(same operations in the same order, so the floats are bit-identical). 11 evaluations
per task and 1,000 steps per task then never decode the same JPEG twice.

Files, in ``cache_dir``, for a cache named NAME with key KEY:

* ``NAME-KEY.images.npy``: uint8 ``[N, 3, S, S]`` (a .npy file: header + raw rows, memory-mapped);
* ``NAME-KEY.labels.npy``: int64 ``[N]``;
* ``NAME-KEY.crc32.npy``: uint32 ``[N]``, the CRC-32 of every image row;
* ``NAME-KEY.json``: what the key was made of, the shape, the sha256 of the labels and the
  checksum of the last image row. Written last: a cache without it is unfinished and is rebuilt.

KEY is a hash of the cache format version, the transform description (image size,
filter, crop) and the caller's ``key_parts`` (for the MTIL data sets: data set, split,
and a fingerprint of the ordered file list with sizes and mtimes, and of the
labels), so a change of transform or of the source files gives a new cache. Every
file is written to a temporary name and moved into place with ``os.replace``; an
interrupted build leaves no file that could be mistaken for a finished cache.
Opening a cache checks the .npy header (dtype, shape), the file size (a truncated
file is detected), the label count, the labels' sha256 and the last row's checksum; a cache that fails
is rebuilt, with a warning. Every other row is checked against its CRC-32 the first
time it is read (per process): a damaged row is an error naming the file and the row,
never silently wrong pixels. (Reading all rows at open would cost a full pass over
the file each run; the first read costs one CRC per row, once.)

Two layouts (``layout=``):

* ``"center-crop"`` (evaluation, synthetic images, and training without augmentation): the
  output of CLIP's eval preprocessing, uint8 ``[N, 3, S, S]``;
* ``"train-crop"`` (task images in training): what the authors' training augmentation,
  ``RandomResizedCrop(S, scale=(0.9, 1.0), bicubic)`` (their ``clip/clip.py``,
  ``_transform(is_train=True)``), needs: each image turned landscape (portrait images are
  transposed), resized aspect-preserving to a shorter side of S (bicubic, PIL), its long side
  center-cropped to ``L = ceil(S * (4/3) / 0.9)`` (no crop of that scale and ratio reaches
  further; docs/METHOD.md, "Training augmentation") and edge-padded to L: uint8
  ``[N, 3, S, L]``, plus ``NAME-KEY.geometry.npy`` (int64 ``[N, 6]``: original height and
  width, transposed, resized long side, left offset, valid width). A batch draws its crop
  boxes on the host exactly as torchvision's ``RandomResizedCrop.get_params`` does, in the
  original image's pixels (``random_resized_crop_box``), and crops + resizes on the device
  (``crop_resize``, bicubic ``grid_sample``). The box distribution is torchvision's; the
  pixels are resampled from the S-short-side image instead of the full-size file (a crop is
  at most ~11% upscaled, or up to ~1.5x downscaled along a long side without PIL's low-pass
  filter), the one approximation of this path (``--data-cache none`` crops the full image).

Two ways to read it:

* ``ds[i]`` -> ``(float tensor [3, S, S] normalized, int label)``: the TaskSpec contract,
  usable with any DataLoader (``"train-crop"``: a fresh random crop, drawn from torch's RNG);
* ``ds.get_batch(indices)`` -> ``(uint8 tensor [B, 3, S, S], int64 labels [B])``: the fast path,
  one gather from the memory map; move it to the GPU and call ``ds.normalize(x)`` there
  (``iter_batches`` does this with a background thread, and with ``"train-crop"`` draws the
  crops too: seeded by (seed, epoch, batch), so a resumed run sees the same crops).
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import io
import json
import math
import os
import queue
import tempfile
import threading
import time
import warnings
import zlib
from typing import Callable, Iterator, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from gift_fast.files import atomic_write_bytes, atomic_write_text, check_free_space

# 2: the "train-crop" layout and its geometry file (caches of version 1 are not read: rebuilt, with a warning)
CACHE_FORMAT_VERSION = 2
LAYOUTS = ("center-crop", "train-crop")

# The authors' training augmentation: RandomResizedCrop(S, scale=(0.9, 1.0)) with torchvision's
# default ratio (3/4, 4/3), bicubic (GIFT_CL clip/clip.py, _transform(is_train=True)).
TRAIN_CROP_SCALE = (0.9, 1.0)
TRAIN_CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
GEOMETRY_FIELDS = ("height", "width", "transposed", "resized_long", "left", "valid")

# open_clip.constants.OPENAI_DATASET_MEAN / _STD (tests check they are equal to open_clip's).
OPENAI_DATASET_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_DATASET_STD = (0.26862954, 0.26130258, 0.27577711)


# --------------------------------------------------------------------------- transforms
class _ToRGB:
    """PIL image -> RGB (grayscale MNIST, palette or RGBA images); a class so that it pickles."""

    def __call__(self, img):
        return img.convert("RGB") if getattr(img, "mode", "RGB") != "RGB" else img

    def __repr__(self) -> str:
        return "ToRGB()"


def clip_uint8_transform(image_size: int = 224):
    """The deterministic part of CLIP's eval preprocessing, to uint8 ``[3, S, S]``: resize the shorter
    side to S (bicubic, PIL), center-crop S x S, convert to RGB (as open_clip's ``image_transform``)."""
    from torchvision import transforms as T
    return T.Compose([
        T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(image_size),
        _ToRGB(),
        T.PILToTensor(),
    ])


def clip_eval_transform(image_size: int = 224, mean: Sequence[float] = OPENAI_DATASET_MEAN,
                        std: Sequence[float] = OPENAI_DATASET_STD):
    """CLIP's eval preprocessing, PIL image -> normalized float ``[3, S, S]`` (open_clip's
    ``image_transform(S, is_train=False)`` with the given mean/std)."""
    from torchvision import transforms as T
    return T.Compose([
        T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(image_size),
        _ToRGB(),
        T.ToTensor(),
        T.Normalize(mean=list(mean), std=list(std)),
    ])


def clip_train_transform(image_size: int = 224, mean: Sequence[float] = OPENAI_DATASET_MEAN,
                         std: Sequence[float] = OPENAI_DATASET_STD):
    """The authors' training preprocessing of task images, PIL image -> normalized float ``[3, S, S]``:
    ``RandomResizedCrop(S, scale=(0.9, 1.0), bicubic)``, RGB, to tensor, normalize (GIFT_CL's
    ``clip/clip.py`` ``_transform(is_train=True)``). Random: torch's global RNG."""
    from torchvision import transforms as T
    return T.Compose([
        T.RandomResizedCrop(image_size, scale=TRAIN_CROP_SCALE, ratio=TRAIN_CROP_RATIO,
                            interpolation=T.InterpolationMode.BICUBIC),
        _ToRGB(),
        T.ToTensor(),
        T.Normalize(mean=list(mean), std=list(std)),
    ])


def train_crop_width(image_size: int) -> int:
    """L: the long side the "train-crop" layout keeps. A crop of scale >= 0.9 and ratio <= 4/3 of an
    image whose long side exceeds 4/3 / 0.9 times its short side cannot succeed, so torchvision falls
    back to the central 4/3 crop: nothing outside the central ``S x L`` region is ever read."""
    return int(math.ceil(image_size * TRAIN_CROP_RATIO[1] / TRAIN_CROP_SCALE[0] - 1e-9))


def transform_description(image_size: int, layout: str = "center-crop") -> str:
    """What the cached pixels are: part of the cache key (change the transform, change this)."""
    if layout == "train-crop":
        return (f"landscape(transpose portrait)|resize-shorter={image_size}:bicubic:PIL|"
                f"center-crop-long<={train_crop_width(image_size)}|edge-pad|rgb|uint8-chw|geometry")
    return f"resize-shorter={image_size}:bicubic:PIL|center-crop={image_size}|rgb|uint8-chw"


def random_resized_crop_box(height: int, width: int, rng: np.random.Generator,
                            scale: Sequence[float] = TRAIN_CROP_SCALE,
                            ratio: Sequence[float] = TRAIN_CROP_RATIO) -> Tuple[int, int, int, int]:
    """``(top, left, h, w)`` in the pixels of a ``height x width`` image: torchvision's
    ``RandomResizedCrop.get_params``, step for step, drawing from ``rng`` instead of torch's global RNG
    (10 tries of an area in ``scale`` and a log-uniform ratio in ``ratio``, then the central crop)."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def boxes_in_cache(geometry: np.ndarray, boxes: np.ndarray, image_size: int) -> np.ndarray:
    """Crop boxes ``(top, left, h, w)`` in original pixels -> float ``(x0, y0, box_w, box_h)`` in the
    pixels of the "train-crop" cached (landscape) image, one row per image."""
    g = np.asarray(geometry, dtype=np.float64).reshape(-1, 6)
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    H, W, tr, long_res, left = g[:, 0], g[:, 1], g[:, 2] > 0, g[:, 3], g[:, 4]
    top, lft, h, w = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    # landscape frame: a transposed image's rows are the original's columns
    short, long = np.where(tr, W, H), np.where(tr, H, W)
    y0, x0 = np.where(tr, lft, top), np.where(tr, top, lft)
    bh, bw = np.where(tr, w, h), np.where(tr, h, w)
    sy, sx = image_size / short, long_res / long
    return np.stack([x0 * sx - left, y0 * sy, bw * sx, bh * sy], axis=1).astype(np.float32)


def crop_resize(x: torch.Tensor, boxes: torch.Tensor, transposed: torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 ``[B, 3, S, L]`` "train-crop" images, float boxes ``[B, 4]`` (``boxes_in_cache``) and
    ``transposed [B]`` -> uint8 ``[B, 3, S, S]``: each box resized to S x S (bicubic, pixel centres as
    PIL's resize of a crop), in the original orientation. Runs on x's device."""
    B, _, Hs, Ls = x.shape
    S = image_size
    dev = x.device
    b = boxes.to(dev, torch.float32)
    u = (torch.arange(S, device=dev, dtype=torch.float32) + 0.5) / S                  # output pixel centres
    gx = 2.0 * (b[:, 0:1] + u[None] * b[:, 2:3]) / Ls - 1.0                            # [B, S] along the long side
    gy = 2.0 * (b[:, 1:2] + u[None] * b[:, 3:4]) / Hs - 1.0                            # [B, S] along the short side
    tr = transposed.to(dev, torch.bool).view(B, 1, 1)
    # output (row p, column q): landscape x from q (from p when the image was transposed), y likewise
    grid_x = torch.where(tr, gx[:, :, None].expand(B, S, S), gx[:, None, :].expand(B, S, S))
    grid_y = torch.where(tr, gy[:, None, :].expand(B, S, S), gy[:, :, None].expand(B, S, S))
    grid = torch.stack([grid_x, grid_y], dim=-1)
    out = torch.nn.functional.grid_sample(x.to(torch.float32), grid, mode="bicubic", padding_mode="border",
                                          align_corners=False)
    return out.clamp_(0, 255).round_().to(torch.uint8)


def _to_landscape_uint8(img, image_size: int) -> Tuple[torch.Tensor, np.ndarray]:
    """PIL image (or uint8 ``[3, H, W]`` tensor) -> the "train-crop" row: uint8 ``[3, S, L]`` and its
    geometry (GEOMETRY_FIELDS)."""
    from PIL import Image
    from torchvision import transforms as T
    from torchvision.transforms import functional as TF

    if isinstance(img, torch.Tensor):
        img = TF.to_pil_image(img)
    img = img.convert("RGB") if img.mode != "RGB" else img
    W, H = img.size
    transposed = H > W
    if transposed:
        img = img.transpose(Image.Transpose.TRANSPOSE)
    S, L = image_size, train_crop_width(image_size)
    img = T.Resize(S, interpolation=T.InterpolationMode.BICUBIC)(img)
    long_res = img.size[0]
    left = int(round((long_res - L) / 2.0)) if long_res > L else 0      # torchvision's CenterCrop rounding
    valid = min(long_res, L)
    x = TF.pil_to_tensor(img)[:, :, left:left + valid]
    if valid < L:       # edge padding: bicubic taps at the right edge read the edge, not black
        x = torch.cat([x, x[:, :, -1:].expand(3, S, L - valid)], dim=2)
    return x.contiguous(), np.array([H, W, int(transposed), long_res, left, valid], dtype=np.int64)


def normalize_uint8(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 ``[..., 3, H, W]`` -> float32 ``(x / 255 - mean) / std`` on x's device; bit-identical to
    torchvision's ToTensor + Normalize (same operations, same order)."""
    m = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(3, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(3, 1, 1)
    return x.to(torch.float32).div_(255).sub_(m).div_(s)


# --------------------------------------------------------------------------- fingerprints
def files_fingerprint(paths: Sequence[str], root: Optional[str] = None) -> str:
    """sha256 of the ordered (path relative to root, size, mtime_ns) of ``paths``: changes when a
    file is added, removed, reordered, resized or touched. A missing file raises FileNotFoundError."""
    h = hashlib.sha256()
    for p in paths:
        st = os.stat(p)
        rel = os.path.relpath(p, root) if root else str(p)
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def labels_fingerprint(labels: Sequence[int]) -> str:
    return hashlib.sha256(np.asarray(labels, dtype=np.int64).tobytes()).hexdigest()


def cache_key(key_parts, image_size: int, layout: str = "center-crop") -> str:
    """16 hex digits naming a cache: format version + transform + the caller's key parts."""
    blob = json.dumps({"version": CACHE_FORMAT_VERSION, "transform": transform_description(image_size, layout),
                       "parts": key_parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- the cache
class _Uint8View(Dataset):
    """source[i] = (PIL image, label) -> (uint8 row, label, geometry) for the building DataLoader:
    ``[3, S, S]`` (center-crop) or ``[3, S, L]`` and its geometry (train-crop)."""

    def __init__(self, source: Dataset, image_size: int, layout: str = "center-crop"):
        self.source, self.image_size, self.tf, self.layout = source, image_size, None, layout

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i):
        img, label = self.source[i]
        if self.layout == "train-crop":
            img, geometry = _to_landscape_uint8(img, self.image_size)
            return img, int(label), torch.from_numpy(geometry)
        if not (isinstance(img, torch.Tensor) and img.dtype == torch.uint8):
            if self.tf is None:      # built on first use: uint8 sources need no torchvision
                self.tf = clip_uint8_transform(self.image_size)
            img = self.tf(img)
        return img, int(label), torch.zeros(6, dtype=torch.int64)


class CacheIntegrityError(ValueError):
    """A cached row that does not match its checksum (names the file and the row)."""


def _row_checksum(row: np.ndarray) -> int:
    # (a view of the row's bytes, no copy; zlib releases the GIL, so the prefetch thread overlaps it)
    return zlib.crc32(memoryview(np.ascontiguousarray(row)).cast("B"))


def _npy_bytes(array: np.ndarray) -> bytes:
    """The bytes ``np.save`` writes for ``array`` (a small side file of the cache, written atomically)."""
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class CachedImageDataset(Dataset):
    """A data set's CLIP-preprocessed pixels, decoded once into a uint8 memory map.

    ``source``: a Dataset yielding ``(PIL image, int label)`` (or uint8 ``[3, S, S]`` tensors), or a
    zero-argument callable returning one; a callable is called only when the cache must be built.
    ``key_parts``: JSON-able description of the source (name, split, file fingerprint...): the cache
    is reused only when it, ``image_size`` and the format version are unchanged.
    ``mean``/``std``: used by ``__getitem__`` and ``normalize``.
    ``layout``: ``"center-crop"`` (deterministic) or ``"train-crop"`` (the training augmentation;
    module docstring).
    """

    def __init__(self, source: Union[Dataset, Callable[[], Dataset]], cache_dir: str, *, key_parts,
                 image_size: int = 224, mean: Sequence[float] = OPENAI_DATASET_MEAN,
                 std: Sequence[float] = OPENAI_DATASET_STD, name: str = "images",
                 num_workers: Optional[int] = None, build_batch_size: int = 64, progress: bool = True,
                 layout: str = "center-crop"):
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        self.layout = layout
        if not isinstance(image_size, int) or image_size <= 0:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ValueError(f"mean and std need 3 values each (std > 0); got mean={mean!r}, std={std!r}")
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
        self.name, self.image_size = safe, image_size
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.key = cache_key(key_parts, image_size, layout)
        self.width = train_crop_width(image_size) if layout == "train-crop" else image_size
        self.cache_dir = os.path.abspath(cache_dir)
        os.makedirs(self.cache_dir, exist_ok=True)
        stem = os.path.join(self.cache_dir, f"{safe}-{self.key}")
        self.images_path, self.labels_path, self.meta_path = stem + ".images.npy", stem + ".labels.npy", stem + ".json"
        self.crc_path = stem + ".crc32.npy"
        self.geometry_path = stem + ".geometry.npy"
        self.built = False          # True when this object built the cache (a miss)
        self._mm = None
        problem = self._validate()
        if problem is not None:
            if problem != "absent":
                warnings.warn(f"cache {stem}.* is unusable ({problem}); rebuilding it", RuntimeWarning)
            else:
                self._warn_other_caches()
            src = source() if callable(source) and not isinstance(source, Dataset) else source
            self._build(src, key_parts, num_workers, build_batch_size, progress)
            problem = self._validate()
            if problem is not None:
                raise RuntimeError(f"the cache just written to {stem}.* does not validate: {problem}")
        self.labels = np.load(self.labels_path)
        self.geometry = np.load(self.geometry_path) if layout == "train-crop" else None
        self._crc = np.load(self.crc_path)
        self._verified = np.zeros(len(self.labels), dtype=bool)   # rows whose CRC was checked in this process

    def _warn_other_caches(self) -> None:
        """Say which caches of the same name this one does not reuse: an older format version is never
        read (its layout differs), and its files only take disk space."""
        here = os.path.basename(self.meta_path)
        for meta_path in sorted(glob.glob(os.path.join(self.cache_dir, f"{self.name}-*.json"))):
            if os.path.basename(meta_path) == here or ".tmp-" in meta_path:
                continue
            try:
                with open(meta_path) as f:
                    meta = json.load(f)
            except (OSError, ValueError):
                continue
            if meta.get("version") != CACHE_FORMAT_VERSION:
                stem = meta_path[: -len(".json")]
                warnings.warn(
                    f"{stem}.* is a cache of format version {meta.get('version')} ({meta.get('transform')}); this "
                    f"version of gift-fast reads format {CACHE_FORMAT_VERSION} only (training images are now "
                    f"cached for the random-crop augmentation), so it is not used and a new cache is built. "
                    f"Delete {stem}.* to free the space.", RuntimeWarning)

    # -- validation / opening
    def _validate(self) -> Optional[str]:
        """None when the finished cache is there and sound; else what is wrong ("absent" if nothing)."""
        if not os.path.exists(self.meta_path):
            return "absent"
        try:
            with open(self.meta_path) as f:
                meta = json.load(f)
            n, s = int(meta["n"]), self.image_size
            if meta.get("version") != CACHE_FORMAT_VERSION:
                return (f"it is format version {meta.get('version')}, this version of gift-fast reads "
                        f"{CACHE_FORMAT_VERSION}")
            if meta.get("key") != self.key or meta.get("layout", "center-crop") != self.layout:
                return "its metadata names another key or layout"
            with open(self.images_path, "rb") as f:
                major, _ = np.lib.format.read_magic(f)
                hdr = (np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0)(f)
                offset = f.tell()
            shape, fortran, dtype = hdr
            L = self.width
            if tuple(shape) != (n, 3, s, L) or dtype != np.uint8 or fortran:
                return f"images header says {shape} {dtype}, expected ({n}, 3, {s}, {L}) uint8"
            size, want = os.path.getsize(self.images_path), offset + n * 3 * s * L
            if size != want:
                return f"images file has {size} bytes, expected {want} (truncated or overwritten)"
            labels = np.load(self.labels_path)
            if labels.shape != (n,) or labels.dtype != np.int64:
                return f"labels are {labels.shape} {labels.dtype}, expected ({n},) int64"
            if "labels_sha256" not in meta or not os.path.exists(self.crc_path):
                return "it was made before per-row checksums"
            if labels_fingerprint(labels) != meta["labels_sha256"]:
                return "the labels do not match their checksum"
            crc = np.load(self.crc_path)
            if crc.shape != (n,) or crc.dtype != np.uint32:
                return f"row checksums are {crc.shape} {crc.dtype}, expected ({n},) uint32"
            if self.layout == "train-crop":
                geometry = np.load(self.geometry_path)
                if geometry.shape != (n, 6) or geometry.dtype != np.int64:
                    return f"geometry is {geometry.shape} {geometry.dtype}, expected ({n}, 6) int64"
            if n and _row_checksum(self._open()[n - 1]) != meta["last_row_crc32"]:
                return "the last image row does not match its checksum"
        except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
            return f"{type(e).__name__}: {e}"
        finally:
            self._mm = None
        return None

    def _open(self) -> np.ndarray:
        if self._mm is None:
            self._mm = np.load(self.images_path, mmap_mode="r")
        return self._mm

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_mm"] = None       # DataLoader workers reopen the memory map themselves
        return state

    # -- building
    def _clean_stale_tmp(self) -> None:
        """Remove the tmp files of this cache that a killed build left: the images' ``<name>.tmp-<pid>`` and
        ``files.tmp_path``'s ``.<name>.tmp-<pid>-<thread>`` (only those of processes that no longer run)."""
        prefix = os.path.basename(self.meta_path)[: -len(".json")]
        for entry in os.listdir(self.cache_dir):
            if entry.lstrip(".").startswith(prefix) and ".tmp-" in entry:
                try:
                    pid = int(entry.rsplit(".tmp-", 1)[1].split("-")[0])
                except ValueError:
                    continue
                if pid != os.getpid() and not _pid_alive(pid):
                    try:
                        os.remove(os.path.join(self.cache_dir, entry))
                    except OSError:
                        pass

    def _build(self, source: Dataset, key_parts, num_workers, batch_size, progress) -> None:
        self._clean_stale_tmp()
        n, s, L = len(source), self.image_size, self.width
        if n == 0:
            raise ValueError(f"cannot cache {self.name}: the source data set is empty")
        if num_workers is None:
            num_workers = min(8, os.cpu_count() or 1) if n > 256 else 0
        # writes through a memory map into a full disk kill the process with SIGBUS (no Python error, nothing
        # saved): check before writing
        check_free_space(self.cache_dir, n * 3 * s * L + 56 * n, what=f"caching {self.name} ({n} images at {s}px)",
                         fix="put the cache on a larger disk (--data-cache DIR / --cache-dir DIR), or decode every "
                             "time (--data-cache none)")
        # The images go to a memory-mapped .npy of their own tmp name (the finished file is this one, renamed); the
        # small files after them go through files.atomic_write_*, the metadata last: its presence marks a finished
        # cache, so a build killed at any point leaves none (``_validate`` says "absent" or what is wrong).
        tmp_images = self.images_path + f".tmp-{os.getpid()}"
        try:
            images = np.lib.format.open_memmap(tmp_images, mode="w+", dtype=np.uint8, shape=(n, 3, s, L))
            labels = np.empty(n, dtype=np.int64)
            geometry = np.zeros((n, 6), dtype=np.int64)
            crc = np.empty(n, dtype=np.uint32)
            loader = DataLoader(_Uint8View(source, s, self.layout), batch_size=batch_size, shuffle=False,
                                num_workers=num_workers, collate_fn=_collate_uint8)
            pos = 0
            with tqdm(total=n, desc=f"caching {self.name} ({s}px)", unit="img", disable=not progress) as bar:
                for x, y, geo in loader:
                    if x.shape[1:] != (3, s, L):
                        raise ValueError(f"source image {pos} became {tuple(x.shape[1:])}, expected (3, {s}, {L})")
                    xs = x.numpy()
                    images[pos:pos + len(x)] = xs
                    crc[pos:pos + len(x)] = [_row_checksum(r) for r in xs]
                    labels[pos:pos + len(y)] = y.numpy()
                    geometry[pos:pos + len(y)] = geo.numpy()
                    pos += len(x)
                    bar.update(len(x))
            if pos != n:
                raise RuntimeError(f"the source yielded {pos} images, but len() says {n}")
            images.flush()             # (msync: on disk before the rename)
            last_crc = _row_checksum(images[n - 1]) if n else 0
            del images
            meta = {"version": CACHE_FORMAT_VERSION, "key": self.key, "n": n, "image_size": s, "layout": self.layout,
                    "transform": transform_description(s, self.layout), "key_parts": key_parts,
                    "last_row_crc32": last_crc, "labels_sha256": labels_fingerprint(labels)}
            os.replace(tmp_images, self.images_path)
            atomic_write_bytes(self.labels_path, _npy_bytes(labels))
            if self.layout == "train-crop":
                atomic_write_bytes(self.geometry_path, _npy_bytes(geometry))
            atomic_write_bytes(self.crc_path, _npy_bytes(crc))
            atomic_write_text(self.meta_path, json.dumps(meta, indent=1, default=str))   # last: the finished mark
            self.built = True
        finally:
            if os.path.exists(tmp_images):
                os.remove(tmp_images)

    # -- access
    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, int]:
        n = len(self.labels)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} cached images")
        row = np.array(self._open()[i])
        self._verify_rows(np.array([i % n]), row[None])
        x = torch.from_numpy(row)
        if self.layout == "train-crop":     # a fresh crop each access, from torch's RNG (as torchvision's)
            rng = np.random.default_rng(int(torch.randint(0, 2 ** 62, (1,))))
            boxes, transposed = self.draw_boxes([i], rng)
            x = crop_resize(x[None], boxes, transposed, self.image_size)[0]
        return normalize_uint8(x, self.mean, self.std), int(self.labels[i])

    def _verify_rows(self, idx: np.ndarray, rows: np.ndarray) -> None:
        """Check rows read for the first time in this process against their CRC-32 (once per row)."""
        todo = np.flatnonzero(~self._verified[idx])
        for j in todo:
            i = int(idx[j])
            if self._verified[i]:
                continue                  # a repeated index of this batch
            if _row_checksum(rows[j]) != int(self._crc[i]):
                raise CacheIntegrityError(
                    f"cache {self.images_path}: image row {i} does not match its checksum (the file was changed or "
                    f"the disk damaged it): delete {self.meta_path} and the cache is rebuilt on the next run")
            self._verified[i] = True

    def draw_boxes(self, indices, rng: np.random.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
        """"train-crop": one RandomResizedCrop box per index (in the original image's pixels, as
        torchvision draws it), as ``crop_resize``'s float boxes ``[B, 4]`` and ``transposed [B]``."""
        if self.layout != "train-crop":
            raise ValueError(f"cache {self.name} has the {self.layout!r} layout: it has no random crops")
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        geo = self.geometry[idx]
        raw = np.array([random_resized_crop_box(int(h), int(w), rng) for h, w in geo[:, :2]],
                       dtype=np.int64).reshape(-1, 4)
        return (torch.from_numpy(boxes_in_cache(geo, raw, self.image_size)),
                torch.from_numpy(geo[:, 2] > 0))

    def augment(self, x: torch.Tensor, boxes: torch.Tensor, transposed: torch.Tensor) -> torch.Tensor:
        """uint8 "train-crop" rows (any device) + their boxes -> normalized float32 ``[B, 3, S, S]``."""
        return normalize_uint8(crop_resize(x, boxes, transposed, self.image_size), self.mean, self.std)

    def get_batch(self, indices) -> Tuple[torch.Tensor, torch.Tensor]:
        """uint8 ``[B, 3, S, S]`` (``"train-crop"``: ``[B, 3, S, L]``, to crop with ``draw_boxes`` and
        ``augment``) and int64 ``[B]`` for ``indices`` (any order, repeats allowed), read with one
        sorted gather from the memory map. Normalize on the GPU with ``self.normalize``."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self.labels)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"indices out of range for {n} cached images")
        idx = np.where(idx < 0, idx + n, idx)
        order = np.argsort(idx, kind="stable")
        rows = self._open()[idx[order]]                 # sorted gather: sequential reads
        self._verify_rows(idx[order], rows)
        out = np.empty_like(rows)
        out[order] = rows
        return torch.from_numpy(out), torch.from_numpy(self.labels[idx].copy())

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 batch (any device) -> normalized float32, bit-identical to ``self[i][0]``."""
        return normalize_uint8(x, self.mean, self.std)

    def iter_batches(self, batch_size: int, *, shuffle: bool = True, seed: int = 0, drop_last: bool = True,
                     epochs: Optional[int] = 1, device: Union[str, torch.device, None] = None,
                     prefetch: int = 2, rows: Optional[slice] = None) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """Normalized ``(float [B, 3, S, S], int64 [B])`` batches on ``device``; a background thread
        gathers the next batches (pinned memory when ``device`` is CUDA) while the GPU works.
        ``epochs=None`` repeats forever (reshuffled each epoch with a seed derived from ``seed``).
        ``rows``: only these rows of each batch are read (one process's share of a global batch).
        ``"train-crop"`` layout: each batch is randomly cropped (the training augmentation), the boxes
        drawn from a generator seeded by (seed, epoch, batch), for the global batch before ``rows``."""
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        dev = torch.device(device) if device is not None else torch.device("cpu")
        pin = dev.type == "cuda"
        n = len(self)
        crops = getattr(self, "layout", "center-crop") == "train-crop"
        q: "queue.Queue" = queue.Queue(maxsize=max(1, prefetch))
        stop = threading.Event()
        done = object()

        def produce():
            try:
                epoch = 0
                while epochs is None or epoch < epochs:
                    order = (np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n))
                    end = n - n % batch_size if drop_last else n
                    for a in range(0, end, batch_size):
                        idx = order[a:a + batch_size]
                        x, y = self.get_batch(idx if rows is None else idx[rows])
                        item = (x, y)
                        if crops:
                            boxes, tr = self.draw_boxes(idx, np.random.default_rng([seed, epoch, a, 0x52524333]))
                            if rows is not None:
                                boxes, tr = boxes[rows], tr[rows]
                            item = (x, y, boxes, tr)
                        if pin:
                            item = tuple(v.pin_memory() for v in item)
                        while not stop.is_set():
                            try:
                                q.put(item, timeout=0.1)
                                break
                            except queue.Full:
                                continue
                        if stop.is_set():
                            return
                    epoch += 1
                    if end == 0:
                        break
                q.put(done)
            except BaseException as e:   # hand the error to the consumer
                q.put(e)

        t = threading.Thread(target=produce, daemon=True)
        t.start()
        try:
            while True:
                item = q.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                x, y = item[0].to(dev, non_blocking=pin), item[1].to(dev, non_blocking=pin)
                if crops:
                    yield self.augment(x, item[2], item[3]), y
                else:
                    yield self.normalize(x), y
        finally:
            # join the producer: a daemon thread still inside pin_memory() when the
            # interpreter exits aborts the process ("terminate called without an active exception")
            stop.set()
            t.join(timeout=10)


def _collate_uint8(batch):
    xs, ys, geos = zip(*batch)
    return torch.stack(xs), torch.tensor(ys, dtype=torch.int64), torch.stack(geos)


def _bench(argv=None) -> None:
    """``python -m gift_fast.data.cache --bench``: read throughput of a synthetic cache (no data set
    needed): the uint8 gather alone, and ``iter_batches`` to the device with normalization there."""
    p = argparse.ArgumentParser(description=_bench.__doc__)
    p.add_argument("--bench", action="store_true", required=True)
    p.add_argument("--n", type=int, default=4096, help="images in the synthetic cache")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)

    class Noise(Dataset):
        def __len__(self):
            return a.n

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            return torch.randint(0, 256, (3, a.image_size, a.image_size), dtype=torch.uint8, generator=g), i % 100

    with tempfile.TemporaryDirectory() as d:
        ds = CachedImageDataset(Noise(), d, key_parts=["bench"], image_size=a.image_size, name="bench", num_workers=0)
        rng = np.random.default_rng(0)
        t = time.perf_counter()
        for _ in range(a.batches):
            ds.get_batch(rng.integers(0, a.n, a.batch_size))
        dt = time.perf_counter() - t
        print(f"get_batch uint8 gather: {a.batches * a.batch_size / dt:,.0f} img/s "
              f"({dt / a.batches * 1e3:.2f} ms per batch of {a.batch_size})")
        k, t = 0, time.perf_counter()
        batches = ds.iter_batches(a.batch_size, epochs=None, device=a.device)
        with contextlib.closing(batches):       # stops and joins the prefetch thread
            for x, y in batches:
                k += 1
                if k == a.batches:
                    break
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        dt = time.perf_counter() - t
        print(f"iter_batches to {a.device} + normalize there: {k * a.batch_size / dt:,.0f} img/s "
              f"({dt / k * 1e3:.2f} ms per batch; the training step budget is ~45 ms)")


if __name__ == "__main__":
    _bench()
