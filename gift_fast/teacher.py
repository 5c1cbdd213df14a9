"""The teacher of a task: which weights the student is distilled towards, and their embeddings of the task's
distillation set.

The teacher is the model after the previous task (``last``, the paper's), the initial model (``initial``) or a
WiSE mix of both (``wise:ALPHA`` = ALPHA * initial + (1 - ALPHA) * last). Its embeddings of the task's synthetic
set are computed once, before the task's first step (the set is fixed and not augmented).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from gift_fast.data.cache import normalize_uint8
from gift_fast.method import parse_teacher
from gift_fast.precision import Precision, autocast
from gift_fast.text import encode_text


@torch.no_grad()
def mix_state(initial: Dict[str, torch.Tensor], last: Dict[str, torch.Tensor], alpha: float) -> Dict[str, torch.Tensor]:
    """WiSE: ``alpha * initial + (1 - alpha) * last`` for floating tensors (others from ``last``)."""
    out = {}
    for k, v in last.items():
        if v.is_floating_point():
            out[k] = alpha * initial[k].to(v.device, v.dtype) + (1.0 - alpha) * v
        else:
            out[k] = v
    return out


@torch.no_grad()
def embed_distill_set(model, distill_set, tokens: torch.Tensor, *, mean, std, device: torch.device,
                      bf16: bool = False, batch_size: int = 256) -> Tuple[torch.Tensor, torch.Tensor]:
    """Image embeddings of every pair [N, D] and text embeddings of every distinct prompt [P, D] (float32)."""
    was_training = model.training
    model.eval()
    try:
        imgs, txts = [], []
        for a in range(0, len(distill_set), batch_size):
            x = normalize_uint8(distill_set.images[a:a + batch_size].to(device), mean, std)
            with autocast(device, bf16):
                imgs.append(model.encode_image(x).float())
        for a in range(0, tokens.shape[0], batch_size):
            with autocast(device, bf16):
                txts.append(encode_text(model, tokens[a:a + batch_size].to(device)).float())
    finally:
        model.train(was_training)
    return torch.cat(imgs), torch.cat(txts)


class Teacher:
    """The teacher of every task of a run (``spec``: last | initial | wise:ALPHA).

    Built before the first task: a teacher other than ``last`` keeps a CPU copy of the initial weights
    (only when the method distills: nothing else reads them)."""

    def __init__(self, spec: str, model, *, mean, std, precision: Precision, distills: bool = True):
        self.kind, self.alpha = parse_teacher(spec)
        self.mean, self.std, self.precision = mean, std, precision
        self.initial_state: Optional[Dict[str, torch.Tensor]] = None
        if self.kind != "last" and distills:
            self.initial_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}

    def embeddings(self, model, distill_set, tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The teacher's embeddings of a task's distillation set; ``model`` is the student at the start of the
        task (= the last teacher)."""
        kw = dict(mean=self.mean, std=self.std, device=self.precision.device, bf16=self.precision.bf16)
        if self.kind == "last":
            return embed_distill_set(model, distill_set, tokens, **kw)   # the student, before any step
        # Another teacher: load its weights into the model for the embedding pass, then put the
        # student's back (in place, so compiled blocks and AWC's flat parameter buffers stay valid).
        current = {k: v.detach().clone() for k, v in model.state_dict().items()}
        initial = {k: v.to(current[k].device) for k, v in self.initial_state.items()}
        state = initial if self.kind == "initial" else mix_state(initial, current, self.alpha)
        try:
            model.load_state_dict(state)
            return embed_distill_set(model, distill_set, tokens, **kw)
        finally:
            model.load_state_dict(current)


__all__ = ["Teacher", "mix_state", "embed_distill_set"]
