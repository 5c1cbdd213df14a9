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

Two ways to read it:

* ``ds[i]`` -> ``(float tensor [3, S, S] normalized, int label)``: the TaskSpec contract,
  usable with any DataLoader;
* ``ds.get_batch(indices)`` -> ``(uint8 tensor [B, 3, S, S], int64 labels [B])``: the fast path,
  one gather from the memory map; move it to the GPU and call ``ds.normalize(x)`` there
  (``iter_batches`` does this with a background thread).
"""
from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
import warnings
import zlib
from typing import Callable, Iterator, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

CACHE_FORMAT_VERSION = 1

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


def transform_description(image_size: int) -> str:
    """What the cached pixels are: part of the cache key (change the transform, change this)."""
    return f"resize-shorter={image_size}:bicubic:PIL|center-crop={image_size}|rgb|uint8-chw"


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


def cache_key(key_parts, image_size: int) -> str:
    """16 hex digits naming a cache: format version + transform + the caller's key parts."""
    blob = json.dumps({"version": CACHE_FORMAT_VERSION, "transform": transform_description(image_size),
                       "parts": key_parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- the cache
class _Uint8View(Dataset):
    """source[i] = (PIL image, label) -> (uint8 [3, S, S], label) for the building DataLoader."""

    def __init__(self, source: Dataset, image_size: int):
        self.source, self.image_size, self.tf = source, image_size, None

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i):
        img, label = self.source[i]
        if not (isinstance(img, torch.Tensor) and img.dtype == torch.uint8):
            if self.tf is None:      # built on first use: uint8 sources need no torchvision
                self.tf = clip_uint8_transform(self.image_size)
            img = self.tf(img)
        return img, int(label)


class CacheIntegrityError(ValueError):
    """A cached row that does not match its checksum (names the file and the row)."""


def _row_checksum(row: np.ndarray) -> int:
    # (a view of the row's bytes, no copy; zlib releases the GIL, so the prefetch thread overlaps it)
    return zlib.crc32(memoryview(np.ascontiguousarray(row)).cast("B"))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_free_space(folder: str, need_bytes: int, what: str, margin: float = 1.05) -> None:
    """Refuse to start a cache file that cannot fit: writes through a memory map into a full disk
    kill the process with SIGBUS (no Python error, nothing saved), so check before writing."""
    import shutil

    free = shutil.disk_usage(folder).free
    if free < need_bytes * margin:
        gb = lambda b: f"{b / 2 ** 30:.1f} GB"  # noqa: E731
        raise OSError(f"{what} needs {gb(need_bytes)} in {folder}, but only {gb(free)} are free: free some space, "
                      f"put the cache on a larger disk (--data-cache DIR / --cache-dir DIR), or decode every time "
                      f"(--data-cache none)")


class CachedImageDataset(Dataset):
    """A data set's CLIP-preprocessed pixels, decoded once into a uint8 memory map.

    ``source``: a Dataset yielding ``(PIL image, int label)`` (or uint8 ``[3, S, S]`` tensors), or a
    zero-argument callable returning one; a callable is called only when the cache must be built.
    ``key_parts``: JSON-able description of the source (name, split, file fingerprint...): the cache
    is reused only when it, ``image_size`` and the format version are unchanged.
    ``mean``/``std``: used by ``__getitem__`` and ``normalize``.
    """

    def __init__(self, source: Union[Dataset, Callable[[], Dataset]], cache_dir: str, *, key_parts,
                 image_size: int = 224, mean: Sequence[float] = OPENAI_DATASET_MEAN,
                 std: Sequence[float] = OPENAI_DATASET_STD, name: str = "images",
                 num_workers: Optional[int] = None, build_batch_size: int = 64, progress: bool = True):
        if not isinstance(image_size, int) or image_size <= 0:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ValueError(f"mean and std need 3 values each (std > 0); got mean={mean!r}, std={std!r}")
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
        self.name, self.image_size = safe, image_size
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.key = cache_key(key_parts, image_size)
        self.cache_dir = os.path.abspath(cache_dir)
        os.makedirs(self.cache_dir, exist_ok=True)
        stem = os.path.join(self.cache_dir, f"{safe}-{self.key}")
        self.images_path, self.labels_path, self.meta_path = stem + ".images.npy", stem + ".labels.npy", stem + ".json"
        self.crc_path = stem + ".crc32.npy"
        self.built = False          # True when this object built the cache (a miss)
        self._mm = None
        problem = self._validate()
        if problem is not None:
            if problem != "absent":
                warnings.warn(f"cache {stem}.* is unusable ({problem}); rebuilding it", RuntimeWarning)
            src = source() if callable(source) and not isinstance(source, Dataset) else source
            self._build(src, key_parts, num_workers, build_batch_size, progress)
            problem = self._validate()
            if problem is not None:
                raise RuntimeError(f"the cache just written to {stem}.* does not validate: {problem}")
        self.labels = np.load(self.labels_path)
        self._crc = np.load(self.crc_path)
        self._verified = np.zeros(len(self.labels), dtype=bool)   # rows whose CRC was checked in this process

    # -- validation / opening
    def _validate(self) -> Optional[str]:
        """None when the finished cache is there and sound; else what is wrong ("absent" if nothing)."""
        if not os.path.exists(self.meta_path):
            return "absent"
        try:
            with open(self.meta_path) as f:
                meta = json.load(f)
            n, s = int(meta["n"]), self.image_size
            if meta.get("key") != self.key or meta.get("version") != CACHE_FORMAT_VERSION:
                return "its metadata names another key or format version"
            with open(self.images_path, "rb") as f:
                major, _ = np.lib.format.read_magic(f)
                hdr = (np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0)(f)
                offset = f.tell()
            shape, fortran, dtype = hdr
            if tuple(shape) != (n, 3, s, s) or dtype != np.uint8 or fortran:
                return f"images header says {shape} {dtype}, expected ({n}, 3, {s}, {s}) uint8"
            size, want = os.path.getsize(self.images_path), offset + n * 3 * s * s
            if size != want:
                return f"images file has {size} bytes, expected {want} (truncated or overwritten)"
            labels = np.load(self.labels_path)
            if labels.shape != (n,) or labels.dtype != np.int64:
                return f"labels are {labels.shape} {labels.dtype}, expected ({n},) int64"
            if "labels_sha256" not in meta or not os.path.exists(self.crc_path):
                return "it was made before per-row checksums"
            if hashlib.sha256(labels.tobytes()).hexdigest() != meta["labels_sha256"]:
                return "the labels do not match their checksum"
            crc = np.load(self.crc_path)
            if crc.shape != (n,) or crc.dtype != np.uint32:
                return f"row checksums are {crc.shape} {crc.dtype}, expected ({n},) uint32"
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
        prefix = os.path.basename(self.meta_path)[: -len(".json")]
        for entry in os.listdir(self.cache_dir):
            if entry.startswith(prefix) and ".tmp-" in entry:
                try:
                    pid = int(entry.rsplit(".tmp-", 1)[1])
                except ValueError:
                    continue
                if pid != os.getpid() and not _pid_alive(pid):
                    try:
                        os.remove(os.path.join(self.cache_dir, entry))
                    except OSError:
                        pass

    def _build(self, source: Dataset, key_parts, num_workers, batch_size, progress) -> None:
        from tqdm.auto import tqdm
        self._clean_stale_tmp()
        n, s = len(source), self.image_size
        if n == 0:
            raise ValueError(f"cannot cache {self.name}: the source data set is empty")
        if num_workers is None:
            num_workers = min(8, os.cpu_count() or 1) if n > 256 else 0
        check_free_space(self.cache_dir, n * 3 * s * s + 8 * n, what=f"caching {self.name} ({n} images at {s}px)")
        tag = f".tmp-{os.getpid()}"
        tmp_images, tmp_labels, tmp_meta = self.images_path + tag, self.labels_path + tag, self.meta_path + tag
        tmp_crc = self.crc_path + tag
        try:
            # A .npy from the start, so that the finished file is this one, renamed.
            images = np.lib.format.open_memmap(tmp_images, mode="w+", dtype=np.uint8, shape=(n, 3, s, s))
            labels = np.empty(n, dtype=np.int64)
            crc = np.empty(n, dtype=np.uint32)
            loader = DataLoader(_Uint8View(source, s), batch_size=batch_size, shuffle=False,
                                num_workers=num_workers, collate_fn=_collate_uint8)
            pos = 0
            with tqdm(total=n, desc=f"caching {self.name} ({s}px)", unit="img", disable=not progress) as bar:
                for x, y in loader:
                    if x.shape[1:] != (3, s, s):
                        raise ValueError(f"source image {pos} became {tuple(x.shape[1:])}, expected (3, {s}, {s})")
                    xs = x.numpy()
                    images[pos:pos + len(x)] = xs
                    labels[pos:pos + len(y)] = y.numpy()
                    crc[pos:pos + len(x)] = [_row_checksum(r) for r in xs]
                    pos += len(x)
                    bar.update(len(x))
            if pos != n:
                raise RuntimeError(f"the source yielded {pos} images, but len() says {n}")
            images.flush()
            last_crc = _row_checksum(images[n - 1]) if n else 0
            del images
            with open(tmp_labels, "wb") as f:
                np.save(f, labels)
            with open(tmp_crc, "wb") as f:
                np.save(f, crc)
            meta = {"version": CACHE_FORMAT_VERSION, "key": self.key, "n": n, "image_size": s,
                    "transform": transform_description(s), "key_parts": key_parts, "last_row_crc32": last_crc,
                    "labels_sha256": hashlib.sha256(labels.tobytes()).hexdigest()}
            with open(tmp_meta, "w") as f:
                json.dump(meta, f, indent=1, default=str)
            os.replace(tmp_images, self.images_path)
            os.replace(tmp_labels, self.labels_path)
            os.replace(tmp_crc, self.crc_path)
            os.replace(tmp_meta, self.meta_path)      # last: its presence marks a finished cache
            self.built = True
        finally:
            for p in (tmp_images, tmp_labels, tmp_meta, tmp_crc):
                if os.path.exists(p):
                    os.remove(p)

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

    def get_batch(self, indices) -> Tuple[torch.Tensor, torch.Tensor]:
        """uint8 ``[B, 3, S, S]`` and int64 ``[B]`` for ``indices`` (any order, repeats allowed), read
        with one sorted gather from the memory map. Normalize on the GPU with ``self.normalize``."""
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
        ``rows``: only these rows of each batch are read (one process's share of a global batch)."""
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        dev = torch.device(device) if device is not None else torch.device("cpu")
        pin = dev.type == "cuda"
        n = len(self)
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
                        if pin:
                            x, y = x.pin_memory(), y.pin_memory()
                        while not stop.is_set():
                            try:
                                q.put((x, y), timeout=0.1)
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
                x, y = item
                yield self.normalize(x.to(dev, non_blocking=pin)), y.to(dev, non_blocking=pin)
        finally:
            # join the producer: a daemon thread still inside pin_memory() when the
            # interpreter exits aborts the process ("terminate called without an active exception")
            stop.set()
            t.join(timeout=10)


def _collate_uint8(batch):
    xs, ys = zip(*batch)
    return torch.stack(xs), torch.tensor(ys, dtype=torch.int64)


def _bench(argv=None) -> None:
    """``python -m gift_fast.data.cache --bench``: read throughput of a synthetic cache (no data set
    needed): the uint8 gather alone, and ``iter_batches`` to the device with normalization there."""
    import argparse
    import contextlib
    import tempfile
    import time
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
