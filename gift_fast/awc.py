"""Adaptive weight consolidation (AWC): the Fisher-weighted L2 pull towards the anchor.

METHOD.md, "Adaptive weight consolidation". Per trainable tensor p (excluded names
such as ``logit_scale`` and frozen tensors are left alone), after ``backward(L_kd)``:

    F_new = g^2 / mean(g^2)           (1e-6 everywhere when g is None or all zero)
    F     = decay * F + (1 - decay) * F_new      (F starts as F_new)
    p.grad += 2 * strength * F * (p - theta*)     (in place; F is a constant)
    penalty = strength * sum_p sum F * (p - theta*)^2

``fisher="uniform"`` is the plain L2 baseline (F = 1, no gradient needed).
``fisher="static"`` is the EWC-V baseline: F is estimated before the task with
``update_fisher()`` on n synthetic batches (a running mean: decay t/(t+1) at the
t-th batch, as the authors' static variant) and then ``step()`` leaves it fixed.

Dtypes: F is float32; the anchor is an exact copy of the parameter (its dtype);
the penalty gradient is computed in float32 and added to ``p.grad`` in place (one
rounding to the gradient's dtype); the penalty is a float32 0-dim tensor.

This file is the plain PyTorch reference (``backend="torch"``). ``backend="triton"``
moves the parameters into flat buckets and runs the fused kernels of
``gift_fast.kernels.awc``; ``"auto"`` picks Triton when the parameters are on CUDA.
"""
from __future__ import annotations

import fnmatch
from collections import OrderedDict
from typing import Dict, Iterable, Optional, Sequence, Tuple

import torch

FISHER_KINDS = ("adaptive", "uniform", "static")
BACKENDS = ("torch", "triton", "auto")
ZERO_GRAD_FISHER = 1e-6


def is_excluded(name: str, exclude: Sequence[str]) -> bool:
    """A name is excluded when it equals, ends with ``.<pattern>`` or fnmatches a pattern."""
    return any(name == e or name.endswith("." + e) or fnmatch.fnmatchcase(name, e) for e in exclude)


def fisher_from_grad(grad: Optional[torch.Tensor], like: torch.Tensor, eps: float = ZERO_GRAD_FISHER) -> torch.Tensor:
    """``g^2 / mean(g^2)`` in float32; ``eps`` everywhere for a None or all-zero gradient.

    No data-dependent branch on the mean (that would sync the device every step).
    """
    if grad is None:
        return torch.full(like.shape, eps, dtype=torch.float32, device=like.device)
    sq = grad.detach().float().square()
    mean = sq.mean()
    positive = mean > 0
    return torch.where(positive, sq / torch.where(positive, mean, torch.ones_like(mean)),
                       torch.full_like(sq, eps))


class AdaptiveWeightConsolidation:
    """Fisher-weighted L2 consolidation towards the weights at the start of the task.

    Usage per task::

        awc.set_anchor()                  # theta* <- current weights
        for step ...:
            loss_kd.backward()            # grads of the distillation alone
            penalty = awc.step()          # Fisher update + penalty gradient into .grad
            loss_ce.backward()            # accumulates into the same .grad
            optimizer.step(); optimizer.zero_grad(set_to_none=True)
    """

    def __init__(self, named_parameters: Iterable[Tuple[str, torch.nn.Parameter]], strength: float = 1.0,
                 decay: float = 0.0, fisher: str = "adaptive", exclude: Sequence[str] = ("logit_scale",),
                 backend: str = "torch", eps: float = ZERO_GRAD_FISHER):
        if fisher not in FISHER_KINDS:
            raise ValueError(f"fisher must be one of {FISHER_KINDS}, got {fisher!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        if strength < 0:
            raise ValueError(f"strength must be >= 0, got {strength}")
        self.strength = float(strength)
        self.decay = float(decay)
        self.fisher_kind = fisher
        self.exclude = tuple(exclude)
        self.eps = float(eps)
        self.params: "OrderedDict[str, torch.nn.Parameter]" = OrderedDict(
            (n, p) for n, p in named_parameters if p.requires_grad and not is_excluded(n, self.exclude))
        if not self.params:
            raise ValueError("AdaptiveWeightConsolidation got no trainable parameter (all frozen or excluded)")
        self.backend = self._resolve_backend(backend)
        self._anchor: Dict[str, torch.Tensor] = {}
        self._fisher: Dict[str, Optional[torch.Tensor]] = {n: None for n in self.params}
        self.num_fisher_updates = 0

    # ------------------------------------------------------------------ helpers
    def _resolve_backend(self, backend: str) -> str:
        if backend == "auto":
            on_cuda = all(p.is_cuda for p in self.params.values())
            return "triton" if on_cuda and _triton_importable() else "torch"
        return backend

    def names(self):
        return list(self.params)

    # ------------------------------------------------------------------ API
    @torch.no_grad()
    def set_anchor(self) -> None:
        """theta* <- the current weights (call at the start of every task)."""
        self._anchor = {n: p.detach().clone() for n, p in self.params.items()}

    def reset_fisher(self) -> None:
        """Forget F (the static variant re-estimates it before each task)."""
        self._fisher = {n: None for n in self.params}
        self.num_fisher_updates = 0

    @torch.no_grad()
    def update_fisher(self, decay: Optional[float] = None) -> None:
        """F <- decay * F + (1 - decay) * g^2 / mean(g^2) from the current ``.grad``.

        ``decay=None`` uses the configured decay, except for ``fisher="static"``,
        where it is the running mean's t / (t + 1).
        """
        if decay is None:
            decay = (self.num_fisher_updates / (self.num_fisher_updates + 1)
                     if self.fisher_kind == "static" else self.decay)
        for n, p in self.params.items():
            f_new = fisher_from_grad(p.grad, p, self.eps)
            old = self._fisher[n]
            self._fisher[n] = f_new if old is None else old.mul_(decay).add_(f_new, alpha=1.0 - decay)
        self.num_fisher_updates += 1

    def _current_fisher(self, name: str) -> torch.Tensor:
        if self.fisher_kind == "uniform":
            p = self.params[name]
            return torch.ones(p.shape, dtype=torch.float32, device=p.device)
        f = self._fisher[name]
        if f is None:
            raise RuntimeError(
                "no Fisher estimate yet: with fisher='static' call update_fisher() on synthetic batches "
                "before the task; with 'adaptive', step() estimates it from the current gradients")
        return f

    @torch.no_grad()
    def apply_penalty(self) -> torch.Tensor:
        """Add ``2 * strength * F * (p - theta*)`` into ``.grad``; return the penalty value."""
        if not self._anchor:
            raise RuntimeError("set_anchor() must be called (at the start of the task) before step()")
        device = next(iter(self.params.values())).device
        total = torch.zeros((), dtype=torch.float32, device=device)
        for n, p in self.params.items():
            f = self._current_fisher(n)
            d = p.detach().float() - self._anchor[n].float()
            pen_grad = (2.0 * self.strength) * f * d
            if p.grad is None:
                p.grad = pen_grad.to(p.dtype)
            else:
                p.grad.add_(pen_grad)
            total += self.strength * (f * d * d).sum()
        return total

    def step(self) -> torch.Tensor:
        """After ``backward(L_kd)``: update F (adaptive), add the penalty gradient, return the penalty."""
        if self.fisher_kind == "adaptive":
            self.update_fisher()
        return self.apply_penalty()

    def fisher(self, name: str) -> torch.Tensor:
        """The current F of one parameter (float32, the parameter's shape)."""
        if name not in self.params:
            raise KeyError(f"{name!r} is not consolidated (frozen, excluded or unknown); known: {self.names()[:5]}...")
        return self._current_fisher(name)

    def anchor(self, name: str) -> torch.Tensor:
        return self._anchor[name]

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> Dict[str, torch.Tensor]:
        """Flat tensor dict (safetensors-friendly): ``anchor.<name>``, ``fisher.<name>``, counters."""
        state = {f"anchor.{n}": t for n, t in self._anchor.items()}
        state.update({f"fisher.{n}": f for n, f in self._fisher.items() if f is not None})
        state["num_fisher_updates"] = torch.tensor(self.num_fisher_updates)
        return state

    @torch.no_grad()
    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        unknown = [k for k in state if k.split(".", 1)[-1] not in self.params and k != "num_fisher_updates"]
        if unknown:
            raise ValueError(f"AWC state has entries for parameters this model lacks: {unknown[:5]}")
        self._anchor = {n: state[f"anchor.{n}"].to(p.device, p.dtype).clone()
                        for n, p in self.params.items() if f"anchor.{n}" in state}
        self._fisher = {n: (state[f"fisher.{n}"].to(p.device, torch.float32).clone()
                            if f"fisher.{n}" in state else None) for n, p in self.params.items()}
        self.num_fisher_updates = int(state.get("num_fisher_updates", torch.tensor(0)))


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        return True
    except ImportError:
        return False


__all__ = ["AdaptiveWeightConsolidation", "fisher_from_grad", "is_excluded", "FISHER_KINDS"]
