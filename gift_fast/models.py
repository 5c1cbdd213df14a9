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
``logit_scale`` is frozen (METHOD.md: ``s`` stays at its pre-trained value).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch

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


def build_tiny_clip(model_name: str = "toy-vit") -> torch.nn.Module:
    """A randomly initialised tiny CLIP (uses torch's global RNG: seed it for reproducibility)."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    if model_name not in TINY_MODEL_CONFIGS:
        raise ValueError(f"unknown tiny model {model_name!r}; known: {', '.join(TINY_MODEL_CONFIGS)}")
    cfg = TINY_MODEL_CONFIGS[model_name]
    text_cfg = dict(cfg["text_cfg"])
    text_cfg["vocab_size"] = tiny_tokenizer(model_name).vocab_size
    return CLIP(embed_dim=cfg["embed_dim"], vision_cfg=CLIPVisionCfg(**cfg["vision_cfg"]),
                text_cfg=CLIPTextCfg(**text_cfg))


def _looks_like_path(pretrained: str) -> bool:
    return (os.sep in pretrained or pretrained.startswith(".")
            or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors", ".ckpt")))


def create_clip(model_name: str = "ViT-B-16", pretrained: Optional[str] = "openai", *,
                device: str | torch.device = "cpu", cache_dir: Optional[str] = None,
                freeze_logit_scale: bool = True) -> ClipBundle:
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
    """
    device = torch.device(device)
    info: Dict[str, Any] = {}
    if is_tiny(model_name):
        cfg = TINY_MODEL_CONFIGS[model_name]
        if pretrained == "toy":
            from gift_fast.data.toy import pretrained_toy_clip_path

            path = pretrained_toy_clip_path(model_name)
            model = build_tiny_clip(model_name)
            load_weights(model, path)
            info["checkpoint"] = str(path)
        elif pretrained is None or pretrained in ("", "none", "random"):
            model = build_tiny_clip(model_name)
        else:
            _check_file(pretrained, model_name)
            model = build_tiny_clip(model_name)
            load_weights(model, pretrained)
        bundle = ClipBundle(model, tiny_tokenizer(model_name), cfg["vision_cfg"]["image_size"],
                            tuple(cfg["image_mean"]), tuple(cfg["image_std"]), model_name, pretrained, info)
    else:
        bundle = _create_open_clip(model_name, pretrained, cache_dir)
    bundle.model.to(device)
    if freeze_logit_scale:
        bundle.model.logit_scale.requires_grad_(False)
    return bundle


def _check_file(pretrained: str, model_name: str) -> None:
    if not os.path.isfile(pretrained):
        raise FileNotFoundError(
            f"checkpoint {pretrained!r} for model {model_name!r} does not exist: pass an existing file "
            f"(a .safetensors state dict or an open_clip checkpoint) or a pretrained tag")


def _create_open_clip(model_name: str, pretrained: Optional[str], cache_dir: Optional[str]) -> ClipBundle:
    import open_clip

    known = open_clip.list_models()
    if model_name.replace("/", "-") not in known and ":" not in model_name:
        close = [m for m in known if m.lower().startswith(model_name.lower().split("-")[0])][:12]
        raise ValueError(f"unknown model {model_name!r}: not an open_clip architecture nor a tiny one "
                         f"({', '.join(TINY_MODEL_CONFIGS)}). Similar open_clip models: {close}")
    own_safetensors = None
    kwargs: Dict[str, Any] = {}
    if pretrained and _looks_like_path(pretrained):
        _check_file(pretrained, model_name)
        if pretrained.endswith(".safetensors"):
            # Our own checkpoints (and other plain state dicts): build, then load with shape checks.
            own_safetensors, pretrained = pretrained, None
    if pretrained == "openai":
        kwargs["force_quick_gelu"] = True   # OpenAI's weights were trained with QuickGELU
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


def write_error(path: str | Path, e: OSError) -> OSError:
    """An OSError that names the file and the fix (a full disk or a permission says neither by itself)."""
    import errno

    why = e.strerror or str(e)
    fix = {errno.ENOSPC: "free disk space or choose another folder",
           errno.EDQUOT: "free disk space (quota) or choose another folder",
           errno.EACCES: "fix the folder's permissions or choose another folder",
           errno.EROFS: "the file system is read-only: choose another folder"}.get(e.errno, "choose another folder")
    return OSError(e.errno, f"cannot write {path}: {why}; {fix}")


def atomic_write_text(path: str | Path, text: str) -> Path:
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise write_error(path, e) from None
    return path


def save_model(model: torch.nn.Module, path: str | Path, metadata: Optional[Dict[str, Any]] = None) -> Path:
    """The model state as safetensors (atomic); ``metadata`` is stored as JSON strings."""
    meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    return atomic_save_safetensors(state_dict_fp32(model), path, metadata=meta)


def read_state_dict(path: str | Path) -> Dict[str, torch.Tensor]:
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    fix = ("it is empty, truncated or not a checkpoint: pass an intact .safetensors state dict or an open_clip "
           "checkpoint (a run's checkpoints/*.safetensors)")
    if os.path.getsize(path) == 0:
        raise ValueError(f"checkpoint {path} is an empty file: {fix}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as e:           # SafetensorError (header), or a short read of the data
            raise ValueError(f"checkpoint {path} is not a readable safetensors file ({e}): {fix}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        # (torch's own message for a pickle it refuses suggests weights_only=False: never do that for a file
        # of unknown origin, so it is not repeated here)
        kind = type(e).__name__
        raise ValueError(f"checkpoint {path} cannot be read as a PyTorch state dict ({kind}): {fix}") from None
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"{path!r} does not hold a state dict (got {type(obj).__name__})")
    return {(k[7:] if k.startswith("module.") else k): v for k, v in obj.items()}


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

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
    return {k: json.loads(v) for k, v in meta.items()}


__all__ = ["ClipBundle", "create_clip", "build_tiny_clip", "TINY_MODEL_CONFIGS", "is_tiny", "save_model",
           "load_weights", "read_state_dict", "check_state_dict", "atomic_save_safetensors", "atomic_write_text",
           "checkpoint_metadata", "state_dict_fp32", "write_error"]
