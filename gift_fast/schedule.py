"""Learning-rate schedules: the reference's linear warm-up then cosine decay (one rule for every loop)."""
from __future__ import annotations

import math


def cosine_lr_lambda(warmup: int, steps: int):
    """The reference's schedule: linear warm-up ((k + 1) / warmup), then a cosine to 0 at ``steps``."""
    def f(k: int) -> float:
        if k < warmup:
            return (k + 1) / warmup
        e, es = k - warmup, max(1, steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(e, es) / es))
    return f
