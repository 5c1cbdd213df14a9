"""Adaptive weight consolidation (AWC): the Fisher-weighted L2 pull towards the anchor.

docs/METHOD.md, "Adaptive weight consolidation". Per trainable tensor p (excluded names
such as ``logit_scale`` and frozen tensors are left alone), after ``backward(L_kd)``:

    F_new = g^2 / mean(g^2)           (1e-6 everywhere when g is None or all zero; the authors'
                                       code divides 0 by 0 there: NaN, docs/METHOD.md "Defects")
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

This file is the plain PyTorch reference (the torch backend, ``backend="torch"``).
``backend="triton"`` moves the parameters into flat buckets and runs the fused kernels of
``gift_fast.kernels.awc``; ``"auto"`` picks Triton when the parameters are on CUDA
(``gift_fast.backends``). With Triton, ``p.data`` and ``p.grad`` become views of flat
(device, dtype) buffers (same Parameter objects, same ``state_dict``;
``awc.owns_grad_buffers`` is then True): zero gradients with ``awc.zero_grad()`` or
``optimizer.zero_grad(set_to_none=False)`` so that backward accumulates into the views;
a gradient that is not the view any more is copied back in (correct, slower).
``foreach_awc_step`` is the same step with ``torch._foreach`` ops (a baseline).
"""
from __future__ import annotations

import fnmatch
from collections import OrderedDict
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from gift_fast.backends import BACKENDS, check_backend, resolve_backend  # noqa: F401  (BACKENDS: its old home)

FISHER_KINDS = ("adaptive", "uniform", "static")
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
            optimizer.step()
            awc.zero_grad() if awc.owns_grad_buffers else optimizer.zero_grad(set_to_none=True)

    (``gift_fast.step.GiftStep`` is this loop.)
    """

    def __init__(self, named_parameters: Iterable[Tuple[str, torch.nn.Parameter]], strength: float = 1.0,
                 decay: float = 0.0, fisher: str = "adaptive", exclude: Sequence[str] = ("logit_scale",),
                 backend: str = "torch", eps: float = ZERO_GRAD_FISHER):
        if fisher not in FISHER_KINDS:
            raise ValueError(f"fisher must be one of {FISHER_KINDS}, got {fisher!r}")
        check_backend(backend)
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
        self.backend = resolve_backend(backend, self.params.values())   # "torch" or "triton"
        self._anchor: Dict[str, torch.Tensor] = {}
        self._fisher: Dict[str, Optional[torch.Tensor]] = {n: None for n in self.params}
        self.num_fisher_updates = 0
        self._flat = None
        if self.backend == "triton":
            from gift_fast.kernels.awc import FlatAWC  # moves the parameters into flat buckets
            self._flat = FlatAWC(self.params)

    # ------------------------------------------------------------------ helpers
    def names(self):
        return list(self.params)

    @property
    def owns_grad_buffers(self) -> bool:
        """True when the consolidated parameters' ``.grad`` are views of buffers this object owns (the Triton
        backend's flat buckets): clear them with ``zero_grad()`` (in place), never by setting them to None."""
        return self._flat is not None

    # ------------------------------------------------------------------ API
    @torch.no_grad()
    def set_anchor(self) -> None:
        """theta* <- the current weights (call at the start of every task)."""
        if self._flat is not None:
            return self._flat.set_anchor()
        self._anchor = {n: p.detach().clone() for n, p in self.params.items()}

    def reset_fisher(self) -> None:
        """Forget F (the static variant re-estimates it before each task)."""
        if self._flat is not None:
            self._flat.reset_fisher()
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
        if self._flat is not None:
            self._flat.update_fisher(decay, self.eps)
            self.num_fisher_updates += 1
            return
        for n, p in self.params.items():
            f_new = fisher_from_grad(p.grad, p, self.eps)
            old = self._fisher[n]
            self._fisher[n] = f_new if old is None else old.mul_(decay).add_(f_new, alpha=1.0 - decay)
        self.num_fisher_updates += 1

    def _current_fisher(self, name: str) -> torch.Tensor:
        if self.fisher_kind == "uniform":
            p = self.params[name]
            return torch.ones(p.shape, dtype=torch.float32, device=p.device)
        f = self._flat.fisher(name) if self._flat is not None else self._fisher[name]
        if f is None:
            raise RuntimeError(
                "no Fisher estimate yet: with fisher='static' call update_fisher() on synthetic batches "
                "before the task; with 'adaptive', step() estimates it from the current gradients")
        return f

    @torch.no_grad()
    def apply_penalty(self) -> torch.Tensor:
        """Add ``2 * strength * F * (p - theta*)`` into ``.grad``; return the penalty value."""
        if self._flat is not None:
            return self._flat.apply_penalty(self.strength, uniform=self.fisher_kind == "uniform")
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
        if self._flat is not None and self.fisher_kind == "adaptive":
            # one fused pass: the Fisher update reads the gradients before the penalty joins them
            penalty = self._flat.step(self.decay, self.strength, self.eps)
            self.num_fisher_updates += 1
            return penalty
        if self.fisher_kind == "adaptive":
            self.update_fisher()
        return self.apply_penalty()

    def fisher(self, name: str) -> torch.Tensor:
        """The current F of one parameter (float32, the parameter's shape)."""
        if name not in self.params:
            raise KeyError(f"{name!r} is not consolidated (frozen, excluded or unknown); known: {self.names()[:5]}...")
        return self._current_fisher(name)

    def anchor(self, name: str) -> torch.Tensor:
        if self._flat is not None:
            return self._flat.anchor(name)
        return self._anchor[name]

    @torch.no_grad()
    def zero_grad(self) -> None:
        """Zero the consolidated parameters' gradients.

        Triton: fills the flat gradient buffers (one launch per bucket) and keeps every
        ``p.grad`` a view of them, so that backward accumulates in place; torch: sets them
        to None. Gradients of excluded parameters (``logit_scale``) are not touched.
        """
        if self._flat is not None:
            return self._flat.zero_grad()
        for p in self.params.values():
            p.grad = None

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> Dict[str, torch.Tensor]:
        """Flat tensor dict (safetensors-friendly): ``anchor.<name>``, ``fisher.<name>``, counters.

        The same keys with either backend, so checkpoints move between them.
        """
        if self._flat is not None:
            state = self._flat.state_dict()
        else:
            state = {f"anchor.{n}": t for n, t in self._anchor.items()}
            state.update({f"fisher.{n}": f for n, f in self._fisher.items() if f is not None})
        state["num_fisher_updates"] = torch.tensor(self.num_fisher_updates)
        return state

    @torch.no_grad()
    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        unknown = [k for k in state if k.split(".", 1)[-1] not in self.params and k != "num_fisher_updates"]
        if unknown:
            raise ValueError(f"AWC state has entries for parameters this model lacks: {unknown[:5]}")
        if self._flat is not None:
            self._flat.load_state_dict(state)
            self.num_fisher_updates = int(state.get("num_fisher_updates", torch.tensor(0)))
            return
        self._anchor = {n: state[f"anchor.{n}"].to(p.device, p.dtype).clone()
                        for n, p in self.params.items() if f"anchor.{n}" in state}
        self._fisher = {n: (state[f"fisher.{n}"].to(p.device, torch.float32).clone()
                            if f"fisher.{n}" in state else None) for n, p in self.params.items()}
        self.num_fisher_updates = int(state.get("num_fisher_updates", torch.tensor(0)))


@torch.no_grad()
def foreach_awc_step(params: Sequence[torch.nn.Parameter], anchors: Sequence[torch.Tensor],
                     fishers: Optional[List[torch.Tensor]] = None, *, strength: float = 1.0, decay: float = 0.0,
                     eps: float = ZERO_GRAD_FISHER) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """One adaptive AWC step with ``torch._foreach`` ops: the stock-tools baseline.

    The same math as ``AdaptiveWeightConsolidation.step()`` on lists of tensors: ``fishers``
    is the previous F per tensor (float32, updated in place) or None for the first step;
    returns ``(penalty, fishers)``. The per-tensor means are read on the host once per step
    (ScalarList ops take host numbers): one device sync. Missing gradients become zeros.
    """
    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    g32 = [g if g.dtype == torch.float32 else g.float() for g in grads]
    sums = torch.stack(torch._foreach_norm(g32)).square()
    means = (sums / torch.tensor([float(g.numel()) for g in g32], device=sums.device)).tolist()
    f_new = torch._foreach_mul(g32, g32)
    torch._foreach_div_(f_new, [m if m > 0 else 1.0 for m in means])
    for f, m in zip(f_new, means):
        if not m > 0:
            f.fill_(eps)
    if fishers is None:
        fishers = f_new
    else:
        torch._foreach_mul_(fishers, decay)
        torch._foreach_add_(fishers, f_new, alpha=1.0 - decay)
    d = torch._foreach_sub([p.float() for p in params], [a.float() for a in anchors])
    fd = torch._foreach_mul(fishers, d)
    terms = torch._foreach_mul(fd, d)
    penalty = strength * torch.stack(torch._foreach_norm(terms, 1)).sum()  # F d^2 >= 0: L1 norm = sum
    torch._foreach_mul_(fd, 2.0 * strength)
    torch._foreach_add_(grads, fd)
    return penalty, fishers


__all__ = ["AdaptiveWeightConsolidation", "fisher_from_grad", "foreach_awc_step", "is_excluded", "FISHER_KINDS"]
