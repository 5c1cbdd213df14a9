"""Fake data sets for the tests: tiny copies of the 11 MTIL data sets and of the class-incremental
benchmarks (CIFAR100, TinyImageNet), in the exact folder layouts torchvision and
``gift_fast.data.cil`` read. Test helpers, not part of the library.

Every layout of ``gift_fast.data.mtil.LAYOUTS`` gets a few small random images, all classes named
(so that ``check_classes`` passes), and labels known in advance.

``make_fake_mtil_root(root)`` returns ``{task: (train_size, test_size)}``;
``make_fake_cifar100_root(root)`` writes every CIFAR100 class; ``make_fake_tiny_imagenet_root(root)``
writes a ``tiny-imagenet-200`` folder and returns its wnids. CIFAR-100 and Flowers102 are md5-checked
by torchvision; fake files cannot pass that, so reading them needs ``relaxed_md5_checks()`` (a context
manager that makes those two checks existence checks), which the tests wrap around their reads.

Test modules import it as ``from fake_datasets import ...`` (pytest puts ``tests/`` on ``sys.path``; a
script run as ``python tests/cli_offline.py`` has its own folder there too).
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import struct
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import scipy.io
import torchvision.datasets.cifar as cifar
import torchvision.datasets.flowers102 as flowers
from PIL import Image

from gift_fast.config import MTIL_TASKS
from gift_fast.data.cil import imagenet_wnids
from gift_fast.data.mtil import classnames

EUROSAT_FOLDERS = ("AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture",
                   "PermanentCrop", "Residential", "River", "SeaLake")


def _save_jpeg(path: str, rng: np.random.Generator, mode: str = "RGB") -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    w, h = int(rng.integers(12, 40)), int(rng.integers(12, 40))    # odd aspect ratios on purpose
    if mode == "L":
        arr = rng.integers(0, 256, (h, w), dtype=np.uint8)
    else:
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr, mode).save(path, quality=90)


def _raw(name: str) -> str:
    """A raw data-set class name that cleans to ``name`` (spaces back to underscores)."""
    return name.replace(" ", "_")


def _savemat(path: str, obj: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    scipy.io.savemat(path, obj)


def _make_aircraft(root, rng, names, n_train=6, n_test=4):
    d = os.path.join(root, "fgvc-aircraft-2013b", "data")
    os.makedirs(os.path.join(d, "images"), exist_ok=True)
    with open(os.path.join(d, "variants.txt"), "w") as f:
        f.write("".join(n + "\n" for n in names))
    k = 0
    for split, count in (("train", n_train), ("test", n_test)):
        lines = []
        for i in range(count):
            k += 1
            image_id = f"{1000000 + k}"
            _save_jpeg(os.path.join(d, "images", image_id + ".jpg"), rng)
            lines.append(f"{image_id} {names[(k * 7) % len(names)]}\n")
        with open(os.path.join(d, f"images_variant_{split}.txt"), "w") as f:
            f.write("".join(lines))
    return n_train, n_test


def _make_caltech(root, rng, names):
    d = os.path.join(root, "caltech101", "101_ObjectCategories")
    folders = ["BACKGROUND_Google"] + [f"cat{i:03d}" for i in range(len(names))]
    n = 0
    for j, c in enumerate(folders):
        for k in range(1, 2 + (j % 2)):     # 1 or 2 images a folder, numbered from 0001
            _save_jpeg(os.path.join(d, c, f"image_{k:04d}.jpg"), rng, "L" if k == 2 else "RGB")
            n += 0 if c == "BACKGROUND_Google" else 1
    n_train = int(0.8 * n)
    return n_train, n - n_train


def _make_cifar100(root, rng, names, n_train=12, n_test=8):
    d = os.path.join(root, "cifar-100-python")
    os.makedirs(d, exist_ok=True)
    for split, count in (("train", n_train), ("test", n_test)):
        entry = {"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
                 "fine_labels": [int(x) for x in rng.integers(0, len(names), count)],
                 "coarse_labels": [0] * count}
        with open(os.path.join(d, split), "wb") as f:
            pickle.dump(entry, f)
    with open(os.path.join(d, "meta"), "wb") as f:
        pickle.dump({"fine_label_names": [_raw(n) for n in names], "coarse_label_names": ["x"] * 20}, f)
    return n_train, n_test


def _make_dtd(root, rng, names):
    d = os.path.join(root, "dtd", "dtd")
    for split in ("train", "test"):
        lines = []
        for c in names:
            rel = f"{c}/{c}_{split}_0001.jpg"
            _save_jpeg(os.path.join(d, "images", rel), rng)
            lines.append(rel + "\n")
        os.makedirs(os.path.join(d, "labels"), exist_ok=True)
        with open(os.path.join(d, "labels", f"{split}1.txt"), "w") as f:
            f.write("".join(lines))
    return len(names), len(names)


def _make_eurosat(root, rng, names, per_class=3):
    d = os.path.join(root, "eurosat", "2750")
    for c in EUROSAT_FOLDERS:
        for k in range(1, per_class + 1):
            _save_jpeg(os.path.join(d, c, f"{c}_{k}.jpg"), rng)
    n = per_class * len(EUROSAT_FOLDERS)
    return int(0.8 * n), n - int(0.8 * n)


def _make_flowers(root, rng, names, n_train=5, n_val=2, n_test=4):
    d = os.path.join(root, "flowers-102")
    n = n_train + n_val + n_test
    for i in range(1, n + 1):
        _save_jpeg(os.path.join(d, "jpg", f"image_{i:05d}.jpg"), rng)
    labels = rng.integers(1, len(names) + 1, n)      # 1-based, as in imagelabels.mat
    _savemat(os.path.join(d, "imagelabels.mat"), {"labels": labels.reshape(1, -1)})
    ids = np.arange(1, n + 1)
    _savemat(os.path.join(d, "setid.mat"), {"trnid": ids[:n_train].reshape(1, -1),
                                            "valid": ids[n_train:n_train + n_val].reshape(1, -1),
                                            "tstid": ids[n_train + n_val:].reshape(1, -1)})
    return n_train, n_test


def _make_food(root, rng, names, n_train=7, n_test=5):
    d = os.path.join(root, "food-101")
    raw = [_raw(n) for n in names]
    for split, count in (("train", n_train), ("test", n_test)):
        meta = {c: [] for c in raw}
        for i in range(count):
            c = raw[(i * 13 + len(split)) % len(raw)]
            rel = f"{c}/{split}{i}"
            _save_jpeg(os.path.join(d, "images", rel + ".jpg"), rng)
            meta[c].append(rel)
        os.makedirs(os.path.join(d, "meta"), exist_ok=True)
        with open(os.path.join(d, "meta", f"{split}.json"), "w") as f:
            json.dump(meta, f)
    return n_train, n_test


def _write_idx(path: str, arr: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    magic = 0x0800 + arr.ndim      # type 0x08 = uint8
    with open(path, "wb") as f:
        f.write(struct.pack(">I", magic))
        f.write(struct.pack(">" + "I" * arr.ndim, *arr.shape))
        f.write(np.ascontiguousarray(arr, dtype=np.uint8).tobytes())


def _make_mnist(root, rng, names, n_train=10, n_test=6):
    d = os.path.join(root, "MNIST", "raw")
    for prefix, count in (("train", n_train), ("t10k", n_test)):
        _write_idx(os.path.join(d, f"{prefix}-images-idx3-ubyte"), rng.integers(0, 256, (count, 28, 28), dtype=np.uint8))
        _write_idx(os.path.join(d, f"{prefix}-labels-idx1-ubyte"), rng.integers(0, 10, count).astype(np.uint8))
    return n_train, n_test


def _make_pets(root, rng, names):
    d = os.path.join(root, "oxford-iiit-pet")
    os.makedirs(os.path.join(d, "annotations"), exist_ok=True)
    for split, start in (("trainval", 1), ("test", 100)):
        lines = []
        for label, c in enumerate(names, 1):
            image_id = f"{_raw(c)}_{start}"
            _save_jpeg(os.path.join(d, "images", image_id + ".jpg"), rng)
            lines.append(f"{image_id} {label} {1 + label % 2} {label}\n")
        with open(os.path.join(d, "annotations", f"{split}.txt"), "w") as f:
            f.write("".join(lines))
    return len(names), len(names)


def _annos(fnames, classes) -> np.ndarray:
    dt = [(k, "O") for k in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")]
    rec = np.zeros((1, len(fnames)), dtype=dt)
    for i, (fn, c) in enumerate(zip(fnames, classes)):
        rec[0, i] = (np.uint8(0), np.uint8(0), np.uint8(8), np.uint8(8), np.uint8(c), fn)
    return rec


def _make_cars(root, rng, names, n_train=6, n_test=4):
    d = os.path.join(root, "stanford_cars")
    _savemat(os.path.join(d, "devkit", "cars_meta.mat"),
             {"class_names": np.array([np.array(n, dtype=object) for n in names], dtype=object).reshape(1, -1)})
    for split, count, ann in (("train", n_train, os.path.join(d, "devkit", "cars_train_annos.mat")),
                              ("test", n_test, os.path.join(d, "cars_test_annos_withlabels.mat"))):
        fnames = [f"{i + 1:05d}.jpg" for i in range(count)]
        for fn in fnames:
            _save_jpeg(os.path.join(d, f"cars_{split}", fn), rng)
        classes = [1 + (i * 31) % len(names) for i in range(count)]     # 1-based, as in the devkit
        _savemat(ann, {"annotations": _annos(fnames, classes)})
    return n_train, n_test


def _make_sun397(root, rng, names):
    d = os.path.join(root, "SUN397")
    os.makedirs(d, exist_ok=True)
    lines = []
    for i, c in enumerate(names):
        raw = _raw(c)
        lines.append(f"/{raw[0]}/{raw}\n")
        _save_jpeg(os.path.join(d, raw[0], raw, f"sun_{i:05d}.jpg"), rng)
    with open(os.path.join(d, "ClassName.txt"), "w") as f:
        f.write("".join(lines))
    n = len(names)
    return int(0.8 * n), n - int(0.8 * n)


_MAKERS = {"Aircraft": _make_aircraft, "Caltech101": _make_caltech, "CIFAR100": _make_cifar100, "DTD": _make_dtd,
           "EuroSAT": _make_eurosat, "Flowers": _make_flowers, "Food": _make_food, "MNIST": _make_mnist,
           "OxfordPet": _make_pets, "StanfordCars": _make_cars, "SUN397": _make_sun397}


def make_fake_mtil_root(root: str, tasks: Optional[Iterable[str]] = None, seed: int = 0) -> Dict[str, Tuple[int, int]]:
    """Write fake ``tasks`` (default: all 11) under ``root``; returns ``{task: (train_size, test_size)}``."""
    rng = np.random.default_rng(seed)
    out = {}
    for task in (MTIL_TASKS if tasks is None else tasks):
        out[task] = _MAKERS[task](root, rng, classnames(task))
    return out


@contextlib.contextmanager
def relaxed_md5_checks():
    """Within the block, torchvision's md5 checks of CIFAR-100 and Flowers102 only check that the
    file exists (fake files cannot match the real checksums)."""

    def exists(fpath, md5=None):
        return os.path.isfile(fpath)

    saved = cifar.check_integrity, flowers.check_integrity
    cifar.check_integrity = flowers.check_integrity = exists
    try:
        yield
    finally:
        cifar.check_integrity, flowers.check_integrity = saved


# --------------------------------------------------------------------------- class-incremental benchmarks
def make_fake_cifar100_root(root: str, train_per_class: int = 2, test_per_class: int = 1, seed: int = 0) -> None:
    """A fake ``root/cifar-100-python`` with every class present (``train_per_class`` / ``test_per_class``
    random 32x32 images each). torchvision md5-checks CIFAR100: read it inside
    ``relaxed_md5_checks()``."""
    rng = np.random.default_rng(seed)
    names = classnames("CIFAR100")
    d = os.path.join(root, "cifar-100-python")
    os.makedirs(d, exist_ok=True)
    for split, per in (("train", train_per_class), ("test", test_per_class)):
        labels = [c for c in range(len(names)) for _ in range(per)]
        labels = [labels[i] for i in rng.permutation(len(labels))]
        entry = {"data": rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8), "fine_labels": labels,
                 "coarse_labels": [0] * len(labels)}
        with open(os.path.join(d, split), "wb") as f:
            pickle.dump(entry, f)
    with open(os.path.join(d, "meta"), "wb") as f:
        pickle.dump({"fine_label_names": [n.replace(" ", "_") for n in names], "coarse_label_names": ["x"] * 20}, f)


def make_fake_tiny_imagenet_root(root: str, wnids: Optional[Sequence[str]] = None, train_per_class: int = 2,
                                 test_per_class: int = 1, seed: int = 0, size: int = 16) -> List[str]:
    """A fake ``root/tiny-imagenet-200`` in the standard layout; returns its wnids. By default 200 real
    ImageNet wnids (the first 200 of a seeded permutation of ImageNet's), so names map to CLIP's."""
    rng = np.random.default_rng(seed)
    if wnids is None:
        all_w = imagenet_wnids()
        wnids = [all_w[i] for i in sorted(rng.permutation(len(all_w))[:200])]
    base = os.path.join(root, "tiny-imagenet-200")
    os.makedirs(os.path.join(base, "val", "images"), exist_ok=True)
    listed = list(wnids)
    rng.shuffle(listed)                    # wnids.txt is not sorted in the real archive either
    with open(os.path.join(base, "wnids.txt"), "w") as f:
        f.write("".join(w + "\n" for w in listed))
    with open(os.path.join(base, "words.txt"), "w") as f:
        f.write("".join(f"{w}\tthing {w[1:]}, other name\n" for w in wnids))

    def save(path):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path, quality=90)

    for w in wnids:
        d = os.path.join(base, "train", w, "images")
        os.makedirs(d, exist_ok=True)
        for k in range(train_per_class):
            save(os.path.join(d, f"{w}_{k}.JPEG"))
    lines, k = [], 0
    for w in wnids:
        for _ in range(test_per_class):
            name = f"val_{k}.JPEG"
            save(os.path.join(base, "val", "images", name))
            lines.append(f"{name}\t{w}\t0\t0\t{size - 1}\t{size - 1}\n")
            k += 1
    lines = [lines[i] for i in rng.permutation(len(lines))]
    with open(os.path.join(base, "val", "val_annotations.txt"), "w") as f:
        f.write("".join(lines))
    return list(wnids)
