"""One GIFT training step (docs/METHOD.md, "One training step"), as a reusable, benchmarkable unit.

    1. L_kd on the synthetic batch (student embeddings against the teacher's, which
       were computed once per task); backward of L_kd alone;
    2. ``awc.step()``: the Fisher from those gradients, the penalty gradient into .grad;
    3. L_ce on the task batch (class prompts through the student text encoder, with
       gradients), label smoothing; backward, accumulating into the same .grad;
    4. the optimizer step (and the LR scheduler), then the gradients are cleared.

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

from gift_fast.distributed import SINGLE, DistContext, all_reduce_grads, gather_rows
from gift_fast.evaluate import autocast
from gift_fast.losses import compute_dtype, feature_distill_loss, gift_distill_loss
from gift_fast.text import encode_text

DISTILL_MODES = ("contrastive", "image_only", "text_only", "kl", "feature", "none")


@dataclass
class StepConfig:
    """What one step computes. Defaults are the paper's (docs/METHOD.md)."""
    logit_scale: float = 100.0        # s = exp(logit_scale), frozen
    label_smoothing: float = 0.2      # CE on the task batch and ITA
    temperature: float = 2.0          # tau of CD
    cd_weight: float = 1.0            # lambda_cd (0 switches CD off)
    ita_weight: float = 0.25          # lambda_ita (0 switches ITA off)
    distill: str = "contrastive"      # contrastive | image_only | text_only | kl | feature | none
    bf16: bool = False                # autocast bf16 (fp32 master weights)
    kernels: str = "auto"             # torch | triton | auto (Triton on CUDA)

    def __post_init__(self):
        if self.distill not in DISTILL_MODES:
            raise ValueError(f"distill must be one of {DISTILL_MODES}, got {self.distill!r}")


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

    ``dist`` (gift_fast.distributed): with several processes, the task batch and the
    synthetic images / tokens are this process's rows, the synthetic labels and teacher
    embeddings the global batch's; the gradients are reduced after each backward (the
    Fisher sees the reduced L_kd gradient), so every process ends the step with the
    weights one process would have.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: StepConfig,
                 awc=None, scheduler=None, dist: DistContext = SINGLE):
        self.model, self.optimizer, self.cfg, self.awc, self.scheduler = model, optimizer, cfg, awc, scheduler
        self.dist = dist
        self._params = [p for p in model.parameters() if p.requires_grad]

    def reduce_grads(self, average: bool) -> None:
        """Sum (L_kd: each process holds its rows' part) or average (L_ce: each process's mean) the
        gradients over the processes; nothing with one process."""
        all_reduce_grads(self._params, self.dist, average=average)

    def zero_grad(self) -> None:
        # The Triton AWC keeps .grad as views of its flat buffers: it clears them in place.
        if self.awc is not None and getattr(self.awc, "backend", "torch") == "triton":
            self.awc.zero_grad()
        else:
            self.optimizer.zero_grad(set_to_none=True)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, class_tokens: torch.Tensor,
                 syn_images: Optional[torch.Tensor] = None, syn_tokens: Optional[torch.Tensor] = None,
                 syn_labels: Optional[torch.Tensor] = None, teacher_img: Optional[torch.Tensor] = None,
                 teacher_txt: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        cfg, model = self.cfg, self.model
        device = images.device
        out: Dict[str, torch.Tensor] = {}
        if cfg.distill != "none":
            if syn_images is None or teacher_img is None:
                raise ValueError(f"distill={cfg.distill!r} needs the synthetic batch and the teacher's embeddings")
            with autocast(device, cfg.bf16):
                loss_kd = distillation_loss(model, syn_images, syn_tokens, syn_labels, teacher_img, teacher_txt, cfg,
                                            self.dist)
            loss_kd.backward()          # the gradients of L_kd alone: AWC's Fisher comes from them
            self.reduce_grads(average=False)       # per-shard parts -> the full gradient
            out["loss_kd"] = loss_kd.detach()
        if self.awc is not None:
            out["loss_awc"] = self.awc.step()
        with autocast(device, cfg.bf16):
            loss_ce = classification_loss(model, images, labels, class_tokens, cfg)
        loss_ce.backward()              # accumulates into the same .grad (no zero_grad in between)
        self.reduce_grads(average=True)            # the mean CE of the global batch
        out["loss_ce"] = loss_ce.detach()   # this process's shard (the trainer averages it when it logs)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.zero_grad()
        return out


__all__ = ["StepConfig", "GiftStep", "classification_loss", "distillation_loss", "compile_blocks"]
