"""Class-incremental benchmarks: class orders and steps, the growing classifier's labels, the data
readers on fake CIFAR100 / TinyImageNet folders, the base class set, the metrics, the seed's numbers."""
import json
import os
import re

import numpy as np
import pytest
import torch

from gift_fast.data import cil
from gift_fast.data.cil import (ICARL_CIFAR100_ORDER, PROTOCOLS, SEED_RESULTS, base_classnames, build_cil, build_steps,
                                class_order, make_split, name_tokens, read_tiny_imagenet, split_steps,
                                write_or_check_split)
from gift_fast.metrics import cil_metrics

from fake_datasets import make_fake_cifar100_root, make_fake_tiny_imagenet_root

# Tab. 7 and Tab. 8 of the paper as its text prints them (only those lines: the data SEED_RESULTS transcribes)
SEED_TABLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "seed_cil_tables.txt")


# --------------------------------------------------------------------------- orders and steps
def test_seeded_order_is_a_reproducible_permutation():
    a = class_order(100, "seeded", seed=3)
    assert sorted(a) == list(range(100))
    assert a == class_order(100, "seeded", seed=3)
    assert a != class_order(100, "seeded", seed=4)
    assert a != list(range(100))
    assert class_order(7, "natural") == list(range(7))


def test_icarl_order_and_bad_orders():
    o = class_order(100, "icarl")
    assert sorted(o) == list(range(100)) and o[:5] == [87, 0, 52, 58, 44] and o[-1] == 39
    assert tuple(o) == ICARL_CIFAR100_ORDER
    with pytest.raises(ValueError, match="icarl"):
        class_order(200, "icarl")
    with pytest.raises(ValueError, match="exactly once"):
        class_order(4, [0, 1, 1, 3])
    with pytest.raises(ValueError, match="exactly once"):
        class_order(4, [0, 1, 2])
    with pytest.raises(ValueError, match="unknown class order"):
        class_order(4, "random")


@pytest.mark.parametrize("steps", [10, 20, 50])
def test_cifar_steps_disjoint_complete_equal(steps):
    order = class_order(100, "seeded", seed=1)
    parts = split_steps(order, steps)
    assert len(parts) == steps
    assert all(len(p) == 100 // steps for p in parts)
    assert sum(parts, []) == order                        # consecutive, in order: disjoint and complete
    assert len(set(sum(parts, []))) == 100


@pytest.mark.parametrize("steps", [5, 10, 20])
def test_tiny_steps_base_then_equal(steps):
    order = class_order(200, "seeded", seed=2)
    parts = split_steps(order, steps, initial=100)
    assert len(parts) == steps + 1                         # the base step, then `steps` incremental ones
    assert parts[0] == order[:100]
    assert all(len(p) == 100 // steps for p in parts[1:])
    assert sum(parts, []) == order


def test_steps_errors():
    with pytest.raises(ValueError, match="equal steps"):
        split_steps(list(range(100)), 7)
    with pytest.raises(ValueError, match="positive"):
        split_steps(list(range(100)), 0)
    with pytest.raises(ValueError, match="initial"):
        split_steps(list(range(10)), 2, initial=10)
    with pytest.raises(ValueError, match="equal steps"):
        make_split("tinyimagenet-cil", 3, [str(i) for i in range(200)])
    with pytest.raises(ValueError, match="needs 100 classes"):
        make_split("cifar100-cil", 10, ["a", "b"])
    with pytest.raises(ValueError, match="unknown class-incremental benchmark"):
        cil.protocol("cifar10-cil")


def test_protocol_settings():
    c, t = PROTOCOLS["cifar100-cil"], PROTOCOLS["tinyimagenet-cil"]
    assert (c.label_smoothing, c.weight_decay, c.initial_classes) == (0.2, 0.0, None)
    assert (t.label_smoothing, t.weight_decay, t.initial_classes) == (0.0, 0.1, 100)


def test_split_record_written_and_checked(tmp_path):
    names = [f"c{i}" for i in range(100)]
    s = make_split("cifar100-cil", 10, names, seed=5, base_classnames_=["tench"])
    path = write_or_check_split(s, str(tmp_path))
    rec = json.load(open(path))
    assert rec["class_order"] == s.class_order and rec["seed"] == 5 and rec["steps"] == 10
    assert rec["step_classnames"][0] == [names[c] for c in s.step_classes[0]]
    assert rec["class_order_names"] == [names[c] for c in s.class_order]
    assert [e for e in os.listdir(tmp_path) if ".tmp" in e] == []
    write_or_check_split(make_split("cifar100-cil", 10, names, seed=5, base_classnames_=["tench"]), str(tmp_path))
    with pytest.raises(ValueError, match="differs from the one recorded"):
        write_or_check_split(make_split("cifar100-cil", 10, names, seed=6, base_classnames_=["tench"]), str(tmp_path))
    with pytest.raises(ValueError, match="steps"):
        write_or_check_split(make_split("cifar100-cil", 20, names, seed=5, base_classnames_=["tench"]), str(tmp_path))


# --------------------------------------------------------------------------- the growing classifier
class _Traced(torch.utils.data.Dataset):
    """Sample i is (tensor([i]), label[i]): lets a test follow each source sample through the views."""

    def __init__(self, labels):
        self.labels = list(labels)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return torch.tensor([i]), self.labels[i]


@pytest.mark.parametrize("bench_name,steps,n", [("cifar100-cil", 20, 100), ("tinyimagenet-cil", 5, 200)])
def test_growing_classifier_labels(bench_name, steps, n):
    rng = np.random.default_rng(0)
    names = [f"class{i}" for i in range(n)]
    train = _Traced(rng.integers(0, n, 6 * n))
    test = _Traced(np.repeat(np.arange(n), 2)[rng.permutation(2 * n)])
    split = make_split(bench_name, steps, names, seed=11)
    tasks, evals = build_steps(bench_name, split, train, test)
    assert len(tasks) == len(evals) == split.num_steps
    position = {c: i for i, c in enumerate(split.class_order)}
    seen_names = []
    for t, (task, ev) in enumerate(zip(tasks, evals)):
        seen_names += task.classnames
        assert ev.classnames == seen_names                       # the classifier grows by the step's classes
        assert ev.classnames == split.ordered_classnames()[:len(seen_names)]
        off = task.meta["label_offset"]
        assert off == len(seen_names) - len(task.classnames)
        # training: labels 0..k-1 of the step's classes; + offset = the cumulative label
        for j in range(len(task.train)):
            (i,), y = task.train[j]
            src = train.labels[int(i)]
            assert src in split.step_classes[t] and 0 <= y < len(task.classnames)
            assert task.classnames[y] == names[src] and y + off == position[src]
        assert len(task.train) == sum(1 for y in train.labels if y in split.step_classes[t])
        # evaluation: every test image of a seen class, labelled by its position in the class order
        seen = set(sum(split.step_classes[:t + 1], []))
        assert len(ev.test) == sum(1 for y in test.labels if y in seen)
        for j in range(len(ev.test)):
            (i,), y = ev.test[j]
            src = test.labels[int(i)]
            assert y == position[src] and ev.classnames[y] == names[src]
        assert ev.train is None
        assert task.templates == ev.templates == [cil.CIL_TEMPLATE]
        assert task.meta["label_smoothing"] == PROTOCOLS[bench_name].label_smoothing
    assert len(evals[-1].test) == len(test)


# --------------------------------------------------------------------------- metrics
def test_cil_metrics_hand_computed():
    m = cil_metrics([80.0, 70.0, 60.0, 50.0])
    assert m == {"avg": pytest.approx(65.0), "last": 50.0, "steps": 4}
    m = cil_metrics(np.array([90.0, 81.0, 72.5]))
    assert m["avg"] == pytest.approx((90 + 81 + 72.5) / 3) and m["last"] == 72.5
    assert cil_metrics([42.0]) == {"avg": 42.0, "last": 42.0, "steps": 1}


def test_cil_metrics_bad_input():
    for bad in ([], [[1.0, 2.0]], [1.0, float("nan")], [float("inf")]):
        with pytest.raises(ValueError):
            cil_metrics(bad)


# --------------------------------------------------------------------------- fake data sets
@pytest.fixture(scope="module")
def fake_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("cil_data"))
    make_fake_cifar100_root(root, train_per_class=2, test_per_class=1)
    make_fake_tiny_imagenet_root(root, train_per_class=2, test_per_class=1)
    return root


def test_cifar100_cil_from_fake_folder(fake_root, tmp_path):
    from fake_datasets import relaxed_md5_checks
    from gift_fast.data.mtil import classnames
    with relaxed_md5_checks():
        plain = build_cil("cifar100-cil", 10, fake_root, image_size=32, record_dir=str(tmp_path / "run"),
                          progress=False)
        cached = build_cil("cifar100-cil", 10, fake_root, image_size=32, cache_dir=str(tmp_path / "cache"),
                           record_dir=str(tmp_path / "run"), progress=False)   # same split: the record check passes
    assert plain.split.classnames == classnames("CIFAR100")
    assert [len(t.train) for t in plain.tasks] == [20] * 10 and [len(t.test) for t in plain.tasks] == [10] * 10
    assert [len(e.test) for e in plain.eval_tasks] == [10 * (t + 1) for t in range(10)]
    assert (plain.label_smoothing, plain.weight_decay) == (0.2, 0.0)
    assert os.path.exists(tmp_path / "run" / cil.SPLIT_RECORD_NAME)
    # the cached view gives the same pixels and labels, and keeps the uint8 fast path
    t = 3
    a, b = plain.tasks[t].train, cached.tasks[t].train
    assert isinstance(b, cil.CachedClassSubset) and not hasattr(a, "get_batch")
    for j in (0, 5, len(a) - 1):
        (xa, ya), (xb, yb) = a[j], b[j]
        assert ya == yb and torch.equal(xa, xb)
    xu, yu = b.get_batch([len(b) - 1, 0, 0])
    assert xu.dtype == torch.uint8 and yu.tolist() == [b[len(b) - 1][1], b[0][1], b[0][1]]
    assert torch.equal(b.normalize(xu[1]), b[0][0])
    batches = list(b.iter_batches(8, shuffle=False, drop_last=False))
    assert torch.equal(torch.cat([y for _, y in batches]), torch.from_numpy(b.labels))
    # the base class set does not overlap CIFAR100's names
    down = set().union(*(name_tokens(n) for n in classnames("CIFAR100")))
    assert len(plain.base_classnames) == 100 and not any(name_tokens(n) & down for n in plain.base_classnames)
    # the synthesis task file: the steps in order, the base set as the pool
    from gift_fast.synth.engine import load_task_file
    tasks, base = load_task_file(plain.write_synth_task_file(str(tmp_path / "run" / "synth-tasks.json")))
    assert [n for n, *_ in tasks] == [t.name for t in plain.tasks] and tasks[2][1] == plain.tasks[2].classnames
    assert {tmpl for _, _, tmpl in tasks} == {"a photo of a {}."}      # the pool template, not the CE one
    assert base == plain.base_classnames and "/" not in "".join(n for n, *_ in tasks)
    with relaxed_md5_checks(), pytest.raises(ValueError, match="differs from the one recorded"):
        build_cil("cifar100-cil", 10, fake_root, image_size=32, seed=7, record_dir=str(tmp_path / "run"))


def test_tinyimagenet_cil_from_fake_folder(fake_root, tmp_path):
    b = build_cil("tinyimagenet-cil", 5, fake_root, image_size=16, cache_dir=str(tmp_path / "cache"), progress=False)
    raw = read_tiny_imagenet(fake_root)
    assert [len(t.classnames) for t in b.tasks] == [100, 20, 20, 20, 20, 20]
    assert len(b.eval_tasks) == 6 and len(b.eval_tasks[-1].classnames) == 200
    assert [len(e.test) for e in b.eval_tasks] == [100, 120, 140, 160, 180, 200]
    assert (b.label_smoothing, b.weight_decay) == (0.0, 0.1)
    # labels are positions of the sorted wnids, names CLIP's ImageNet names of those wnids
    assert raw["wnids"] == sorted(raw["wnids"])
    from gift_fast.data.mtil import imagenet_classnames
    inet = dict(zip(cil.imagenet_wnids(), imagenet_classnames()))
    assert raw["classnames"] == [inet[w] for w in raw["wnids"]]
    ann = {}
    with open(os.path.join(raw["root"], "val", "val_annotations.txt")) as f:
        for line in f:
            name, wnid = line.split("\t")[:2]
            ann[name] = wnid
    for p, y in zip(raw["test"].files[:20], raw["test"].labels[:20]):
        assert raw["wnids"][y] == ann[os.path.basename(p)]
    for p, y in zip(raw["train"].files[::37], raw["train"].labels[::37]):
        assert raw["wnids"][y] == p.split(os.sep)[-3]
    img, y = raw["train"][0]
    assert img.mode == "RGB" and img.size == (16, 16)
    # the synthetic base set leaves out the TinyImageNet classes themselves and any name overlap
    assert len(b.base_classnames) == 100 and not set(b.base_classnames) & set(raw["classnames"])
    x, _ = b.eval_tasks[2].test[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32


def test_tiny_imagenet_reader_errors_and_words_fallback(tmp_path):
    root = str(tmp_path)
    with pytest.raises(FileNotFoundError, match="wnids.txt"):
        read_tiny_imagenet(root)
    make_fake_tiny_imagenet_root(root, wnids=["n01440764", "n99999999"], train_per_class=1)
    raw = read_tiny_imagenet(os.path.join(root, "tiny-imagenet-200"))   # the folder itself also works
    assert raw["classnames"] == ["tench", "thing 99999999"]            # not an ImageNet wnid: words.txt
    ann = os.path.join(root, "tiny-imagenet-200", "val", "val_annotations.txt")
    with open(ann, "a") as f:
        f.write("val_99.JPEG\tn00000001\t0\t0\t1\t1\n")
    with pytest.raises(ValueError, match="does not name a class"):
        read_tiny_imagenet(root)


# --------------------------------------------------------------------------- base class set
def test_base_classnames_rule():
    from gift_fast.data.mtil import classnames, imagenet_classnames
    down = classnames("CIFAR100")
    a = base_classnames(down)
    assert a == base_classnames(down) and a != base_classnames(down, seed=1)
    pool = imagenet_classnames()
    assert [pool.index(n) for n in a] == sorted(pool.index(n) for n in a)      # pool order
    # names hide overlaps that the WordNet glosses show: a dinosaur, a ray, a spider
    assert name_tokens("Maple Trees") == {"maple", "tree"}
    eligible = set(base_classnames(down, n=600))
    assert not {"triceratops", "stingray", "tarantula", "brown bear"} & eligible
    # an explicit pool: word overlap and exclusion by index
    pool2 = ["red fox", "tabby cat", "golden retriever", "tree frog", "teapot", "violin"]
    assert base_classnames(["fox", "oak tree"], n=3, pool=pool2, exclude=[4]) == ["tabby cat", "golden retriever",
                                                                                  "violin"]
    with pytest.raises(ValueError, match="only 3"):
        base_classnames(["fox", "oak tree"], n=4, pool=pool2, exclude=[4])


# --------------------------------------------------------------------------- reference data
def _parse_seed_tables(path):
    lines = open(path, encoding="utf-8").read().splitlines()
    tables, cur = [], None
    for ln in lines:
        if re.match(r"^\d+ steps \|", ln):
            cur = {int(s): {} for s in re.findall(r"(\d+) steps", ln)}
            tables.append(cur)
        elif cur is not None and "|" in ln and not ln.startswith("Methods"):
            cells = [c.strip() for c in ln.split("|")]
            if len(cells) < 7 or not re.match(r"^-?[\d.]+$|^-$", cells[1]):
                cur = None
                continue
            name = re.sub(r"\s*\[\d+\]|\s*\(Ours\)", "", cells[0])
            vals = [None if c == "-" else float(c) for c in cells[1:7]]
            for i, s in enumerate(cur):
                cur[s][name] = (vals[2 * i], vals[2 * i + 1])
        elif cur is not None and "|" not in ln:
            cur = None
    return tables


def test_seed_results_match_the_paper_text():
    tables = _parse_seed_tables(SEED_TABLES)
    assert tables[0] == SEED_RESULTS["cifar100-cil"]
    assert tables[1] == SEED_RESULTS["tinyimagenet-cil"]


def test_seed_results_shape():
    for name, proto in PROTOCOLS.items():
        assert sorted(SEED_RESULTS[name]) == sorted(proto.paper_steps)
        for steps in proto.paper_steps:
            rows = cil.seed_results(name, steps)
            assert {"GIFT", "ZSCL", "CLIP Zero-shot", "CLIP Fine-tune"} <= set(rows)
            assert rows["GIFT"][0] > rows["GIFT"][1]       # Avg > Last on every column of both tables
    assert cil.seed_results("cifar100-cil", 10)["GIFT"] == (85.11, 77.70)
    assert cil.seed_results("tinyimagenet-cil", 20)["GIFT"] == (79.32, 74.87)
    assert cil.seed_results("cifar100-cil", 5) == {}


def test_imagenet_metadata():
    w = cil.imagenet_wnids()
    assert len(w) == 1000 == len(set(w)) and w == sorted(w) and w[0] == "n01440764"   # tench
    d = cil.imagenet_descriptions()
    assert len(d) == 1000 and "dinosaur" in d[[i for i, n in enumerate(
        __import__("gift_fast.data.mtil", fromlist=["x"]).imagenet_classnames()) if n == "triceratops"][0]]
