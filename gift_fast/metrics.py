"""Continual-learning metrics of the MTIL protocol (docs/METHOD.md, "Metrics").

``acc[i, j]`` is the accuracy on task j after learning task i (T x T):

* Transfer = mean over j >= 2 of mean(acc[1..j-1, j]): the zero-shot ability on
  tasks not learned yet (the strict upper triangle, averaged per column first);
* Avg      = mean of all T * T entries;
* Last     = mean of the last row.

Per task (column j): transfer_j = mean(acc[:j, j]) (None for the first task),
avg_j = mean(acc[:, j]), last_j = acc[T-1, j].
"""
from __future__ import annotations

from typing import Any, Dict, Sequence

import numpy as np


def _as_square(acc) -> np.ndarray:
    a = np.asarray(acc.tolist() if hasattr(acc, "tolist") else acc, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] == 0:
        raise ValueError(f"acc must be a non-empty square T x T matrix (acc[i, j] = accuracy on task j "
                         f"after learning task i), got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError("acc holds NaN or infinite entries: every task must be evaluated after every task")
    return a


def continual_metrics(acc: Sequence[Sequence[float]]) -> Dict[str, Any]:
    """Transfer, Avg and Last of a T x T accuracy matrix, overall and per task (column)."""
    a = _as_square(acc)
    T = a.shape[0]
    transfer_cols = [float(a[:j, j].mean()) for j in range(1, T)]
    per_task = [{"transfer": (None if j == 0 else float(a[:j, j].mean())),
                 "avg": float(a[:, j].mean()),
                 "last": float(a[T - 1, j])} for j in range(T)]
    return {
        "transfer": float(np.mean(transfer_cols)) if transfer_cols else None,
        "avg": float(a.mean()),
        "last": float(a[T - 1].mean()),
        "per_task": per_task,
    }


def cil_metrics(step_accuracies: Sequence[float]) -> Dict[str, Any]:
    """Class-incremental metrics (DyTox's protocol, seed Suppl. B): ``step_accuracies[t]`` is the accuracy
    on the test images of every class seen so far, after training step t (no task identity).
    Avg = their mean over all steps (the base step included); Last = the accuracy after the last step."""
    a = np.asarray(step_accuracies.tolist() if hasattr(step_accuracies, "tolist") else step_accuracies,
                   dtype=np.float64)
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"step_accuracies must be a non-empty list of numbers (one accuracy after each step), "
                         f"got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError("step_accuracies holds NaN or infinite entries: evaluate after every step")
    return {"avg": float(a.mean()), "last": float(a[-1]), "steps": int(a.size)}


__all__ = ["continual_metrics", "cil_metrics"]
