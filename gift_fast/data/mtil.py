"""The 11 MTIL data sets: class names, prompt templates, and (see ``build_task``) their data.

Class names and templates are not typed by hand. They come from a snapshot,
``gift_fast/data/mtil_metadata.py``, that ``generate_metadata`` writes from two
maintained sources (the wheels' files are read directly, nothing is imported):

* clip_benchmark (LAION's CLIP evaluation suite): ``en_classnames.json`` (CLIP's
  cleaned class names of Caltech101, EuroSAT, Flowers102, MNIST, Oxford Pets and
  ImageNet) and ``en_zeroshot_classification_templates.json`` (CLIP's templates
  for every data set here);
* mmpretrain (OpenMMLab): ``mmpretrain/datasets/categories.py`` for the data sets
  whose names clip_benchmark takes from the data files themselves (FGVC Aircraft,
  CIFAR-100, DTD, Food-101, Stanford Cars, SUN397); they are cleaned with
  clip_benchmark's rule ("_" -> " ", and "/" -> " " for SUN397).

Why a snapshot and not a dependency: ``pip install clip-benchmark`` pulls
pycocoevalcap (a 104 MB wheel) and webdataset for two JSON files, and still lacks
six of the eleven class lists; mmpretrain needs mmengine/mmcv. The snapshot keeps
``classnames()`` free of heavy imports (the GPU machine has no open_clip) and
records the source versions and file hashes; ``tests/test_mtil_data.py`` compares
it with the sources wherever they are installed.

Label order: every list is in the label order of torchvision's data set class
(``build_task`` checks this against the data when it is loaded). Caltech101:
torchvision drops ``BACKGROUND_Google``, leaving 101 classes (as MTIL/ZSCL use);
clip_benchmark's list has 102 with "background" first, which the generator drops.
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
import pprint
import re
import zipfile
from typing import Dict, List, Optional, Sequence

from gift_fast.config import MTIL_TASKS

# MTIL task -> key of clip_benchmark (templates, and class names where it has them).
CLIP_BENCHMARK_KEYS: Dict[str, str] = {
    "Aircraft": "fgvc_aircraft", "Caltech101": "caltech101", "CIFAR100": "cifar100", "DTD": "dtd",
    "EuroSAT": "eurosat", "Flowers": "flowers", "Food": "food101", "MNIST": "mnist", "OxfordPet": "pets",
    "StanfordCars": "cars", "SUN397": "sun397",
}
# Tasks whose class names clip_benchmark does not list (it reads them from the data files):
# MTIL task -> variable of mmpretrain/datasets/categories.py.
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
    """clip_benchmark's cleaning of raw data-set class names: "_" -> " " (and "/" -> " " for SUN397)."""
    name = name.replace("_", " ")
    if task == "SUN397":
        name = name.replace("/", " ")
    return re.sub(r"\s+", " ", name).strip()


def classnames(task: str) -> List[str]:
    """The class names of ``task`` in torchvision's label order, cleaned for prompts (a new list)."""
    from gift_fast.data import mtil_metadata
    return list(mtil_metadata.CLASSNAMES[_check_task(task)])


def templates(task: str) -> List[str]:
    """CLIP's zero-shot templates of ``task`` as "{}" format strings (a new list); the first is the
    one a single-prompt classifier uses."""
    from gift_fast.data import mtil_metadata
    return list(mtil_metadata.TEMPLATES[_check_task(task)])


def imagenet_classnames() -> List[str]:
    """CLIP's 1,000 cleaned ImageNet class names (the synthetic-data class pool; equal to
    open_clip's IMAGENET_CLASSNAMES, without importing open_clip)."""
    from gift_fast.data import mtil_metadata
    return list(mtil_metadata.IMAGENET_CLASSNAMES)


def imagenet_templates() -> List[str]:
    """CLIP's 80 ImageNet templates (open_clip's OPENAI_IMAGENET_TEMPLATES) as "{}" format strings."""
    from gift_fast.data import mtil_metadata
    return list(mtil_metadata.IMAGENET_TEMPLATES)


# --------------------------------------------------------------------------- snapshot generator
def _read_member(source: str, member: str) -> bytes:
    """``member`` (a path inside the package, e.g. "clip_benchmark/datasets/x.json") from a wheel
    file or from a site-packages-like directory."""
    if os.path.isdir(source):
        with open(os.path.join(source, member), "rb") as f:
            return f.read()
    with zipfile.ZipFile(source) as zf:
        return zf.read(member)


def _source_version(source: str, package: str) -> str:
    """The version in a wheel's file name, or in the ``<package>-<version>.dist-info`` beside an
    installed package; "unknown" when neither says."""
    if not os.path.isdir(source):
        parts = os.path.basename(source).split("-")
        return parts[1] if len(parts) > 1 else "unknown"
    for entry in sorted(os.listdir(source)):
        if entry.startswith(package + "-") and entry.endswith(".dist-info"):
            return entry[len(package) + 1:-len(".dist-info")]
    return "unknown"


def _templates_from_clip_benchmark(raw: List[str]) -> List[str]:
    out = []
    for t in raw:
        if "{c}" not in t or t.count("{") != 1 or t.count("}") != 1:
            raise ValueError(f"unexpected clip_benchmark template {t!r}: want exactly one '{{c}}'")
        out.append(t.replace("{c}", "{}"))
    return out


def generate_metadata(clip_benchmark: str, mmpretrain: str) -> str:
    """The source text of ``mtil_metadata.py`` from a clip_benchmark and an mmpretrain wheel
    (or installed package roots, i.e. the folders holding ``clip_benchmark/`` / ``mmpretrain/``)."""
    cb_names_file = "clip_benchmark/datasets/en_classnames.json"
    cb_tmpl_file = "clip_benchmark/datasets/en_zeroshot_classification_templates.json"
    mm_file = "mmpretrain/datasets/categories.py"
    raw = {f: _read_member(clip_benchmark, f) for f in (cb_names_file, cb_tmpl_file)}
    raw[mm_file] = _read_member(mmpretrain, mm_file)
    cb_names = json.loads(raw[cb_names_file])
    cb_tmpl = json.loads(raw[cb_tmpl_file])
    mm = {}
    for node in ast.parse(raw[mm_file].decode("utf-8")).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            mm[node.targets[0].id] = ast.literal_eval(node.value)

    names: Dict[str, List[str]] = {}
    for task in MTIL_TASKS:
        if task in MMPRETRAIN_KEYS:
            lst = [clean_classname(c, task) for c in mm[MMPRETRAIN_KEYS[task]]]
        else:
            lst = [clean_classname(c, task) for c in cb_names[CLIP_BENCHMARK_KEYS[task]]]
            if task == "Caltech101":
                if lst[0] != "background":
                    raise ValueError(f"clip_benchmark caltech101 list starts with {lst[0]!r}, not 'background'")
                lst = lst[1:]   # torchvision's Caltech101 drops BACKGROUND_Google
        if len(lst) != NUM_CLASSES[task]:
            raise ValueError(f"{task}: {len(lst)} class names from the sources, torchvision has {NUM_CLASSES[task]}")
        names[task] = lst
    tmpl = {task: _templates_from_clip_benchmark(cb_tmpl[CLIP_BENCHMARK_KEYS[task]]) for task in MTIL_TASKS}
    sources = {
        "clip_benchmark": {"version": _source_version(clip_benchmark, "clip_benchmark"),
                           **{f: hashlib.sha256(raw[f]).hexdigest() for f in (cb_names_file, cb_tmpl_file)}},
        "mmpretrain": {"version": _source_version(mmpretrain, "mmpretrain"), mm_file: hashlib.sha256(raw[mm_file]).hexdigest()},
    }

    def lit(obj) -> str:
        return pprint.pformat(obj, width=110, sort_dicts=False)

    return (
        '"""GENERATED by gift_fast.data.mtil.generate_metadata: do not edit by hand.\n\n'
        "Class names (torchvision label order, cleaned for prompts) and CLIP's zero-shot templates of\n"
        "the 11 MTIL data sets and ImageNet, from clip_benchmark and mmpretrain (see SOURCES and the\n"
        "docstring of gift_fast/data/mtil.py). Regenerate with:\n"
        "    python -m gift_fast.data.mtil --clip-benchmark WHEEL_OR_DIR --mmpretrain WHEEL_OR_DIR\n"
        '"""\n\n'
        f"SOURCES = {lit(sources)}\n\n"
        f"CLASSNAMES = {lit(names)}\n\n"
        f"TEMPLATES = {lit(tmpl)}\n\n"
        f"IMAGENET_CLASSNAMES = {lit([clean_classname(c) for c in cb_names['imagenet1k']])}\n\n"
        f"IMAGENET_TEMPLATES = {lit(_templates_from_clip_benchmark(cb_tmpl['imagenet1k']))}\n"
    )


def _main(argv: Optional[Sequence[str]] = None) -> None:
    import argparse
    p = argparse.ArgumentParser(description="Regenerate gift_fast/data/mtil_metadata.py from the sources.")
    p.add_argument("--clip-benchmark", required=True, help="clip_benchmark wheel, or the folder holding clip_benchmark/")
    p.add_argument("--mmpretrain", required=True, help="mmpretrain wheel, or the folder holding mmpretrain/")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "mtil_metadata.py"))
    a = p.parse_args(argv)
    text = generate_metadata(a.clip_benchmark, a.mmpretrain)
    tmp = a.out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, a.out)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    _main()
