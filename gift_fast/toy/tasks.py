"""The toy tasks of the tiny preset: digits, shapes, colours (textures as an extra).

Each task asks for one attribute of a scene and draws the others at random as nuisances, so
fine-tuning on one task teaches the model to ignore what the next one needs (forgetting). Its
images show the task part of the digit writers (never seen in pre-training); its data depend only
on (name, sizes, seed).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import TensorDataset

from gift_fast.data.base import TaskSpec
from gift_fast.toy.world import (COLOURS, DIGITS, IMAGE_SIZE, OBJECTS, SHAPES, TEMPLATES, TEXTURES, _to_chw,
                                 normalize_toy_images, random_scene, render)

@dataclass(frozen=True)
class ToyTaskDef:
    name: str
    attribute: str                    # which attribute is the class
    classnames: Tuple[str, ...]
    objects: Tuple[str, ...] = OBJECTS  # the objects its images show


TOY_TASKS: Dict[str, ToyTaskDef] = {
    "ToyDigits": ToyTaskDef("ToyDigits", "obj", DIGITS, DIGITS),
    "ToyTextures": ToyTaskDef("ToyTextures", "texture", TEXTURES),
    "ToyShapes": ToyTaskDef("ToyShapes", "obj", SHAPES, SHAPES),
    "ToyColours": ToyTaskDef("ToyColours", "colour", tuple(COLOURS)),
}
# The tiny preset's sequence. ToyTextures exists too (pass it with --tasks): the
# pre-training never names textures, so its zero-shot accuracy is chance and the
# teacher's features ignore backgrounds; distilling towards that teacher slows its
# learning a lot (a concept the teacher lacks), which makes it a hard case.
DEFAULT_TOY_ORDER: Tuple[str, ...] = ("ToyDigits", "ToyShapes", "ToyColours")


def _task_images(td: ToyTaskDef, n: int, rng: np.random.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    labels = rng.integers(len(td.classnames), size=n)
    images = []
    for k in labels:
        fixed = {td.attribute: td.classnames[k]}
        scene = random_scene(rng, objects=td.objects, **fixed)
        images.append(render(scene, rng, glyph_part="task"))
    return normalize_toy_images(_to_chw(np.stack(images))), torch.from_numpy(labels.astype(np.int64))


def toy_task(name: str, *, train_size: int = 1000, test_size: int = 300, seed: int = 0, lr: float = 1e-3) -> TaskSpec:
    """One toy task as a TaskSpec (train / test: TensorDatasets of normalized images and labels).

    Its images show the task-part digit writers (never seen in pre-training) and
    random nuisance attributes; the data depend only on (name, sizes, seed).
    """
    if name not in TOY_TASKS:
        raise ValueError(f"unknown toy task {name!r}; known: {', '.join(TOY_TASKS)}")
    td = TOY_TASKS[name]
    key = sum(ord(c) * (i + 1) for i, c in enumerate(name))
    train = TensorDataset(*_task_images(td, train_size, np.random.default_rng([seed, key, 1])))
    test = TensorDataset(*_task_images(td, test_size, np.random.default_rng([seed, key, 2])))
    return TaskSpec(name=name, classnames=list(td.classnames), templates=list(TEMPLATES), train=train, test=test,
                    lr=lr, meta={"toy": True, "attribute": td.attribute, "train_size": train_size,
                                 "test_size": test_size, "image_size": IMAGE_SIZE})


def toy_tasks(names: Sequence[str] = DEFAULT_TOY_ORDER, **kw) -> List[TaskSpec]:
    return [toy_task(n, **kw) for n in names]

