"""Loading CLIPs: open_clip architectures, local checkpoints and the toy world's tiny CLIPs.

``create_clip(model_name, pretrained)`` is the one way the project builds a CLIP:

* any open_clip architecture with a pretrained tag (``"ViT-B-16", "openai"``, the
  paper's backbone) or a local checkpoint file (``pretrained="/path/ckpt.pt"`` or
  ``.safetensors``), through ``open_clip.create_model_and_transforms``;
* the tiny architectures of ``TINY_MODEL_CONFIGS`` (``gift_fast.toy.clip``: the toy world's
  CLIP of the tiny preset and the tests), built from their config with the toy world's
  word-level tokenizer; ``pretrained="toy"`` gives the tiny CLIP pre-trained on
  the toy world (trained on first use, then cached; see ``gift_fast.toy.pretrain``).

The model is kept in float32 (master weights); bf16 runs use autocast.
``logit_scale`` is frozen (docs/METHOD.md: ``s`` stays at its pre-trained value).
Checkpoint files (``save_model``, ``load_weights``, ...) are ``gift_fast.checkpoints``.

Architecture options (``gift_fast.checkpoints.architecture_options``): what a state dict alone does
not say but the function depends on; today the activation of the transformer MLPs. OpenAI's
CLIP weights were trained with QuickGELU (``x * sigmoid(1.702 x)``); open_clip's plain
architecture names (``ViT-B-16``) build nn.GELU, its ``-quickgelu`` names
(``ViT-B-16-quickgelu``) and the ``openai`` tag build QuickGELU. ``save_model`` records
the options in the checkpoint's metadata and ``create_clip`` rebuilds a checkpoint with
them, so a run started from ``--pretrained openai`` reloads to the same function. A
local file of OpenAI weights (no metadata) loads with QuickGELU through the
``-quickgelu`` name (``create_clip("ViT-B-16-quickgelu", "/path/open_clip_model.safetensors")``)
or ``quick_gelu=True``.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch

from gift_fast.checkpoints import activation_name, architecture_options, checkpoint_architecture, load_weights
from gift_fast.errors import ModelUnavailable
from gift_fast.toy.clip import TINY_MODEL_CONFIGS, build_tiny_clip, is_tiny, toy_clip_tokenizer
from gift_fast.toy.pretrain import pretrained_toy_clip_path


OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ClipBundle:
    """A CLIP model with what is needed to feed it."""
    model: torch.nn.Module
    tokenizer: Callable[..., torch.Tensor]   # list[str] -> LongTensor [N, context_length]
    image_size: int
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    model_name: str
    pretrained: Optional[str]
    info: Dict[str, Any] = field(default_factory=dict)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts))


def _resolve_quick_gelu(model_name: str, pretrained: Optional[str], quick_gelu: Optional[bool],
                        recorded: Optional[Dict[str, Any]]) -> Tuple[bool, str]:
    """(quick_gelu, why): an explicit ``quick_gelu`` wins, then the checkpoint's record, then the
    ``openai`` tag / a ``-quickgelu`` architecture name; otherwise nn.GELU (open_clip's default)."""
    named = model_name.lower().endswith("-quickgelu")
    if quick_gelu is not None:
        if named and not quick_gelu:
            raise ValueError(f"quick_gelu=False contradicts the model name {model_name!r} (a QuickGELU "
                             f"architecture): use the name without '-quickgelu'")
        return bool(quick_gelu), "asked for"
    if recorded is not None and "quick_gelu" in recorded:
        if named and not recorded["quick_gelu"]:
            raise ValueError(f"checkpoint {pretrained!r} records nn.GELU, but {model_name!r} is a QuickGELU "
                             f"architecture: use the name without '-quickgelu'")
        return bool(recorded["quick_gelu"]), "recorded in the checkpoint"
    if pretrained == "openai":
        return True, "OpenAI's weights were trained with it"
    if named:
        return True, "the architecture name"
    return False, "open_clip's default"


def _looks_like_path(pretrained: str) -> bool:
    return (os.sep in pretrained or pretrained.startswith(".")
            or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors", ".ckpt")))


def create_clip(model_name: str = "ViT-B-16", pretrained: Optional[str] = "openai", *,
                device: str | torch.device = "cpu", cache_dir: Optional[str] = None,
                freeze_logit_scale: bool = True, quick_gelu: Optional[bool] = None) -> ClipBundle:
    """Build a CLIP: an open_clip architecture (tag or local file) or a tiny one.

    Args:
        model_name: an open_clip architecture ("ViT-B-16", "ViT-L-14", ...) or a tiny
            one of ``TINY_MODEL_CONFIGS`` ("toy-vit").
        pretrained: an open_clip pretrained tag ("openai", "laion2b_s34b_b88k", ...), a
            local checkpoint path (open_clip's formats, or a safetensors state dict such
            as a run's task checkpoint), ``None`` for random weights, or for tiny
            models ``"toy"`` (the toy world's pre-trained weights).
        device: where the model goes (float32 weights).
        cache_dir: open_clip's download cache.
        freeze_logit_scale: ``logit_scale.requires_grad = False`` (the paper's setting).
        quick_gelu: the MLP activation; None (default) takes it from the checkpoint's record
            (``save_model``), else QuickGELU for the ``openai`` tag and ``-quickgelu`` names, else
            nn.GELU. A local file of OpenAI weights records nothing: pass True (or use the
            ``-quickgelu`` model name). ``bundle.info["activation"]`` says which one was built.
    """
    device = torch.device(device)
    info: Dict[str, Any] = {}
    if is_tiny(model_name):
        cfg = TINY_MODEL_CONFIGS[model_name]
        if pretrained == "toy":
            path = pretrained_toy_clip_path(model_name)
            qg, _ = _resolve_quick_gelu(model_name, str(path), quick_gelu, checkpoint_architecture(path))
            model = build_tiny_clip(model_name, qg)
            load_weights(model, path)
            info["checkpoint"] = str(path)
        elif pretrained is None or pretrained in ("", "none", "random"):
            model = build_tiny_clip(model_name, bool(quick_gelu))
        else:
            _check_file(pretrained, model_name)
            qg, _ = _resolve_quick_gelu(model_name, pretrained, quick_gelu, checkpoint_architecture(pretrained))
            model = build_tiny_clip(model_name, qg)
            load_weights(model, pretrained)
        bundle = ClipBundle(model, toy_clip_tokenizer(model_name), cfg["vision_cfg"]["image_size"],
                            tuple(cfg["image_mean"]), tuple(cfg["image_std"]), model_name, pretrained, info)
    else:
        bundle = _create_open_clip(model_name, pretrained, cache_dir, quick_gelu)
    bundle.info["activation"] = activation_name(architecture_options(bundle.model).get("quick_gelu", False))
    bundle.model.to(device)
    if freeze_logit_scale:
        bundle.model.logit_scale.requires_grad_(False)
    return bundle


def _check_file(pretrained: str, model_name: str) -> None:
    if not os.path.isfile(pretrained):
        raise FileNotFoundError(
            f"checkpoint {pretrained!r} for model {model_name!r} does not exist: pass an existing file "
            f"(a .safetensors state dict or an open_clip checkpoint) or a pretrained tag")


def _create_open_clip(model_name: str, pretrained: Optional[str], cache_dir: Optional[str],
                      quick_gelu: Optional[bool] = None) -> ClipBundle:
    import open_clip

    known = open_clip.list_models()
    if model_name.replace("/", "-") not in known and ":" not in model_name:
        close = [m for m in known if m.lower().startswith(model_name.lower().split("-")[0])][:12]
        raise ValueError(f"unknown model {model_name!r}: not an open_clip architecture nor a tiny one "
                         f"({', '.join(TINY_MODEL_CONFIGS)}). Similar open_clip models: {close}")
    own_safetensors = None
    kwargs: Dict[str, Any] = {}
    recorded = None
    if pretrained and _looks_like_path(pretrained):
        _check_file(pretrained, model_name)
        recorded = checkpoint_architecture(pretrained)
        if pretrained.endswith(".safetensors"):
            # Our own checkpoints (and other plain state dicts): build, then load with shape checks.
            own_safetensors, pretrained = pretrained, None
        if recorded is None and quick_gelu is None and not model_name.lower().endswith("-quickgelu"):
            fix = (f"use --model {model_name}-quickgelu" if f"{model_name}-quickgelu" in known
                   else "pass quick_gelu=True to gift_fast.models.create_clip")
            warnings.warn(f"{own_safetensors or pretrained} does not record its activation: building {model_name!r} "
                          f"with nn.GELU. If these weights come from OpenAI's CLIP (or a run started from "
                          f"--pretrained openai before checkpoints recorded it), {fix}", UserWarning, stacklevel=3)
    qg, _ = _resolve_quick_gelu(model_name, own_safetensors or pretrained, quick_gelu, recorded)
    if qg:
        kwargs["force_quick_gelu"] = True   # e.g. OpenAI's weights, trained with QuickGELU
    try:
        model, _, preprocess_val = open_clip.create_model_and_transforms(
            model_name, pretrained=pretrained or None, cache_dir=cache_dir, **kwargs)
    except Exception as e:
        if pretrained and os.path.isfile(pretrained):   # a local file that open_clip cannot read
            raise ValueError(f"checkpoint {pretrained} for {model_name!r} cannot be read ({type(e).__name__}): it "
                             f"is empty, truncated or not an open_clip checkpoint of this model") from None
        if not isinstance(e, RuntimeError):
            raise
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        raise ModelUnavailable(
            f"could not load {model_name!r} with pretrained={pretrained!r}: {e}. "
            f"Known tags for this model: {tags}. Without internet access, download the weights elsewhere "
            f"and pass the file: --pretrained /path/to/weights") from e
    if own_safetensors is not None:
        load_weights(model, own_safetensors)
    tokenizer = open_clip.get_tokenizer(model_name)
    image_size = model.visual.image_size
    image_size = image_size[0] if isinstance(image_size, (tuple, list)) else int(image_size)
    mean = tuple(getattr(model.visual, "image_mean", None) or OPENAI_MEAN)
    std = tuple(getattr(model.visual, "image_std", None) or OPENAI_STD)
    return ClipBundle(model, tokenizer, image_size, mean, std, model_name, own_safetensors or pretrained,
                      {"preprocess_val": preprocess_val})


__all__ = ["ClipBundle", "create_clip", "OPENAI_MEAN", "OPENAI_STD"]
