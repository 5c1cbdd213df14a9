"""Reading a synthetic folder (the reference's layout) and real reference images."""
import numpy as np
import pytest
import torch
from PIL import Image

from gift_fast.data.synthetic import load_reference_set, load_synthetic_set


def _write_folder(root, task, rows, size=(40, 30)):
    folder = root / f"{task}_Syn"
    folder.mkdir(parents=True)
    lines = ["image,text"]
    for i, (text, black) in enumerate(rows):
        arr = np.zeros((size[1], size[0], 3), np.uint8) if black else \
            np.random.default_rng(i).integers(1, 255, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"{i}.png")
        lines.append(f'{i}.png,"{text}"')
    (folder / "image_text.csv").write_text("\n".join(lines) + "\n")
    return folder


def test_black_images_dropped_and_labels_are_distinct_prompt_ids(tmp_path):
    rows = [("a photo of a cat.", False), ("a photo of a dog.", True), ("a photo of a cat.", False),
            ("a photo of a car, red.", False), ("a photo of a dog.", False)]
    _write_folder(tmp_path, "Food", rows)
    ds = load_synthetic_set(tmp_path, "Food", image_size=16, progress=False)
    assert ds.dropped_black == 1 and len(ds) == 4
    assert ds.prompts == ["a photo of a cat.", "a photo of a car, red.", "a photo of a dog."]
    assert ds.labels.tolist() == [0, 0, 1, 2]
    assert ds.texts() == ["a photo of a cat.", "a photo of a cat.", "a photo of a car, red.", "a photo of a dog."]
    assert ds.images.shape == (4, 3, 16, 16) and ds.images.dtype == torch.uint8


def test_limit_keeps_the_first_rows(tmp_path):
    _write_folder(tmp_path, "DTD", [(f"a photo of a {k}.", False) for k in "abcdef"])
    ds = load_synthetic_set(tmp_path, "DTD", image_size=8, limit=3, progress=False)
    assert ds.prompts == ["a photo of a a.", "a photo of a b.", "a photo of a c."]


def test_resize_and_centre_crop_match_clip_geometry(tmp_path):
    _write_folder(tmp_path, "T", [("x", False)], size=(40, 20))
    ds = load_synthetic_set(tmp_path, "T", image_size=10, progress=False)
    src = Image.open(tmp_path / "T_Syn" / "0.png").convert("RGB").resize((20, 10), Image.BICUBIC).crop((5, 0, 15, 10))
    assert np.array_equal(ds.images[0].permute(1, 2, 0).numpy(), np.asarray(src))


def test_missing_or_incomplete_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="gift-fast synth"):
        load_synthetic_set(tmp_path, "Aircraft", image_size=8)
    (tmp_path / "Aircraft_Syn").mkdir()
    with pytest.raises(FileNotFoundError, match="incomplete"):
        load_synthetic_set(tmp_path, "Aircraft", image_size=8)
    _write_folder(tmp_path, "MNIST", [("a", True), ("b", True)])
    with pytest.raises(ValueError, match="black"):
        load_synthetic_set(tmp_path, "MNIST", image_size=8, progress=False)


def test_reference_images_from_class_folders_are_seeded_per_task(tmp_path):
    for cls in ("golden_retriever", "tabby_cat"):
        (tmp_path / cls).mkdir()
        for i in range(4):
            Image.fromarray(np.full((12, 12, 3), 10 + i, np.uint8)).save(tmp_path / cls / f"{i}.jpg")
    a = load_reference_set(tmp_path, 5, seed=0, task_index=0, image_size=8, progress=False)
    b = load_reference_set(tmp_path, 5, seed=0, task_index=0, image_size=8, progress=False)
    c = load_reference_set(tmp_path, 5, seed=0, task_index=1, image_size=8, progress=False)
    assert len(a) == 5 and torch.equal(a.images, b.images) and a.texts() == b.texts()
    assert set(a.prompts) <= {"a photo of a golden retriever.", "a photo of a tabby cat."}
    assert a.texts() != c.texts() or not torch.equal(a.images, c.images)
    with pytest.raises(FileNotFoundError, match="no images"):
        load_reference_set(tmp_path / "golden_retriever", 2, seed=0, task_index=0, image_size=8)
