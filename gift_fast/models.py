"""CLIP models: open_clip loading, tokenizers, tiny configs, checkpoints.

``create_clip(model_name, pretrained)`` is the one way the project builds a CLIP:

* any open_clip architecture with a pretrained tag (``"ViT-B-16", "openai"``, the
  paper's backbone) or a local checkpoint file (``pretrained="/path/ckpt.pt"`` or
  ``.safetensors``), through ``open_clip.create_model_and_transforms``;
* the tiny architectures of ``TINY_MODEL_CONFIGS`` (the toy world's CLIP of the
  tiny preset and the tests), built from their config with the toy world's
  word-level tokenizer; ``pretrained="toy"`` gives the tiny CLIP pre-trained on
  the toy world (trained on first use, then cached; see ``gift_fast.data.toy``).

The model is kept in float32 (master weights); bf16 runs use autocast.
``logit_scale`` is frozen (docs/METHOD.md: ``s`` stays at its pre-trained value).

Architecture options (``architecture_options``): what a state dict alone does not say
but the function depends on; today the activation of the transformer MLPs. OpenAI's
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

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch

from gift_fast.files import append_text_line, atomic_write_text, write_error  # noqa: F401  (old home)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

# Tiny architectures built in code (open_clip.model.CLIP(embed_dim, vision_cfg, text_cfg)).
# The text tower's vocabulary is the toy world's (gift_fast.data.toy.ToyTokenizer).
TINY_MODEL_CONFIGS: Dict[str, Dict[str, Any]] = {
    "toy-vit": dict(
        embed_dim=64,
        vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=3, head_width=32, mlp_ratio=2.0),
        text_cfg=dict(context_length=16, width=64, heads=2, layers=2, mlp_ratio=2.0),
        image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5),
    ),
    # for unit tests: the same inputs, a fraction of the compute
    "toy-vit-test": dict(
        embed_dim=32,
        vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=1, head_width=16, mlp_ratio=2.0),
        text_cfg=dict(context_length=16, width=32, heads=2, layers=1, mlp_ratio=2.0),
        image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5),
    ),
}


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


def is_tiny(model_name: str) -> bool:
    return model_name in TINY_MODEL_CONFIGS


def tiny_tokenizer(model_name: str):
    from gift_fast.data.toy import ToyTokenizer

    return ToyTokenizer(context_length=TINY_MODEL_CONFIGS[model_name]["text_cfg"]["context_length"])


def build_tiny_clip(model_name: str = "toy-vit", quick_gelu: bool = False) -> torch.nn.Module:
    """A randomly initialised tiny CLIP (uses torch's global RNG: seed it for reproducibility);
    ``quick_gelu``: QuickGELU instead of nn.GELU in the transformer MLPs."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    if model_name not in TINY_MODEL_CONFIGS:
        raise ValueError(f"unknown tiny model {model_name!r}; known: {', '.join(TINY_MODEL_CONFIGS)}")
    cfg = TINY_MODEL_CONFIGS[model_name]
    text_cfg = dict(cfg["text_cfg"])
    text_cfg["vocab_size"] = tiny_tokenizer(model_name).vocab_size
    return CLIP(embed_dim=cfg["embed_dim"], vision_cfg=CLIPVisionCfg(**cfg["vision_cfg"]),
                text_cfg=CLIPTextCfg(**text_cfg), quick_gelu=bool(quick_gelu))


# --------------------------------------------------------------------------- architecture options
ARCHITECTURE_KEY = "architecture"     # the safetensors metadata entry save_model writes


def activation_name(quick_gelu: bool) -> str:
    return "quick_gelu" if quick_gelu else "gelu"


def architecture_options(model: torch.nn.Module) -> Dict[str, Any]:
    """What a checkpoint of ``model`` must record to be rebuilt as the same function:
    ``{"quick_gelu": bool}`` (QuickGELU or nn.GELU in the transformer MLPs), read from the
    modules themselves. A model with neither activation (e.g. a timm tower) gives ``{}``."""
    from open_clip.transformer import QuickGELU

    kinds = {type(m) for m in model.modules() if isinstance(m, (QuickGELU, torch.nn.GELU))}
    if not kinds:
        return {}
    if len(kinds) > 1:
        raise ValueError(f"the model mixes activations {sorted(k.__name__ for k in kinds)}: its checkpoint "
                         f"cannot record one quick_gelu option")
    return {"quick_gelu": kinds == {QuickGELU}}


def checkpoint_architecture(path: str | Path) -> Optional[Dict[str, Any]]:
    """The architecture options a safetensors checkpoint recorded (``save_model``), or None when it
    recorded none (not a safetensors file, another tool's file, or a checkpoint older than the record)."""
    if not str(path).endswith(".safetensors"):
        return None
    meta = checkpoint_metadata(path)
    arch = meta.get(ARCHITECTURE_KEY)
    return dict(arch) if isinstance(arch, dict) else None


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
            from gift_fast.data.toy import pretrained_toy_clip_path

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
        bundle = ClipBundle(model, tiny_tokenizer(model_name), cfg["vision_cfg"]["image_size"],
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
            import warnings

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
        from gift_fast.preflight import ModelUnavailable
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


# --------------------------------------------------------------------------- checkpoints
def state_dict_fp32(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The model's state dict, contiguous, detached, on the CPU."""
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


def atomic_save_safetensors(tensors: Dict[str, torch.Tensor], path: str | Path,
                            metadata: Optional[Dict[str, str]] = None) -> Path:
    """Write a safetensors file atomically (tmp file + fsync + os.replace)."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise write_error(path, e) from None
    except Exception as e:               # safetensors reports a failed write as its own error type
        tmp.unlink(missing_ok=True)
        if type(e).__name__ != "SafetensorError":
            raise
        raise write_error(path, OSError(str(e))) from None
    return path


def save_model(model: torch.nn.Module, path: str | Path, metadata: Optional[Dict[str, Any]] = None) -> Path:
    """The model state as safetensors (atomic); ``metadata`` is stored as JSON strings, with the
    model's ``architecture_options`` under ``"architecture"`` (what ``create_clip`` rebuilds it with)."""
    metadata = dict(metadata or {})
    metadata.setdefault(ARCHITECTURE_KEY, architecture_options(model))
    meta = {k: json.dumps(v) for k, v in metadata.items()}
    return atomic_save_safetensors(state_dict_fp32(model), path, metadata=meta)


def read_state_dict(path: str | Path) -> Dict[str, torch.Tensor]:
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    fix = ("it is empty, truncated or not a checkpoint: pass an intact .safetensors state dict or an open_clip "
           "checkpoint (a run's checkpoints/*.safetensors)")
    if os.path.getsize(path) == 0:
        raise ValueError(f"checkpoint {path} is an empty file: {fix}")
    # open_clip's reader: safetensors or torch.load(weights_only=True), unwraps {"state_dict": ...}
    # and strips DataParallel's "module." (tests/test_models.py checks these rules on real files)
    from open_clip.factory import load_state_dict as open_clip_load_state_dict

    try:
        state = open_clip_load_state_dict(path, device="cpu", weights_only=True)
    except StopIteration:        # an empty state dict (open_clip looks at its first key)
        return {}
    except AttributeError as e:  # not a mapping (a tensor, a list...)
        raise ValueError(f"{path!r} does not hold a state dict ({e})") from None
    except Exception as e:       # a damaged file (SafetensorError, a short read, a pickle torch refuses)
        # (torch's own message for a pickle it refuses suggests weights_only=False: never do that for a file
        # of unknown origin, so it is not repeated here)
        what = "safetensors file" if path.endswith(".safetensors") else "PyTorch state dict"
        raise ValueError(f"checkpoint {path} cannot be read as a {what} ({type(e).__name__}): {fix}") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path!r} does not hold a state dict (got {type(state).__name__})")
    return dict(state)


def check_state_dict(model: torch.nn.Module, state: Dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Raise a clear error when ``state`` does not fit ``model``'s architecture."""
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in state.items()}
    missing = sorted(set(own) - set(theirs))
    unexpected = sorted(set(theirs) - set(own))
    wrong = sorted(k for k in set(own) & set(theirs) if own[k] != theirs[k])
    if missing or unexpected or wrong:
        lines = [f"{source} does not fit this model's architecture (is it a checkpoint of another model? "
                 f"pick the matching --model):"]
        if wrong:
            lines.append("  shape mismatch: " + ", ".join(f"{k} {theirs[k]} vs model {own[k]}" for k in wrong[:5]))
        if missing:
            lines.append(f"  missing {len(missing)} tensors, e.g. {missing[:5]}")
        if unexpected:
            lines.append(f"  unexpected {len(unexpected)} tensors, e.g. {unexpected[:5]}")
        raise ValueError("\n".join(lines))


@torch.no_grad()
def load_weights(model: torch.nn.Module, path_or_state) -> None:
    """Load a state dict (path or dict) into ``model`` after checking that every tensor fits."""
    if isinstance(path_or_state, (str, Path)):
        state, source = read_state_dict(path_or_state), f"checkpoint {str(path_or_state)!r}"
    else:
        state, source = path_or_state, "state dict"
    check_state_dict(model, state, source)
    model.load_state_dict(state, strict=True)


def checkpoint_metadata(path: str | Path) -> Dict[str, Any]:
    """The JSON metadata a safetensors checkpoint was saved with."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except Exception as e:               # SafetensorError: an empty, truncated or foreign file
        raise ValueError(f"checkpoint {path} is not a readable safetensors file ({e}): it is empty, truncated or "
                         f"not a checkpoint; pass an intact .safetensors state dict") from None
    return {k: json.loads(v) for k, v in meta.items()}


__all__ = ["ClipBundle", "create_clip", "build_tiny_clip", "TINY_MODEL_CONFIGS", "is_tiny", "save_model",
           "load_weights", "read_state_dict", "check_state_dict", "atomic_save_safetensors", "atomic_write_text",
           "checkpoint_metadata", "state_dict_fp32", "architecture_options", "checkpoint_architecture",
           "activation_name", "write_error"]
