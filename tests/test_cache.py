"""The uint8 memory-mapped pixel cache: hit, miss, invalidation, damaged files, and its fast paths."""
from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from gift_fast.data.cache import (CachedImageDataset, cache_key, clip_eval_transform, files_fingerprint,
                                  normalize_uint8)

S = 12
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


class ToySource(Dataset):
    """n PIL images of assorted sizes and modes; counts the decodes."""

    def __init__(self, n=23, seed=0, fail_at=None):
        rng = np.random.default_rng(seed)
        self.items = []
        for i in range(n):
            h, w = int(rng.integers(5, 30)), int(rng.integers(5, 30))
            mode = ("RGB", "L", "RGBA")[i % 3]
            shape = {"RGB": (h, w, 3), "L": (h, w), "RGBA": (h, w, 4)}[mode]
            self.items.append((rng.integers(0, 256, shape, dtype=np.uint8), mode, int(rng.integers(0, 5))))
        self.calls = 0
        self.fail_at = fail_at

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        self.calls += 1
        if self.fail_at is not None and i == self.fail_at:
            raise OSError("simulated decode failure")
        arr, mode, y = self.items[i]
        return Image.fromarray(arr, mode), y


def make(tmp_path, source=None, key=("toy", 1), **kw):
    kw.setdefault("num_workers", 0)
    kw.setdefault("progress", False)
    return CachedImageDataset(source if source is not None else ToySource(), str(tmp_path), key_parts=list(key),
                              image_size=kw.pop("image_size", S), mean=MEAN, std=STD, name="toy", **kw)


def test_miss_then_hit_equals_the_eval_transform(tmp_path):
    src = ToySource()
    ds = make(tmp_path, src)
    assert ds.built and src.calls == len(src) and len(ds) == len(src)
    tf = clip_eval_transform(S, MEAN, STD)
    for i in range(len(src)):
        x, y = ds[i]
        assert y == src.items[i][2]
        assert torch.equal(x, tf(Image.fromarray(src.items[i][0], src.items[i][1])))   # bit-identical
    # A hit opens the files and never touches (or even builds) the source.
    calls = []

    def factory():
        calls.append(1)
        return ToySource()
    hit = make(tmp_path, factory)
    assert not hit.built and not calls
    assert torch.equal(hit[5][0], ds[5][0]) and hit[-1][1] == ds[-1][1]
    with pytest.raises(IndexError):
        hit[len(hit)]


def test_key_changes_with_parts_and_transform(tmp_path):
    a = make(tmp_path)
    assert not make(tmp_path).built
    b = make(tmp_path, key=("toy", 2))
    c = make(tmp_path, image_size=S + 1)
    assert b.built and c.built and len({a.key, b.key, c.key}) == 3
    assert c[0][0].shape == (3, S + 1, S + 1)
    assert cache_key(["x"], 224) != cache_key(["x"], 336) and cache_key(["x"], 224) == cache_key(["x"], 224)


def test_truncated_images_file_is_rebuilt(tmp_path):
    ds = make(tmp_path)
    good = ds.get_batch(range(len(ds)))[0].clone()
    with open(ds.images_path, "r+b") as f:
        f.truncate(os.path.getsize(ds.images_path) - 100)
    src = ToySource()
    with pytest.warns(RuntimeWarning, match="truncated"):
        again = make(tmp_path, src)
    assert again.built and src.calls == len(src)
    assert torch.equal(again.get_batch(range(len(again)))[0], good)


@pytest.mark.parametrize("damage", ["meta", "labels", "header", "last_row", "garbage_meta"])
def test_other_damage_is_detected(tmp_path, damage):
    ds = make(tmp_path)
    if damage == "meta":
        os.remove(ds.meta_path)                     # an unfinished build: rebuilt silently
    elif damage == "labels":
        np.save(ds.labels_path, np.zeros(3, dtype=np.int64))
    elif damage == "header":
        with open(ds.images_path, "r+b") as f:
            f.write(b"NOTNUMPY")
    elif damage == "last_row":
        with open(ds.images_path, "r+b") as f:
            f.seek(-1, os.SEEK_END)
            last = f.read(1)
            f.seek(-1, os.SEEK_END)
            f.write(bytes([(last[0] + 1) % 256]))
    else:
        with open(ds.meta_path, "w") as f:
            f.write("{not json")
    src = ToySource()
    if damage == "meta":
        again = make(tmp_path, src)
    else:
        with pytest.warns(RuntimeWarning, match="unusable"):
            again = make(tmp_path, src)
    assert again.built and src.calls == len(src) and len(again) == len(src)


def test_interrupted_build_leaves_no_cache(tmp_path):
    with pytest.raises(OSError, match="simulated"):
        make(tmp_path, ToySource(fail_at=17))
    assert os.listdir(tmp_path) == []              # no final file, no temporary file
    ok = make(tmp_path)
    assert ok.built


def test_stale_tmp_of_a_dead_process_is_removed(tmp_path):
    ds = make(tmp_path)
    stale = ds.images_path.replace(".images.npy", ".images.npy.tmp-999999999")
    with open(stale, "wb") as f:
        f.write(b"x" * 10)
    os.remove(ds.meta_path)                        # force a rebuild
    make(tmp_path)
    assert not os.path.exists(stale)


def test_get_batch_any_order_and_repeats(tmp_path):
    ds = make(tmp_path)
    idx = [7, 2, 2, 22, 0, -1]
    x, y = ds.get_batch(idx)
    assert x.dtype == torch.uint8 and x.shape == (6, 3, S, S) and y.dtype == torch.int64
    for k, i in enumerate(idx):
        xi, yi = ds[i]
        assert torch.equal(ds.normalize(x[k]), xi) and int(y[k]) == yi
    with pytest.raises(IndexError):
        ds.get_batch([0, len(ds)])


def test_normalize_is_totensor_plus_normalize():
    from torchvision import transforms as T
    x = torch.randint(0, 256, (4, 3, 5, 7), dtype=torch.uint8)
    ref = torch.stack([T.Normalize(MEAN, STD)(xi.float().div(255)) for xi in x])
    assert torch.equal(normalize_uint8(x, MEAN, STD), ref)


def test_iter_batches(tmp_path):
    ds = make(tmp_path)
    seen = []
    for xb, yb in ds.iter_batches(5, shuffle=True, seed=3, drop_last=True, epochs=2):
        assert xb.shape == (5, 3, S, S) and xb.dtype == torch.float32
        seen.append(yb)
    assert len(seen) == 2 * (len(ds) // 5)
    full = list(ds.iter_batches(5, shuffle=False, drop_last=False))
    xs = torch.cat([b[0] for b in full])
    assert xs.shape[0] == len(ds)
    assert torch.equal(xs[11], ds[11][0])
    # Same seed, same order; stopping early does not hang.
    a = [y.tolist() for _, y in ds.iter_batches(4, seed=9)]
    b = [y.tolist() for _, y in ds.iter_batches(4, seed=9)]
    assert a == b
    it = ds.iter_batches(4, epochs=None)
    next(it)
    it.close()


def test_pickles_for_dataloader_workers(tmp_path):
    ds = make(tmp_path)
    ds[0]                                          # opens the memory map in this process
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._mm is None and torch.equal(clone[3][0], ds[3][0])
    xs = torch.cat([x for x, _ in DataLoader(ds, batch_size=8, num_workers=2)])
    assert torch.equal(xs, torch.stack([ds[i][0] for i in range(len(ds))]))


def test_build_with_workers(tmp_path):
    a = make(tmp_path / "a", num_workers=2)
    b = make(tmp_path / "b")
    assert torch.equal(a.get_batch(range(len(a)))[0], b.get_batch(range(len(b)))[0])
    meta = json.loads(open(a.meta_path).read())
    assert meta["n"] == len(a) and meta["image_size"] == S


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="image_size"):
        make(tmp_path, image_size=0)
    with pytest.raises(ValueError, match="empty"):
        make(tmp_path, ToySource(n=0))
    with pytest.raises(ValueError, match="mean and std"):
        CachedImageDataset(ToySource(), str(tmp_path), key_parts=[], std=(0.1, 0.0, 0.2))


def test_files_fingerprint(tmp_path):
    p = tmp_path / "a.bin"
    p.write_bytes(b"abc")
    q = tmp_path / "b.bin"
    q.write_bytes(b"abcd")
    f1 = files_fingerprint([str(p), str(q)], str(tmp_path))
    assert f1 == files_fingerprint([str(p), str(q)], str(tmp_path))
    assert f1 != files_fingerprint([str(q), str(p)], str(tmp_path))        # order matters (row i = file i)
    os.utime(p, ns=(5, 5))
    assert f1 != files_fingerprint([str(p), str(q)], str(tmp_path))
    with pytest.raises(FileNotFoundError):
        files_fingerprint([str(tmp_path / "missing")])


def test_iter_batches_rows_are_a_share_of_the_same_global_batches(tmp_path):
    """Several processes (gift_fast.distributed): each reads only its rows of the batch all draw."""
    ds = make(tmp_path)
    full = list(ds.iter_batches(8, shuffle=True, seed=3, epochs=2))
    for rows in (slice(0, 4), slice(4, 8)):
        part = list(ds.iter_batches(8, shuffle=True, seed=3, epochs=2, rows=rows))
        assert len(part) == len(full)
        for (x, y), (xs, ys) in zip(full, part):
            assert torch.equal(xs, x[rows]) and torch.equal(ys, y[rows])


def test_a_cache_that_cannot_fit_on_the_disk_is_refused_before_writing(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 ** 9, 10 ** 9 - 1000, 1000))
    with pytest.raises(OSError, match=r"needs .* GB in .* only 0.0 GB are free.*--data-cache none"):
        make(tmp_path)
    assert not any(".tmp-" in f or f.endswith(".npy") for f in os.listdir(tmp_path))   # nothing written


def _indices_of(ds, batches):
    """The dataset index of every row of ``batches`` (each cached image is distinct)."""
    ref = torch.stack([ds[i][0] for i in range(len(ds))]).flatten(1)
    out = []
    for xb, _ in batches:
        hit = (xb.flatten(1)[:, None, :] == ref[None]).all(-1)
        assert bool((hit.sum(1) == 1).all())
        out.append(hit.int().argmax(1).tolist())
    return out


def test_iter_batches_reshuffles_every_epoch_and_repeats_with_the_seed(tmp_path):
    ds = make(tmp_path)                                     # 23 images, batches of 5: 4 per epoch, 3 dropped
    n, b, per_epoch = len(ds), 5, len(ds) // 5
    runs = [_indices_of(ds, ds.iter_batches(b, shuffle=True, seed=s, epochs=3)) for s in (4, 4, 5)]
    assert runs[0] == runs[1]                               # the same seed, the same sequence
    assert runs[0] != runs[2]
    epochs = [sum(runs[0][e * per_epoch:(e + 1) * per_epoch], []) for e in range(3)]
    for e in epochs:                                        # each epoch: distinct images, a permutation's prefix
        assert len(e) == per_epoch * b and len(set(e)) == len(e) and set(e) <= set(range(n))
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2] and epochs[0] != epochs[2]
    assert sorted(epochs[0]) != list(range(per_epoch * b))  # shuffled
    # endless iteration (the trainer's use) gives the same first epochs
    it = ds.iter_batches(b, shuffle=True, seed=4, epochs=None)
    endless = _indices_of(ds, [next(it) for _ in range(3 * per_epoch)])
    it.close()
    assert endless == runs[0]
