"""Fused Triton kernels (installed as ``gift_fast.kernels``).

One file per fused op, holding its Triton kernels and its autograd.Function;
the plain PyTorch reference of each lives in ``gift_fast`` (losses.py, awc.py).
"""
