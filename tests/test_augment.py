"""The training augmentation of task images (the authors' RandomResizedCrop(S, scale=(0.9, 1.0), bicubic)):
the box sampler against torchvision's, the cached (crop on the device) path against the DataLoader path,
training batches random and evaluation batches fixed, and the cache's format version."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from gift_fast.data import cache as cache_mod
from gift_fast.data.cache import (CACHE_FORMAT_VERSION, CachedImageDataset, _to_landscape_uint8, boxes_in_cache,
                                  clip_eval_transform, clip_train_transform, crop_resize, random_resized_crop_box,
                                  train_crop_width)
from gift_fast.evaluate import iter_eval_batches
from gift_fast.batches import TaskBatches

SIZES = [(375, 500), (500, 375), (300, 300), (240, 800), (800, 240), (333, 450), (450, 430)]


def smooth_image(h, w, seed=0):
    """A smooth, asymmetric RGB image (a wrong orientation or offset shows as a large difference)."""
    g = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    chans = []
    for c in range(3):
        a, b, f = g.uniform(0.5, 2, 3)
        chans.append(120 + 60 * np.sin(a * 3 * xx + c) * np.cos(b * 2 * yy) + 50 * xx * f - 40 * yy)
    return Image.fromarray(np.clip(np.stack(chans, -1), 0, 255).astype(np.uint8))


def _stats(boxes, h, w):
    b = np.asarray(boxes, dtype=np.float64)
    feats = np.stack([b[:, 0] / h, b[:, 1] / w, b[:, 2] / h, b[:, 3] / w, b[:, 2] * b[:, 3] / (h * w)], 1)
    return feats.mean(0), feats.std(0), len(b)


def _assert_same_distribution(a, b, what):
    (ma, sa, na), (mb, sb, nb) = a, b
    se = np.sqrt(sa ** 2 / na + sb ** 2 / nb) + 1e-9
    assert np.all(np.abs(ma - mb) <= 5 * se + 1e-4), (what, ma, mb, se)
    assert np.all(np.abs(sa - sb) <= 0.1 * np.maximum(sa, sb) + 1e-3), (what, sa, sb)


@pytest.mark.parametrize("h,w", SIZES)
def test_box_sampler_is_torchvisions(h, w):
    """random_resized_crop_box draws torchvision's RandomResizedCrop.get_params distribution (with the
    protocol's scale and the default ratio): same mean and spread of position, size and area."""
    from torchvision import transforms as T

    n = 4000
    torch.manual_seed(0)
    img = torch.zeros(1, h, w)
    theirs = [T.RandomResizedCrop.get_params(img, [0.9, 1.0], [3 / 4, 4 / 3]) for _ in range(n)]
    rng = np.random.default_rng(0)
    ours = [random_resized_crop_box(h, w, rng) for _ in range(n)]
    _assert_same_distribution(_stats(theirs, h, w), _stats(ours, h, w), (h, w))
    # every box lies in the image; the central-crop fallback happens as often
    for t, b in ((theirs, "torchvision"), (ours, "ours")):
        arr = np.asarray(t)
        assert (arr[:, 0] >= 0).all() and (arr[:, 1] >= 0).all(), b
        assert (arr[:, 0] + arr[:, 2] <= h).all() and (arr[:, 1] + arr[:, 3] <= w).all(), b
    fallback = lambda bs: np.mean([tuple(x) == random_resized_crop_box(h, w, _Never()) for x in bs])  # noqa: E731
    assert abs(fallback(theirs) - fallback(ours)) < 0.05


class _Never:
    """A generator whose draws always fail the size test: random_resized_crop_box returns its fallback."""

    def uniform(self, lo, hi):
        return 1e6 if lo > 0 else 0.0        # the area draw: far too large; the log-ratio draw: 0

    def integers(self, lo, hi):
        raise AssertionError("not reached")


class Repeated(Dataset):
    """The same PIL image n times (labels 0..n-1)."""

    def __init__(self, img, n):
        self.img, self.n = img, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.img, i


@pytest.mark.parametrize("h,w", [(300, 400), (400, 300), (200, 700), (480, 470)])
def test_cached_crop_is_the_same_crop_as_torchvisions(h, w):
    """For the same box, crop_resize of the cached row is the PIL resized crop of the full image, up to
    the resampling from the smaller image (a smooth image: under one grey level on average; a box off by 6%
    of the image gives ~2.5, the wrong orientation ~40)."""
    from torchvision.transforms import functional as TF

    S = 32
    img = smooth_image(h, w, seed=h + w)
    row, geo = _to_landscape_uint8(img, S)
    assert row.shape == (3, S, train_crop_width(S)) and geo[0] == h and geo[1] == w and geo[2] == int(h > w)
    rng = np.random.default_rng(1)
    for _ in range(6):
        top, left, bh, bw = random_resized_crop_box(h, w, rng)
        want = TF.pil_to_tensor(TF.resized_crop(img, top, left, bh, bw, [S, S],
                                                TF.InterpolationMode.BICUBIC, antialias=True)).float()
        boxes = torch.from_numpy(boxes_in_cache(geo[None], np.array([[top, left, bh, bw]]), S))
        got = crop_resize(row[None], boxes, torch.tensor([geo[2] > 0]), S)[0].float()
        assert (got - want).abs().mean() < 1.0, (h, w, (got - want).abs().mean())
    # the whole image of an aspect inside the ratio range is the resize of the whole image
    if 3 / 4 <= w / h <= 4 / 3:
        want = TF.pil_to_tensor(img.resize((S, S), Image.BICUBIC)).float()
        boxes = torch.from_numpy(boxes_in_cache(geo[None], np.array([[0, 0, h, w]]), S))
        got = crop_resize(row[None], boxes, torch.tensor([geo[2] > 0]), S)[0].float()
        assert (got - want).abs().mean() < 1.0


def test_cached_and_uncached_paths_draw_the_same_box_distribution(tmp_path, monkeypatch):
    """The boxes the two training paths actually draw (spied on), for a landscape and a portrait image."""
    from torchvision import transforms as T

    S, n = 16, 1500
    for h, w in ((300, 420), (420, 300)):
        img = smooth_image(h, w)
        drawn = []
        real = T.RandomResizedCrop.get_params

        def spy(im, scale, ratio):
            box = real(im, scale, ratio)
            drawn.append(box)
            return box

        monkeypatch.setattr(T.RandomResizedCrop, "get_params", staticmethod(spy))
        tf = clip_train_transform(S)
        torch.manual_seed(0)
        for _ in range(n):
            tf(img)
        monkeypatch.undo()
        uncached = list(drawn)

        drawn.clear()
        real_box = cache_mod.random_resized_crop_box

        def spy_box(hh, ww, rng, *a):
            box = real_box(hh, ww, rng, *a)
            drawn.append(box)
            return box

        ds = CachedImageDataset(Repeated(img, 50), str(tmp_path / f"{h}x{w}"), key_parts=["rep", h, w],
                                image_size=S, layout="train-crop", num_workers=0, progress=False)
        monkeypatch.setattr(cache_mod, "random_resized_crop_box", spy_box)
        batches = ds.iter_batches(50, seed=3, epochs=n // 50)
        for _ in batches:
            pass
        monkeypatch.undo()
        assert len(drawn) == n and len(uncached) == n
        _assert_same_distribution(_stats(uncached, h, w), _stats(drawn, h, w), (h, w))


def _rows_differ(x):
    return not torch.equal(x[0], x[1])


def test_training_batches_of_one_image_differ_and_evaluation_batches_do_not(tmp_path):
    S = 16
    img = smooth_image(120, 150)
    src = Repeated(img, 8)
    cached = CachedImageDataset(src, str(tmp_path), key_parts=["one"], image_size=S, layout="train-crop",
                                num_workers=0, progress=False)
    uncached = TransformedDatasetLike(src, clip_train_transform(S))
    for name, ds in (("cached", cached), ("uncached", uncached)):
        torch.manual_seed(0)
        batches = TaskBatches(ds, 4, seed=5, device=torch.device("cpu"))
        b1, _ = next(batches)
        b2, _ = next(batches)
        batches.close()
        assert b1.shape == (4, 3, S, S), name
        assert _rows_differ(b1), name                        # the same image, another crop in the same batch
        assert not torch.equal(b1, b2), name                 # and at the next step
    # both streams are functions of the seed, whatever torch's global RNG did (a resumed run sees the same crops)
    for name, ds in (("cached", cached), ("uncached", uncached)):
        torch.manual_seed(1)
        a = TaskBatches(ds, 4, seed=5, device=torch.device("cpu"), start=1)
        torch.manual_seed(2)
        b = TaskBatches(ds, 4, seed=5, device=torch.device("cpu"))
        next(b)
        assert torch.equal(next(a)[0], next(b)[0]), name
        a.close()
        b.close()
    # evaluation: the deterministic transform, cached or not, batch after batch
    test_cached = CachedImageDataset(src, str(tmp_path), key_parts=["one"], image_size=S, num_workers=0,
                                     progress=False)
    test_plain = TransformedDatasetLike(src, clip_eval_transform(S))
    for ds in (test_cached, test_plain):
        first = torch.cat([x for x, _ in iter_eval_batches(ds, 4, torch.device("cpu"))])
        second = torch.cat([x for x, _ in iter_eval_batches(ds, 4, torch.device("cpu"))])
        assert torch.equal(first, second) and torch.equal(first[0], first[-1])
    with pytest.raises(ValueError, match="cannot evaluate on a 'train-crop' cache"):
        next(iter_eval_batches(cached, 4, torch.device("cpu")))


class TransformedDatasetLike(Dataset):
    def __init__(self, src, tf):
        self.src, self.tf = src, tf

    def __len__(self):
        return len(self.src)

    def __getitem__(self, i):
        img, y = self.src[i]
        return self.tf(img), y


def test_old_cache_format_is_named_and_not_read(tmp_path):
    """A cache of format version 1 (center-cropped training images) is not used: a warning names it and says
    how to free the space; the new cache is built beside it."""
    old = tmp_path / "Food-train-0123456789abcdef.json"
    old.write_text(json.dumps({"version": 1, "key": "0123456789abcdef", "n": 8,
                               "transform": "resize-shorter=16:bicubic:PIL|center-crop=16|rgb|uint8-chw"}))
    with pytest.warns(RuntimeWarning, match=r"format version 1 .*reads format 2 only.*Delete"):
        ds = CachedImageDataset(Repeated(smooth_image(40, 50), 8), str(tmp_path), key_parts=["food"], image_size=16,
                                name="Food-train", layout="train-crop", num_workers=0, progress=False)
    assert ds.built and CACHE_FORMAT_VERSION == 2
    meta = json.loads(open(ds.meta_path).read())
    assert meta["layout"] == "train-crop" and meta["version"] == 2
    # the same cache with a wrong version in its metadata is refused and rebuilt, with the reason
    meta["version"] = 1
    with open(ds.meta_path, "w") as f:
        json.dump(meta, f)
    with pytest.warns(RuntimeWarning, match="format version 1, this version of gift-fast reads 2"):
        again = CachedImageDataset(Repeated(smooth_image(40, 50), 8), str(tmp_path), key_parts=["food"],
                                   image_size=16, name="Food-train", layout="train-crop", num_workers=0,
                                   progress=False)
    assert again.built


def test_train_crop_width():
    assert train_crop_width(224) == 332 == math.ceil(224 * 4 / 3 / 0.9)
