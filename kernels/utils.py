"""Helpers shared by every fused kernel of ``gift_fast.kernels`` (Liger-Kernel's ``ops/utils.py`` role).

Like the kernels, this imports nothing from ``gift_fast``: the kernels are a layer below the package.

* ``interpreting()``: whether Triton runs its CPU interpreter (``TRITON_INTERPRET=1``, the tests) instead of
  compiling for the GPU; the one check of it in ``kernels/``.
* ``round_to_bf16_rne(v)``: fp32 -> the nearest bfloat16 value (ties to even), still as fp32. The GPU and torch
  round fp32 -> bf16 casts to nearest even, but the interpreter (seen with triton 3.8) truncates: a kernel that
  stores bf16 rounds by hand under the interpreter so the CPU tests see the GPU's bits.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl


def interpreting() -> bool:
    """True when Triton's CPU interpreter runs the kernels (``TRITON_INTERPRET=1`` before triton was imported,
    or set through ``triton.knobs``); the GPU path compiles them."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None and hasattr(knobs, "runtime"):
        return bool(knobs.runtime.interpret)     # reads TRITON_INTERPRET now, unless set through the knob
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def round_to_bf16_rne(v):
    """fp32 ``v`` rounded to the nearest bfloat16 (ties to even), as fp32 (finite values): ``.to(tl.bfloat16)``
    of the result is then exact, also where the interpreter would truncate."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return bits.to(tl.float32, bitcast=True)


__all__ = ["interpreting", "round_to_bf16_rne"]
