"""The tiny CLIP's pre-training on the toy world, and its cache.

``pretrained_toy_clip_path`` gives the tiny CLIP pre-trained contrastively on the pre-training
part of the world (the first half of the digit writers; captions that name the object, its colour
or both, never the background), so that it has zero-shot knowledge to lose. It is trained on first
use (about a minute on a CPU) and cached under ``cache_root()/toy/<model>-<key>.safetensors``; the
key (``pretrain_key``) hashes the world version, the pre-training config, the architecture and the
vocabulary, so any change to them gives a new file.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tqdm.auto import tqdm

from gift_fast.checkpoints import save_model
from gift_fast.schedule import warmup_times_cosine_lr
from gift_fast.toy.clip import TINY_MODEL_CONFIGS, build_tiny_clip, toy_clip_tokenizer
from gift_fast.toy.world import (ATTRIBUTE_VALUES, ATTRIBUTES, CAPTION_PARTS, OBJECT_PHASE_PARTS, TEMPLATES,
                                 WORLD_VERSION, Scene, normalize_toy_images, pretraining_scenes)


@dataclass(frozen=True)
class ToyPretrainConfig:
    """Contrastive pre-training of the tiny CLIP on the pre-training part of the world.

    Two things make a one-minute CPU pre-training learn shapes and digits: the
    token embeddings start with std 1 (with CLIP's 0.02 every caption starts at
    nearly the same embedding and the object words never separate), and during
    the first ``object_phase`` of the steps the captions name the object only
    (colours are so easy that, learned first, they starve the shapes and digits of
    gradient). The loss is CLIP's, with every image that fits a caption a positive
    (a caption naming only "red" fits every red image of the batch).
    """
    model_name: str = "toy-vit"
    images: int = 6000
    steps: int = 400
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup: int = 50
    object_phase: float = 0.5
    phase1_parts: Tuple[Tuple[str, ...], ...] = OBJECT_PHASE_PARTS
    caption_parts: Tuple[Tuple[str, ...], ...] = CAPTION_PARTS
    token_init_std: float = 1.0
    logit_scale: float = 14.3         # s = exp(logit_scale) at the start (CLIP's 1 / 0.07)
    learn_logit_scale: bool = True    # CLIP learns it (clamped to <= 100)
    seed: int = 0


def _match_matrix(parts: Sequence[Tuple[str, ...]], scenes: Sequence[Scene]) -> torch.Tensor:
    """M[i, j] = 1 when image j fits caption i (caption i names attributes ``parts[i]`` of scene i)."""
    n = len(scenes)
    M = torch.ones(n, n, dtype=torch.bool)
    for attr in ATTRIBUTES:
        vals = torch.tensor([ATTRIBUTE_VALUES[attr].index(getattr(s, attr)) for s in scenes])
        named = torch.tensor([attr in p for p in parts])
        M &= (~named[:, None]) | (vals[:, None] == vals[None, :])
    return M.float()


def pretrain_toy_clip(cfg: ToyPretrainConfig = ToyPretrainConfig(), *, progress: bool = True) -> torch.nn.Module:
    """Pre-train the tiny CLIP; returns the model (float32, CPU)."""
    threads = torch.get_num_threads()
    # One thread: a model this small gains little from two, and OpenMP threads that spin while
    # another process holds the cores slow it down tenfold.
    torch.set_num_threads(1)
    try:
        return _pretrain(cfg, progress)
    finally:
        torch.set_num_threads(threads)


def _pretrain(cfg: ToyPretrainConfig, progress: bool) -> torch.nn.Module:
    torch.manual_seed(cfg.seed)
    model = build_tiny_clip(cfg.model_name)
    torch.nn.init.normal_(model.token_embedding.weight, std=cfg.token_init_std)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(cfg.logit_scale))
    model.logit_scale.requires_grad_(cfg.learn_logit_scale)
    tok = toy_clip_tokenizer(cfg.model_name)
    images, scenes = pretraining_scenes(cfg.images, cfg.seed)
    x_all = normalize_toy_images(images)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    # Its own rule, not gift_fast.schedule.cosine_lr_lambda: see warmup_times_cosine_lr (the cached weights
    # were trained with it and the cache key does not record the schedule).
    lr_at = warmup_times_cosine_lr(cfg.lr, cfg.warmup, cfg.steps)
    rng = np.random.default_rng([cfg.seed, 11])
    model.train()
    bar = tqdm(range(cfg.steps), desc="pre-training the toy CLIP", disable=not progress, leave=False)
    for step in bar:
        lr = lr_at(step)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = rng.integers(0, cfg.images, size=cfg.batch_size)
        batch_scenes = [scenes[i] for i in idx]
        choices = cfg.phase1_parts if step < cfg.object_phase * cfg.steps else cfg.caption_parts
        parts = [choices[k] for k in rng.integers(len(choices), size=cfg.batch_size)]
        captions = [TEMPLATES[rng.integers(len(TEMPLATES))].format(s.describe(p))
                    for s, p in zip(batch_scenes, parts)]
        M = _match_matrix(parts, batch_scenes)
        img = F.normalize(model.encode_image(x_all[torch.from_numpy(idx)]), dim=-1)
        txt = F.normalize(model.encode_text(tok(captions)), dim=-1)
        logits = model.logit_scale.exp() * txt @ img.T          # captions x images
        loss = (-(M / M.sum(1, keepdim=True) * F.log_softmax(logits, 1)).sum(1).mean()
                - (M.T / M.T.sum(1, keepdim=True) * F.log_softmax(logits.T, 1)).sum(1).mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return model



def cache_root() -> Path:
    """Where cached models go: ``$GIFT_FAST_CACHE``, default ``~/.cache/gift_fast`` (read at each call)."""
    return Path(os.environ.get("GIFT_FAST_CACHE") or Path.home() / ".cache" / "gift_fast")


def pretrain_key(cfg: ToyPretrainConfig) -> str:
    """The cache key of a pre-training: a hash of the world version, the config, the architecture and the vocabulary."""
    blob = json.dumps({"world": WORLD_VERSION, "pretrain": dataclasses.asdict(cfg),
                       "model": TINY_MODEL_CONFIGS[cfg.model_name],
                       "vocab": toy_clip_tokenizer(cfg.model_name).vocab}, sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def pretrained_toy_clip_path(model_name: str = "toy-vit", cfg: Optional[ToyPretrainConfig] = None,
                             progress: bool = True) -> Path:
    """The cached pre-trained tiny CLIP (pre-trained now if absent; atomic write).

    Under ``$GIFT_FAST_CACHE`` (default ``~/.cache/gift_fast``)``/toy/<model>-<key>.safetensors``;
    the key hashes the world version, the pre-training config, the architecture and
    the vocabulary, so any change gives a new file.
    """
    cfg = cfg or ToyPretrainConfig(model_name=model_name)
    path = cache_root() / "toy" / f"{model_name}-{pretrain_key(cfg)}.safetensors"
    if path.exists() and not _readable_safetensors(path):
        warnings.warn(f"the cached toy CLIP {path} is unreadable (truncated or damaged): pre-training it again",
                      RuntimeWarning)
        path.unlink()
    if not path.exists():
        model = pretrain_toy_clip(cfg, progress=progress)
        save_model(model, path, metadata={"toy_pretrain": dataclasses.asdict(cfg), "world_version": WORLD_VERSION})
    return path


def _readable_safetensors(path: Path) -> bool:
    """The whole file loads (a tiny model: milliseconds), so a truncated cache file is rebuilt, not an error."""
    try:
        load_file(str(path))
    except Exception:
        return False
    return True
