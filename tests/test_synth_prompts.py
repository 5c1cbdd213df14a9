"""Class pool, prompt sampling and per-image seeds (gift_fast.synth.prompts)."""
from collections import Counter

import pytest

from gift_fast.synth.prompts import (DEFAULT_TEMPLATE, RETRY_SEED_STRIDE, build_class_pool, image_seed,
                                     imagenet_classnames, prompt_indices, sample_prompts, shard_indices)


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


def test_pool_for_mtil_order_1_task_3_is_imagenet_plus_aircraft_and_caltech():
    from gift_fast.config import task_order
    from gift_fast.data.mtil import classnames
    order = task_order(1)
    base = imagenet_classnames()
    pool = build_class_pool(base, [classnames(t) for t in order[:2]])
    assert len(pool) == 1000 + len(classnames("Aircraft")) + len(classnames("Caltech101"))
    assert pool[:1000] == base and pool[1000:1100] == classnames("Aircraft")
    # the first task samples from ImageNet names only
    first = sample_prompts(build_class_pool(base, []), 300, seed=1, task_index=0)
    assert all(p[len("a photo of a "):-1] in set(base) for p in first)


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
