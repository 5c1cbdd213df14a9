"""The 11 MTIL data sets: class names, prompt templates, and (see ``build_task``) their data.

Class names and templates are those GIFT's authors used (their reference code reuses
ZSCL's MTIL data-set classes), kept in ``gift_fast/data/mtil_metadata.py`` with the
source repositories and commits named there (``SOURCES``); ImageNet's come from
open_clip. ``docs/PROTOCOL_PROMPTS.md`` describes the mapping; ``tests/test_mtil_data.py``
and ``tests/test_synth_prompts.py`` check them against the authors' files.

Label order: every list is in the label order of torchvision's data set class
(``build_task`` checks this against the data when it is loaded). Caltech101:
torchvision drops ``BACKGROUND_Google``, leaving 101 classes (as MTIL/ZSCL use).
"""
from __future__ import annotations

import json
import os
import warnings
from typing import Dict, List, Optional, Sequence, Union

import torch
from torch.utils.data import Dataset

from gift_fast.config import MTIL_TASKS, task_lr, task_order
from gift_fast.data import mtil_metadata
from gift_fast.data.mtil_metadata import imagenet_classnames  # noqa: F401  (public here too: the MTIL names API)
from gift_fast.data.base import TaskSpec
from gift_fast.data.cache import (OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, CachedImageDataset, clip_eval_transform,
                                  clip_train_transform, files_fingerprint, labels_fingerprint)
from gift_fast.files import atomic_write_text

# Tasks whose class names the authors read from the data files (torchvision's ``classes``, "_" -> " "),
# so ``check_classes`` can compare the data's own names. (The name is historical; the values are
# not used.)
MMPRETRAIN_KEYS: Dict[str, str] = {
    "Aircraft": "FGVCAIRCRAFT_CATEGORIES", "CIFAR100": "CIFAR100_CATEGORIES", "DTD": "DTD_CATEGORIES",
    "Food": "FOOD101_CATEGORIES", "StanfordCars": "STANFORDCARS_CATEGORIES", "SUN397": "SUN397_CATEGORIES",
}
# Number of classes of each torchvision data set (label range), as MTIL uses them.
NUM_CLASSES: Dict[str, int] = {
    "Aircraft": 100, "Caltech101": 101, "CIFAR100": 100, "DTD": 47, "EuroSAT": 10, "Flowers": 102,
    "Food": 101, "MNIST": 10, "OxfordPet": 37, "StanfordCars": 196, "SUN397": 397,
}


def _check_task(task: str) -> str:
    if task not in MTIL_TASKS:
        raise ValueError(f"unknown MTIL task {task!r}; known: {', '.join(MTIL_TASKS)}")
    return task


def clean_classname(name: str, task: Optional[str] = None) -> str:
    """The authors' cleaning of a raw data-set class name (their ``process_labels``): "_" -> " ", nothing
    else (SUN397 keeps its "/": "apartment_building/outdoor" -> "apartment building/outdoor").
    ``task`` is accepted for callers that pass it; no data set is cleaned differently."""
    return name.replace("_", " ")


def classnames(task: str) -> List[str]:
    """The class names of ``task`` in torchvision's label order, cleaned for prompts (a new list)."""
    return list(mtil_metadata.CLASSNAMES[_check_task(task)])


def templates(task: str) -> List[str]:
    """CLIP's zero-shot templates of ``task`` as "{}" format strings (a new list); the first is the
    one a single-prompt classifier uses."""
    return list(mtil_metadata.TEMPLATES[_check_task(task)])


def imagenet_templates() -> List[str]:
    """CLIP's 80 ImageNet templates (open_clip's OPENAI_IMAGENET_TEMPLATES) as "{}" format strings."""
    return list(mtil_metadata.IMAGENET_TEMPLATES)


# --------------------------------------------------------------------------- the data sets
# How each MTIL task is read with torchvision (ZSCL's MTIL conventions, which GIFT's reference
# follows): the torchvision class, its keyword arguments per split, or None for the tasks that
# torchvision gives as one pool, split here with a seeded 80/20 split (``seeded_split``).
_TV_CLASS: Dict[str, str] = {
    "Aircraft": "FGVCAircraft", "Caltech101": "Caltech101", "CIFAR100": "CIFAR100", "DTD": "DTD",
    "EuroSAT": "EuroSAT", "Flowers": "Flowers102", "Food": "Food101", "MNIST": "MNIST",
    "OxfordPet": "OxfordIIITPet", "StanfordCars": "StanfordCars", "SUN397": "SUN397",
}
_SPLIT_KWARGS: Dict[str, Optional[Dict[str, dict]]] = {
    "Aircraft": {"train": {"split": "train", "annotation_level": "variant"},
                 "test": {"split": "test", "annotation_level": "variant"}},
    "Caltech101": None,
    "CIFAR100": {"train": {"train": True}, "test": {"train": False}},
    "DTD": {"train": {"split": "train", "partition": 1}, "test": {"split": "test", "partition": 1}},
    "EuroSAT": None,
    "Flowers": {"train": {"split": "train"}, "test": {"split": "test"}},
    "Food": {"train": {"split": "train"}, "test": {"split": "test"}},
    "MNIST": {"train": {"train": True}, "test": {"train": False}},
    "OxfordPet": {"train": {"split": "trainval", "target_types": "category"},
                  "test": {"split": "test", "target_types": "category"}},
    "StanfordCars": {"train": {"split": "train"}, "test": {"split": "test"}},
    "SUN397": None,
}
# The folder (under the data root) each torchvision class needs; checked before the class is built
# because some classes create folders in the data root (Caltech101 does) even when the data is absent.
REQUIRED_DIRS: Dict[str, str] = {
    "Aircraft": "fgvc-aircraft-2013b", "Caltech101": "caltech101/101_ObjectCategories",
    "CIFAR100": "cifar-100-python", "DTD": "dtd/dtd", "EuroSAT": "eurosat/2750", "Flowers": "flowers-102",
    "Food": "food-101", "MNIST": "MNIST", "OxfordPet": "oxford-iiit-pet", "StanfordCars": "stanford_cars",
    "SUN397": "SUN397",
}
_POOL_KWARGS: Dict[str, dict] = {"Caltech101": {"target_type": "category"}, "EuroSAT": {}, "SUN397": {}}
# The torchvision splits used for train / test (MTIL/ZSCL's choice), as `data check` prints them.
SPLIT_NAMES: Dict[str, str] = {
    "Aircraft": "train / test", "Caltech101": "seeded", "CIFAR100": "train / test", "DTD": "train1 / test1",
    "EuroSAT": "seeded", "Flowers": "train / test", "Food": "train / test", "MNIST": "train / test",
    "OxfordPet": "trainval / test", "StanfordCars": "train / test", "SUN397": "seeded",
}
DEFAULT_TRAIN_FRACTION = 0.8
DEFAULT_SPLIT_SEED = 42

# The folder layout torchvision's class reads, under --data-root DIR (torchvision 0.19-0.29).
LAYOUTS: Dict[str, str] = {
    "Aircraft": """\
DIR/fgvc-aircraft-2013b/data/variants.txt               100 variant names, one a line (label order)
DIR/fgvc-aircraft-2013b/data/images_variant_train.txt   "<image id> <variant>" a line (3,334 images)
DIR/fgvc-aircraft-2013b/data/images_variant_test.txt    "<image id> <variant>" a line (3,333 images)
DIR/fgvc-aircraft-2013b/data/images/<image id>.jpg
(fgvc-aircraft-2013b.tar.gz unpacked in DIR; --download fetches it)""",
    "Caltech101": """\
DIR/caltech101/101_ObjectCategories/<category>/image_0001.jpg, image_0002.jpg, ...
  102 folders incl. BACKGROUND_Google (which torchvision drops: 101 classes); each folder's
  images numbered from 0001 without gaps, and nothing else in the folder
(101_ObjectCategories.tar.gz unpacked in DIR/caltech101; --download needs the gdown package)""",
    "CIFAR100": """\
DIR/cifar-100-python/train, DIR/cifar-100-python/test, DIR/cifar-100-python/meta
  (the python pickles of cifar-100-python.tar.gz, md5-checked; --download fetches them)""",
    "DTD": """\
DIR/dtd/dtd/images/<class>/<name>.jpg          47 class folders
DIR/dtd/dtd/labels/train1.txt, test1.txt       "<class>/<name>.jpg" a line (partition 1)
(dtd-r1.0.1.tar.gz unpacked in DIR/dtd; --download fetches it)""",
    "EuroSAT": """\
DIR/eurosat/2750/<Class>/<Class>_<n>.jpg
  10 folders: AnnualCrop Forest HerbaceousVegetation Highway Industrial Pasture PermanentCrop
  Residential River SeaLake (the RGB EuroSAT.zip unpacked in DIR/eurosat; --download fetches it)""",
    "Flowers": """\
DIR/flowers-102/jpg/image_00001.jpg ... image_08189.jpg
DIR/flowers-102/imagelabels.mat, DIR/flowers-102/setid.mat   (md5-checked)
(102flowers.tgz unpacked in DIR/flowers-102 plus the two .mat files; --download fetches them)""",
    "Food": """\
DIR/food-101/images/<class>/<id>.jpg           101 class folders
DIR/food-101/meta/train.json, test.json        {"<class>": ["<class>/<id>", ...], ...}
(food-101.tar.gz unpacked in DIR; --download fetches it)""",
    "MNIST": """\
DIR/MNIST/raw/train-images-idx3-ubyte, train-labels-idx1-ubyte,
DIR/MNIST/raw/t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte     (un-gzipped)
(--download fetches them)""",
    "OxfordPet": """\
DIR/oxford-iiit-pet/images/<Breed_name>_<n>.jpg
DIR/oxford-iiit-pet/annotations/trainval.txt, test.txt
  "<image id> <class 1-37> <species 1-2> <breed id>" a line
(images.tar.gz and annotations.tar.gz unpacked in DIR/oxford-iiit-pet; --download fetches them)""",
    "StanfordCars": """\
DIR/stanford_cars/devkit/cars_meta.mat, DIR/stanford_cars/devkit/cars_train_annos.mat
DIR/stanford_cars/cars_train/<fname>.jpg
DIR/stanford_cars/cars_test_annos_withlabels.mat
DIR/stanford_cars/cars_test/<fname>.jpg
  Stanford's site is gone, so --download cannot fetch it. Images: Kaggle's
  jessicali9530/stanford-cars-dataset (flatten cars_train/cars_train -> cars_train, same for
  cars_test); devkit: car_devkit.tgz from pytorch/vision issue 7545; the labeled test
  annotations cars_test_annos_withlabels.mat: linked from the same issue""",
    "SUN397": """\
DIR/SUN397/ClassName.txt                        397 lines "/a/abbey", ... (label order)
DIR/SUN397/<letter>/<class>[/<sub>]/sun_*.jpg   e.g. DIR/SUN397/a/abbey/sun_aaalbzqrimafwbiv.jpg
(SUN397.tar.gz unpacked in DIR; --download fetches it, 37 GB)""",
}


class TransformedDataset(Dataset):
    """``(transform(image), label)`` from a data set of ``(PIL image, label)``."""

    def __init__(self, source: Dataset, transform):
        self.source, self.transform = source, transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i):
        img, label = self.source[i]
        return self.transform(img), int(label)


class IndexedSubset(Dataset):
    """The samples ``indices`` of ``source``, with their file paths and labels kept alongside."""

    def __init__(self, source: Dataset, indices: Sequence[int], files: Sequence[str], labels: Sequence[int]):
        self.source, self.indices = source, list(indices)
        self.files, self.labels = list(files), list(labels)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        return self.source[self.indices[i]]


def _torchvision_dataset(task: str, data_root: str, kwargs: dict, download: bool):
    import torchvision.datasets as tvd
    cls = getattr(tvd, _TV_CLASS[task])
    return cls(data_root, download=download, **kwargs)


def sample_files(task: str, ds) -> List[str]:
    """The file(s) each sample of a torchvision MTIL data set is read from, in the data set's order.
    CIFAR100 and MNIST keep all images in a few files: their data files are returned instead."""
    if isinstance(ds, IndexedSubset):
        return list(ds.files)
    if task in ("Aircraft", "DTD", "Flowers", "Food", "SUN397"):
        return [str(p) for p in ds._image_files]
    if task == "OxfordPet":
        return [str(p) for p in ds._images]
    if task == "StanfordCars":
        return [str(p) for p, _ in ds._samples]
    if task == "EuroSAT":
        return [str(p) for p, _ in ds.samples]
    if task == "Caltech101":
        base = os.path.join(ds.root, "101_ObjectCategories")
        return [os.path.join(base, ds.categories[y], f"image_{k:04d}.jpg") for y, k in zip(ds.y, ds.index)]
    if task == "CIFAR100":
        names = [f for f, _ in (ds.train_list if ds.train else ds.test_list)] + [ds.meta["filename"]]
        return [os.path.join(ds.root, ds.base_folder, f) for f in names]
    if task == "MNIST":
        prefix = "train" if ds.train else "t10k"
        raw = [os.path.join(ds.raw_folder, f"{prefix}-{kind}") for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")]
        if all(os.path.exists(p) for p in raw):
            return raw
        return [os.path.join(ds.processed_folder, ds.training_file if ds.train else ds.test_file)]
    raise ValueError(f"unknown MTIL task {task!r}")


def sample_labels(task: str, ds) -> List[int]:
    """Every sample's label without decoding an image."""
    if isinstance(ds, IndexedSubset):
        return list(ds.labels)
    if task in ("Aircraft", "DTD", "Flowers", "Food", "SUN397", "OxfordPet"):
        return [int(y) for y in ds._labels]
    if task == "StanfordCars":
        return [int(y) for _, y in ds._samples]
    if task in ("EuroSAT", "CIFAR100", "MNIST"):
        return [int(y) for y in ds.targets]
    if task == "Caltech101":
        return [int(y) for y in ds.y]
    raise ValueError(f"unknown MTIL task {task!r}")


def _dataset_classes(task: str, ds) -> List[str]:
    if isinstance(ds, IndexedSubset):
        ds = ds.source
    return list(ds.categories if task == "Caltech101" else ds.classes)


def check_classes(task: str, ds) -> List[str]:
    """The class names of ``ds`` in its label order, checked against the snapshot; raises ValueError
    when the data's classes are not the expected ones (wrong or incomplete data).

    Where the snapshot derives from the data's own names (Aircraft, CIFAR100, DTD, Food, StanfordCars,
    SUN397) the cleaned names must be the snapshot's; if only their order differs (another release of
    the files), the data's order is the truth for the labels: the reordered names are returned, with a
    warning. Elsewhere (CLIP's rewritten names) the count and the label range are checked."""
    want = classnames(task)
    have = _dataset_classes(task, ds)
    names = want
    if task in MMPRETRAIN_KEYS:
        cleaned = [clean_classname(c, task) for c in have]
        if sorted(cleaned) != sorted(want):
            extra = sorted(set(cleaned) - set(want))[:3]
            missing = sorted(set(want) - set(cleaned))[:3]
            raise ValueError(
                f"{task}: the data set's {len(have)} classes are not the expected {len(want)} (unexpected: "
                f"{extra}, missing: {missing}). Check the files against this layout:\n{LAYOUTS[task]}")
        if cleaned != want:
            warnings.warn(f"{task}: the data set orders its classes differently from the snapshot; using the "
                          f"data's order for the labels", RuntimeWarning)
            names = cleaned
    elif len(have) != len(want):
        raise ValueError(f"{task}: the data set has {len(have)} classes, expected {len(want)}. "
                         f"Check the files against this layout:\n{LAYOUTS[task]}")
    labels = sample_labels(task, ds)
    if labels and (min(labels) < 0 or max(labels) >= len(want)):
        raise ValueError(f"{task}: labels span {min(labels)}..{max(labels)}, expected 0..{len(want) - 1}")
    return names


def seeded_split(keys: Sequence[str], seed: int, train_fraction: float = DEFAULT_TRAIN_FRACTION):
    """Indices (train, test) of a seeded split of the samples named ``keys`` (relative paths).

    The samples are put in the canonical order of their sorted keys (independent of the order a file
    system lists them in), then permuted exactly as ``torch.utils.data.random_split(range(n),
    [int(f * n), n - int(f * n)], generator=torch.Generator().manual_seed(seed))`` does: the
    convention of ZSCL's MTIL code (f = 0.8, seed 42). Each part is returned sorted by key."""
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    if len(set(keys)) != len(keys):
        raise ValueError("seeded_split needs unique keys (one per sample)")
    canonical = sorted(range(len(keys)), key=lambda i: keys[i])
    n = len(keys)
    n_train = int(train_fraction * n)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))).tolist()
    train = sorted((canonical[p] for p in perm[:n_train]), key=lambda i: keys[i])
    test = sorted((canonical[p] for p in perm[n_train:]), key=lambda i: keys[i])
    return train, test


def open_splits(task: str, data_root: str, *, download: bool = False, split_seed: int = DEFAULT_SPLIT_SEED,
                train_fraction: float = DEFAULT_TRAIN_FRACTION, split_record_dir: Optional[str] = None) -> dict:
    """The raw train and test data sets of ``task`` (yielding ``(PIL image, int label)``) and how they
    were split: ``{"train": ds, "test": ds, "split": {...}}``.

    Seeded split (Caltech101, EuroSAT, SUN397): written to ``split_record_dir/<task>-split.json``
    (the relative paths of each part); if that file exists, the split must equal it (a run that
    resumes on changed data fails loudly instead of mixing test images into training)."""
    _check_task(task)
    data_root = os.path.abspath(os.path.expanduser(str(data_root)))
    required = os.path.join(data_root, *REQUIRED_DIRS[task].split("/"))
    if not download and not os.path.isdir(required):
        raise FileNotFoundError(f"{required} is not there")
    spec = _SPLIT_KWARGS[task]
    if spec is not None:
        out = {k: _torchvision_dataset(task, data_root, kw, download) for k, kw in spec.items()}
        out["split"] = {"kind": "torchvision", **{k: dict(kw) for k, kw in spec.items()}}
        return out
    pool = _torchvision_dataset(task, data_root, _POOL_KWARGS[task], download)
    files = sample_files(task, pool)
    labels = sample_labels(task, pool)
    rel = [os.path.relpath(f, data_root) for f in files]
    train_idx, test_idx = seeded_split(rel, split_seed, train_fraction)
    record = {"task": task, "seed": int(split_seed), "train_fraction": train_fraction, "n": len(rel),
              "rule": "sorted relative paths, permuted as torch random_split with manual_seed(seed); "
                      "first int(train_fraction * n) to train",
              "train": [rel[i] for i in train_idx], "test": [rel[i] for i in test_idx]}
    split = {"kind": "seeded", "seed": int(split_seed), "train_fraction": train_fraction, "record": None}
    if split_record_dir is not None:
        os.makedirs(split_record_dir, exist_ok=True)
        path = os.path.join(split_record_dir, f"{task}-split.json")
        if os.path.exists(path):
            with open(path) as f:
                old = json.load(f)
            if old.get("train") != record["train"] or old.get("test") != record["test"]:
                raise ValueError(
                    f"{task}: the seeded split differs from the one recorded in {path} (seed {old.get('seed')}, "
                    f"{len(old.get('train', []))} train / {len(old.get('test', []))} test; now seed {split_seed}, "
                    f"{len(train_idx)} / {len(test_idx)}): the files under {data_root} or the seed changed. "
                    f"Restore them, or start a new run folder.")
        else:
            atomic_write_text(path, json.dumps(record, indent=1))
        split["record"] = path
    out = {name: IndexedSubset(pool, idx, [files[i] for i in idx], [labels[i] for i in idx])
           for name, idx in (("train", train_idx), ("test", test_idx))}
    out["split"] = split
    return out


def build_task(task: str, data_root: str, *, image_size: int = 224,
               mean: Sequence[float] = OPENAI_DATASET_MEAN, std: Sequence[float] = OPENAI_DATASET_STD,
               download: bool = False, cache_dir: Optional[str] = None, split_seed: int = DEFAULT_SPLIT_SEED,
               split_record_dir: Optional[str] = None, train_fraction: float = DEFAULT_TRAIN_FRACTION,
               num_workers: Optional[int] = None, progress: bool = True, train_augment: bool = True) -> TaskSpec:
    """One MTIL task as a TaskSpec: class names, templates, lr, and train / test data sets yielding
    ``(float [3, S, S] normalized, int label)``. The test split has CLIP's eval preprocessing (resize
    the shorter side to ``image_size`` bicubic, center crop, to tensor, normalize with ``mean``/``std``);
    the train split, with ``train_augment`` (the protocol's default), the authors' training
    augmentation ``RandomResizedCrop(image_size, scale=(0.9, 1.0), bicubic)`` instead of resize + crop
    (docs/METHOD.md, "Training augmentation"), else the eval preprocessing too.

    With ``cache_dir`` both splits are ``CachedImageDataset``s (decoded once; ``get_batch`` /
    ``iter_batches`` give uint8 batches to normalize, and crop, on the GPU: the train split uses the
    ``"train-crop"`` layout); without, they decode per access.
    ``meta`` says how the data was split, the sizes, and whether it is cached."""
    _check_task(task)
    data_root = os.path.abspath(os.path.expanduser(str(data_root)))
    try:
        raw = open_splits(task, data_root, download=download, split_seed=split_seed,
                          train_fraction=train_fraction, split_record_dir=split_record_dir)
    except (RuntimeError, FileNotFoundError) as e:
        raise FileNotFoundError(
            f"{task} not found under {data_root} ({type(e).__name__}: {e}).\nExpected layout:\n"
            f"{LAYOUTS[task]}\nRun `gift-fast data check --data-root {data_root}` to see every data set.") from e
    data = {}
    names = None
    for part in ("train", "test"):
        ds = raw[part]
        part_names = check_classes(task, ds)
        if names is not None and part_names != names:
            raise ValueError(f"{task}: the train and test splits order their classes differently")
        names = part_names
        crops = part == "train" and train_augment
        if cache_dir is None:
            tf = clip_train_transform if crops else clip_eval_transform
            data[part] = TransformedDataset(ds, tf(image_size, mean, std))
            continue
        files = sample_files(task, ds)
        key_parts = {"task": task, "split": part, "split_rule": raw["split"],
                     "files": files_fingerprint(files, data_root), "n_files": len(files),
                     "labels": labels_fingerprint(sample_labels(task, ds))}
        data[part] = CachedImageDataset(ds, cache_dir, key_parts=key_parts, image_size=image_size, mean=mean,
                                        std=std, name=f"{task}-{part}", num_workers=num_workers,
                                        progress=progress, layout="train-crop" if crops else "center-crop")
    meta = {"num_classes": len(classnames(task)), "split": raw["split"], "train_size": len(data["train"]),
            "test_size": len(data["test"]), "image_size": image_size, "mean": list(mean), "std": list(std),
            "cached": cache_dir is not None, "data_root": data_root,
            "train_augment": "RandomResizedCrop(scale=(0.9, 1.0), bicubic)" if train_augment else None}
    return TaskSpec(name=task, classnames=names, templates=templates(task), train=data["train"],
                    test=data["test"], lr=task_lr(task), meta=meta)


def build_tasks(order_or_names: Union[int, str, Sequence[str]], data_root: str, **kw) -> List[TaskSpec]:
    """TaskSpecs of MTIL order 1 or 2, or of the named tasks, in that order (``kw`` as ``build_task``)."""
    if isinstance(order_or_names, (int, str)) and str(order_or_names).strip() in ("1", "2"):
        names = task_order(int(order_or_names))
    elif isinstance(order_or_names, str):
        names = [n.strip() for n in order_or_names.split(",") if n.strip()]
    else:
        names = list(order_or_names)
    for n in names:
        _check_task(n)
    return [build_task(n, data_root, **kw) for n in names]


def check_task_data(task: str, data_root: str, *, download: bool = False) -> dict:
    """What ``gift-fast data check`` reports for one task: present, the split sizes, or the problem."""
    _check_task(task)
    row = {"task": task, "present": False, "train": None, "test": None, "split": None, "problem": None}
    try:
        raw = open_splits(task, data_root, download=download)
        for part in ("train", "test"):
            check_classes(task, raw[part])
        row.update(present=True, train=len(raw["train"]), test=len(raw["test"]))
        sp = raw["split"]
        row["split"] = (f"seeded {sp['train_fraction']:.0%}/{1 - sp['train_fraction']:.0%}, seed {sp['seed']}"
                        if sp["kind"] == "seeded" else SPLIT_NAMES[task])
    except Exception as e:   # any failure is reported, with the layout, instead of stopping the check
        row["problem"] = f"{type(e).__name__}: {e}".strip()
    return row

