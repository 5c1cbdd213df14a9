"""The tiny CLIP architectures of the toy world (the tiny preset's model and the tests').

``TINY_MODEL_CONFIGS`` are open_clip ``CLIP(embed_dim, vision_cfg, text_cfg)`` configurations built
in code; their text tower reads the toy world's word tokens (``toy_clip_tokenizer``), not CLIP's BPE.
``gift_fast.models.create_clip`` builds them by name like any open_clip architecture.
"""
from __future__ import annotations

from typing import Any, Dict

import torch

from gift_fast.toy.world import ToyTokenizer

# Tiny architectures built in code (open_clip.model.CLIP(embed_dim, vision_cfg, text_cfg)).
# The text tower's vocabulary is the toy world's (gift_fast.toy.world.ToyTokenizer).
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


def is_tiny(model_name: str) -> bool:
    """Whether ``model_name`` is one of the toy world's tiny CLIPs (else an open_clip architecture)."""
    return model_name in TINY_MODEL_CONFIGS


def toy_clip_tokenizer(model_name: str) -> ToyTokenizer:
    """The word tokenizer of the tiny CLIP ``model_name`` (the toy world's vocabulary, its context length)."""
    return ToyTokenizer(context_length=TINY_MODEL_CONFIGS[model_name]["text_cfg"]["context_length"])


def build_tiny_clip(model_name: str = "toy-vit", quick_gelu: bool = False) -> torch.nn.Module:
    """A randomly initialised tiny CLIP (uses torch's global RNG: seed it for reproducibility);
    ``quick_gelu``: QuickGELU instead of nn.GELU in the transformer MLPs."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg   # lazy: open_clip takes a second to import

    if model_name not in TINY_MODEL_CONFIGS:
        raise ValueError(f"unknown tiny model {model_name!r}; known: {', '.join(TINY_MODEL_CONFIGS)}")
    cfg = TINY_MODEL_CONFIGS[model_name]
    text_cfg = dict(cfg["text_cfg"])
    text_cfg["vocab_size"] = toy_clip_tokenizer(model_name).vocab_size
    return CLIP(embed_dim=cfg["embed_dim"], vision_cfg=CLIPVisionCfg(**cfg["vision_cfg"]),
                text_cfg=CLIPTextCfg(**text_cfg), quick_gelu=bool(quick_gelu))
