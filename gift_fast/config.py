"""Shared configuration: the MTIL task orders and their per-task learning rates.

docs/METHOD.md, "The MTIL protocol": Order I and Order II of MTIL with 1,000 iterations per
task; the learning rate is 5e-5 for Aircraft and MNIST and 1e-5 otherwise.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

MTIL_TASKS: Tuple[str, ...] = ("Aircraft", "Caltech101", "CIFAR100", "DTD", "EuroSAT", "Flowers", "Food",
                               "MNIST", "OxfordPet", "StanfordCars", "SUN397")

ORDERS: Dict[int, Tuple[str, ...]] = {
    1: ("Aircraft", "Caltech101", "CIFAR100", "DTD", "EuroSAT", "Flowers", "Food", "MNIST", "OxfordPet",
        "StanfordCars", "SUN397"),
    2: ("StanfordCars", "Food", "MNIST", "OxfordPet", "Flowers", "SUN397", "Aircraft", "Caltech101", "DTD",
        "EuroSAT", "CIFAR100"),
}

HIGH_LR_TASKS = frozenset({"Aircraft", "MNIST"})
BASE_LR = 1e-5
HIGH_LR = 5e-5


def task_order(order: int) -> List[str]:
    """The task names of MTIL order 1 or 2; a clear error for anything else."""
    try:
        return list(ORDERS[int(order)])
    except (KeyError, ValueError, TypeError):
        raise ValueError(f"unknown order {order!r}: MTIL has order 1 (Aircraft first) and order 2 "
                         f"(StanfordCars first)") from None


def task_lr(task: str) -> float:
    """The per-task learning rate of the paper's protocol (both orders use the same rule)."""
    if task not in MTIL_TASKS:
        raise ValueError(f"unknown MTIL task {task!r}; known: {', '.join(MTIL_TASKS)}")
    return HIGH_LR if task in HIGH_LR_TASKS else BASE_LR
