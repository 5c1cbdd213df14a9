"""Synthesis resume with other prompts: an image whose prompt differs from this run's is generated
again (the seed of an image depends on its index only, so only its stored prompt tells them apart)."""
import csv

import numpy as np
from PIL import Image

from gift_fast.synth.engine import read_image_meta, synthesize_task
from gift_fast.synth.prompts import image_seed


class PromptPainter:
    """Image k is a function of (prompts[k], seeds[k]): the prompt's length sets the colour."""

    name = "painter"

    def __init__(self):
        self.calls = []

    def generate(self, prompts, seeds):
        self.calls.extend(zip(prompts, seeds))
        out = []
        for p, s in zip(prompts, seeds):
            rng = np.random.default_rng([s % (2 ** 32), sum(map(ord, p))])
            out.append(Image.fromarray(rng.integers(1, 256, (8, 8, 3), dtype=np.uint8)))
        return out

    def describe(self):
        return {"name": "painter", "config": {"v": 1}, "runtime": {}}


def _run(gen, root, prompts):
    return synthesize_task(gen, "Cats", prompts, root, seed=3, task_index=1, batch_size=4, progress=False,
                           image_format="png")


def test_resume_regenerates_images_of_another_prompt(tmp_path):
    first = [f"a photo of a {c}." for c in ("cat", "dog", "owl", "cat", "fox", "eel")]
    second = list(first)
    second[1], second[4] = "a photo of a lynx.", "a photo of a wolf."
    _run(PromptPainter(), tmp_path / "run", first)
    gen = PromptPainter()
    folder = _run(gen, tmp_path / "run", second)
    # only the two images whose prompt changed were made again, with their own seeds
    assert gen.calls == [(second[1], image_seed(3, 1, 1)), (second[4], image_seed(3, 1, 4))]
    with open(folder / "image_text.csv", newline="") as fh:
        assert [r["text"] for r in csv.DictReader(fh)] == second
    for i, p in enumerate(second):
        assert read_image_meta(folder / f"{i}.png", decode=True)["prompt"] == p
    # the folder is what a fresh run of the second prompts writes
    fresh = _run(PromptPainter(), tmp_path / "fresh", second)
    for i in range(len(second)):
        assert (folder / f"{i}.png").read_bytes() == (fresh / f"{i}.png").read_bytes(), i
