"""Learning-rate schedules: the reference's linear warm-up then cosine decay (one rule for every training loop;
the toy CLIP's pre-training keeps its own, older rule, ``warmup_times_cosine_lr``)."""
from __future__ import annotations

import math
from typing import Callable


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
