"""Checkpoint files: writing a model's state as safetensors, reading and checking state dicts.

``save_model`` writes a model's float32 state dict as safetensors (atomically: a tmp file in the same
folder, fsynced, then ``os.replace``) with JSON metadata, including the model's architecture options
(``architecture_options``: what a state dict alone does not say but the function depends on; today
the activation of the transformer MLPs, QuickGELU or nn.GELU). ``read_state_dict`` reads our
safetensors files and open_clip's checkpoint formats with errors that name the file and the fix;
``load_weights`` loads one into a model after checking every tensor's name and shape.
``gift_fast.models.create_clip`` rebuilds a checkpoint with the options it recorded
(``checkpoint_architecture``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from gift_fast.files import write_error

# --------------------------------------------------------------------------- architecture options
ARCHITECTURE_KEY = "architecture"     # the safetensors metadata entry save_model writes


def activation_name(quick_gelu: bool) -> str:
    return "quick_gelu" if quick_gelu else "gelu"


def architecture_options(model: torch.nn.Module) -> Dict[str, Any]:
    """What a checkpoint of ``model`` must record to be rebuilt as the same function:
    ``{"quick_gelu": bool}`` (QuickGELU or nn.GELU in the transformer MLPs), read from the
    modules themselves. A model with neither activation (e.g. a timm tower) gives ``{}``."""
    from open_clip.transformer import QuickGELU   # lazy: open_clip is slow to import

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


# --------------------------------------------------------------------------- state dicts
def state_dict_fp32(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The model's state dict, contiguous, detached, on the CPU."""
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


def atomic_save_safetensors(tensors: Dict[str, torch.Tensor], path: str | Path,
                            metadata: Optional[Dict[str, str]] = None) -> Path:
    """Write a safetensors file atomically (tmp file + fsync + os.replace), errors through ``files.write_error``.

    safetensors writes the tmp file itself (``files.atomic_write_bytes`` would need the whole file in memory).
    The tmp file keeps the visible name ``<name>.tmp<pid>`` rather than ``files.tmp_path``'s hidden one: the
    trainer removes a killed run's in-task leftovers with ``checkpoints/in_task_*``, which skips hidden files.
    """
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
    """A state dict from a safetensors file or an open_clip checkpoint; a clear error for a missing, empty or
    damaged file."""
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    fix = ("it is empty, truncated or not a checkpoint: pass an intact .safetensors state dict or an open_clip "
           "checkpoint (a run's checkpoints/*.safetensors)")
    if os.path.getsize(path) == 0:
        raise ValueError(f"checkpoint {path} is an empty file: {fix}")
    # open_clip's reader: safetensors or torch.load(weights_only=True), unwraps {"state_dict": ...}
    # and strips DataParallel's "module." (tests/test_models.py checks these rules on real files)
    from open_clip.factory import load_state_dict as open_clip_load_state_dict   # lazy: open_clip is slow to import

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
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except Exception as e:               # SafetensorError: an empty, truncated or foreign file
        raise ValueError(f"checkpoint {path} is not a readable safetensors file ({e}): it is empty, truncated or "
                         f"not a checkpoint; pass an intact .safetensors state dict") from None
    return {k: json.loads(v) for k, v in meta.items()}


__all__ = ["ARCHITECTURE_KEY", "activation_name", "architecture_options", "checkpoint_architecture",
           "state_dict_fp32", "atomic_save_safetensors", "save_model", "read_state_dict", "check_state_dict",
           "load_weights", "checkpoint_metadata"]
