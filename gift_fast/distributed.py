"""Data-parallel training over several processes (``torchrun``): what N processes need so that
they compute what one process computes.

    torchrun --nproc_per_node N --no-python gift-fast train --order 1 --bf16 ...

One process per GPU (NCCL), or per CPU process (gloo). The global batch (64 task images +
64 synthetic pairs by default) is split into N equal row shards; every process holds the
whole model. Why not ``torch.nn.parallel.DistributedDataParallel``: a GIFT step has two
backward passes, and the Fisher of AWC must come from the *reduced* gradient of the
distillation loss alone, between them. So the step reduces gradients itself:

1. the student's synthetic embeddings are gathered (``gather_rows``) so that every process
   evaluates the exact B x B contrastive / alignment loss of the global batch; the backward of
   the gather keeps only this process's rows of the (identical) upstream gradient;
2. after ``L_kd.backward()``: ``all_reduce_grads(..., average=False)`` sums the per-shard
   gradients into the full gradient of L_kd, identical on every process; AWC's Fisher and
   penalty are then identical too;
3. after ``L_ce.backward()`` (each process: the mean CE of its shard, accumulated into the same
   .grad): ``all_reduce_grads(..., average=True)``; the mean over processes of
   ``G + g_ce,r`` is ``G + mean_r g_ce,r``, the gradient of the global mean CE.

Evaluation is sharded (each process scores a contiguous slice of every test set; correct
counts are summed). Only rank 0 writes the run folder.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterable, List, Optional, Tuple

import torch

# Gradients are reduced in buckets of this many bytes: one flat copy per bucket bounds the
# extra memory (a whole ViT-L's gradient at once would be another 1.2 GB).
BUCKET_BYTES = 64 * 2 ** 20


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``rank`` of ``world_size`` (1: no distribution at all)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def rows(self, n: int) -> slice:
        """This process's rows of a global batch of ``n`` (n must divide evenly)."""
        if not self.enabled:
            return slice(None)
        if n % self.world_size:
            raise ValueError(f"a global batch of {n} does not split evenly over {self.world_size} processes: "
                             f"choose a batch size that is a multiple of {self.world_size}")
        per = n // self.world_size
        return slice(self.rank * per, (self.rank + 1) * per)

    def span(self, n: int) -> Tuple[int, int]:
        """This process's contiguous share ``[start, stop)`` of ``n`` items (shares differ by at most one)."""
        base, extra = divmod(n, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (1 if self.rank < extra else 0)

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()


SINGLE = DistContext()


def env_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 outside torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


def current() -> DistContext:
    """The context of an initialized process group, else the single-process one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return DistContext(torch.distributed.get_rank(), torch.distributed.get_world_size(),
                           int(os.environ.get("LOCAL_RANK", "0")))
    return SINGLE


def init_from_env(device: Optional[str] = None) -> Tuple[DistContext, torch.device]:
    """Join the process group torchrun describes (NCCL on CUDA, gloo on CPU); the process's device.

    Outside torchrun (WORLD_SIZE unset or 1) nothing is initialized. ``device`` as the
    CLI takes it: auto / cpu / cuda (each process then uses cuda:LOCAL_RANK) / cuda:N.
    The one entry of ``gift-fast train``, ``eval`` and ``synth``.
    """
    world = env_world_size()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev_opt = (device or "auto").strip().lower()
    if dev_opt == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(dev_opt)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available on this machine")
        if dev.index is None:
            if local >= torch.cuda.device_count():
                raise ValueError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPU(s) here: start at "
                                 f"most {torch.cuda.device_count()} processes per node (--nproc_per_node)")
            dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if world <= 1:
        return SINGLE, dev
    if not torch.distributed.is_initialized():
        for var in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
            if var not in os.environ:
                raise ValueError(f"WORLD_SIZE={world} but {var} is not set: start several processes with "
                                 f"`torchrun --nproc_per_node N --no-python gift-fast COMMAND ...`")
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kw = {"device_id": dev} if dev.type == "cuda" else {}
        torch.distributed.init_process_group(backend=backend, **kw)
    return current(), dev


@contextlib.contextmanager
def main_first(dist: DistContext):
    """Rank 0 runs the block first (decodes the image caches, fetches weights), the others after it
    and find what it made. An error in rank 0's block skips its barrier: torchrun then stops all."""
    if not dist.is_main:
        dist.barrier()
    yield
    if dist.is_main:
        dist.barrier()


def shutdown() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


class _GatherRows(torch.autograd.Function):
    """All-gather along dim 0; the backward returns this process's rows of the upstream gradient.

    Valid because every process computes the *same* loss of the gathered tensor: the upstream
    gradient is identical everywhere, and the rows of process r are exactly the gradient of
    the loss with respect to r's inputs (no sum over processes, which would count it N times).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
        ctx.rank, ctx.n = rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        torch.distributed.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        a = ctx.rank * ctx.n
        return grad[a:a + ctx.n], None, None


def gather_rows(x: torch.Tensor, dist: DistContext = SINGLE) -> torch.Tensor:
    """The global batch from every process's equal shard (autograd-aware); ``x`` itself with one process."""
    if not dist.enabled:
        return x
    return _GatherRows.apply(x, dist.rank, dist.world_size)


def _buckets(tensors: List[torch.Tensor]) -> Iterable[List[torch.Tensor]]:
    bucket: List[torch.Tensor] = []
    size = 0
    for t in tensors:
        if bucket and (size + t.numel() * t.element_size() > BUCKET_BYTES or t.dtype != bucket[0].dtype
                       or t.device != bucket[0].device):
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += t.numel() * t.element_size()
    if bucket:
        yield bucket


@torch.no_grad()
def all_reduce_tensors_(tensors: List[torch.Tensor], dist: DistContext, average: bool) -> None:
    """Sum (or average) each tensor over the processes, in place, in flat buckets."""
    if not dist.enabled:
        return
    for bucket in _buckets(tensors):
        flat = torch.cat([t.reshape(-1) for t in bucket])
        torch.distributed.all_reduce(flat)            # SUM: the one op both gloo and NCCL have
        if average:
            flat.div_(dist.world_size)
        a = 0
        for t in bucket:                               # in place: AWC's .grad may be views of its buffers
            t.copy_(flat[a:a + t.numel()].view_as(t))
            a += t.numel()


def all_reduce_grads(params: Iterable[torch.nn.Parameter], dist: DistContext, average: bool) -> None:
    """Reduce the ``.grad`` of ``params`` over the processes (parameters without one are skipped:
    every process runs the same graph, so they are the same everywhere)."""
    if not dist.enabled:
        return
    all_reduce_tensors_([p.grad for p in params if p.grad is not None], dist, average)


def all_reduce_sum(t: torch.Tensor, dist: DistContext) -> torch.Tensor:
    """``t`` summed over the processes (a new tensor; ``t`` itself with one process)."""
    if not dist.enabled:
        return t
    out = t.clone()
    torch.distributed.all_reduce(out)
    return out


__all__ = ["DistContext", "SINGLE", "current", "init_from_env", "main_first", "shutdown", "gather_rows", "all_reduce_grads",
           "all_reduce_tensors_", "all_reduce_sum", "env_world_size", "BUCKET_BYTES"]
