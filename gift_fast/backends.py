"""Which implementation runs a fused op: the plain PyTorch one or the Triton kernel. The one resolver.

The distillation loss (``gift_fast.losses``) and the consolidation (``gift_fast.awc``) each have a torch
backend (the plain PyTorch reference of the math) and a Triton backend (``gift_fast.kernels``); the user
picks one with ``--kernels`` / ``backend=``:

* ``"torch"``: the plain PyTorch code, on any device;
* ``"triton"``: the fused kernels (CUDA tensors; on the CPU only under ``TRITON_INTERPRET=1``, for tests);
* ``"auto"``: Triton when every tensor concerned is on CUDA and Triton imports, else torch.

This module imports neither torch nor Triton, so the CLI can offer ``BACKENDS`` as ``--kernels`` choices
without paying for them at start-up.
"""
from __future__ import annotations

from typing import Any

BACKENDS = ("torch", "triton", "auto")


def check_backend(backend: str, what: str = "backend") -> str:
    """``backend`` itself when it is one of BACKENDS; a ValueError naming ``what`` otherwise."""
    if backend not in BACKENDS:
        raise ValueError(f"{what} must be one of {BACKENDS}, got {backend!r}")
    return backend


def triton_available() -> bool:
    """True when Triton imports (it is imported here only to find out; the kernels import it themselves)."""
    try:
        import triton  # noqa: F401  (lazy: importing Triton is slow and it is absent off Linux)
    except ImportError:
        return False
    return True


def _on_cuda(where: Any) -> bool:
    """A tensor, a ``torch.device``, a device string, or an iterable of tensors (all of them) on CUDA."""
    if hasattr(where, "is_cuda"):                   # a tensor
        return bool(where.is_cuda)
    if isinstance(where, str):                      # "cuda", "cuda:1", "cpu"
        return where.split(":", 1)[0] == "cuda"
    if hasattr(where, "type") and hasattr(where, "index"):   # a torch.device
        return where.type == "cuda"
    return all(t.is_cuda for t in where)


def resolve_backend(backend: str, where: Any, *, what: str = "backend") -> str:
    """``"torch"`` or ``"triton"``: ``backend`` itself, or for ``"auto"`` Triton when ``where`` (a tensor, a
    device, or an iterable of tensors, all of which must be on CUDA) is on CUDA and Triton imports.

    ``what`` names the option in the error for an unknown backend (``backend``, ``--kernels``).
    """
    check_backend(backend, what)
    if backend != "auto":
        return backend
    return "triton" if _on_cuda(where) and triton_available() else "torch"


__all__ = ["BACKENDS", "check_backend", "triton_available", "resolve_backend"]
