"""Class pool, prompt sampling and per-image seeds (gift_fast.synth.prompts)."""
from collections import Counter

import pytest

from gift_fast.synth.prompts import (DEFAULT_TEMPLATE, RETRY_SEED_STRIDE, authors_image_seed, build_class_pool,
                                     image_seed, imagenet_classnames, pool_source, prompt_indices, sample_prompts,
                                     seed_for, sequence_prompts, shard_indices, task_pools)


def test_imagenet_classnames_come_from_open_clip():
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
    names = imagenet_classnames()
    assert names == list(IMAGENET_CLASSNAMES)
    assert len(names) == 1000 and names[0] == "tench"


def test_pool_is_base_then_learned_tasks_in_order_with_duplicates_kept():
    pool = build_class_pool(["cat", "dog"], [["robin", "cat"], ["oak"]])
    assert pool == ["cat", "dog", "robin", "cat", "oak"]
    assert build_class_pool(["cat"], []) == ["cat"]
    assert build_class_pool([], [["a"]]) == ["a"]


def test_pool_for_mtil_order_1_task_3_is_imagenet_plus_aircraft_and_caltech_each_with_its_template():
    from gift_fast.config import task_order
    from gift_fast.data.mtil import classnames
    from gift_fast.synth.engine import mtil_tasks, sequence_sources
    base, sources = sequence_sources(mtil_tasks(1))
    pool = task_pools(base, sources)[2]
    assert len(pool) == 1000 + len(classnames("Aircraft")) + len(classnames("Caltech101"))
    assert pool[:1000] == [f"a photo of a {c}." for c in imagenet_classnames()]
    assert pool[1000:1100] == [f"a photo of a {c}, a type of aircraft." for c in classnames("Aircraft")]
    assert pool[1100] == "a photo of a off-center face."
    assert [s.name for s in sources] == task_order(1)
    # the first task samples from ImageNet names only
    first = sequence_prompts(base, sources, 300, seed=1)[0]
    assert set(first) <= set(pool[:1000])


def test_sequence_prompts_hash_scheme_keeps_the_counter_based_draws():
    base = pool_source("base", ["x", "y"], "a photo of a {}.")
    tasks = [pool_source("A", ["a1", "a2"], "an {} of A."), pool_source("B", ["b1"])]
    got = sequence_prompts(base, tasks, 50, seed=9)
    pools = task_pools(base, tasks)
    assert pools[1] == ["a photo of a x.", "a photo of a y.", "an a1 of A.", "an a2 of A."]
    for t in range(2):
        assert got[t] == [pools[t][k] for k in prompt_indices(len(pools[t]), 50, seed=9, task_index=t)]
    assert sequence_prompts(base, tasks, 7, seed=9)[1] == got[1][:7]   # prefix-stable, as before


def test_sequence_prompts_authors_scheme_is_txt2img_random_choice():
    import random
    base = pool_source("base", ["x", "y", "z"])
    tasks = [pool_source("A", ["a1"], "{} of A"), pool_source("B", ["b1", "b2"]), pool_source("C", ["c"])]
    got = sequence_prompts(base, tasks, 20, seed=42, scheme="authors")
    # txt2img.py: seed_all(seed); pool grows task after task; random.choice(prompts_pool), image_num times
    random.seed(42)
    pool, want = [], []
    for src in [base] + tasks[:-1]:
        pool.extend(src.prompts())
        want.append([random.choice(pool) for _ in range(20)])
    assert got == want
    with pytest.raises(ValueError, match="unknown seed scheme"):
        sequence_prompts(base, tasks, 2, seed=1, scheme="numpy")
    # pool_exclude: the excluded data set's entries never occur, the others still do
    ex = sequence_prompts(base, tasks, 200, seed=3, exclude=["A"])
    assert "a1 of A" not in set(ex[1] + ex[2]) and "a photo of a b1." in ex[2]


def test_authors_image_seed_is_their_expression():
    # txt2img.py: seed = j + 100000 * (dataset_names.index(dataset_name) - 1) + 10000000 * args.seed, where
    # dataset_name is the data set BEFORE the task in [ImageNet, task 1, task 2, ...]
    dataset_names = ["ImageNet", "Aircraft", "Caltech101", "CIFAR100"]
    for i in range(len(dataset_names) - 1):          # i: 0-based index of the task being generated
        for j in (0, 1, 999, 9999):
            theirs = j + 100000 * (dataset_names.index(dataset_names[i]) - 1) + 10000000 * 42
            assert authors_image_seed(42, i, j) == theirs == seed_for("authors", 42, i, j)
    assert authors_image_seed(42, 0, 0, attempt=2) == 420_000_000 - 100_000 + 2 * RETRY_SEED_STRIDE
    assert seed_for("hash", 5, 1, 2) == image_seed(5, 1, 2)
    import torch
    torch.Generator().manual_seed(authors_image_seed(0, 0, 5))   # negative (seed 0, first task): accepted


# --------------------------------------------------------------------------- the authors' released prompts
def _authors_prompts():
    import json
    import os
    path = os.path.join(os.path.dirname(__file__), "fixtures", "authors", "synthetic_prompts.json")
    with open(path, encoding="utf-8") as f:
        fx = json.load(f)
    prompts = fx["prompts"]

    def distinct(task_entry):
        mask = int(task_entry["distinct"], 16)
        return {p for i, p in enumerate(prompts) if mask >> i & 1}

    return fx, distinct


def _prompts_only(tmp_path, order, n, scheme):
    from click.testing import CliRunner

    from gift_fast.cli.main import main
    out = tmp_path / f"o{order}{scheme}"
    r = CliRunner().invoke(main, ["synth", "--order", str(order), "--prompts-only", "--images-per-task", str(n),
                                  "--seed", "42", "--seed-scheme", scheme, "--out", str(out)],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return out


def _column(path):
    import csv
    with open(path, newline="", encoding="utf-8") as f:
        return [row[1] for row in list(csv.reader(f))[1:]]


@pytest.mark.slow
@pytest.mark.parametrize("order", [1, 2])
def test_prompts_only_covers_every_distinct_prompt_of_the_authors_csvs(tmp_path, order):
    """Default (hash) scheme, many draws: every prompt the authors drew for a task can occur here."""
    fx, distinct = _authors_prompts()
    out = _prompts_only(tmp_path, order, 40000, "hash")   # 40,000 draws from <= 2,101 entries: all occur
    for task, entry in fx["orders"][str(order)]["tasks"].items():
        ours = set(_column(out / f"{task}_Syn" / "image_text.csv"))
        theirs = distinct(entry)
        assert len(theirs) > 600
        missing = theirs - ours
        assert not missing, f"Order {order}, {task}: {len(missing)} authors' prompts missing, e.g. {sorted(missing)[:3]}"


@pytest.mark.parametrize("order,rows", [(1, 10000), (2, 1000)])
def test_seed_scheme_authors_reproduces_the_authors_csvs_row_by_row(tmp_path, order, rows):
    import hashlib
    fx, distinct = _authors_prompts()
    out = _prompts_only(tmp_path, order, rows, "authors")
    for task, entry in fx["orders"][str(order)]["tasks"].items():
        assert entry["rows"] == rows
        col = _column(out / f"{task}_Syn" / "image_text.csv")
        assert set(col) == distinct(entry), task
        assert hashlib.sha256("\n".join(col).encode("utf-8")).hexdigest() == entry["sha256"], task


@pytest.mark.parametrize("bad", [["cat", ""], ["cat", 3], ["  "]])
def test_pool_rejects_empty_or_non_string_names(bad):
    with pytest.raises(ValueError, match="non-empty string"):
        build_class_pool(bad, [])


def test_pool_rejects_a_string_and_an_empty_pool():
    with pytest.raises(TypeError):
        build_class_pool("cat", [])
    with pytest.raises(TypeError):
        build_class_pool(["cat"], "dog")
    with pytest.raises(ValueError, match="empty"):
        build_class_pool([], [])


def test_prompts_are_templated_drawn_from_the_pool_with_replacement():
    pool = ["a", "b", "c"]
    prompts = sample_prompts(pool, 50, seed=0, task_index=0)
    assert len(prompts) == 50
    assert set(prompts) <= {DEFAULT_TEMPLATE.format(c) for c in pool}
    assert len(set(prompts)) == 3  # 50 draws from 3: all appear, hence repeats (with replacement)
    assert sample_prompts(["x y"], 2, seed=0, task_index=0, template="{} photo") == ["x y photo"] * 2


def test_prompts_are_uniform_over_the_pool():
    counts = Counter(prompt_indices(10, 20000, seed=3, task_index=2))
    assert set(counts) == set(range(10))
    # binomial(20000, 0.1): sd = 42; 6 sd either side
    assert all(abs(c - 2000) < 260 for c in counts.values()), counts


def test_prompts_are_deterministic_prefix_stable_and_seed_dependent():
    pool = [f"class{k}" for k in range(1000)]
    a = sample_prompts(pool, 200, seed=42, task_index=3)
    assert a == sample_prompts(pool, 200, seed=42, task_index=3)
    assert a[:17] == sample_prompts(pool, 17, seed=42, task_index=3)  # smaller sets are subsets of larger
    assert a != sample_prompts(pool, 200, seed=43, task_index=3)
    assert a != sample_prompts(pool, 200, seed=42, task_index=4)
    assert sample_prompts(pool, 0, seed=1, task_index=0) == []


def test_prompt_indices_are_pinned():
    # a change of the sampling rule changes every synthetic set: make it visible
    # the values (pinned when the rule was written) and the independent re-implementation below
    assert prompt_indices(1000, 5, seed=42, task_index=0) == [559, 987, 922, 98, 687]
    assert prompt_indices(7, 8, seed=0, task_index=3) == [4, 1, 5, 5, 4, 0, 1, 5]
    for pool, seed, task in ((1000, 42, 0), (7, 0, 3), (1100, 5, 9)):
        assert prompt_indices(pool, 20, seed=seed, task_index=task) == [_reference_index(pool, seed, task, i)
                                                                       for i in range(20)]


def _reference_index(pool_size, seed, task, i):
    """An independent re-implementation of the documented rule (SplitMix64 over the tuple)."""
    m = (1 << 64) - 1

    def sm(x):
        x = (x + 0x9E3779B97F4A7C15) & m
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m
        return x ^ (x >> 31)

    h = 0x243F6A8885A308D3
    for p in (0x5052_4F4D_5054, seed, task, i):
        h = sm(h ^ (p & m))
        h = sm(h ^ 0)  # sign limb
    return h % pool_size


@pytest.mark.parametrize("kw,err", [
    (dict(template="no placeholder"), ValueError), (dict(template="{} and {}"), ValueError),
    (dict(seed=-1), ValueError), (dict(seed=1.5), TypeError), (dict(task_index=-2), ValueError),
])
def test_sample_prompts_bad_arguments(kw, err):
    args = dict(seed=0, task_index=0)
    args.update(kw)
    with pytest.raises(err):
        sample_prompts(["a"], 3, **args)


def test_image_seeds_are_deterministic_distinct_and_in_range():
    seeds = {image_seed(42, t, i) for t in range(11) for i in range(1000)}
    assert len(seeds) == 11 * 1000
    assert all(0 <= s < 2 ** 63 for s in seeds)
    assert image_seed(42, 3, 7) == image_seed(42, 3, 7)
    assert image_seed(42, 3, 7) != image_seed(43, 3, 7)
    import numpy as np
    assert image_seed(np.int64(42), 3, 7) == image_seed(42, 3, 7)


def test_retry_seeds_are_the_documented_next_seeds():
    base = image_seed(5, 1, 9)
    assert image_seed(5, 1, 9, attempt=0) == base
    for k in (1, 2, 10):
        assert image_seed(5, 1, 9, attempt=k) == (base + k * RETRY_SEED_STRIDE) % 2 ** 63
    retries = {image_seed(5, 1, i, a) for i in range(200) for a in range(4)}
    assert len(retries) == 800


@pytest.mark.parametrize("n,world", [(0, 1), (1, 1), (10, 3), (1000, 8), (7, 16)])
def test_shards_are_disjoint_and_complete(n, world):
    shards = [shard_indices(n, r, world) for r in range(world)]
    flat = [i for s in shards for i in s]
    assert sorted(flat) == list(range(n)) and len(flat) == len(set(flat))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_shard_errors():
    with pytest.raises(ValueError, match="out of range"):
        shard_indices(10, 3, 3)
    with pytest.raises(ValueError):
        shard_indices(10, 0, 0)
