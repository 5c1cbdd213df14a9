"""Fused AWC on flat parameter buckets: Triton kernels and the buckets that own them.

The plain PyTorch reference (the torch backend) is ``gift_fast.awc.AdaptiveWeightConsolidation(backend="torch")``;
``backend="triton"`` builds a :class:`FlatAWC` and forwards to it. Per step, per bucket:

1. ``_awc_block_sumsq_kernel``: sum(g^2) of every block (a block lies in one tensor);
2. ``_awc_segment_mean_kernel``: per tensor, mean(g^2) = (its blocks' partial sums) / numel,
   summed in a fixed order (deterministic, no atomics);
3. ``_awc_update_kernel``: one elementwise pass that updates F in place
   (``F = decay * F + (1 - decay) * g^2 / mean``, or 1e-6 for a tensor whose gradient is
   zero or missing), adds ``2 * strength * F * (p - theta*)`` into ``.grad`` in place and
   writes one penalty partial per block;

then one ``sum`` of the penalty partials of all buckets on the device. ``fisher="static"``
(EWC-V: F estimated before the task, then frozen) and ``fisher="uniform"`` (plain L2) run
the same update kernel with compile-time switches (UPDATE_FISHER, APPLY_PENALTY, UNIFORM).

Bytes moved per fp32 parameter (adaptive, decay > 0): read g twice, p, theta*, F; write F
and g: 28 B. With decay = 0 (AdaptiveWeightConsolidation's default) F is not read: 24 B.

Flat buckets
------------
The consolidated parameters are grouped by (device, dtype). Each group gets one flat
parameter buffer, one flat gradient buffer (same dtype), one flat anchor buffer (same
dtype, allocated by the first ``set_anchor``) and one flat float32 Fisher buffer (allocated
by the first Fisher update). Every tensor is a segment (offset, numel) of its bucket; the
offsets and the padded lengths are multiples of 16 elements so that the kernels can use
128-bit loads (the padding is zero in p, theta* and g, so it adds nothing to any sum).
``p.data`` and ``p.grad`` become views of the flat buffers: the Parameter objects stay the
same (an optimizer built before or after keeps working, fused AdamW included), and
``model.state_dict()`` has the same keys, shapes and values. No step copies gradients in or
out, as long as backward accumulates into the existing ``.grad`` views: zero the gradients
with :meth:`FlatAWC.zero_grad` or ``optimizer.zero_grad(set_to_none=False)``. A gradient
that is no longer the view (``set_to_none=True``, ``create_graph=True``, DDP with
``gradient_as_bucket_view=True``) is detected on the host (an identity check, no device
sync) and copied into the flat buffer, and ``p.grad`` is pointed back at the view: always
correct, one copy slower. A missing gradient is a zero segment (F = 1e-6), and the
penalty gradient still lands in ``p.grad``.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from .utils import interpreting, round_to_bf16_rne

ALIGN = 16                 # segment offsets and padded lengths: multiples of 16 elements
DEFAULT_BLOCK_CUDA = 4096  # elements per program on the GPU
DEFAULT_WARPS_CUDA = 8
DEFAULT_BLOCK_CPU = 32     # under TRITON_INTERPRET=1 (tests): small, so tensors span blocks
SEGMENT_REDUCE_BLOCK = 1024


# ============================================================================ kernels
@triton.jit
def _block_range(blk_start_ptr, blk_end_ptr, pid, BLOCK: tl.constexpr):
    """The element offsets of block ``pid`` and their mask (the block's segment's padded end).

    Tables hold offsets in units of ALIGN (16) elements; multiplying by the constant
    lets the compiler prove 16-element alignment of the offsets and of the mask's
    bound, hence vectorized loads, without hints that differ between Triton versions.
    """
    start = tl.load(blk_start_ptr + pid).to(tl.int64) * 16
    end = tl.load(blk_end_ptr + pid).to(tl.int64) * 16
    offs = start + tl.arange(0, BLOCK)
    return offs, offs < end


@triton.jit
def _awc_block_sumsq_kernel(grad_ptr, blk_start_ptr, blk_end_ptr, blk_sumsq_ptr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs, mask = _block_range(blk_start_ptr, blk_end_ptr, pid, BLOCK)
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(blk_sumsq_ptr + pid, tl.sum(g * g, axis=0))


@triton.jit
def _awc_segment_mean_kernel(blk_sumsq_ptr, seg_blk_ptr, seg_numel_ptr, seg_mean_ptr,
                             RBLOCK: tl.constexpr):
    """mean(g^2) of segment ``s`` from its blocks' partial sums, in a fixed order."""
    s = tl.program_id(0)
    b0 = tl.load(seg_blk_ptr + s)
    b1 = tl.load(seg_blk_ptr + s + 1)
    acc = tl.zeros([RBLOCK], dtype=tl.float32)
    for b in range(b0, b1, RBLOCK):
        idx = b + tl.arange(0, RBLOCK)
        acc += tl.load(blk_sumsq_ptr + idx, mask=idx < b1, other=0.0)
    total = tl.sum(acc, axis=0)
    tl.store(seg_mean_ptr + s, total / tl.load(seg_numel_ptr + s))


@triton.jit
def _awc_update_kernel(param_ptr, anchor_ptr, grad_ptr, fisher_ptr, pen_ptr,
                       seg_mean_ptr, seg_has_fisher_ptr, blk_seg_ptr, blk_start_ptr, blk_end_ptr,
                       decay, one_minus_decay, two_strength, strength, eps,
                       BLOCK: tl.constexpr, UPDATE_FISHER: tl.constexpr, EMA: tl.constexpr,
                       APPLY_PENALTY: tl.constexpr, UNIFORM: tl.constexpr, GRAD_F64: tl.constexpr,
                       BF16_RNE_BY_HAND: tl.constexpr):
    pid = tl.program_id(0)
    offs, mask = _block_range(blk_start_ptr, blk_end_ptr, pid, BLOCK)
    seg = tl.load(blk_seg_ptr + pid)
    g_raw = tl.load(grad_ptr + offs, mask=mask, other=0.0)
    if UPDATE_FISHER:
        # F_new = g^2 / mean(g^2), as fisher_from_grad: eps for a zero (or missing) gradient
        g = g_raw.to(tl.float32)
        mean = tl.load(seg_mean_ptr + seg)
        positive = mean > 0
        f = tl.where(positive, (g * g) / tl.where(positive, mean, 1.0), eps)
        if EMA:
            # segments without an F yet take F_new (masked load: no traffic for them)
            has_old = tl.load(seg_has_fisher_ptr + seg) != 0
            f_old = tl.load(fisher_ptr + offs, mask=mask & has_old, other=0.0)
            f = tl.where(has_old, f_old * decay + one_minus_decay * f, f)
        tl.store(fisher_ptr + offs, f, mask=mask)
    if APPLY_PENALTY:
        if UNIFORM:
            f = tl.full([BLOCK], 1.0, dtype=tl.float32)
        elif not UPDATE_FISHER:
            f = tl.load(fisher_ptr + offs, mask=mask, other=0.0)
        p = tl.load(param_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        a = tl.load(anchor_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        d = p - a
        fd = f * d
        pen_grad = two_strength * f * d  # (2 * strength) * F * d, the torch backend's order
        if GRAD_F64:
            g_new = g_raw.to(tl.float64) + pen_grad.to(tl.float64)
        else:
            g_new = g_raw.to(tl.float32) + pen_grad
        if BF16_RNE_BY_HAND:
            # The CPU interpreter (triton 3.8) truncates float32 -> bfloat16 casts; the GPU
            # and torch round to nearest even. Round by hand there (finite values).
            g_out = round_to_bf16_rne(g_new).to(tl.bfloat16)
        else:
            g_out = g_new.to(grad_ptr.dtype.element_ty)
        tl.store(grad_ptr + offs, g_out, mask=mask)
        tl.store(pen_ptr + pid, strength * tl.sum(fd * d, axis=0))


# ============================================================================ layout
def _dense_strides(t: torch.Tensor) -> Tuple[int, ...]:
    """``t``'s strides when its elements fill ``numel`` consecutive slots (any dim order,
    e.g. channels_last), else the contiguous strides. The segment view then has the
    parameter's own memory layout."""
    dims = sorted((d for d in range(t.dim()) if t.size(d) != 1), key=lambda d: t.stride(d))
    expected = 1
    for d in dims:
        if t.stride(d) != expected:
            return torch.empty(t.shape, device="meta").stride()
        expected *= t.size(d)
    return tuple(t.stride())


def _padded(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass(eq=False)
class _Segment:
    name: str
    index: int  # in its bucket
    param: torch.nn.Parameter
    offset: int
    numel: int
    shape: torch.Size
    strides: Tuple[int, ...]
    param_view: torch.Tensor = None
    grad_view: torch.Tensor = None
    data_ptr: int = 0


@dataclass(eq=False)
class _Bucket:
    """The flat storage of all consolidated tensors of one (device, dtype)."""
    device: torch.device
    dtype: torch.dtype
    segments: List[_Segment]
    numel: int
    param: torch.Tensor
    grad: torch.Tensor
    anchor: Optional[torch.Tensor] = None
    fisher: Optional[torch.Tensor] = None
    # block tables (device, int32): block -> segment, block start and its segment's padded end
    # (in units of ALIGN elements)
    blk_seg: torch.Tensor = None
    blk_start: torch.Tensor = None
    blk_end: torch.Tensor = None
    seg_blk: torch.Tensor = None          # [nseg + 1] CSR: the blocks of segment s are seg_blk[s]:seg_blk[s+1]
    seg_numel: torch.Tensor = None        # float32 [nseg]
    seg_has_fisher: torch.Tensor = None   # int32 [nseg] (device copy of has_fisher)
    blk_sumsq: torch.Tensor = None        # float32 [nblocks]
    seg_mean: torch.Tensor = None         # float32 [nseg]
    pen: torch.Tensor = None              # float32 [nblocks], a slice of the device's penalty buffer
    num_blocks: int = 0
    has_fisher: List[bool] = field(default_factory=list)
    has_anchor: List[bool] = field(default_factory=list)


class FlatAWC:
    """Flat (device, dtype) buckets of the consolidated parameters, and the fused AWC steps.

    ``params`` maps names to the Parameters to consolidate (already filtered: trainable,
    not excluded). On construction the Parameters' data and gradients move into the flat
    buffers (see the module docstring). ``block_size`` / ``num_warps``: elements per
    program and warps of the elementwise kernels (defaults: 4096 / 8 on CUDA, 32 / 1
    under the interpreter).
    """

    def __init__(self, params: Mapping[str, torch.nn.Parameter], block_size: Optional[int] = None,
                 num_warps: Optional[int] = None):
        if not params:
            raise ValueError("FlatAWC got no parameter")
        for name, p in params.items():
            if p.device.type != "cuda" and not interpreting():
                raise ValueError(
                    f"backend='triton' needs CUDA parameters, but {name!r} is on {p.device}: use backend='torch' "
                    "(or 'auto'), or set TRITON_INTERPRET=1 before triton is imported to run the kernels on the "
                    "CPU (slow; for tests)")
            if not p.dtype.is_floating_point:
                raise ValueError(f"AWC consolidates floating-point parameters; {name!r} is {p.dtype}")
            if type(p.data) is not torch.Tensor:
                raise ValueError(
                    f"{name!r} is a {type(p.data).__name__}, not a plain tensor (FSDP / DTensor?): backend='triton' "
                    "moves parameters into its own flat buckets; use backend='torch' with sharded parameters")
        self._check_no_aliasing(params)
        self.block_size, self.num_warps = self._launch_config(next(iter(params.values())).device, block_size, num_warps)
        self.reduce_block = SEGMENT_REDUCE_BLOCK
        self.segments: "OrderedDict[str, _Segment]" = OrderedDict()
        groups: "OrderedDict[Tuple[torch.device, torch.dtype], List[Tuple[str, torch.nn.Parameter]]]" = OrderedDict()
        for name, p in params.items():
            groups.setdefault((p.device, p.dtype), []).append((name, p))
        self.buckets: List[_Bucket] = [self._build_bucket(dev, dt, members) for (dev, dt), members in groups.items()]
        self._bucket_of: Dict[str, _Bucket] = {s.name: b for b in self.buckets for s in b.segments}
        self._segment_list = list(self.segments.values())
        self._param_list = [s.param for s in self._segment_list]
        self._grad_view_list = [s.grad_view for s in self._segment_list]
        self._ptr_list = [s.data_ptr for s in self._segment_list]
        self._build_block_tables()

    # ------------------------------------------------------------------ construction
    @staticmethod
    def _check_no_aliasing(params: Mapping[str, torch.nn.Parameter]) -> None:
        spans = sorted((p.data_ptr(), p.data_ptr() + p.numel() * p.element_size(), n)
                       for n, p in params.items() if p.numel() > 0)
        for (s0, e0, n0), (s1, e1, n1) in zip(spans, spans[1:]):
            if s1 < e0:
                raise ValueError(
                    f"parameters {n0!r} and {n1!r} share memory; backend='triton' would separate them into "
                    "their own slots. Tie them as one Parameter object, or use backend='torch'")

    @staticmethod
    def _launch_config(device: torch.device, block_size: Optional[int], num_warps: Optional[int]) -> Tuple[int, int]:
        on_gpu = device.type == "cuda" and not interpreting()
        block = block_size or (DEFAULT_BLOCK_CUDA if on_gpu else DEFAULT_BLOCK_CPU)
        warps = num_warps or (DEFAULT_WARPS_CUDA if on_gpu else 1)
        if block < ALIGN or block & (block - 1):
            raise ValueError(f"block_size must be a power of two >= {ALIGN}, got {block}")
        return block, warps

    @torch.no_grad()
    def _build_bucket(self, device: torch.device, dtype: torch.dtype,
                      members: Sequence[Tuple[str, torch.nn.Parameter]]) -> _Bucket:
        segments, offset = [], 0
        for name, p in members:
            segments.append(_Segment(name, len(segments), p, offset, p.numel(), p.shape, _dense_strides(p)))
            offset += _padded(p.numel())
        flat_param = torch.zeros(offset, dtype=dtype, device=device)
        flat_grad = torch.zeros(offset, dtype=dtype, device=device)
        for seg in segments:
            p = seg.param
            seg.param_view = flat_param.as_strided(seg.shape, seg.strides, seg.offset)
            seg.grad_view = flat_grad.as_strided(seg.shape, seg.strides, seg.offset)
            seg.param_view.copy_(p.detach())
            if p.grad is not None:
                seg.grad_view.copy_(p.grad)
            p.data = seg.param_view
            p.grad = seg.grad_view
            seg.data_ptr = p.data_ptr()
            self.segments[seg.name] = seg
        n = len(segments)
        return _Bucket(device, dtype, segments, offset, flat_param, flat_grad,
                       has_fisher=[False] * n, has_anchor=[False] * n)

    def _build_block_tables(self) -> None:
        """Block -> segment maps for the current block size; one penalty buffer per device."""
        per_blk = self.block_size // ALIGN
        pen_sizes: Dict[torch.device, int] = OrderedDict()
        for b in self.buckets:
            blk_seg, blk_start, blk_end, seg_blk = [], [], [], [0]
            for i, seg in enumerate(b.segments):
                start, end = seg.offset // ALIGN, (seg.offset + _padded(seg.numel)) // ALIGN
                starts = list(range(start, end, per_blk))
                blk_seg += [i] * len(starts)
                blk_start += starts
                blk_end += [end] * len(starts)
                seg_blk.append(len(blk_seg))
            dev = b.device
            as_i32 = lambda xs: torch.tensor(xs, dtype=torch.int32, device=dev)  # noqa: E731
            if b.numel // ALIGN >= 2 ** 31:
                raise ValueError("a flat AWC bucket over 2^35 elements does not fit the int32 block tables")
            b.num_blocks = len(blk_seg)
            b.blk_seg, b.blk_start, b.blk_end = as_i32(blk_seg), as_i32(blk_start), as_i32(blk_end)
            b.seg_blk = as_i32(seg_blk)
            b.seg_numel = torch.tensor([float(s.numel) for s in b.segments], dtype=torch.float32, device=dev)
            b.seg_has_fisher = as_i32([int(h) for h in b.has_fisher])
            b.blk_sumsq = torch.zeros(b.num_blocks, dtype=torch.float32, device=dev)
            b.seg_mean = torch.zeros(len(b.segments), dtype=torch.float32, device=dev)
            pen_sizes[dev] = pen_sizes.get(dev, 0) + b.num_blocks
        self._pen: Dict[torch.device, torch.Tensor] = {
            dev: torch.zeros(max(n, 1), dtype=torch.float32, device=dev) for dev, n in pen_sizes.items()}
        used: Dict[torch.device, int] = {}
        for b in self.buckets:
            o = used.get(b.device, 0)
            b.pen = self._pen[b.device][o:o + b.num_blocks]
            used[b.device] = o + b.num_blocks

    def configure(self, block_size: Optional[int] = None, num_warps: Optional[int] = None,
                  reduce_block: Optional[int] = None) -> None:
        """Change the launch configuration (the flat layout does not depend on it): elements
        and warps per program of the elementwise kernels, block partials per step of the
        per-tensor reduction. None restores the device's default."""
        self.block_size, self.num_warps = self._launch_config(self.buckets[0].device, block_size, num_warps)
        reduce_block = reduce_block or SEGMENT_REDUCE_BLOCK
        if reduce_block & (reduce_block - 1):
            raise ValueError(f"reduce_block must be a power of two, got {reduce_block}")
        self.reduce_block = reduce_block
        self._build_block_tables()

    # ------------------------------------------------------------------ keeping the views
    @torch.no_grad()
    def sync(self) -> None:
        """Make every ``p.data`` and ``p.grad`` a view of the flat buffers again (host-side checks).

        A parameter whose data was replaced (``p.data = ...``) is copied back into its slot; a
        gradient that is not the view (a fresh tensor after ``set_to_none``) is copied into
        its slot; a missing one is a zero slot. Costs nothing when the views are in place.
        """
        segs = self._segment_list
        # list comprehensions: ~0.5 us per tensor on the host (this runs every step)
        ptrs = [p.data_ptr() for p in self._param_list]
        if ptrs != self._ptr_list:
            for seg, ptr in zip(segs, ptrs):
                if ptr != seg.data_ptr:
                    self._readopt(seg)
        stale = [seg for seg, p, view in zip(segs, self._param_list, self._grad_view_list) if p.grad is not view]
        if not stale:
            return
        zero: List[torch.Tensor] = []
        dst: List[torch.Tensor] = []
        src: List[torch.Tensor] = []
        for seg in stale:
            g = seg.param.grad
            if g is None:
                zero.append(seg.grad_view)
            else:
                dst.append(seg.grad_view)
                src.append(g)
            seg.param.grad = seg.grad_view
        if zero:
            torch._foreach_zero_(zero)
        if dst:
            torch._foreach_copy_(dst, src)

    def _readopt(self, seg: _Segment) -> None:
        p, b = seg.param, self._bucket_of[seg.name]
        if p.device != b.device or p.dtype != b.dtype or p.shape != seg.shape:
            raise RuntimeError(
                f"parameter {seg.name!r} changed to {tuple(p.shape)} {p.dtype} on {p.device} after AWC was built "
                f"(it was {tuple(seg.shape)} {b.dtype} on {b.device}): build AdaptiveWeightConsolidation after "
                "moving or casting the model")
        seg.param_view.copy_(p.detach())
        p.data = seg.param_view
        seg.data_ptr = p.data_ptr()
        self._ptr_list = [s.data_ptr for s in self._segment_list]

    @torch.no_grad()
    def zero_grad(self) -> None:
        """Zero the flat gradient buffers (one fill per bucket) and point every ``p.grad`` at its view."""
        for seg in self.segments.values():
            if seg.param.grad is not seg.grad_view:
                seg.param.grad = seg.grad_view
        for b in self.buckets:
            b.grad.zero_()

    # ------------------------------------------------------------------ anchor and Fisher state
    @torch.no_grad()
    def set_anchor(self) -> None:
        """theta* <- the current weights: one copy per bucket."""
        self.sync()
        for b in self.buckets:
            if b.anchor is None:
                b.anchor = torch.empty_like(b.param)
            b.anchor.copy_(b.param)
            b.has_anchor = [True] * len(b.segments)

    def reset_fisher(self) -> None:
        for b in self.buckets:
            b.has_fisher = [False] * len(b.segments)
            b.seg_has_fisher.zero_()

    def has_fisher(self, name: str) -> bool:
        b = self._bucket_of[name]
        return b.has_fisher[self.segments[name].index]

    def _fisher_view(self, name: str) -> torch.Tensor:
        seg, b = self.segments[name], self._bucket_of[name]
        return b.fisher.as_strided(seg.shape, seg.strides, seg.offset)

    def fisher(self, name: str) -> Optional[torch.Tensor]:
        """F of one tensor (a float32 view of the flat buffer), None before any estimate."""
        return self._fisher_view(name) if self.has_fisher(name) else None

    def anchor(self, name: str) -> torch.Tensor:
        seg, b = self.segments[name], self._bucket_of[name]
        if b.anchor is None or not b.has_anchor[seg.index]:
            raise KeyError(f"no anchor for {name!r}: call set_anchor() first")
        return b.anchor.as_strided(seg.shape, seg.strides, seg.offset)

    def _ensure_fisher(self, b: _Bucket) -> None:
        if b.fisher is None:
            b.fisher = torch.zeros(b.numel, dtype=torch.float32, device=b.device)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """``anchor.<name>`` / ``fisher.<name>`` views, the keys of the torch backend."""
        state: Dict[str, torch.Tensor] = {}
        for name in self.segments:
            b = self._bucket_of[name]
            if b.anchor is not None and b.has_anchor[self.segments[name].index]:
                state[f"anchor.{name}"] = self.anchor(name)
        for name in self.segments:
            if self.has_fisher(name):
                state[f"fisher.{name}"] = self._fisher_view(name)
        return state

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Copy per-tensor ``anchor.<name>`` / ``fisher.<name>`` entries into the flat buffers."""
        for b in self.buckets:
            for i, seg in enumerate(b.segments):
                a = state.get(f"anchor.{seg.name}")
                if a is not None:
                    self._check_entry_shape("anchor", seg, a)
                    if b.anchor is None:
                        b.anchor = torch.zeros_like(b.param)
                    b.anchor.as_strided(seg.shape, seg.strides, seg.offset).copy_(a)
                b.has_anchor[i] = a is not None
                f = state.get(f"fisher.{seg.name}")
                if f is not None:
                    self._check_entry_shape("fisher", seg, f)
                    self._ensure_fisher(b)
                    self._fisher_view(seg.name).copy_(f)
                b.has_fisher[i] = f is not None
            b.seg_has_fisher.copy_(torch.tensor([int(h) for h in b.has_fisher], dtype=torch.int32))

    @staticmethod
    def _check_entry_shape(kind: str, seg: _Segment, t: torch.Tensor) -> None:
        if tuple(t.shape) != tuple(seg.shape):
            raise ValueError(f"AWC state {kind}.{seg.name} has shape {tuple(t.shape)}, the parameter {tuple(seg.shape)}")

    # ------------------------------------------------------------------ the fused steps
    def _require_anchor(self) -> None:
        for b in self.buckets:
            if b.anchor is None or not all(b.has_anchor):
                raise RuntimeError("set_anchor() must be called (at the start of the task) before step()")

    def _require_fisher(self) -> None:
        for b in self.buckets:
            if not all(b.has_fisher):
                raise RuntimeError(
                    "no Fisher estimate yet: with fisher='static' call update_fisher() on synthetic batches "
                    "before the task; with 'adaptive', step() estimates it from the current gradients")

    def _launch(self, b: _Bucket, *, update_fisher: bool, decay: float, apply_penalty: bool, uniform: bool,
                strength: float, eps: float) -> None:
        if b.num_blocks == 0:
            return
        grid = (b.num_blocks,)
        if update_fisher:
            self._ensure_fisher(b)
            _awc_block_sumsq_kernel[grid](b.grad, b.blk_start, b.blk_end, b.blk_sumsq,
                                          BLOCK=self.block_size, num_warps=self.num_warps)
            _awc_segment_mean_kernel[(len(b.segments),)](b.blk_sumsq, b.seg_blk, b.seg_numel, b.seg_mean,
                                                         RBLOCK=self.reduce_block, num_warps=4)
        ema = update_fisher and decay != 0.0 and any(b.has_fisher)
        fisher = b.fisher if b.fisher is not None else b.seg_mean  # unread when uniform
        anchor = b.anchor if apply_penalty else b.param              # unread without penalty
        _awc_update_kernel[grid](
            b.param, anchor, b.grad, fisher, b.pen, b.seg_mean, b.seg_has_fisher,
            b.blk_seg, b.blk_start, b.blk_end,
            float(decay), float(1.0 - decay), float(2.0 * strength), float(strength), float(eps),
            BLOCK=self.block_size, UPDATE_FISHER=update_fisher, EMA=ema, APPLY_PENALTY=apply_penalty,
            UNIFORM=uniform, GRAD_F64=b.dtype == torch.float64,
            BF16_RNE_BY_HAND=b.dtype == torch.bfloat16 and interpreting(), num_warps=self.num_warps)
        if update_fisher and not all(b.has_fisher):
            b.has_fisher = [True] * len(b.segments)
            b.seg_has_fisher.fill_(1)

    def _penalty(self) -> torch.Tensor:
        totals = [pen.sum() for pen in self._pen.values()]
        first = self.buckets[0].device
        total = totals[0]
        for t in totals[1:]:
            total = total + t.to(first)
        return total

    @torch.no_grad()
    def update_fisher(self, decay: float, eps: float) -> None:
        """F <- decay * F + (1 - decay) * g^2 / mean(g^2) from the current gradients (no penalty)."""
        self.sync()
        for b in self.buckets:
            self._launch(b, update_fisher=True, decay=decay, apply_penalty=False, uniform=False, strength=0.0, eps=eps)

    @torch.no_grad()
    def apply_penalty(self, strength: float, uniform: bool) -> torch.Tensor:
        """``.grad += 2 * strength * F * (p - theta*)`` with the current F (or F = 1); the penalty."""
        self._require_anchor()
        if not uniform:
            self._require_fisher()
        self.sync()
        for b in self.buckets:
            self._launch(b, update_fisher=False, decay=0.0, apply_penalty=True, uniform=uniform,
                         strength=strength, eps=0.0)
        return self._penalty()

    @torch.no_grad()
    def step(self, decay: float, strength: float, eps: float) -> torch.Tensor:
        """Adaptive AWC in one pass: update F from the current gradients, then add the penalty gradient."""
        self._require_anchor()
        self.sync()
        for b in self.buckets:
            self._launch(b, update_fisher=True, decay=decay, apply_penalty=True, uniform=False,
                         strength=strength, eps=eps)
        return self._penalty()


__all__ = ["FlatAWC", "ALIGN"]
