"""Fused Triton kernels (installed as ``gift_fast.kernels``).

One file per fused op, holding its Triton kernels and its autograd.Function;
``utils.py`` holds what they share (the interpreter check, bf16 rounding). The
plain PyTorch reference of each op, its torch backend, lives in ``gift_fast``
(losses.py, awc.py). Nothing here imports ``gift_fast``.
"""
