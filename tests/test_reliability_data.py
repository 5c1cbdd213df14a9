"""Damaged inputs are found and named: cache rows and labels, a synthetic folder's short CSV row or
decompression-bomb PNG, a truncated cached toy CLIP (rebuilt)."""
from __future__ import annotations

import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset


class Pixels(Dataset):
    """n uint8 [3, 8, 8] images (already at the cache's size) with labels i % 5."""

    def __init__(self, n=20):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], i % 5


def cache(tmp_path, source=None):
    from gift_fast.data.cache import CachedImageDataset

    return CachedImageDataset(source or Pixels(), str(tmp_path), key_parts=["t"], image_size=8, name="t",
                              num_workers=0, progress=False)


def test_a_damaged_middle_row_is_an_error_naming_the_file_and_row(tmp_path):
    ds = cache(tmp_path)
    offset = ds._open().offset if hasattr(ds._open(), "offset") else None
    ds._mm = None
    raw = np.load(ds.images_path, mmap_mode="r+")
    raw[3, 0, 0, 0] ^= 0xFF                 # row 3 of 20: neither the last row nor the header
    raw.flush()
    del raw, offset
    ds = cache(tmp_path)                   # opens without complaint (only the last row is checked at open)
    assert not ds.built
    ds.get_batch([0, 1, 2])                # intact rows read fine
    with pytest.raises(ValueError, match=r"t-[0-9a-f]+\.images\.npy: image row 3 does not match its checksum"):
        ds.get_batch([5, 3])
    with pytest.raises(ValueError, match="row 3"):
        ds[3]


def test_shifted_labels_are_detected_and_the_cache_rebuilt(tmp_path):
    ds = cache(tmp_path)
    good = ds.labels.copy()
    np.save(ds.labels_path, np.roll(good, 1))          # a valid .npy with every label moved by one
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ds = cache(tmp_path)
    assert ds.built and any("labels do not match" in str(x.message) for x in w)
    np.testing.assert_array_equal(ds.labels, good)


def test_verified_rows_are_checked_once(tmp_path):
    ds = cache(tmp_path)
    ds.get_batch(range(20))
    assert ds._verified.all()


# ----------------------------------------------------------------------------- synthetic folders
def _folder(tmp_path, csv_text, images=()):
    from PIL import Image

    folder = tmp_path / "syn" / "ToyShapes_Syn"
    folder.mkdir(parents=True)
    for name in images:
        Image.fromarray(np.full((16, 16, 3), 128, np.uint8)).save(folder / name)
    (folder / "image_text.csv").write_text(csv_text)
    return folder


def test_a_short_csv_row_names_the_file_and_line(tmp_path):
    from gift_fast.data.synthetic import load_synthetic_set

    _folder(tmp_path, "image,text\n0.png,a photo of a cat.\n1.png\n", images=["0.png", "1.png"])
    with pytest.raises(ValueError, match=r"image_text\.csv, line 3: a row needs an image and a text"):
        load_synthetic_set(tmp_path / "syn", "ToyShapes", image_size=8, progress=False)


def _png_header_only(path, width, height):
    """A PNG whose header claims width x height (a 'decompression bomb' costs its reader that much memory)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
                     + chunk(b"IEND", b""))


def test_a_decompression_bomb_png_is_a_sentence_naming_it(tmp_path):
    from gift_fast.data.synthetic import load_synthetic_set

    folder = _folder(tmp_path, "image,text\n0.png,a photo of a cat.\nbomb.png,a photo of a dog.\n", images=["0.png"])
    _png_header_only(folder / "bomb.png", 60000, 60000)
    with pytest.raises(ValueError, match=r"cannot read image .*bomb\.png \(DecompressionBombError"):
        load_synthetic_set(tmp_path / "syn", "ToyShapes", image_size=8, progress=False)


def test_synthetic_fingerprint_follows_manifest_and_csv(tmp_path):
    from gift_fast.run_folder import synthetic_fingerprint

    folder = _folder(tmp_path, "image,text\n0.png,a photo of a cat.\n", images=["0.png"])
    a = synthetic_fingerprint(tmp_path / "syn", "ToyShapes")
    assert a["image_text.csv"] and a["manifest.json"] is None
    (folder / "manifest.json").write_text("{}")
    b = synthetic_fingerprint(tmp_path / "syn", "ToyShapes")
    assert b["manifest.json"] and b["image_text.csv"] == a["image_text.csv"]


# ----------------------------------------------------------------------------- the cached toy CLIP
def test_a_truncated_cached_toy_clip_is_rebuilt(tmp_path, monkeypatch):
    from gift_fast.checkpoints import load_weights
    from gift_fast.toy.clip import build_tiny_clip
    from gift_fast.toy.pretrain import ToyPretrainConfig, pretrained_toy_clip_path

    monkeypatch.setenv("GIFT_FAST_CACHE", str(tmp_path))
    cfg = ToyPretrainConfig(model_name="toy-vit-test", images=64, steps=2, batch_size=16, warmup=1)
    path = pretrained_toy_clip_path("toy-vit-test", cfg, progress=False)
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 3])
    with pytest.warns(RuntimeWarning, match="unreadable"):
        again = pretrained_toy_clip_path("toy-vit-test", cfg, progress=False)
    assert again == path and path.stat().st_size == len(whole)
    load_weights(build_tiny_clip("toy-vit-test"), path)
