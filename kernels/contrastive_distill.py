"""Fused Triton kernels for GIFT's contrastive distillation (CD) + image-text alignment (ITA).

The math is ``gift_fast.losses`` (the plain PyTorch reference, the torch backend). With X, Y the student
sides of the mode (contrastive: img_s, txt_s; image_only: img_s, txt_t; text_only:
img_t, txt_s) and X', Y' the teacher (img_t, txt_t), rows normalized by
``n(x) = x / max(||x||, 1e-12)`` (F.normalize):

    S_ij = s * n(X_i) . n(Y_j),   S'_ij = s * n(X'_i) . n(Y'_j)            (B x B)
    parts = [ cd_w tau^2 / B * sum_i CE(S_i / tau, softmax(S'_i / tau)),      cd_image
              cd_w tau^2 / B * sum_j CE(S_:j / tau, softmax(S'_:j / tau)),    cd_text
              ita_w / B * sum_i CE(S_i, At_i),                                ita_image
              ita_w / B * sum_j CE(S_:j, At_:j) ]                             ita_text
    At_ij = (1 - ls) [k_i == k_j] / #{l : k_l == k_i} + ls / B   (symmetric)

Neither S nor S' is ever written to memory: every kernel recomputes its tiles from
the raw embeddings (``tl.dot`` on the input dtype, fp32 accumulation; the norms are
applied to the tile afterwards, so bf16 inputs lose nothing to normalization).

How the work is split
* B <= SMALL_B_MAX: one program holds the whole B x B problem. The forward is one
  launch (loss), the backward one launch (recomputes, then the gradients).
* larger B, forward: ``_rnorm_kernel`` (inverse norms), ``_stats_kernel`` (each
  program a group of tiles: online row statistics across its column tiles, online
  column statistics across its row blocks, written as partials per group),
  ``_combine_kernel`` (merges the partials into the row and column log-sum-exps and
  the four loss terms). Memory: (row groups + column groups) x 9 x B floats.
* larger B, backward: ``_grad_tiles_kernel`` recomputes the tiles of a chunk of rows
  and writes ``H = s * diag(rx) dS diag(ry)`` for that chunk (bounded by
  GRAD_CHUNK_BYTES, by default 64 MB), two cuBLAS GEMMs accumulate ``u = H Y`` and
  ``v = H^T X`` in fp32, and ``_finish_kernel`` applies the normalization's backward
  ``dx = u - n (n . u)`` and casts to the input dtype.

Every loss term is summed from non-negative pieces (``P'_ij (lse_i - S_ij / tau)``,
``At_ij (lse_i - S_ij)``, and in the partials distances to the running maximum), so
there is no cancellation between two large numbers even at s = 100.

Host cost (a slow host makes small B launch-bound): the kernels take contiguous inputs
(strided views are copied first) so no stride arguments are passed, the forward's fp32
buffers are one workspace allocation, the launch parameters are cached per shape, and
``gift_distill_loss_triton`` (what ``gift_distill_loss`` calls without ``return_parts``)
writes the sum of the parts itself: no sum op and no autograd node after the kernel.
Small B: 2 launches and 3 allocations per forward + backward.

The backward is real (not precomputed in the forward): it reads the gradient of the
four parts from device memory, so any weighting of the parts (or backpropagating one
part) is exact, and no host synchronization happens anywhere.

Under ``TRITON_INTERPRET=1`` (CPU tensors) ``tl.dot`` on bf16 operands is garbage:
the constexpr ``UPCAST`` then rounds each operand to its input dtype and multiplies
in fp32, which is what the GPU's tensor cores compute (exact products, fp32 sums).
"""
from __future__ import annotations

import functools
import warnings
from typing import Optional, Tuple, Union

import torch
import triton
import triton.language as tl

from .utils import interpreting, round_to_bf16_rne

# Largest B that runs as one program (forward: 1 launch, backward: 1 launch).
SMALL_B_MAX = 64
# Upper bound of the B x rows block of H materialized at a time in the large backward.
GRAD_CHUNK_BYTES = 64 * 2 ** 20
# Partial statistics up to this size live in the workspace kept for the backward (saves an
# allocation per call; above it they are freed at the end of the forward).
PART_SHARED_BYTES = 8 * 2 ** 20

_EPS = tl.constexpr(1e-12)       # F.normalize's eps
_NEG = tl.constexpr(-1.0e30)     # finite "-inf": 0 * (x - _NEG) stays 0, never inf * 0
_N_STATS = 9                     # per partial slot: m, l1, l2, mp, lp, w, a, b, c
# The modes this kernel computes: gift_fast.losses.MODES without its torch-only ones, same order and meaning
# (tests/test_kernel_contrastive_distill.py keeps the two lists in step; nothing here imports gift_fast).
MODES = ("contrastive", "image_only", "text_only")
_NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ============================================================================ helpers
@triton.jit
def _scalar(v, IS_PTR: tl.constexpr):
    """A run-time scalar given as a float argument or as a pointer to a 0-dim tensor."""
    if IS_PTR:
        return tl.load(v).to(tl.float32)
    else:
        return v


@triton.jit
def _mma(a, b, acc, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """acc + a @ b with fp32 accumulation.

    UPCAST (the CPU interpreter): operands already rounded to their dtype are multiplied
    in fp32, exactly what the tensor cores do with bf16/fp16 operands. IEEE: fp32 inputs
    keep full fp32 products (no tf32).
    """
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _cast(v, DT: tl.constexpr, UPCAST: tl.constexpr):
    """v.to(DT) with round-to-nearest-even, as the GPU converts.

    The interpreter truncates fp32 -> bf16 (seen with triton 3.8): round the bits first there.
    """
    if UPCAST:
        if DT == tl.bfloat16:
            v = round_to_bf16_rne(v)
    return v.to(DT)


@triton.jit
def _raw_tile(x_ptr, y_ptr, rows, cols, row_ok, col_ok, D,
              BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
              UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """Unnormalized X_rows . Y_cols^T in fp32."""
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, D, BK):
        offk = k0 + tl.arange(0, BK)
        k_ok = offk < D
        x = tl.load(x_ptr + rows[:, None] * D + offk[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        y = tl.load(y_ptr + cols[None, :] * D + offk[:, None],
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = _mma(x, y, acc, UPCAST, IEEE)
    return acc


@triton.jit
def _raw_tiles(x_ptr, y_ptr, xt_ptr, yt_ptr, rows, cols, row_ok, col_ok, D,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
               UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """Unnormalized X_rows . Y_cols^T and X'_rows . Y'_cols^T (fp32), one K loop each
    (two short pipelines hold fewer registers than one with four operands)."""
    acc = _raw_tile(x_ptr, y_ptr, rows, cols, row_ok, col_ok, D,
                    BM, BN, BK, UPCAST, IEEE)
    acc_t = _raw_tile(xt_ptr, yt_ptr, rows, cols, row_ok, col_ok, D,
                      BM, BN, BK, UPCAST, IEEE)
    return acc, acc_t


@triton.jit
def _tile_stats(S, St, match, ok2, inv_tau, AXIS: tl.constexpr):
    """Partial statistics of a tile along AXIS (1: per row, 0: per column).

    m = max S, l1 = sum e^(S - m), l2 = sum e^((S - m)/tau), mp = max S',
    lp = sum e^((S' - mp)/tau), w = sum e^((S' - mp)/tau) (m - S)/tau (all >= 0),
    a = sum_{same label} S, b = sum S, c = #same label (additive: no rescaling).
    """
    Sm = tl.where(ok2, S, _NEG)
    Tm = tl.where(ok2, St, _NEG)
    m = tl.max(Sm, AXIS)
    mp = tl.max(Tm, AXIS)
    if AXIS == 1:
        d = m[:, None] - Sm
        dt = Tm - mp[:, None]
    else:
        d = m[None, :] - Sm
        dt = Tm - mp[None, :]
    d = tl.where(ok2, d, 0.0)
    ep = tl.where(ok2, tl.exp(dt * inv_tau), 0.0)
    l1 = tl.sum(tl.where(ok2, tl.exp(-d), 0.0), AXIS)
    l2 = tl.sum(tl.where(ok2, tl.exp(-d * inv_tau), 0.0), AXIS)
    lp = tl.sum(ep, AXIS)
    w = tl.sum(ep * d, AXIS) * inv_tau
    Sz = tl.where(ok2, S, 0.0)
    a = tl.sum(match * Sz, AXIS)
    b = tl.sum(Sz, AXIS)
    c = tl.sum(match, AXIS)
    return m, l1, l2, mp, lp, w, a, b, c


@triton.jit
def _merge(M, L1, L2, MP, LP, W, A, Bs, C, m, l1, l2, mp, lp, w, a, b, c, inv_tau):
    """Merge two sets of partial statistics (see _tile_stats)."""
    Mn = tl.maximum(M, m)
    dA = Mn - M
    dB = Mn - m
    L1 = L1 * tl.exp(-dA) + l1 * tl.exp(-dB)
    L2 = L2 * tl.exp(-dA * inv_tau) + l2 * tl.exp(-dB * inv_tau)
    MPn = tl.maximum(MP, mp)
    ea = tl.exp((MP - MPn) * inv_tau)
    eb = tl.exp((mp - MPn) * inv_tau)
    # (a neutral side has LP = 0 and dA ~ 1e30: keep 1e30 * inv_tau * 0 from ever being inf * 0)
    W = ea * (W + tl.where(LP > 0, dA * inv_tau * LP, 0.0)) + eb * (w + tl.where(lp > 0, dB * inv_tau * lp, 0.0))
    LP = LP * ea + lp * eb
    return Mn, L1, L2, MPn, LP, W, A + a, Bs + b, C + c


# ======================================================================= small B path
@triton.jit(do_not_specialize=["B"])
def _small_kernel(x_ptr, y_ptr, xt_ptr, yt_ptr, lab_ptr, io_ptr, gx_ptr, gy_ptr,
                  scale, tau_in, ls, cdw, itaw, inv_B, B, D, s_go,
                  SCALE_PTR: tl.constexpr, TAU_PTR: tl.constexpr, GRAD: tl.constexpr, TOTAL: tl.constexpr,
                  NEED_DX: tl.constexpr, NEED_DY: tl.constexpr,
                  BB: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """The whole problem in one program: the loss (GRAD=False) or the gradients (GRAD=True).

    Contiguous inputs (row stride D). io_ptr: the output (the four parts, or with TOTAL
    their sum) in the forward; the gradient of the output, stride s_go (0 for the total),
    in the backward.
    """
    s = _scalar(scale, SCALE_PTR)
    tau = _scalar(tau_in, TAU_PTR)
    inv_tau = 1.0 / tau
    idx = tl.arange(0, BB)
    ok = idx < B
    ok2 = ok[:, None] & ok[None, :]

    sraw = tl.zeros((BB, BB), dtype=tl.float32)
    traw = tl.zeros((BB, BB), dtype=tl.float32)
    nx = tl.zeros((BB,), dtype=tl.float32)
    ny = tl.zeros((BB,), dtype=tl.float32)
    nxt = tl.zeros((BB,), dtype=tl.float32)
    nyt = tl.zeros((BB,), dtype=tl.float32)
    for k0 in range(0, D, BK):
        offk = k0 + tl.arange(0, BK)
        m2 = ok[:, None] & (offk < D)[None, :]
        off = idx[:, None] * D + offk[None, :]
        x = tl.load(x_ptr + off, mask=m2, other=0.0)
        y = tl.load(y_ptr + off, mask=m2, other=0.0)
        xt = tl.load(xt_ptr + off, mask=m2, other=0.0)
        yt = tl.load(yt_ptr + off, mask=m2, other=0.0)
        sraw = _mma(x, tl.trans(y), sraw, UPCAST, IEEE)
        traw = _mma(xt, tl.trans(yt), traw, UPCAST, IEEE)
        xf = x.to(tl.float32)
        yf = y.to(tl.float32)
        xtf = xt.to(tl.float32)
        ytf = yt.to(tl.float32)
        nx += tl.sum(xf * xf, 1)
        ny += tl.sum(yf * yf, 1)
        nxt += tl.sum(xtf * xtf, 1)
        nyt += tl.sum(ytf * ytf, 1)
    norm_x = tl.sqrt(nx)
    norm_y = tl.sqrt(ny)
    rx = 1.0 / tl.maximum(norm_x, _EPS)
    ry = 1.0 / tl.maximum(norm_y, _EPS)
    rxt = 1.0 / tl.maximum(tl.sqrt(nxt), _EPS)
    ryt = 1.0 / tl.maximum(tl.sqrt(nyt), _EPS)
    S = sraw * (s * rx)[:, None] * ry[None, :]
    St = traw * (s * rxt)[:, None] * ryt[None, :]

    # log-sum-exps of rows and columns (student at 1 and at tau, teacher at tau)
    Sm = tl.where(ok2, S, _NEG)
    Tm = tl.where(ok2, St, _NEG)
    m_r = tl.max(Sm, 1)
    m_c = tl.max(Sm, 0)
    mt_r = tl.max(Tm, 1)
    mt_c = tl.max(Tm, 0)
    d_r = tl.where(ok2, m_r[:, None] - S, 0.0)
    d_c = tl.where(ok2, m_c[None, :] - S, 0.0)
    l1_r = tl.sum(tl.where(ok2, tl.exp(-d_r), 0.0), 1)
    l2_r = tl.sum(tl.where(ok2, tl.exp(-d_r * inv_tau), 0.0), 1)
    l1_c = tl.sum(tl.where(ok2, tl.exp(-d_c), 0.0), 0)
    l2_c = tl.sum(tl.where(ok2, tl.exp(-d_c * inv_tau), 0.0), 0)
    lt_r = tl.sum(tl.where(ok2, tl.exp(tl.where(ok2, St - mt_r[:, None], 0.0) * inv_tau), 0.0), 1)
    lt_c = tl.sum(tl.where(ok2, tl.exp(tl.where(ok2, St - mt_c[None, :], 0.0) * inv_tau), 0.0), 0)
    lse1_r = tl.where(ok, m_r + tl.log(tl.where(ok, l1_r, 1.0)), 0.0)
    lse2_r = tl.where(ok, m_r * inv_tau + tl.log(tl.where(ok, l2_r, 1.0)), 0.0)
    lset_r = tl.where(ok, mt_r * inv_tau + tl.log(tl.where(ok, lt_r, 1.0)), 0.0)
    lse1_c = tl.where(ok, m_c + tl.log(tl.where(ok, l1_c, 1.0)), 0.0)
    lse2_c = tl.where(ok, m_c * inv_tau + tl.log(tl.where(ok, l2_c, 1.0)), 0.0)
    lset_c = tl.where(ok, mt_c * inv_tau + tl.log(tl.where(ok, lt_c, 1.0)), 0.0)

    # teacher targets and -log q (all >= 0 up to rounding)
    St_tau = St * inv_tau
    S_tau = S * inv_tau
    P_r = tl.where(ok2, tl.exp(St_tau - lset_r[:, None]), 0.0)
    P_c = tl.where(ok2, tl.exp(St_tau - lset_c[None, :]), 0.0)
    nq_r = lse2_r[:, None] - S_tau
    nq_c = lse2_c[None, :] - S_tau
    nr_r = lse1_r[:, None] - S
    nr_c = lse1_c[None, :] - S

    # ITA target from the labels: (1 - ls) [k_i == k_j] / count_i + ls / B
    lab = tl.load(lab_ptr + idx, mask=ok, other=0)
    match = tl.where((lab[:, None] == lab[None, :]) & ok2, 1.0, 0.0)
    cnt = tl.sum(match, 1)
    At = tl.where(ok2, (1.0 - ls) * match / tl.maximum(cnt, 1.0)[:, None] + ls * inv_B, 0.0)

    cd_coef = cdw * tau * tau * inv_B
    ita_coef = itaw * inv_B
    if not GRAD:
        cd_img = tl.sum(tl.sum(tl.where(ok2, P_r * nq_r, 0.0), 1), 0)
        cd_txt = tl.sum(tl.sum(tl.where(ok2, P_c * nq_c, 0.0), 1), 0)
        ita_img = tl.sum(tl.sum(tl.where(ok2, At * nr_r, 0.0), 1), 0)
        ita_txt = tl.sum(tl.sum(tl.where(ok2, At * nr_c, 0.0), 1), 0)
        if TOTAL:
            tl.store(io_ptr, ((cd_coef * cd_img + cd_coef * cd_txt) + ita_coef * ita_img) + ita_coef * ita_txt)
        else:
            tl.store(io_ptr + 0, cd_coef * cd_img)
            tl.store(io_ptr + 1, cd_coef * cd_txt)
            tl.store(io_ptr + 2, ita_coef * ita_img)
            tl.store(io_ptr + 3, ita_coef * ita_txt)
    else:
        g0 = tl.load(io_ptr).to(tl.float32)
        g1 = tl.load(io_ptr + s_go).to(tl.float32)
        g2 = tl.load(io_ptr + 2 * s_go).to(tl.float32)
        g3 = tl.load(io_ptr + 3 * s_go).to(tl.float32)
        Q_r = tl.exp(-nq_r)
        Q_c = tl.exp(-nq_c)
        R_r = tl.exp(-nr_r)
        R_c = tl.exp(-nr_c)
        dS = (cd_coef * inv_tau) * (g0 * (Q_r - P_r) + g1 * (Q_c - P_c)) \
            + ita_coef * (g2 * (R_r - At) + g3 * (R_c - At))
        dS = tl.where(ok2, dS, 0.0)
        H = dS * (s * rx)[:, None] * ry[None, :]
        # The GEMM operands: H rounded to the input dtype (as on the tensor cores), scaled per
        # row for u = H Y and per column for v = H^T X so that fp16's narrow range never
        # underflows or overflows (the scales are undone after the product; a no-op for
        # bf16/fp32 precision).
        Ha = tl.abs(H)
        su = tl.max(Ha, 1)
        su = tl.where(su > 0, su, 1.0)
        sv = tl.max(Ha, 0)
        sv = tl.where(sv > 0, sv, 1.0)
        Hu = _cast(H / su[:, None], x_ptr.dtype.element_ty, UPCAST)
        Hv = _cast(H / sv[None, :], x_ptr.dtype.element_ty, UPCAST)
        # normalization backward: dx = u - n (n . u), n . u = rx^2 sum_j H_ij (x_i . y_j), with
        # the rounded H so that the projection matches the product exactly
        # (rx sraw_ij = n_i . y_j stays bounded: no overflow for tiny norms)
        c_x = tl.where(norm_x >= _EPS, su * (rx * tl.sum(Hu.to(tl.float32) * (sraw * rx[:, None]), 1)), 0.0)
        c_y = tl.where(norm_y >= _EPS, sv * (ry * tl.sum(Hv.to(tl.float32) * (sraw * ry[None, :]), 0)), 0.0)
        for k0 in range(0, D, BK):
            offk = k0 + tl.arange(0, BK)
            m2 = ok[:, None] & (offk < D)[None, :]
            out_off = idx[:, None] * D + offk[None, :]
            x = tl.load(x_ptr + out_off, mask=m2, other=0.0)
            y = tl.load(y_ptr + out_off, mask=m2, other=0.0)
            if NEED_DX:
                u = _mma(Hu, y, tl.zeros((BB, BK), dtype=tl.float32), UPCAST, IEEE) * su[:, None]
                dx = u - x.to(tl.float32) * c_x[:, None]
                tl.store(gx_ptr + out_off, _cast(dx, gx_ptr.dtype.element_ty, UPCAST), mask=m2)
            if NEED_DY:
                v = _mma(tl.trans(Hv), x, tl.zeros((BB, BK), dtype=tl.float32), UPCAST, IEEE) * sv[:, None]
                dy = v - y.to(tl.float32) * c_y[:, None]
                tl.store(gy_ptr + out_off, _cast(dy, gy_ptr.dtype.element_ty, UPCAST), mask=m2)


# ======================================================================= large B path
@triton.jit
def _rnorm_rows(ptr, rows, ok, D, BR: tl.constexpr, BK: tl.constexpr):
    acc = tl.zeros((BR,), dtype=tl.float32)
    for k0 in range(0, D, BK):
        offk = k0 + tl.arange(0, BK)
        v = tl.load(ptr + rows[:, None] * D + offk[None, :],
                    mask=ok[:, None] & (offk < D)[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(v * v, 1)
    return 1.0 / tl.maximum(tl.sqrt(acc), _EPS)


@triton.jit(do_not_specialize=["B"])
def _rnorm_kernel(x_ptr, y_ptr, xt_ptr, yt_ptr, rn_ptr, B, D, BR: tl.constexpr, BK: tl.constexpr):
    """rn[t, i] = 1 / max(||row i of tensor t||, eps) for t = X, Y, X', Y'."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    ok = rows < B
    tl.store(rn_ptr + rows, _rnorm_rows(x_ptr, rows, ok, D, BR, BK), mask=ok)
    tl.store(rn_ptr + B + rows, _rnorm_rows(y_ptr, rows, ok, D, BR, BK), mask=ok)
    tl.store(rn_ptr + 2 * B + rows, _rnorm_rows(xt_ptr, rows, ok, D, BR, BK), mask=ok)
    tl.store(rn_ptr + 3 * B + rows, _rnorm_rows(yt_ptr, rows, ok, D, BR, BK), mask=ok)


@triton.jit
def _store_stats(ptr, B, idx, ok, m, l1, l2, mp, lp, w, a, b, c):
    tl.store(ptr + idx, m, mask=ok)
    tl.store(ptr + B + idx, l1, mask=ok)
    tl.store(ptr + 2 * B + idx, l2, mask=ok)
    tl.store(ptr + 3 * B + idx, mp, mask=ok)
    tl.store(ptr + 4 * B + idx, lp, mask=ok)
    tl.store(ptr + 5 * B + idx, w, mask=ok)
    tl.store(ptr + 6 * B + idx, a, mask=ok)
    tl.store(ptr + 7 * B + idx, b, mask=ok)
    tl.store(ptr + 8 * B + idx, c, mask=ok)


@triton.jit
def _neutral_stats(N: tl.constexpr):
    """N lanes of the neutral element of _merge: the start of every online-softmax accumulation."""
    neg = tl.full((N,), _NEG, dtype=tl.float32)
    zero = tl.zeros((N,), dtype=tl.float32)
    return neg, zero, zero, neg, zero, zero, zero, zero, zero


@triton.jit
def _load_stats(ptr, B, idx, ok):
    """Partial statistics at ptr; where not ok the neutral element of _merge."""
    m = tl.load(ptr + idx, mask=ok, other=_NEG)
    l1 = tl.load(ptr + B + idx, mask=ok, other=0.0)
    l2 = tl.load(ptr + 2 * B + idx, mask=ok, other=0.0)
    mp = tl.load(ptr + 3 * B + idx, mask=ok, other=_NEG)
    lp = tl.load(ptr + 4 * B + idx, mask=ok, other=0.0)
    w = tl.load(ptr + 5 * B + idx, mask=ok, other=0.0)
    a = tl.load(ptr + 6 * B + idx, mask=ok, other=0.0)
    b = tl.load(ptr + 7 * B + idx, mask=ok, other=0.0)
    c = tl.load(ptr + 8 * B + idx, mask=ok, other=0.0)
    return m, l1, l2, mp, lp, w, a, b, c


@triton.jit(do_not_specialize=["B"])
def _stats_kernel(x_ptr, y_ptr, xt_ptr, yt_ptr, lab_ptr, rn_ptr, part_ptr, part_off,
                  scale, tau_in, B, D, n_ib, n_jb, GR, GC, n_cg,
                  SCALE_PTR: tl.constexpr, TAU_PTR: tl.constexpr,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                  UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """Program (rg, cg): the GR x GC tiles of row group rg and column group cg.

    Row statistics accumulate online over the group's column tiles and go to slot cg;
    column statistics accumulate over the group's row blocks in slot n_cg + rg, which
    this program alone owns (read-modify-write, a barrier between row blocks). So the
    partial memory is (n_rg + n_cg) * 9 * B floats, whatever the number of tiles.
    """
    s = _scalar(scale, SCALE_PTR)
    inv_tau = 1.0 / _scalar(tau_in, TAU_PTR)
    part_ptr += part_off
    rg = tl.program_id(0)
    cg = tl.program_id(1)
    i_begin = rg * GR
    i_end = tl.minimum(i_begin + GR, n_ib)
    j_begin = cg * GC
    j_end = tl.minimum(j_begin + GC, n_jb)
    col_base = part_ptr + (n_cg + rg) * 9 * B
    for ib in range(i_begin, i_end):
        rows = ib * BM + tl.arange(0, BM)
        row_ok = rows < B
        srx = s * tl.load(rn_ptr + rows, mask=row_ok, other=0.0)
        srxt = s * tl.load(rn_ptr + 2 * B + rows, mask=row_ok, other=0.0)
        lab_r = tl.load(lab_ptr + rows, mask=row_ok, other=0)
        M, L1, L2, MP, LP, W, A, Bs, C = _neutral_stats(BM)
        for jb in range(j_begin, j_end):
            cols = jb * BN + tl.arange(0, BN)
            col_ok = cols < B
            ok2 = row_ok[:, None] & col_ok[None, :]
            ry = tl.load(rn_ptr + B + cols, mask=col_ok, other=0.0)
            ryt = tl.load(rn_ptr + 3 * B + cols, mask=col_ok, other=0.0)
            lab_c = tl.load(lab_ptr + cols, mask=col_ok, other=0)
            sraw, traw = _raw_tiles(x_ptr, y_ptr, xt_ptr, yt_ptr, rows, cols, row_ok, col_ok, D,
                                    BM, BN, BK, UPCAST, IEEE)
            S = sraw * srx[:, None] * ry[None, :]
            St = traw * srxt[:, None] * ryt[None, :]
            match = tl.where((lab_r[:, None] == lab_c[None, :]) & ok2, 1.0, 0.0)
            m, l1, l2, mp, lp, w, a, b, c = _tile_stats(S, St, match, ok2, inv_tau, 1)
            M, L1, L2, MP, LP, W, A, Bs, C = _merge(M, L1, L2, MP, LP, W, A, Bs, C,
                                                    m, l1, l2, mp, lp, w, a, b, c, inv_tau)
            m, l1, l2, mp, lp, w, a, b, c = _tile_stats(S, St, match, ok2, inv_tau, 0)
            pm, pl1, pl2, pmp, plp, pw, pa, pb, pc = _load_stats(col_base, B, cols, col_ok & (ib > i_begin))
            m, l1, l2, mp, lp, w, a, b, c = _merge(pm, pl1, pl2, pmp, plp, pw, pa, pb, pc,
                                                   m, l1, l2, mp, lp, w, a, b, c, inv_tau)
            _store_stats(col_base, B, cols, col_ok, m, l1, l2, mp, lp, w, a, b, c)
        _store_stats(part_ptr + cg * 9 * B, B, rows, row_ok, M, L1, L2, MP, LP, W, A, Bs, C)
        # the next row block reads the column partials written above (other threads' stores)
        tl.debug_barrier()


@triton.jit(do_not_specialize=["B"])
def _combine_kernel(part_ptr, part_off, ws_ptr, tau_in, ls, cdw, itaw, inv_B,
                    B, n_row_slots, n_col_slots,
                    TAU_PTR: tl.constexpr, BC: tl.constexpr):
    """Merge the partial slots of rows (axis 1 = 0) or columns (axis 1 = 1).

    Writes stats[side] = (lse at 1, lse at tau, teacher lse at tau, label count) and this
    program's share of the loss terms to lossp[pid, (cd, ita) of the side] (the workspace
    layout: rn [4, B], stats [2, 4, B], lossp [n_c, 4]).
    """
    part_ptr += part_off
    stats_ptr = ws_ptr + 4 * B
    lossp_ptr = ws_ptr + 12 * B
    tau = _scalar(tau_in, TAU_PTR)
    inv_tau = 1.0 / tau
    pid = tl.program_id(0)
    side = tl.program_id(1)
    idx = pid * BC + tl.arange(0, BC)
    ok = idx < B
    slot0 = side * n_row_slots
    n_slots = n_row_slots + side * (n_col_slots - n_row_slots)

    M, L1, L2, MP, LP, W, A, Bs, C = _neutral_stats(BC)
    for k in range(0, n_slots):
        # lanes past B get the neutral element; they are masked out of every store below
        m, l1, l2, mp, lp, w, a, b, c = _load_stats(part_ptr + (slot0 + k) * 9 * B, B, idx, ok)
        M, L1, L2, MP, LP, W, A, Bs, C = _merge(M, L1, L2, MP, LP, W, A, Bs, C,
                                                m, l1, l2, mp, lp, w, a, b, c, inv_tau)
    L1 = tl.where(ok, L1, 1.0)
    L2 = tl.where(ok, L2, 1.0)
    LP = tl.where(ok, LP, 1.0)
    C = tl.where(ok, C, 1.0)
    log_l1 = tl.log(L1)
    log_l2 = tl.log(L2)
    out = stats_ptr + side * 4 * B + idx
    tl.store(out, M + log_l1, mask=ok)
    tl.store(out + B, M * inv_tau + log_l2, mask=ok)
    tl.store(out + 2 * B, MP * inv_tau + tl.log(LP), mask=ok)
    tl.store(out + 3 * B, C, mask=ok)
    # CE at tau = log L2 + sum_j P'_j (M - S_j) / tau (non-negative pieces);
    # CE at 1 = lse - sum_j At_j S_j = M - At.S + log L1 (cancels to ~|S| * 1e-7, as log_softmax does)
    cd = tl.where(ok, log_l2 + W / LP, 0.0)
    ita = tl.where(ok, (M - (1.0 - ls) * A / C - ls * inv_B * Bs) + log_l1, 0.0)
    tl.store(lossp_ptr + pid * 4 + side, cdw * tau * tau * inv_B * tl.sum(cd, 0))
    tl.store(lossp_ptr + pid * 4 + 2 + side, itaw * inv_B * tl.sum(ita, 0))


@triton.jit(do_not_specialize=["B", "r0", "r_end"])
def _grad_tiles_kernel(x_ptr, y_ptr, xt_ptr, yt_ptr, lab_ptr, rn_ptr, go_ptr, h_ptr,
                       scale, tau_in, ls, cdw, itaw, inv_B,
                       B, D, r0, r_end, ld_h, s_go,
                       SCALE_PTR: tl.constexpr, TAU_PTR: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                       UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """H[i - r0, j] = s rx_i ry_j dL/dS_ij for rows r0 <= i < r_end (the GEMM operand).

    rn_ptr: the forward's workspace (rn [4, B], then stats [2, 4, B]).
    """
    stats_ptr = rn_ptr + 4 * B
    s = _scalar(scale, SCALE_PTR)
    tau = _scalar(tau_in, TAU_PTR)
    inv_tau = 1.0 / tau
    rows = r0 + tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    row_ok = rows < r_end
    col_ok = cols < B
    ok2 = row_ok[:, None] & col_ok[None, :]
    srx = s * tl.load(rn_ptr + rows, mask=row_ok, other=0.0)
    ry = tl.load(rn_ptr + B + cols, mask=col_ok, other=0.0)
    srxt = s * tl.load(rn_ptr + 2 * B + rows, mask=row_ok, other=0.0)
    ryt = tl.load(rn_ptr + 3 * B + cols, mask=col_ok, other=0.0)
    sraw, traw = _raw_tiles(x_ptr, y_ptr, xt_ptr, yt_ptr, rows, cols, row_ok, col_ok, D,
                            BM, BN, BK, UPCAST, IEEE)
    S = sraw * srx[:, None] * ry[None, :]
    St_tau = traw * srxt[:, None] * ryt[None, :] * inv_tau
    S_tau = S * inv_tau
    lse1_r = tl.load(stats_ptr + rows, mask=row_ok, other=0.0)
    lse2_r = tl.load(stats_ptr + B + rows, mask=row_ok, other=0.0)
    lset_r = tl.load(stats_ptr + 2 * B + rows, mask=row_ok, other=0.0)
    cnt_r = tl.load(stats_ptr + 3 * B + rows, mask=row_ok, other=1.0)
    lse1_c = tl.load(stats_ptr + 4 * B + cols, mask=col_ok, other=0.0)
    lse2_c = tl.load(stats_ptr + 5 * B + cols, mask=col_ok, other=0.0)
    lset_c = tl.load(stats_ptr + 6 * B + cols, mask=col_ok, other=0.0)
    lab_r = tl.load(lab_ptr + rows, mask=row_ok, other=0)
    lab_c = tl.load(lab_ptr + cols, mask=col_ok, other=0)
    g0 = tl.load(go_ptr).to(tl.float32)
    g1 = tl.load(go_ptr + s_go).to(tl.float32)
    g2 = tl.load(go_ptr + 2 * s_go).to(tl.float32)
    g3 = tl.load(go_ptr + 3 * s_go).to(tl.float32)

    match = tl.where(lab_r[:, None] == lab_c[None, :], 1.0, 0.0)
    At = (1.0 - ls) * match / tl.maximum(cnt_r, 1.0)[:, None] + ls * inv_B
    cd_k = cdw * tau * inv_B
    ita_k = itaw * inv_B
    dS = cd_k * (g0 * (tl.exp(S_tau - lse2_r[:, None]) - tl.exp(St_tau - lset_r[:, None]))
                 + g1 * (tl.exp(S_tau - lse2_c[None, :]) - tl.exp(St_tau - lset_c[None, :]))) \
        + ita_k * (g2 * (tl.exp(S - lse1_r[:, None]) - At) + g3 * (tl.exp(S - lse1_c[None, :]) - At))
    H = tl.where(ok2, dS * srx[:, None] * ry[None, :], 0.0)
    tl.store(h_ptr + (rows - r0)[:, None] * ld_h + cols[None, :], _cast(H, h_ptr.dtype.element_ty, UPCAST), mask=ok2)


@triton.jit
def _finish_rows(x_ptr, u_ptr, g_ptr, rows, ok, D, BK: tl.constexpr, UPCAST: tl.constexpr):
    """g = u - x rx^2 (x . u): the backward of x / max(||x||, eps) applied to u = rx * dL/dn."""
    sq = tl.zeros(rows.shape, dtype=tl.float32)
    xu = tl.zeros(rows.shape, dtype=tl.float32)
    for k0 in range(0, D, BK):
        offk = k0 + tl.arange(0, BK)
        m2 = ok[:, None] & (offk < D)[None, :]
        off = rows[:, None] * D + offk[None, :]
        x = tl.load(x_ptr + off, mask=m2, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + off, mask=m2, other=0.0)
        sq += tl.sum(x * x, 1)
        xu += tl.sum(x * u, 1)
    norm = tl.sqrt(sq)
    r = 1.0 / tl.maximum(norm, _EPS)
    c = tl.where(norm >= _EPS, r * r * xu, 0.0)
    for k0 in range(0, D, BK):
        offk = k0 + tl.arange(0, BK)
        m2 = ok[:, None] & (offk < D)[None, :]
        off = rows[:, None] * D + offk[None, :]
        x = tl.load(x_ptr + off, mask=m2, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + off, mask=m2, other=0.0)
        tl.store(g_ptr + off, _cast(u - c[:, None] * x, g_ptr.dtype.element_ty, UPCAST), mask=m2)


@triton.jit(do_not_specialize=["B"])
def _finish_kernel(x_ptr, y_ptr, u_ptr, v_ptr, gx_ptr, gy_ptr, B, D, NEED_DX: tl.constexpr,
                   BR: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr):
    """Both normalization backwards in one launch: program (i, 0) is X's rows (when NEED_DX),
    the last column Y's rows (grid[1] = number of gradients needed)."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    ok = rows < B
    if NEED_DX:
        if tl.program_id(1) == 0:
            _finish_rows(x_ptr, u_ptr, gx_ptr, rows, ok, D, BK, UPCAST)
        else:
            _finish_rows(y_ptr, v_ptr, gy_ptr, rows, ok, D, BK, UPCAST)
    else:
        _finish_rows(y_ptr, v_ptr, gy_ptr, rows, ok, D, BK, UPCAST)


# ======================================================================== host side
def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# Tile settings (BM, BN, BK, num_warps, num_stages) of the large path. Chosen from an sm_90
# AOT compile (ptxas -v: no or small register spills) with triton 3.8; retune on the GPU.
STATS_TILES = {"lowp": (64, 64, 64, 8, 3), "fp32": (64, 64, 32, 8, 2)}
GRAD_TILES = {"lowp": (128, 64, 64, 8, 3), "fp32": (64, 64, 32, 8, 2)}
_CPU_TILES = (64, 64, 64, 4, 1)   # the interpreter: fewer, larger programs run faster


class _Config:
    """Launch parameters of one call (path, tiles, grouping, chunking); cached per shape."""

    def __init__(self, B: int, D: int, dtype: torch.dtype, on_gpu: bool, sms: int,
                 force: Optional[str] = None, tiles: Optional[Tuple[int, int, int]] = None,
                 group: Union[None, int, Tuple[int, int]] = None, chunk_rows: Optional[int] = None,
                 upcast: Optional[bool] = None):
        self.ieee = dtype == torch.float32
        self.upcast = (not on_gpu) if upcast is None else upcast
        self.small = (B <= SMALL_B_MAX) if force is None else (force == "small")
        if self.small:
            self.BB = max(16, _next_pow2(B))
            self.BK = max(16, min(32 if (self.ieee or self.BB > 32) else 64, _next_pow2(D)))
            self.warps = 4 if self.BB <= 16 else (8 if self.BB <= 32 else 16)
            return
        key = "fp32" if self.ieee else "lowp"
        if tiles is not None:
            st = gr = tuple(tiles) + (4, 1)
        elif not on_gpu:
            st = gr = _CPU_TILES
        else:
            st, gr = STATS_TILES[key], GRAD_TILES[key]
        kmax = max(16, _next_pow2(D))
        self.BM, self.BN, self.BK, self.warps, self.stages = st[0], st[1], min(st[2], kmax), st[3], st[4]
        self.gBM, self.gBN, self.gBK, self.gwarps, self.gstages = gr[0], gr[1], min(gr[2], kmax), gr[3], gr[4]
        self.n_ib = triton.cdiv(B, self.BM)
        self.n_jb = triton.cdiv(B, self.BN)
        if group is None:
            # about 4 programs per SM; each program a square-ish group of tiles
            side = max(1, int((4 * sms) ** 0.5))
            group = (triton.cdiv(self.n_ib, side), triton.cdiv(self.n_jb, side))
        elif isinstance(group, int):
            group = (group, group)
        self.GR, self.GC = group
        self.n_rg = triton.cdiv(self.n_ib, self.GR)
        self.n_cg = triton.cdiv(self.n_jb, self.GC)
        self.ld_h = triton.cdiv(B, 16) * 16
        itemsize = torch.empty((), dtype=dtype).element_size()
        if chunk_rows is None:
            chunk_rows = max(self.gBM, (GRAD_CHUNK_BYTES // (self.ld_h * itemsize)) // self.gBM * self.gBM)
        self.chunk_rows = min(chunk_rows, triton.cdiv(B, self.gBM) * self.gBM)
        # forward workspace (fp32): rn [4, B] | stats [2, 4, B] | lossp [n_c, 4], kept for the
        # backward; the partials (only the forward needs them) share that allocation while
        # small (one allocation less per call), and get their own above PART_SHARED_BYTES
        self.BC = 256
        self.n_c = triton.cdiv(B, self.BC)
        self.keep_floats = 12 * B + 4 * self.n_c
        self.part_floats = (self.n_cg + self.n_rg) * _N_STATS * B
        self.part_shared = self.part_floats * 4 <= PART_SHARED_BYTES
        self.single_chunk = self.chunk_rows >= B
        self.grid_rnorm = (triton.cdiv(B, 32),)
        self.grid_stats = (self.n_rg, self.n_cg)
        self.grid_combine = (self.n_c, 2)
        self.grid_finish = triton.cdiv(B, 16)


@functools.lru_cache(maxsize=256)
def _config(B, D, dtype, on_gpu, sms, force, tiles, group, chunk_rows, upcast) -> _Config:
    return _Config(B, D, dtype, on_gpu, sms, force, tiles, group, chunk_rows, upcast)


_MM_OUT_DTYPE_OK = [True]   # torch >= 2.8 has mm(..., out_dtype=torch.float32) on CUDA


def _mm_f32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, accumulate: bool) -> None:
    """out (+)= a @ b with fp32 accumulation and an fp32 result, products of the input dtype."""
    if a.dtype == torch.float32:
        if accumulate:
            torch.addmm(out, a, b, out=out)
        else:
            torch.mm(a, b, out=out)
        return
    if a.is_cuda and _MM_OUT_DTYPE_OK[0]:
        try:
            if accumulate:
                torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
            else:
                torch.mm(a, b, out_dtype=torch.float32, out=out)
            return
        except (TypeError, RuntimeError) as err:
            _MM_OUT_DTYPE_OK[0] = False
            warnings.warn(f"torch.mm(..., out_dtype=torch.float32) failed ({err}); the CD kernel's gradient "
                          "GEMMs fall back to rounding their products to the input dtype (less accurate)")
    if a.is_cuda:
        prod = torch.mm(a, b).float()     # older torch: a rounding of the product to bf16/fp16
    else:
        prod = torch.mm(a.float(), b.float())   # CPU: exact products, fp32 sums (as the tensor cores)
    if accumulate:
        out.add_(prod)
    else:
        out.copy_(prod)


def _forward(x, y, xt, yt, labels, scale, tau, ls, cdw, itaw, cfg: _Config, scale_ptr, tau_ptr, total):
    """Inputs contiguous. Returns the output (the four parts, or their sum with total) and the
    tensors the backward needs."""
    B, D = x.shape
    dev = x.device
    out = torch.empty(() if total else (4,), dtype=torch.float32, device=dev)
    inv_B = 1.0 / B
    if cfg.small:
        _small_kernel[(1,)](x, y, xt, yt, labels, out, x, y, scale, tau, ls, cdw, itaw, inv_B, B, D, 0,
                            SCALE_PTR=scale_ptr, TAU_PTR=tau_ptr, GRAD=False, TOTAL=total, NEED_DX=False,
                            NEED_DY=False, BB=cfg.BB, BK=cfg.BK, UPCAST=cfg.upcast, IEEE=cfg.ieee,
                            num_warps=cfg.warps)
        return out, None
    if cfg.part_shared:
        ws = torch.empty(cfg.keep_floats + cfg.part_floats, dtype=torch.float32, device=dev)
        part, part_off = ws, cfg.keep_floats
    else:
        ws = torch.empty(cfg.keep_floats, dtype=torch.float32, device=dev)
        part, part_off = torch.empty(cfg.part_floats, dtype=torch.float32, device=dev), 0
    _rnorm_kernel[cfg.grid_rnorm](x, y, xt, yt, ws, B, D, BR=32, BK=64, num_warps=4)
    _stats_kernel[cfg.grid_stats](
        x, y, xt, yt, labels, ws, part, part_off, scale, tau, B, D, cfg.n_ib, cfg.n_jb, cfg.GR, cfg.GC, cfg.n_cg,
        SCALE_PTR=scale_ptr, TAU_PTR=tau_ptr, BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, UPCAST=cfg.upcast, IEEE=cfg.ieee,
        num_warps=cfg.warps, num_stages=cfg.stages)
    _combine_kernel[cfg.grid_combine](part, part_off, ws, tau, ls, cdw, itaw, inv_B, B, cfg.n_cg, cfg.n_rg,
                                      TAU_PTR=tau_ptr, BC=cfg.BC, num_warps=4)
    del part
    lossp = ws[12 * B: cfg.keep_floats].view(cfg.n_c, 4)
    if total:
        torch.sum(lossp, (0, 1), out=out)
    else:
        torch.sum(lossp, 0, out=out)
    return out, ws


def _backward(grad_out, x, y, xt, yt, labels, ws, scale, tau, ls, cdw, itaw, cfg: _Config,
              scale_ptr, tau_ptr, need_dx, need_dy):
    B, D = x.shape
    inv_B = 1.0 / B
    # stride 0: the gradient of the total is one number for all four parts
    s_go = 0 if grad_out.dim() == 0 else grad_out.stride(0)
    gx = torch.empty((B, D), dtype=x.dtype, device=x.device) if need_dx else x
    gy = torch.empty((B, D), dtype=y.dtype, device=y.device) if need_dy else y
    if cfg.small:
        _small_kernel[(1,)](x, y, xt, yt, labels, grad_out, gx, gy, scale, tau, ls, cdw, itaw, inv_B, B, D, s_go,
                            SCALE_PTR=scale_ptr, TAU_PTR=tau_ptr, GRAD=True, TOTAL=False, NEED_DX=need_dx,
                            NEED_DY=need_dy, BB=cfg.BB, BK=cfg.BK, UPCAST=cfg.upcast, IEEE=cfg.ieee,
                            num_warps=cfg.warps)
        return (gx if need_dx else None), (gy if need_dy else None)
    R = cfg.chunk_rows
    # fp16's range cannot hold the unnormalized block s rx ry dS at large B (it underflows):
    # fp16 inputs run the gradient GEMMs on bf16 operands (bf16-level gradient accuracy)
    gemm_dtype = torch.bfloat16 if x.dtype == torch.float16 else x.dtype
    xg = x if x.dtype == gemm_dtype else x.to(gemm_dtype)
    yg = y if y.dtype == gemm_dtype else y.to(gemm_dtype)
    h = torch.empty((R, cfg.ld_h), dtype=gemm_dtype, device=x.device)
    u = torch.empty((B, D), dtype=torch.float32, device=x.device) if need_dx else None
    v = torch.empty((B, D), dtype=torch.float32, device=x.device) if need_dy else None
    for r0 in range(0, B, R):
        r1 = min(B, r0 + R)
        _grad_tiles_kernel[(triton.cdiv(r1 - r0, cfg.gBM), triton.cdiv(B, cfg.gBN))](
            x, y, xt, yt, labels, ws, grad_out, h, scale, tau, ls, cdw, itaw, inv_B,
            B, D, r0, r1, cfg.ld_h, s_go,
            SCALE_PTR=scale_ptr, TAU_PTR=tau_ptr, BM=cfg.gBM, BN=cfg.gBN, BK=cfg.gBK,
            UPCAST=cfg.upcast, IEEE=cfg.ieee, num_warps=cfg.gwarps, num_stages=cfg.gstages)
        # (one chunk: the whole blocks, no views; each view is a dispatcher call on the host)
        hc = h if (r1 - r0 == R and cfg.ld_h == B) else h[: r1 - r0, :B]
        if need_dx:
            _mm_f32(hc, yg, u if cfg.single_chunk else u[r0:r1], accumulate=False)
        if need_dy:
            _mm_f32(hc.t(), xg if cfg.single_chunk else xg[r0:r1], v, accumulate=r0 > 0)
    del h, xg, yg
    _finish_kernel[(cfg.grid_finish, int(need_dx) + int(need_dy))](
        x, y, u if need_dx else v, v if need_dy else u, gx, gy, B, D, NEED_DX=need_dx, BR=16, BK=64,
        UPCAST=cfg.upcast, num_warps=4)
    return (gx if need_dx else None), (gy if need_dy else None)


class GiftDistillFunction(torch.autograd.Function):
    """Parts [cd_image, cd_text, ita_image, ita_text] of (x, y) = the student sides of the mode,
    or with ``total`` their sum (a 0-dim tensor: no sum op and no autograd node after it).

    The inputs are contiguous. The backward reads the gradient of the output on the device (any
    weighting is exact, no sync) and recomputes the similarity tiles.
    """

    @staticmethod
    def forward(ctx, x, y, xt, yt, labels, scale, tau, consts):
        ls, cdw, itaw, cfg, scale_ptr, tau_ptr, total = consts
        out, ws = _forward(x, y, xt, yt, labels, scale, tau, ls, cdw, itaw, cfg, scale_ptr, tau_ptr, total)
        ctx.consts = consts
        ctx.scalars = (None if scale_ptr else scale, None if tau_ptr else tau)
        ctx.extra = bool(scale_ptr or tau_ptr or ws is not None)
        if ctx.extra:
            ctx.save_for_backward(x, y, xt, yt, labels, scale if scale_ptr else None, tau if tau_ptr else None, ws)
        else:
            ctx.save_for_backward(x, y, xt, yt, labels)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        ls, cdw, itaw, cfg, scale_ptr, tau_ptr, _ = ctx.consts
        need_dx, need_dy = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_dx or need_dy):
            return None, None, None, None, None, None, None, None
        scale, tau = ctx.scalars
        if ctx.extra:
            x, y, xt, yt, labels, scale_t, tau_t, ws = ctx.saved_tensors
            if scale_ptr:
                scale = scale_t
            if tau_ptr:
                tau = tau_t
        else:
            x, y, xt, yt, labels = ctx.saved_tensors
            ws = None
        if grad_out.dtype != torch.float32:
            grad_out = grad_out.float()
        gx, gy = _backward(grad_out, x, y, xt, yt, labels, ws, scale, tau, ls, cdw, itaw, cfg,
                           scale_ptr, tau_ptr, need_dx, need_dy)
        return gx, gy, None, None, None, None, None, None


def _runtime_scalar(value, name: str, device: torch.device):
    """A float argument, or a 0-dim tensor on the device read by the kernel (no host sync)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a 0-dim tensor, got shape {tuple(value.shape)}")
        if value.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"backend='triton' gives no gradient to {name}: pass {name}.detach() "
                             "(GIFT keeps it frozen) or use backend='torch'")
        if value.device == device:
            return value.detach().reshape(()).float(), True
        return float(value), False      # a CPU tensor: reading it does not sync the GPU
    return float(value), False


def _plain_float(value, name: str) -> float:
    if isinstance(value, torch.Tensor):
        if value.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"backend='triton' gives no gradient to {name}: pass a number or a detached tensor")
        return float(value)
    return float(value)


def _apply(img_s, txt_s, img_t, txt_t, labels, logit_scale, temperature, label_smoothing, cd_weight, ita_weight,
           mode, total, force_path=None, tiles=None, group=None, chunk_rows=None, upcast=None) -> torch.Tensor:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES} for backend='triton', got {mode!r}")
    on_gpu = img_s.is_cuda
    if not on_gpu and not interpreting():
        raise ValueError("backend='triton' needs CUDA tensors (the CPU runs Triton only through the "
                         "TRITON_INTERPRET=1 interpreter, for tests); use backend='auto' or 'torch'")
    dtype = img_s.dtype
    if not (txt_s.dtype == dtype and img_t.dtype == dtype and txt_t.dtype == dtype and dtype in _NATIVE_DTYPES):
        dtypes = {img_s.dtype, txt_s.dtype, img_t.dtype, txt_t.dtype}
        dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
        if dtype not in _NATIVE_DTYPES:
            dtype = torch.float32
        img_s, txt_s, img_t, txt_t = (t if t.dtype == dtype else t.to(dtype) for t in (img_s, txt_s, img_t, txt_t))
    # the teacher is a constant (text_only makes img_t the X side: no gradient may reach it)
    if img_t.requires_grad:
        img_t = img_t.detach()
    if txt_t.requires_grad:
        txt_t = txt_t.detach()
    if mode == "contrastive":
        x, y = img_s, txt_s
    elif mode == "image_only":
        x, y = img_s, txt_t
    else:
        x, y = img_t, txt_s
    # the kernels index contiguous rows (fewer launch arguments); a copy only for strided views
    if not x.is_contiguous():
        x = x.contiguous()
    if not y.is_contiguous():
        y = y.contiguous()
    if not img_t.is_contiguous():
        img_t = img_t.contiguous()
    if not txt_t.is_contiguous():
        txt_t = txt_t.contiguous()
    if not labels.is_contiguous():
        labels = labels.contiguous()
    B, D = x.shape
    if B * D >= 2 ** 31 or B * B >= 2 ** 31:
        raise ValueError(f"B = {B}, D = {D} is too large for the int32 indexing of the Triton kernels "
                         "(B * D and B * B must stay below 2**31): use backend='torch' or split the batch")
    dev = x.device
    scale, scale_ptr = _runtime_scalar(logit_scale, "logit_scale", dev)
    tau, tau_ptr = _runtime_scalar(temperature, "temperature", dev)
    ls = _plain_float(label_smoothing, "label_smoothing")
    cdw = _plain_float(cd_weight, "cd_weight")
    itaw = _plain_float(ita_weight, "ita_weight")
    sms = _num_sms(dev.index if dev.index is not None else torch.cuda.current_device()) if on_gpu else 1
    cfg = _config(B, D, dtype, on_gpu, sms, force_path, tiles, group, chunk_rows, upcast)
    return GiftDistillFunction.apply(x, y, img_t, txt_t, labels, scale, tau,
                                     (ls, cdw, itaw, cfg, scale_ptr, tau_ptr, total))


def gift_distill_parts_triton(img_s, txt_s, img_t, txt_t, labels, logit_scale, temperature, label_smoothing,
                              cd_weight, ita_weight, mode, *, _force_path: Optional[str] = None,
                              _tiles: Optional[Tuple[int, int, int]] = None,
                              _group: Union[None, int, Tuple[int, int]] = None,
                              _chunk_rows: Optional[int] = None, _upcast: Optional[bool] = None) -> torch.Tensor:
    """The four weighted parts (cd_image, cd_text, ita_image, ita_text), float32 [4].

    Differentiable w.r.t. img_s and txt_s (only img_s in image_only, only txt_s in text_only);
    the teacher embeddings are constants. Embeddings of any float dtype: float32, bfloat16 and
    float16 are computed natively (fp32 accumulation), others in float32. ``logit_scale`` and
    ``temperature`` may be 0-dim tensors on the embeddings' device (read by the kernels: no host
    sync); they get no gradient. The underscored arguments are for tests and tuning only.
    """
    return _apply(img_s, txt_s, img_t, txt_t, labels, logit_scale, temperature, label_smoothing, cd_weight,
                  ita_weight, mode, False, _force_path, _tiles, _group, _chunk_rows, _upcast)


def gift_distill_loss_triton(img_s, txt_s, img_t, txt_t, labels, logit_scale, temperature, label_smoothing,
                             cd_weight, ita_weight, mode, *, _force_path: Optional[str] = None,
                             _tiles: Optional[Tuple[int, int, int]] = None,
                             _group: Union[None, int, Tuple[int, int]] = None,
                             _chunk_rows: Optional[int] = None, _upcast: Optional[bool] = None) -> torch.Tensor:
    """The sum of the four parts as a 0-dim float32 tensor (``gift_distill_parts_triton(...).sum()``
    computed in the kernel: one op and one autograd node less per call, which is what a small
    batch costs on a slow host). Same arguments and gradients as gift_distill_parts_triton."""
    return _apply(img_s, txt_s, img_t, txt_t, labels, logit_scale, temperature, label_smoothing, cd_weight,
                  ita_weight, mode, True, _force_path, _tiles, _group, _chunk_rows, _upcast)


__all__ = ["gift_distill_parts_triton", "gift_distill_loss_triton", "GiftDistillFunction", "SMALL_B_MAX", "GRAD_CHUNK_BYTES"]
