"""MTIL metadata (class names, templates): counts, cleaning, agreement with the authors' files and open_clip."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil

import numpy as np
import pytest
import torch

from gift_fast.config import MTIL_TASKS
from gift_fast.data import mtil
from gift_fast.data.cache import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, CachedImageDataset, clip_eval_transform
from fake_datasets import make_fake_mtil_root, relaxed_md5_checks

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
        # "head of a  crocodile" (Caltech101) keeps the authors' double space: it is in their prompts
        assert n and n == n.strip() and "_" not in n and ("  " not in n or n == "head of a  crocodile"), repr(n)
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
    assert mtil.classnames("MNIST")[:2] == ["0 - zero", "1 - one"]          # torchvision's MNIST.classes
    assert mtil.classnames("EuroSAT")[0] == "annual crop land" and mtil.classnames("EuroSAT")[-1] == "lake or sea"
    assert mtil.classnames("CIFAR100")[1] == "aquarium fish"
    assert mtil.classnames("SUN397")[:2] == ["abbey", "airplane cabin"]
    assert mtil.classnames("Food")[0] == "apple pie"
    # torchvision's Food101 sorts the raw folder names: "cheese_plate" < "cheesecake".
    assert mtil.classnames("Food").index("cheese plate") + 1 == mtil.classnames("Food").index("cheesecake")
    # SUN397 keeps ClassName.txt's order ("/j/jail/indoor" < "/j/jail_cell") and its "/".
    assert mtil.classnames("SUN397").index("jail/indoor") + 1 == mtil.classnames("SUN397").index("jail cell")
    assert "apartment building/outdoor" in mtil.classnames("SUN397")


def test_clean_classname_is_the_authors_underscore_rule_only():
    assert mtil.clean_classname("apartment_building/outdoor", "SUN397") == "apartment building/outdoor"
    assert mtil.clean_classname("Ram C/V Cargo Van Minivan 2012", "StanfordCars") == "Ram C/V Cargo Van Minivan 2012"
    assert mtil.clean_classname("aquarium_fish") == "aquarium fish"


def _open_clip_module(name):
    """open_clip's pure-data module ``name`` run from its file: importing the open_clip package costs
    seconds (torch, timm, transformers), these files import nothing."""
    root = _package_root("open_clip")
    if root is None:
        pytest.skip("open_clip not installed")
    ns = {}
    with open(os.path.join(root, "open_clip", name + ".py")) as f:
        exec(compile(f.read(), name, "exec"), ns)
    return type("Module", (), ns)


def _authors_names():
    with open(os.path.join(os.path.dirname(__file__), "fixtures", "authors", "mtil_names.json"), encoding="utf-8") as f:
        return json.load(f)


def test_imagenet_matches_open_clip_and_the_authors():
    """Parity: the ImageNet names and 80 templates in use are open_clip's, and equal the authors'."""
    zsm = _open_clip_module("zero_shot_metadata")
    fx = _authors_names()
    assert mtil.imagenet_classnames() == list(zsm.IMAGENET_CLASSNAMES) == fx["imagenet_classnames"]
    assert [t.format("X") for t in mtil.imagenet_templates()] == [f("X") for f in zsm.OPENAI_IMAGENET_TEMPLATES]
    assert mtil.imagenet_templates() == fx["imagenet_templates"]
    from gift_fast.data.mtil_metadata import IMAGENET_SYNTHETIC_TEMPLATE
    assert IMAGENET_SYNTHETIC_TEMPLATE == fx["imagenet_template"]     # the authors' ImageNet.template


@pytest.mark.parametrize("task", MTIL_TASKS)
def test_templates_equal_the_authors(task):
    assert mtil.templates(task) == _authors_names()["templates"][task]


def test_class_names_equal_the_authors():
    fx = _authors_names()
    for task, names in fx["classnames"].items():       # the lists their code spells out
        assert mtil.classnames(task) == names, task
    # read from the data by their code (torchvision's classes, "_" -> " "): SUN397's ClassName.txt ...
    assert mtil.classnames("SUN397") == [c[3:].replace("_", " ") for c in fx["sun397_classname_txt"]]
    # ... and MNIST's classes, which torchvision spells out
    import torchvision
    assert mtil.classnames("MNIST") == list(torchvision.datasets.MNIST.classes)
    # the other names read from data files (Aircraft, CIFAR100, DTD, Food, OxfordPet, StanfordCars) are checked
    # against the authors' released prompts: tests/test_synth_prompts.py (every name occurs there)


def test_every_class_name_occurs_in_the_authors_prompts():
    """Each data set's names, templated with its first template, are prompts the authors drew (SUN397: the
    36 names their draws missed are covered by ClassName.txt above)."""
    with open(os.path.join(os.path.dirname(__file__), "fixtures", "authors", "synthetic_prompts.json"),
              encoding="utf-8") as f:
        drawn = set(json.load(f)["prompts"])
    for task in MTIL_TASKS:
        first = mtil.templates(task)[0]
        missing = [c for c in mtil.classnames(task) if first.format(c) not in drawn]
        assert len(missing) == (36 if task == "SUN397" else 0), (task, missing[:5])
    assert all(f"a photo of a {c}." in drawn for c in mtil.imagenet_classnames())


def test_metadata_names_its_sources():
    from gift_fast.data import mtil_metadata as md
    assert md.SOURCES["GIFT_CL"]["commit"] == _authors_names()["sources"]["GIFT_CL"]["commit"]
    assert md.SOURCES["ZSCL"]["commit"] == _authors_names()["sources"]["ZSCL"]["commit"]
    assert all(len(c) == 40 for c in (md.SOURCES[k]["commit"] for k in md.SOURCES))


# --------------------------------------------------------------------------- data wiring on fake folders
SIZE = 16   # small images keep the caches tiny


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("mtil")
    sizes = make_fake_mtil_root(str(root))
    return str(root), sizes


@pytest.fixture
def relaxed():
    with relaxed_md5_checks():
        yield


def test_mean_std_are_open_clips():
    consts = _open_clip_module("constants")
    assert OPENAI_DATASET_MEAN == tuple(consts.OPENAI_DATASET_MEAN)
    assert OPENAI_DATASET_STD == tuple(consts.OPENAI_DATASET_STD)


def test_check_task_data_sees_every_fake_layout(fake_root, relaxed):
    root, sizes = fake_root
    for task in MTIL_TASKS:
        row = mtil.check_task_data(task, root)
        assert row["present"], row
        assert (row["train"], row["test"]) == sizes[task], task


@pytest.mark.parametrize("task", MTIL_TASKS)
def test_build_task_uncached(fake_root, relaxed, task):
    root, sizes = fake_root
    spec = mtil.build_task(task, root, image_size=SIZE, train_augment=False)   # deterministic (tests/test_augment.py)
    assert spec.name == task and spec.classnames == mtil.classnames(task)
    assert spec.templates == mtil.templates(task)
    assert spec.lr == (5e-5 if task in ("Aircraft", "MNIST") else 1e-5)
    assert (len(spec.train), len(spec.test)) == sizes[task]
    assert spec.meta["train_size"] == sizes[task][0] and not spec.meta["cached"]
    raw = mtil.open_splits(task, root)
    tf = clip_eval_transform(SIZE, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)
    for part in ("train", "test"):
        ds = getattr(spec, part)
        for i in (0, len(ds) - 1):
            x, y = ds[i]
            assert x.dtype == torch.float32 and x.shape == (3, SIZE, SIZE)
            assert isinstance(y, int) and 0 <= y < len(spec.classnames)
            img, y_raw = raw[part][i]
            assert y == y_raw and torch.equal(x, tf(img))


@pytest.mark.parametrize("task", MTIL_TASKS)
def test_build_task_cached_is_bit_identical(fake_root, relaxed, task, tmp_path):
    root, sizes = fake_root
    plain = mtil.build_task(task, root, image_size=SIZE, train_augment=False)
    cached = mtil.build_task(task, root, image_size=SIZE, cache_dir=str(tmp_path), num_workers=0, progress=False,
                             train_augment=False)
    assert cached.train.built and cached.test.built and cached.meta["cached"]
    assert isinstance(cached.test, CachedImageDataset)
    for part in ("train", "test"):
        a, b = getattr(plain, part), getattr(cached, part)
        assert len(a) == len(b) == sizes[task][part == "test"]
        for i in range(0, len(a), max(1, len(a) // 7)):
            xa, ya = a[i]
            xb, yb = b[i]
            assert ya == yb and torch.equal(xa, xb), (task, part, i)
    again = mtil.build_task(task, root, image_size=SIZE, cache_dir=str(tmp_path), num_workers=0, progress=False,
                            train_augment=False)
    assert not again.train.built and not again.test.built          # a hit: nothing decoded


def test_seeded_split_record(fake_root, relaxed, tmp_path):
    root, sizes = fake_root
    spec = mtil.build_task("EuroSAT", root, image_size=SIZE, split_record_dir=str(tmp_path))
    rec_path = tmp_path / "EuroSAT-split.json"
    rec = json.loads(rec_path.read_text())
    assert spec.meta["split"] == {"kind": "seeded", "seed": 42, "train_fraction": 0.8, "record": str(rec_path)}
    assert (len(rec["train"]), len(rec["test"])) == sizes["EuroSAT"]
    assert not set(rec["train"]) & set(rec["test"])
    assert len(set(rec["train"]) | set(rec["test"])) == rec["n"] == sum(sizes["EuroSAT"])
    assert all(p.startswith("eurosat/2750/") for p in rec["train"])
    # The same seed again agrees with the record; another seed is refused.
    mtil.build_task("EuroSAT", root, image_size=SIZE, split_record_dir=str(tmp_path))
    with pytest.raises(ValueError, match="differs from the one recorded"):
        mtil.build_task("EuroSAT", root, image_size=SIZE, split_seed=1, split_record_dir=str(tmp_path))
    other = mtil.open_splits("EuroSAT", root, split_seed=1)
    assert sorted(other["train"].files) != sorted(mtil.open_splits("EuroSAT", root)["train"].files)


def test_seeded_split_is_random_split_on_sorted_keys():
    keys = [f"k{i:03d}" for i in range(53)]
    train, test = mtil.seeded_split(keys, seed=42, train_fraction=0.8)
    a, b = torch.utils.data.random_split(range(53), [42, 11], generator=torch.Generator().manual_seed(42))
    assert train == sorted(a.indices) and test == sorted(b.indices)
    # The file system's listing order does not matter: the split is a function of the key set.
    perm = np.random.default_rng(0).permutation(53)
    shuffled = [keys[i] for i in perm]
    tr2, te2 = mtil.seeded_split(shuffled, seed=42)
    assert sorted(shuffled[i] for i in tr2) == sorted(keys[i] for i in train)
    assert sorted(shuffled[i] for i in te2) == sorted(keys[i] for i in test)
    with pytest.raises(ValueError, match="unique"):
        mtil.seeded_split(["a", "a"], 0)
    with pytest.raises(ValueError, match="train_fraction"):
        mtil.seeded_split(keys, 0, train_fraction=1.0)


def test_missing_data_is_a_clear_error_and_creates_nothing(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"(?s)caltech101/101_ObjectCategories.*gift-fast data check"):
        mtil.build_task("Caltech101", str(empty))
    assert list(empty.iterdir()) == []      # torchvision's Caltech101 would have made a folder
    row = mtil.check_task_data("Food", str(empty))
    assert not row["present"] and "food-101" in row["problem"]


def _copy_task(fake_root, tmp_path, folder):
    root, _ = fake_root
    shutil.copytree(os.path.join(root, folder), tmp_path / folder)
    return str(tmp_path)


def test_wrong_class_list_is_refused(fake_root, tmp_path):
    root = _copy_task(fake_root, tmp_path, "food-101")
    meta = tmp_path / "food-101" / "meta" / "test.json"
    d = json.loads(meta.read_text())
    d["pizza_margherita"] = d.pop("pizza")
    meta.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="pizza margherita"):
        mtil.build_task("Food", root, image_size=SIZE)


def test_class_order_comes_from_the_data(fake_root, tmp_path):
    root = _copy_task(fake_root, tmp_path, "fgvc-aircraft-2013b")
    variants = tmp_path / "fgvc-aircraft-2013b" / "data" / "variants.txt"
    lines = variants.read_text().splitlines()
    lines[0], lines[1] = lines[1], lines[0]
    variants.write_text("\n".join(lines) + "\n")
    with pytest.warns(RuntimeWarning, match="orders its classes differently"):
        spec = mtil.build_task("Aircraft", root, image_size=SIZE)
    want = mtil.classnames("Aircraft")
    assert spec.classnames[:2] == want[1::-1] and spec.classnames[2:] == want[2:]


def test_cache_key_follows_the_source_files(fake_root, relaxed, tmp_path):
    root = _copy_task(fake_root, tmp_path, "dtd")
    cache = tmp_path / "cache"
    kw = dict(image_size=SIZE, cache_dir=str(cache), num_workers=0, progress=False)
    first = mtil.build_task("DTD", root, **kw)
    assert first.test.built
    assert not mtil.build_task("DTD", root, **kw).test.built
    img = tmp_path / "dtd" / "dtd" / "images" / "banded" / "banded_test_0001.jpg"
    from PIL import Image
    Image.new("RGB", (20, 30), (255, 0, 0)).save(img)
    os.utime(img, ns=(1, 1_000_000_000))
    changed = mtil.build_task("DTD", root, **kw)
    assert changed.test.built and not changed.train.built       # only the split whose files changed
    assert changed.test.key != first.test.key
    bigger = mtil.build_task("DTD", root, **{**kw, "image_size": SIZE + 2})
    assert bigger.test.built and bigger.test[0][0].shape == (3, SIZE + 2, SIZE + 2)


def test_build_tasks_orders(fake_root, relaxed):
    root, _ = fake_root
    specs = mtil.build_tasks("MNIST,Food", root, image_size=SIZE)
    assert [s.name for s in specs] == ["MNIST", "Food"]
    specs = mtil.build_tasks(2, root, image_size=SIZE)
    assert [s.name for s in specs][:3] == ["StanfordCars", "Food", "MNIST"] and len(specs) == 11
    with pytest.raises(ValueError, match="unknown MTIL task"):
        mtil.build_tasks(["Food", "Birds"], root)
