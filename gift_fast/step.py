"""One GIFT training step (docs/METHOD.md, "One training step"), as a reusable, benchmarkable unit.

    1. L_kd on the synthetic batch (student embeddings against the teacher's, which
       were computed once per task); backward of L_kd alone;
    2. ``awc.step()``: the Fisher from those gradients, the penalty gradient into .grad;
    3. L_ce on the task batch (class prompts through the student text encoder, with
       gradients), label smoothing; backward, accumulating into the same .grad;
    4. the optimizer step (and the LR scheduler), then the gradients are cleared.

Step 1 on its own is ``GiftStep.distill_backward``; EWC-V's Fisher pass before a task reuses
it (``GiftStep.fisher_batch``). The forward passes run under the step's ``Precision``
(gift_fast.precision), decided once by the caller.

Nothing here reads a value back to the host: the losses come back as device
tensors, so a loop can log them every N steps without a sync per step.

The fast path is a set of switches of the same function (``StepConfig``): bf16
autocast with fp32 master weights, the fused Triton loss and AWC (``kernels``),
and regional ``torch.compile`` of the transformer blocks (``compile_blocks``:
each block compiles once and is reused by every layer, so compilation costs
seconds, not minutes, and the class count of a task does not force a recompile
of the whole encoder).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from gift_fast.backends import check_backend
from gift_fast.distributed import SINGLE, DistContext, all_reduce_grads, gather_rows
from gift_fast.losses import DISTILL_MODES as _LOSS_DISTILL_MODES
from gift_fast.losses import compute_dtype, feature_distill_loss, gift_distill_loss
from gift_fast.precision import Precision
from gift_fast.text import encode_text

# What a step may distill with: the method's distillation losses (gift_fast.losses.DISTILL_MODES), or "none"
# (fine-tune, L2: no synthetic batch).
DISTILL_MODES = _LOSS_DISTILL_MODES + ("none",)


@dataclass
class StepConfig:
    """What one step computes. Defaults are the paper's (docs/METHOD.md)."""
    logit_scale: float = 100.0        # s = exp(logit_scale), frozen
    label_smoothing: float = 0.2      # CE on the task batch and ITA
    temperature: float = 2.0          # tau of CD
    cd_weight: float = 1.0            # lambda_cd (0 switches CD off)
    ita_weight: float = 0.25          # lambda_ita (0 switches ITA off)
    distill: str = "contrastive"      # one of DISTILL_MODES: contrastive | image_only | text_only | kl | feature | none
    bf16: bool = False                # autocast bf16 (fp32 master weights): GiftStep's Precision
    kernels: str = "auto"             # torch | triton | auto (Triton on CUDA): gift_fast.backends

    def __post_init__(self):
        if self.distill not in DISTILL_MODES:
            raise ValueError(f"distill must be one of {DISTILL_MODES}, got {self.distill!r}")
        check_backend(self.kernels, "kernels")


def classification_loss(model, images, labels, class_tokens, cfg: StepConfig) -> torch.Tensor:
    """CE with label smoothing of ``s * n(f_img) @ n(f_txt)^T`` over the task's class prompts."""
    img, txt = model.encode_image(images), encode_text(model, class_tokens)
    cdt = compute_dtype(img)
    img, txt = F.normalize(img.to(cdt), dim=-1), F.normalize(txt.to(cdt), dim=-1)
    logits = cfg.logit_scale * img @ txt.T
    return F.cross_entropy(logits, labels, label_smoothing=cfg.label_smoothing)


def distillation_loss(model, syn_images, syn_tokens, syn_labels, teacher_img, teacher_txt,
                      cfg: StepConfig, dist: DistContext = SINGLE) -> torch.Tensor:
    """L_kd of the synthetic batch against the teacher's (cached) embeddings.

    With several processes, ``syn_images`` / ``syn_tokens`` are this process's rows of the
    global batch and ``syn_labels`` / ``teacher_*`` the global batch's: the student's
    embeddings are gathered so the B x B loss is the one a single process computes.
    """
    img_s = gather_rows(model.encode_image(syn_images), dist)
    txt_s = gather_rows(encode_text(model, syn_tokens), dist)
    if cfg.distill == "feature":
        # Tab. 4a's feature distance replaces L_cd; ITA stays on beside it (the authors' --feature_mse)
        loss = feature_distill_loss(img_s, txt_s, teacher_img, teacher_txt, weight=cfg.cd_weight)
        if cfg.ita_weight:
            loss = loss + gift_distill_loss(img_s, txt_s, teacher_img, teacher_txt, syn_labels,
                                            logit_scale=cfg.logit_scale, temperature=cfg.temperature,
                                            label_smoothing=cfg.label_smoothing, cd_weight=0.0,
                                            ita_weight=cfg.ita_weight, mode="contrastive", backend=cfg.kernels)
        return loss
    return gift_distill_loss(img_s, txt_s, teacher_img, teacher_txt, syn_labels, logit_scale=cfg.logit_scale,
                             temperature=cfg.temperature, label_smoothing=cfg.label_smoothing,
                             cd_weight=cfg.cd_weight, ita_weight=cfg.ita_weight, mode=cfg.distill,
                             backend=cfg.kernels)


def compile_blocks(model: torch.nn.Module, **compile_kwargs) -> int:
    """Regional compilation: ``torch.compile`` each transformer block in place.

    The blocks of a tower share their code, so Dynamo compiles one and reuses it
    for the others; module names and ``state_dict`` keys do not change. Returns
    the number of blocks compiled.
    """
    n = 0
    for tower in (getattr(getattr(model, "visual", None), "transformer", None), getattr(model, "transformer", None)):
        blocks = getattr(tower, "resblocks", None)
        if blocks is None:
            continue
        for block in blocks:
            block.compile(**compile_kwargs)
            n += 1
    return n


class GiftStep:
    """One training step of GIFT (or of a baseline, by switches).

    ``awc`` may be None (no consolidation: fine-tune, or a method without AWC);
    with ``cfg.distill == "none"`` there is no synthetic batch (fine-tune, L2).

    ``precision`` (gift_fast.precision): the autocast of the forward passes, decided once by the
    caller; by default ``Precision.resolve(<the model's device>, cfg.bf16)``. Given, it must agree
    with ``cfg.bf16``.

    ``dist`` (gift_fast.distributed): with several processes, the task batch and the
    synthetic images / tokens are this process's rows, the synthetic labels and teacher
    embeddings the global batch's; the gradients are reduced after each backward (the
    Fisher sees the reduced L_kd gradient), so every process ends the step with the
    weights one process would have.

    ``distill_backward`` is the L_kd half of the step on its own; ``fisher_batch`` uses it to add
    one synthetic batch to the static Fisher (EWC-V) before a task.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: StepConfig,
                 awc=None, scheduler=None, dist: DistContext = SINGLE, precision: Optional[Precision] = None):
        self.model, self.optimizer, self.cfg, self.awc, self.scheduler = model, optimizer, cfg, awc, scheduler
        self.dist = dist
        if precision is None:
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
            precision = Precision.resolve(device, cfg.bf16, option="StepConfig.bf16")
        elif precision.bf16 != bool(cfg.bf16):
            raise ValueError(f"precision.bf16={precision.bf16} but StepConfig.bf16={cfg.bf16}: build both from "
                             "the run's one bf16 setting")
        self.precision = precision
        self._params = [p for p in model.parameters() if p.requires_grad]
        # Trainable tensors whose gradients the consolidation does not own (none when it consolidates every
        # trainable tensor, as in the trainer: only the frozen logit_scale is excluded there).
        owned = {id(p) for p in awc.params.values()} if awc is not None and awc.owns_grad_buffers else set()
        self._unowned_params = [p for p in self._params if id(p) not in owned]

    def reduce_grads(self, average: bool) -> None:
        """Sum (L_kd: each process holds its rows' part) or average (L_ce: each process's mean) the
        gradients over the processes; nothing with one process."""
        all_reduce_grads(self._params, self.dist, average=average)

    def zero_grad(self) -> None:
        """Clear the gradients: in place where the consolidation owns the buffers (the Triton AWC keeps
        ``.grad`` as views of its flat buffers), else by setting them to None."""
        if self.awc is not None and self.awc.owns_grad_buffers:
            self.awc.zero_grad()
            for p in self._unowned_params:
                p.grad = None
        else:
            self.optimizer.zero_grad(set_to_none=True)

    def distill_backward(self, syn_images: torch.Tensor, syn_tokens: torch.Tensor, syn_labels: torch.Tensor,
                         teacher_img: torch.Tensor, teacher_txt: torch.Tensor) -> torch.Tensor:
        """L_kd of the synthetic batch (under the step's precision), its backward into ``.grad`` and the sum
        of the gradients over the processes (each holds its rows' part). Returns L_kd, detached.

        The gradients of L_kd alone are what AWC's Fisher is computed from: the step calls this before
        ``awc.step()``, the static Fisher pass (``fisher_batch``) before ``awc.update_fisher()``.
        """
        if self.cfg.distill == "none":
            raise ValueError("distill='none' has no distillation loss: this step has no synthetic batch")
        if syn_images is None or teacher_img is None:
            raise ValueError(f"distill={self.cfg.distill!r} needs the synthetic batch and the teacher's embeddings")
        with self.precision.autocast():
            loss_kd = distillation_loss(self.model, syn_images, syn_tokens, syn_labels, teacher_img, teacher_txt,
                                        self.cfg, self.dist)
        loss_kd.backward()
        self.reduce_grads(average=False)       # per-shard parts -> the full gradient
        return loss_kd.detach()

    def fisher_batch(self, syn_images: torch.Tensor, syn_tokens: torch.Tensor, syn_labels: torch.Tensor,
                     teacher_img: torch.Tensor, teacher_txt: torch.Tensor) -> torch.Tensor:
        """EWC-V: add one synthetic batch to the static Fisher, ``awc.update_fisher()`` from the gradients of
        L_kd alone. The gradients are cleared before and after (the authors' static-Fisher loop stops
        clearing them once its estimate ends: docs/METHOD.md, "Defects"). Returns L_kd, detached."""
        if self.awc is None:
            raise ValueError("fisher_batch needs the consolidation (awc) whose Fisher it estimates")
        self.zero_grad()
        loss_kd = self.distill_backward(syn_images, syn_tokens, syn_labels, teacher_img, teacher_txt)
        self.awc.update_fisher()
        self.zero_grad()
        return loss_kd

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, class_tokens: torch.Tensor,
                 syn_images: Optional[torch.Tensor] = None, syn_tokens: Optional[torch.Tensor] = None,
                 syn_labels: Optional[torch.Tensor] = None, teacher_img: Optional[torch.Tensor] = None,
                 teacher_txt: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        out: Dict[str, torch.Tensor] = {}
        if self.cfg.distill != "none":
            # the gradients of L_kd alone: AWC's Fisher comes from them
            out["loss_kd"] = self.distill_backward(syn_images, syn_tokens, syn_labels, teacher_img, teacher_txt)
        if self.awc is not None:
            out["loss_awc"] = self.awc.step()
        with self.precision.autocast():
            loss_ce = classification_loss(self.model, images, labels, class_tokens, self.cfg)
        loss_ce.backward()              # accumulates into the same .grad (no zero_grad in between)
        self.reduce_grads(average=True)            # the mean CE of the global batch
        out["loss_ce"] = loss_ce.detach()   # this process's shard (the trainer averages it when it logs)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.zero_grad()
        return out


__all__ = ["StepConfig", "GiftStep", "classification_loss", "distillation_loss", "compile_blocks", "DISTILL_MODES"]
