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


# --------------------------------------------------------------------------- the authors' layout, orders
def _authors_folder(root, task, texts, black=(), size=(24, 20), order_dir="synthetic_data_a"):
    """A folder as the authors' txt2img.py writes it: the image column holds the path it saw."""
    import csv
    folder = root / f"{task}_Syn"
    folder.mkdir(parents=True)
    with open(folder / "image_text.csv", "w", newline="") as f:
        w = csv.writer(f)      # as txt2img.py writes it (csv.writer, default dialect)
        w.writerow(["image", "text"])
        for j, text in enumerate(texts):
            arr = np.zeros((size[1], size[0], 3), np.uint8) if j in black else \
                np.random.default_rng(j).integers(1, 255, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(arr).save(folder / f"{j}.jpeg", quality=95)
            w.writerow([f"./data/synthetic/{order_dir}/{task}_Syn/{j}.jpeg", text])
    return folder


def test_reads_the_authors_layout_by_file_name(tmp_path):
    texts = ["a photo of a tench.", "a photo of a goldfish.", "a photo of a tench."]
    _authors_folder(tmp_path, "Aircraft", texts)
    ds = load_synthetic_set(tmp_path, "Aircraft", image_size=8, progress=False)
    assert ds.texts() == texts and len(ds) == 3
    ref = Image.open(tmp_path / "Aircraft_Syn" / "1.jpeg").convert("RGB").resize((10, 8), Image.BICUBIC).crop((1, 0, 9, 8))
    assert np.array_equal(ds.images[1].permute(1, 2, 0).numpy(), np.asarray(ref))


def test_black_images_are_dropped_before_taking_n(tmp_path):
    texts = [f"a photo of a p{j}." for j in range(8)]
    _authors_folder(tmp_path, "DTD", texts, black={1, 2})
    ds = load_synthetic_set(tmp_path, "DTD", image_size=8, limit=4, progress=False)
    # the first 4 non-black images (0, 3, 4, 5), not the non-black ones among the first 4 rows
    assert ds.texts() == [texts[j] for j in (0, 3, 4, 5)] and ds.dropped_black == 2
    ds = load_synthetic_set(tmp_path, "DTD", image_size=8, limit=20, progress=False)
    assert len(ds) == 6


def _pool_sources(order, task):
    from gift_fast.config import task_order
    from gift_fast.synth.engine import mtil_tasks, sequence_sources
    base, src = sequence_sources(mtil_tasks(order))
    t = task_order(order).index(task)
    return [(s.name, s.prompts()) for s in [base] + src[:t]]


def _authors_draws(order, task, n):
    from gift_fast.config import task_order
    from gift_fast.synth.engine import mtil_tasks, sequence_sources
    from gift_fast.synth.prompts import sequence_prompts
    base, src = sequence_sources(mtil_tasks(order))
    return sequence_prompts(base, src, n, seed=0, scheme="authors")[task_order(order).index(task)]


@pytest.mark.parametrize("task,made_for,why", [
    ("StanfordCars", 1, "cannot come from"),   # Order I: nine data sets in its pool; Order II: ImageNet only
    ("CIFAR100", 1, "none of its"),           # Order I: ImageNet + 2; Order II's pool is a superset of that
])
def test_a_folder_of_the_other_order_is_refused(tmp_path, task, made_for, why):
    from gift_fast.config import task_order
    from gift_fast.data.synthetic import SyntheticFolderMismatch
    other = 2 if made_for == 1 else 1
    _authors_folder(tmp_path, task, _authors_draws(made_for, task, 300), size=(8, 8))
    with pytest.raises(SyntheticFolderMismatch, match=f"{why}.*another task order"):
        load_synthetic_set(tmp_path, task, image_size=8, progress=False, sequence=task_order(other),
                           pool_sources=_pool_sources(other, task))
    ok = load_synthetic_set(tmp_path, task, image_size=8, progress=False, sequence=task_order(made_for),
                            pool_sources=_pool_sources(made_for, task))
    assert len(ok) == 300


def test_the_authors_released_prompts_pass_the_check_for_their_own_order_only(tmp_path):
    """Every task's released prompts (the fixture's distinct prompts of each file) against both orders'
    pools: accepted for their own order, refused for the other unless the pools coincide."""
    import json
    import os
    from gift_fast.config import task_order
    from gift_fast.data.synthetic import SyntheticFolderMismatch, check_folder_sequence
    with open(os.path.join(os.path.dirname(__file__), "fixtures", "authors", "synthetic_prompts.json")) as f:
        fx = json.load(f)
    refused = {}
    for order in (1, 2):
        other = 3 - order
        refused[order] = []
        for task in task_order(order):
            mask = int(fx["orders"][str(order)]["tasks"][task]["distinct"], 16)
            draws = [p for i, p in enumerate(fx["prompts"]) if mask >> i & 1]
            check_folder_sequence(tmp_path, task, task_order(order), _pool_sources(order, task), draws)
            try:
                check_folder_sequence(tmp_path, task, task_order(other), _pool_sources(other, task), draws)
            except SyntheticFolderMismatch:
                refused[order].append(task)
        assert set(fx["orders"][str(order)]["tasks"]) == set(task_order(order))
    # the first task of both orders has the same pool (ImageNet only): Aircraft/StanfordCars cannot tell
    assert set(task_order(1)) - set(refused[1]) <= {"Aircraft"}, refused[1]
    assert set(task_order(2)) - set(refused[2]) <= {"StanfordCars"}, refused[2]


def test_a_manifest_of_another_sequence_is_refused(tmp_path):
    from gift_fast.data.synthetic import SyntheticFolderMismatch
    from gift_fast.synth.engine import synthesize_sequence

    class Gen:
        name = "g"

        def generate(self, prompts, seeds):
            return [Image.fromarray(np.full((8, 8, 3), 1 + s % 200, np.uint8)) for s in seeds]

        def describe(self):
            return {"config": {}}

    tasks = [("A", ["a"]), ("B", ["b"]), ("C", ["c"])]
    synthesize_sequence(Gen(), tasks, tmp_path, images_per_task=4, seed=0, base_classnames=["x"], progress=False)
    assert len(load_synthetic_set(tmp_path, "C", image_size=8, progress=False, sequence=["A", "B", "C"])) == 4
    with pytest.raises(SyntheticFolderMismatch, match=r"classes of \['A', 'B'\].*follows \['B', 'A'\]"):
        load_synthetic_set(tmp_path, "C", image_size=8, progress=False, sequence=["B", "A", "C"])
    # a pool made with --pool-exclude is what that run asked for: accepted
    synthesize_sequence(Gen(), tasks, tmp_path / "ex", images_per_task=4, seed=0, base_classnames=["x"],
                        pool_exclude=["A"], progress=False)
    assert len(load_synthetic_set(tmp_path / "ex", "C", image_size=8, progress=False, sequence=["A", "B", "C"])) == 4
    # prompts only: a clear error that says how to make the images
    synthesize_sequence(None, tasks, tmp_path / "po", images_per_task=4, seed=0, base_classnames=["x"],
                        prompts_only=True)
    with pytest.raises(FileNotFoundError, match="prompts only.*--prompts-from"):
        load_synthetic_set(tmp_path / "po", "B", image_size=8, progress=False)
