"""The batches of a task: seeded streams of task images and of synthetic pairs, as functions of the seed alone.

Randomness is derived per task from (seed, task index, stream), never from the process's history
(``derived_seed``), so ``--resume`` after task k, or in the middle of a task, gives the same batches as an
uninterrupted run. With several processes every process draws the same global batch and keeps its rows.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch


def derived_seed(*parts: int) -> int:
    """A seed that is a function of ``parts`` alone (the run's seed, a task index, a stream id, ...)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


# The random streams of a task: derived_seed(seed, task index, stream)
STREAM_TASK, STREAM_SYN, STREAM_FISHER = 1, 2, 3


class _SeededItems(torch.utils.data.Dataset):
    """``dataset[i]`` under torch's RNG seeded by (seed, i): a random transform (the training crops) draws the
    same for an item of an epoch whatever the worker or the process, so a resumed run sees the same batches."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derived_seed(self.seed, i))
            return self.dataset[i]


class TaskBatches:
    """An endless, seeded stream of ``(images, labels)`` training batches of one task on ``device``.

    Tensor data sets (the toy world) are indexed on the device; cached data sets
    (``gift_fast.data.cache``) use their uint8 fast path; anything else goes through
    a seeded DataLoader. Each epoch is a fresh permutation; the last partial batch
    of an epoch is dropped.
    """

    def __init__(self, dataset, batch_size: int, seed: int, device: torch.device, num_workers: int = 0,
                 start: int = 0, rows: slice = slice(None)):
        if dataset is None or len(dataset) == 0:
            raise ValueError("the task has no training data")
        if len(dataset) < batch_size:
            raise ValueError(f"the task has {len(dataset)} training images, fewer than one batch ({batch_size}): "
                             f"lower --batch-size")
        self.dataset, self.batch_size, self.seed, self.device = dataset, batch_size, seed, device
        self.num_workers = num_workers
        self.rows = rows          # this process's rows of each global batch (all of them with one process)
        # The stream is a function of (seed, batch index) only: a run resumed at step k skips k batches
        # (index-only for tensor data sets; the other paths draw and drop them) and sees the same batches.
        self.start = int(start)
        self._it = self._make()
        if getattr(dataset, "tensors", None) is None:
            for _ in range(self.start):
                next(self._it)

    def _perms(self) -> Iterator[torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed)
        n = len(self.dataset)
        skip = self.start
        while True:
            perm = torch.randperm(n, generator=g)
            for a in range(0, n - self.batch_size + 1, self.batch_size):
                if skip > 0:
                    skip -= 1
                    continue
                yield perm[a:a + self.batch_size]

    def _make(self):
        tensors = getattr(self.dataset, "tensors", None)
        if tensors is not None:
            images, labels = (t.to(self.device) for t in tensors[:2])
            for idx in self._perms():
                idx = idx[self.rows].to(self.device)
                yield images[idx], labels[idx]
        elif hasattr(self.dataset, "iter_batches"):
            yield from self.dataset.iter_batches(self.batch_size, shuffle=True, seed=self.seed, drop_last=True,
                                                 epochs=None, device=self.device, rows=self.rows)
        else:
            epoch = 0
            while True:
                g = torch.Generator().manual_seed(derived_seed(self.seed, epoch))
                loader = torch.utils.data.DataLoader(
                    _SeededItems(self.dataset, derived_seed(self.seed, epoch, 1)), batch_size=self.batch_size,
                    shuffle=True, drop_last=True, generator=g,
                    num_workers=self.num_workers, pin_memory=self.device.type == "cuda",
                    persistent_workers=False)
                for x, y in loader:     # (several processes: each decodes the global batch and keeps its rows)
                    x, y = x[self.rows], torch.as_tensor(y)[self.rows]
                    yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                epoch += 1

    def __next__(self):
        return next(self._it)

    def __iter__(self):
        return self

    def close(self):
        self._it.close()


def synthetic_indices(n: int, batch_size: int, steps: int, seed: int) -> torch.Tensor:
    """[steps, batch] indices into a synthetic set of n pairs: epochs of seeded permutations.

    A set smaller than a batch is drawn with replacement.
    """
    g = torch.Generator().manual_seed(seed)
    if n < batch_size:
        return torch.randint(0, n, (steps, batch_size), generator=g)
    rows, need = [], steps * batch_size
    while sum(r.numel() for r in rows) < need:
        perm = torch.randperm(n, generator=g)
        rows.append(perm[: n - n % batch_size])
    return torch.cat(rows)[:need].view(steps, batch_size)


__all__ = ["derived_seed", "STREAM_TASK", "STREAM_SYN", "STREAM_FISHER", "TaskBatches", "synthetic_indices"]
