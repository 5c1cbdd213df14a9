"""GIFT's distillation losses: the plain PyTorch reference (the torch backend) and the backend switch.

The math (docs/METHOD.md, "Distillation on the synthetic batch"):

    I = n(img_s), T = n(txt_s), I' = n(img_t), T' = n(txt_t)       n(x) = x / ||x||
    S = s * I @ T^T   (student),  S' = s * I' @ T'^T   (teacher),   B x B
    L_cd  = tau^2 * [ mean_i CE(S_i / tau, softmax(S'_i / tau))
                    + mean_j CE(S^T_j / tau, softmax(S'^T_j / tau)) ]
    A_ij  = [k_i == k_j] / #{j : k_j == k_i}
    L_ita = CE(S, (1 - ls) A + ls / B) + CE(S^T, (1 - ls) A + ls / B)      (row means)
    loss  = cd_weight * L_cd + ita_weight * L_ita

``mode`` picks the student matrix and the form of L_cd (Tab. 4a of the paper, as the
authors' ``src/models/finetune_gift.py`` / ``src/models/helpers.py`` compute it):

* ``"contrastive"``: ``S = s I T^T`` and L_cd above (soft-target cross-entropy,
  teacher distribution as the target);
* ``"image_only"``: the student image against the teacher text, ``S = s I T'^T``;
* ``"text_only"``: the teacher image against the student text, ``S = s I' T^T``;
* ``"kl"``: ``S = s I T^T`` and, per direction,
  ``tau^2 * F.kl_div(log_softmax(S'/tau), softmax(S/tau), reduction="batchmean")``,
  i.e. ``tau^2 * mean_i KL(q_i || p_i)`` with q = softmax(S_i/tau) the *student's*
  distribution as the target and p = softmax(S'_i/tau) the teacher's: the reverse of
  the usual KL(teacher || student), and not the same gradient as ``"contrastive"``
  (the authors' ``kl_divergence(t, s)`` helper; the torch backend only).

``feature_distill_loss`` is Tab. 4a's feature-distance variant; with it the step keeps
the ITA term (docs/METHOD.md, "Tab. 4a variants").

The teacher embeddings are constants (no gradient flows to them). The torch backend
computes in float32 (float64 when the inputs are float64, which the tests use); the
Triton backend (``gift_fast.kernels.contrastive_distill``) is chosen by ``backend``
(``gift_fast.backends``).
"""
from __future__ import annotations

from typing import Dict, Tuple, Union

import torch
import torch.nn.functional as F

from gift_fast.backends import BACKENDS, resolve_backend  # noqa: F401  (BACKENDS re-exported: its old home)

MODES = ("contrastive", "image_only", "text_only", "kl")   # the similarity matrices gift_distill_loss compares
# The modes only the torch backend computes. The fused kernel's own list (gift_fast.kernels.contrastive_distill.MODES;
# the kernels import nothing from here) is MODES without these, in this order: a test keeps the two in step.
TORCH_ONLY_MODES = ("kl",)
# The distillation losses of the method (Tab. 4a): the one list. The CLI spells them with hyphens (image-only).
DISTILL_MODES = MODES + ("feature",)
PART_NAMES = ("cd_image", "cd_text", "ita_image", "ita_text")
FEATURE_PART_NAMES = ("feat_image", "feat_text")

LossOut = Union[torch.Tensor, Tuple[torch.Tensor, Dict[str, torch.Tensor]]]


# ----------------------------------------------------------------------------- checks
def _check_embeddings(**embeddings: torch.Tensor) -> Tuple[int, int]:
    """All embeddings must be floating [B, D] tensors of one shape with B >= 1."""
    shape = None
    first = None
    for name, x in embeddings.items():
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor of shape [B, D], got {type(x).__name__}")
        if x.dim() != 2:
            raise ValueError(f"{name} must have shape [B, D] (2 dimensions), got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
        if shape is None:
            shape, first = tuple(x.shape), name
        elif tuple(x.shape) != shape:
            raise ValueError(
                f"{name} has shape {tuple(x.shape)} but {first} has shape {shape}: "
                "student and teacher embeddings must all be [B, D] with the same B and D")
    B, D = shape
    if B == 0:
        raise ValueError(f"{first} has B = 0 rows: the synthetic batch must hold at least one pair")
    if D == 0:
        raise ValueError(f"{first} has D = 0 columns: embeddings must have at least one feature")
    devices = {x.device for x in embeddings.values()}
    if len(devices) > 1:
        raise ValueError(f"embeddings are on different devices {sorted(map(str, devices))}: move them to one device")
    return B, D


def _check_labels(labels: torch.Tensor, B: int, device: torch.device) -> None:
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"labels must be a torch.Tensor of shape [{B}] with dtype int64, got {type(labels).__name__}")
    if labels.dim() != 1 or labels.shape[0] != B:
        raise ValueError(f"labels must have shape [{B}] (one prompt id per pair), got shape {tuple(labels.shape)}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be integer prompt ids (torch.int64), got dtype {labels.dtype}")
    if labels.device != device:
        raise ValueError(f"labels are on {labels.device} but the embeddings on {device}: move them to one device")


def _check_scalars(logit_scale, temperature, label_smoothing) -> None:
    # Python numbers only: checking tensor values would force a device sync.
    if isinstance(temperature, (int, float)) and not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if isinstance(logit_scale, (int, float)) and not logit_scale > 0:
        raise ValueError(f"logit_scale must be > 0 (it is exp of CLIP's logit_scale parameter), got {logit_scale}")
    if isinstance(label_smoothing, (int, float)) and not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype losses are computed in: float32 for bf16 / fp16 / fp32 inputs, float64 stays."""
    return torch.promote_types(x.dtype, torch.float32)


# ---------------------------------------------------------------- the torch backend
def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean_i CE(logits_i, target_i) = -mean_i sum_k target_ik log softmax(logits_i)_k."""
    return -(target * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()


def alignment_targets(labels: torch.Tensor, label_smoothing: float, dtype: torch.dtype) -> torch.Tensor:
    """ITA's target: A_ij = [k_i == k_j] / #matches, smoothed as torch's CE does (ls / B)."""
    same = (labels[:, None] == labels[None, :]).to(dtype)
    A = same / same.sum(dim=1, keepdim=True)
    B = labels.shape[0]
    return (1.0 - label_smoothing) * A + label_smoothing / B


def _student_teacher_matrices(img_s, txt_s, img_t, txt_t, logit_scale, mode):
    cdt = compute_dtype(img_s)
    I, T = F.normalize(img_s.to(cdt), dim=-1), F.normalize(txt_s.to(cdt), dim=-1)
    It = F.normalize(img_t.detach().to(cdt), dim=-1)
    Tt = F.normalize(txt_t.detach().to(cdt), dim=-1)
    if mode == "image_only":
        S = logit_scale * I @ Tt.T
    elif mode == "text_only":
        S = logit_scale * It @ T.T
    else:
        S = logit_scale * I @ T.T
    S_t = logit_scale * It @ Tt.T
    return S, S_t


def _gift_distill_parts_torch(img_s, txt_s, img_t, txt_t, labels, logit_scale, temperature,
                              label_smoothing, cd_weight, ita_weight, mode) -> torch.Tensor:
    """The four weighted terms [cd_image, cd_text, ita_image, ita_text] as one tensor."""
    S, S_t = _student_teacher_matrices(img_s, txt_s, img_t, txt_t, logit_scale, mode)
    tau = temperature
    if mode == "kl":
        # the authors' kl_divergence(t, s): F.kl_div(log p_teacher, q_student, "batchmean") * tau^2,
        # i.e. KL(student || teacher) with the student's distribution as the target (gradients flow
        # through the target too)
        cd_image = tau * tau * F.kl_div(F.log_softmax(S_t / tau, dim=1), F.softmax(S / tau, dim=1),
                                        reduction="batchmean")
        cd_text = tau * tau * F.kl_div(F.log_softmax(S_t.T / tau, dim=1), F.softmax(S.T / tau, dim=1),
                                       reduction="batchmean")
    else:
        p_rows = F.softmax(S_t / tau, dim=1)
        p_cols = F.softmax(S_t.T / tau, dim=1)
        cd_image = tau * tau * soft_cross_entropy(S / tau, p_rows)
        cd_text = tau * tau * soft_cross_entropy(S.T / tau, p_cols)
    A = alignment_targets(labels, label_smoothing, S.dtype)
    ita_image = soft_cross_entropy(S, A)
    ita_text = soft_cross_entropy(S.T, A.T)
    return torch.stack([cd_weight * cd_image, cd_weight * cd_text,
                        ita_weight * ita_image, ita_weight * ita_text])


def _output_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def gift_distill_loss(img_s: torch.Tensor, txt_s: torch.Tensor, img_t: torch.Tensor, txt_t: torch.Tensor,
                      labels: torch.Tensor, *, logit_scale: float = 100.0, temperature: float = 2.0,
                      label_smoothing: float = 0.2, cd_weight: float = 1.0, ita_weight: float = 0.25,
                      mode: str = "contrastive", backend: str = "torch",
                      return_parts: bool = False) -> LossOut:
    """GIFT's distillation loss ``cd_weight * L_cd + ita_weight * L_ita`` on a synthetic batch.

    Args:
        img_s, txt_s: student image / text embeddings [B, D], any float dtype, not normalized.
        img_t, txt_t: teacher embeddings [B, D] (constants: no gradient flows to them).
        labels: [B] integer prompt ids; pairs with equal ids are positives for ITA.
        logit_scale: ``s = exp(logit_scale)`` of CLIP (100 for OpenAI CLIP); float or 0-dim tensor.
        temperature: tau of the contrastive distillation.
        label_smoothing: smoothing of the ITA targets (0.2 as the task loss).
        cd_weight, ita_weight: lambda_cd and lambda_ita.
        mode: "contrastive" | "image_only" | "text_only" | "kl" (see module doc).
        backend: "torch" (the plain PyTorch code of this module), "triton" (fused kernel), "auto"
            (Triton on CUDA): gift_fast.backends.
        return_parts: also return the dict of the four weighted terms.

    Returns:
        0-dim float32 tensor (float64 for float64 inputs), and with ``return_parts`` a dict
        ``{"cd_image", "cd_text", "ita_image", "ita_text"}`` of 0-dim tensors that sum to it.
    """
    B, _ = _check_embeddings(img_s=img_s, txt_s=txt_s, img_t=img_t, txt_t=txt_t)
    _check_labels(labels, B, img_s.device)
    _check_scalars(logit_scale, temperature, label_smoothing)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    chosen = resolve_backend(backend, img_s)
    if chosen == "triton" and mode in TORCH_ONLY_MODES:
        if backend == "triton":
            raise ValueError(f"mode={mode!r} exists in the torch backend only: use backend='torch' or 'auto'")
        chosen = "torch"
    args = (img_s, txt_s, img_t, txt_t, labels, logit_scale, temperature, label_smoothing,
            cd_weight, ita_weight, mode)
    if chosen == "triton":
        from gift_fast.kernels import contrastive_distill as cdk
        if not return_parts:
            # the kernel sums the parts itself (no sum op / autograd node: host time at small B)
            total = cdk.gift_distill_loss_triton(*args)
            return total.double() if img_s.dtype == torch.float64 else total
        parts_vec = cdk.gift_distill_parts_triton(*args)
    else:
        parts_vec = _gift_distill_parts_torch(*args)
    parts_vec = parts_vec.to(_output_dtype(img_s))
    total = parts_vec.sum()
    if return_parts:
        return total, dict(zip(PART_NAMES, parts_vec.unbind(0)))
    return total


def feature_distill_loss(img_s: torch.Tensor, txt_s: torch.Tensor, img_t: torch.Tensor, txt_t: torch.Tensor,
                         *, weight: float = 1.0, return_parts: bool = False) -> LossOut:
    """Feature-distance distillation (Tab. 4a, "feature distance"), as the authors compute it.

    ``weight * (F.mse_loss(n(img_t), n(img_s)) + F.mse_loss(n(txt_t), n(txt_s)))``: the squared
    difference of the normalized teacher and student embeddings, averaged over all B * D elements
    (``F.mse_loss``'s default "mean"; the authors' ``--feature_mse``), image and text separately.
    The teacher embeddings are constants. This replaces L_cd only: the ITA term stays on beside it
    (``gift_fast.step.distillation_loss`` adds it), as in the authors' code.
    """
    _check_embeddings(img_s=img_s, txt_s=txt_s, img_t=img_t, txt_t=txt_t)
    cdt = compute_dtype(img_s)

    def dist(s, t):
        return F.mse_loss(F.normalize(s.to(cdt), dim=-1), F.normalize(t.detach().to(cdt), dim=-1))

    parts_vec = torch.stack([weight * dist(img_s, img_t), weight * dist(txt_s, txt_t)]).to(_output_dtype(img_s))
    total = parts_vec.sum()
    if return_parts:
        return total, dict(zip(FEATURE_PART_NAMES, parts_vec.unbind(0)))
    return total


__all__ = ["gift_distill_loss", "feature_distill_loss", "soft_cross_entropy", "alignment_targets",
           "resolve_backend", "MODES", "DISTILL_MODES", "TORCH_ONLY_MODES", "BACKENDS", "PART_NAMES"]
