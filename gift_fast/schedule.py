"""How a task is optimized: the reference's linear warm-up then cosine decay (one rule for every training loop;
the toy CLIP's pre-training keeps its own, older rule, ``warmup_times_cosine_lr``), a task's ``TaskSchedule`` (lr,
steps, warm-up, weight decay) and the AdamW + schedule built from it."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Tuple

import torch


def cosine_lr_lambda(warmup: int, steps: int):
    """The reference's schedule: linear warm-up ((k + 1) / warmup), then a cosine to 0 at ``steps``."""
    def f(k: int) -> float:
        if k < warmup:
            return (k + 1) / warmup
        e, es = k - warmup, max(1, steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(e, es) / es))
    return f


def warmup_times_cosine_lr(base_lr: float, warmup: int, steps: int) -> Callable[[int], float]:
    """The toy CLIP pre-training's learning rate at step k (a rate, not a factor):
    ``base_lr * min(1, (k + 1) / warmup) * 0.5 * (1 + cos(pi * k / steps))``.

    Not ``cosine_lr_lambda``'s rule: here the warm-up ramp multiplies a cosine that runs over all
    ``steps`` from step 0, there the cosine starts after the warm-up. The cached pre-trained tiny
    CLIP (``gift_fast.toy.pretrain``) was trained with this one and its cache key does not record
    the schedule, so switching rules would change the weights behind an unchanged key (and the tiny
    preset's table). The float operations run in the order the pre-training loop always used, so the
    rates are bit-identical to it.
    """
    def lr(k: int) -> float:
        warm = min(1.0, (k + 1) / warmup)
        return base_lr * warm * 0.5 * (1 + math.cos(math.pi * k / steps))
    return lr


@dataclass(frozen=True)
class TaskSchedule:
    """How one task is optimized: its learning rate, steps, warm-up steps and AdamW weight decay."""
    lr: float
    steps: int
    warmup: int
    weight_decay: float = 0.0

    def lr_lambda(self):
        return cosine_lr_lambda(self.warmup, self.steps)


def make_optimizer(params: Iterable[torch.nn.Parameter], schedule: TaskSchedule, device: torch.device
                   ) -> Tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The task's AdamW (betas 0.9 / 0.999, eps 1e-8) and its warm-up + cosine schedule."""
    opt_kw = dict(lr=schedule.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=schedule.weight_decay)
    if torch.device(device).type == "cuda":
        opt_kw["fused"] = True          # one kernel for all parameters
    else:
        opt_kw["foreach"] = True        # fewer, larger ops (the tiny preset is overhead-bound)
    optimizer = torch.optim.AdamW(list(params), **opt_kw)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule.lr_lambda())
