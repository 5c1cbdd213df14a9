"""MTIL metadata (class names, templates): counts, cleaning, agreement with the maintained sources."""
from __future__ import annotations

import importlib.util
import os

import pytest

from gift_fast.config import MTIL_TASKS
from gift_fast.data import mtil

TORCHVISION_COUNTS = {"Aircraft": 100, "Caltech101": 101, "CIFAR100": 100, "DTD": 47, "EuroSAT": 10,
                      "Flowers": 102, "Food": 101, "MNIST": 10, "OxfordPet": 37, "StanfordCars": 196,
                      "SUN397": 397}


def _package_root(name):
    """The folder that holds package ``name`` (without importing it), or None."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.dirname(list(spec.submodule_search_locations)[0])


@pytest.mark.parametrize("task", MTIL_TASKS)
def test_classnames_counts_and_cleaning(task):
    names = mtil.classnames(task)
    assert len(names) == TORCHVISION_COUNTS[task]
    assert len(set(names)) == len(names), "duplicate class names make the zero-shot classifier ambiguous"
    for n in names:
        assert n and n == n.strip() and "_" not in n and "  " not in n, repr(n)
    assert mtil.classnames(task) is not mtil.classnames(task)   # callers may mutate their copy


@pytest.mark.parametrize("task", MTIL_TASKS)
def test_templates_format_into_prompts_without_underscores(task):
    tmpl = mtil.templates(task)
    assert tmpl, task
    for t in tmpl:
        assert t.count("{}") == 1 and "{c}" not in t, t
        for c in mtil.classnames(task):
            p = t.format(c)
            assert "_" not in p and c in p


def test_unknown_task_names_the_known_ones():
    for fn in (mtil.classnames, mtil.templates):
        with pytest.raises(ValueError, match="Aircraft.*SUN397"):
            fn("ImageNet1k")


def test_known_label_orders():
    # Spot checks of the label order torchvision uses (sorted folder / file order).
    assert mtil.classnames("Caltech101")[:4] == ["off-center face", "centered face", "leopard", "motorbike"]
    assert mtil.classnames("MNIST") == [str(i) for i in range(10)]
    assert mtil.classnames("EuroSAT")[0] == "annual crop land" and mtil.classnames("EuroSAT")[-1] == "lake or sea"
    assert mtil.classnames("CIFAR100")[1] == "aquarium fish"
    assert mtil.classnames("SUN397")[:2] == ["abbey", "airplane cabin"]
    assert mtil.classnames("Food")[0] == "apple pie"
    # torchvision's Food101 sorts the raw folder names: "cheese_plate" < "cheesecake".
    assert mtil.classnames("Food").index("cheese plate") + 1 == mtil.classnames("Food").index("cheesecake")
    # SUN397 keeps ClassName.txt's order: "/j/jail/indoor" < "/j/jail_cell".
    assert mtil.classnames("SUN397").index("jail indoor") + 1 == mtil.classnames("SUN397").index("jail cell")


def test_clean_classname():
    assert mtil.clean_classname("apartment_building/outdoor", "SUN397") == "apartment building outdoor"
    assert mtil.clean_classname("Ram C/V Cargo Van Minivan 2012", "StanfordCars") == "Ram C/V Cargo Van Minivan 2012"
    assert mtil.clean_classname("  aquarium__fish ") == "aquarium fish"


def test_imagenet_matches_open_clip():
    zsm = pytest.importorskip("open_clip.zero_shot_metadata")
    assert mtil.imagenet_classnames() == list(zsm.IMAGENET_CLASSNAMES)
    assert [t.format("X") for t in mtil.imagenet_templates()] == [f("X") for f in zsm.OPENAI_IMAGENET_TEMPLATES]


def test_snapshot_is_what_the_generator_makes_from_the_sources():
    cb, mm = _package_root("clip_benchmark"), _package_root("mmpretrain")
    if cb is None or mm is None:
        pytest.skip("clip_benchmark and mmpretrain not installed (only needed to check the snapshot)")
    path = os.path.join(os.path.dirname(mtil.__file__), "mtil_metadata.py")
    with open(path, encoding="utf-8") as f:
        assert mtil.generate_metadata(cb, mm) == f.read()


def test_generator_rejects_a_wrong_count(tmp_path):
    # A source whose list no longer matches torchvision's class count must not become a snapshot.
    import json
    import zipfile
    from gift_fast.data import mtil_metadata as md
    cb_names = {"caltech101": ["background"] + md.CLASSNAMES["Caltech101"], "eurosat": md.CLASSNAMES["EuroSAT"][:9],
                "flowers": md.CLASSNAMES["Flowers"], "mnist": md.CLASSNAMES["MNIST"],
                "pets": md.CLASSNAMES["OxfordPet"], "imagenet1k": md.IMAGENET_CLASSNAMES}
    cb_tmpl = {k: ["a photo of a {c}."] for k in list(mtil.CLIP_BENCHMARK_KEYS.values()) + ["imagenet1k"]}
    cbw, mmw = tmp_path / "clip_benchmark-0.0-py3-none-any.whl", tmp_path / "mmpretrain-0.0-py3-none-any.whl"
    with zipfile.ZipFile(cbw, "w") as z:
        z.writestr("clip_benchmark/datasets/en_classnames.json", json.dumps(cb_names))
        z.writestr("clip_benchmark/datasets/en_zeroshot_classification_templates.json", json.dumps(cb_tmpl))
    with zipfile.ZipFile(mmw, "w") as z:
        z.writestr("mmpretrain/datasets/categories.py", "\n".join(
            f"{v} = {tuple(md.CLASSNAMES[k])!r}" for k, v in mtil.MMPRETRAIN_KEYS.items()))
    with pytest.raises(ValueError, match="EuroSAT: 9 class names"):
        mtil.generate_metadata(str(cbw), str(mmw))
    cb_names["eurosat"] = md.CLASSNAMES["EuroSAT"]
    with zipfile.ZipFile(cbw, "w") as z:
        z.writestr("clip_benchmark/datasets/en_classnames.json", json.dumps(cb_names))
        z.writestr("clip_benchmark/datasets/en_zeroshot_classification_templates.json", json.dumps(cb_tmpl))
    text = mtil.generate_metadata(str(cbw), str(mmw))
    ns = {}
    exec(compile(text, "mtil_metadata.py", "exec"), ns)
    assert ns["CLASSNAMES"] == md.CLASSNAMES
