"""The toy world of the tiny preset: captioned images rendered in code.

Everything the paper's pipeline needs exists here in miniature, with no download:

* a *world*: 32 x 32 images of one coloured object (a shape, or a hand-written
  digit from scikit-learn's bundled ``load_digits``) on a grey textured
  background, each with a caption naming some of its attributes
  ("a photo of a red circle on stripes.");
* a word-level *tokenizer* for the world's vocabulary (a tiny CLIP needs no
  49k-token BPE table);
* *pre-training data*: a part of the world (the first half of the digit
  writers; captions that name the object, its colour or both, never the
  background) on which the tiny preset pre-trains a tiny CLIP contrastively, so
  that it has zero-shot knowledge to lose (cached; see ``pretrained_toy_clip_path``);
* a *sequence of toy tasks* (digits, shapes, colours; textures as an extra): each
  asks for one attribute and treats the others as nuisances, so fine-tuning on
  one task teaches the model to ignore what the next task needs (forgetting);
* a *generator* (``ToyGenerator``) that renders an image from a prompt
  ("a photo of a red circle.") behind the same ``ImageGenerator`` interface as
  Stable Diffusion: the attributes the prompt names are fixed, the others are
  drawn at random, and every image depends only on its seed. It knows the
  digit writers of the pre-training part only, as Stable Diffusion knows only
  its own training data.

The synthetic class pool's base names (the analogue of ImageNet's 1,000 class
names) are ``BASE_CLASSNAMES``: the colour-object names of the pre-training
vocabulary.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

IMAGE_SIZE = 32
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)

COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 175, 60),
    "blue": (45, 80, 235),
    "yellow": (235, 215, 35),
    "purple": (150, 55, 205),
    "orange": (250, 135, 25),
}
SHAPES: Tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring", "diamond")
DIGITS: Tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
OBJECTS: Tuple[str, ...] = SHAPES + DIGITS
TEXTURES: Tuple[str, ...] = ("plain", "stripes", "checks", "dots", "grid", "waves")

# The words of captions besides the attribute names.
FILLER_WORDS: Tuple[str, ...] = ("a", "an", "photo", "of", "the", "on", "thing", "image", "picture", "small",
                                 "big", "toy", ".")
TEMPLATES: Tuple[str, ...] = ("a photo of a {}.", "an image of a {}.", "a picture of the {}.", "a {}.")

# Base names of the synthetic class pool (the analogue of ImageNet's class names).
BASE_CLASSNAMES: Tuple[str, ...] = tuple(f"{c} {o}" for c in COLOURS for o in OBJECTS)


# --------------------------------------------------------------------------- scenes
@dataclass(frozen=True)
class Scene:
    """What an image shows: an object of a colour on a background texture."""
    colour: str
    obj: str
    texture: str

    def describe(self, parts: Sequence[str] = ("colour", "obj", "texture")) -> str:
        """A caption body naming the given attributes ("red circle on stripes")."""
        words = []
        if "colour" in parts:
            words.append(self.colour)
        if "obj" in parts:
            words.append(self.obj)
        if "texture" in parts:
            words += (["on", self.texture] if words else [self.texture])
        return " ".join(words)


@lru_cache(maxsize=1)
def _digit_glyphs() -> Tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits (1,797 images by 43 writers) in [0, 1], and their labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)


@lru_cache(maxsize=2)
def digit_glyph_indices(part: str) -> Dict[int, np.ndarray]:
    """Indices of the glyphs of each digit in one part of the world.

    ``"pretrain"`` holds the first half of the writers (the pre-training data, and
    all the generator knows); ``"task"`` the second half (the toy tasks' data).
    """
    _, labels = _digit_glyphs()
    half = len(labels) // 2
    sl = slice(0, half) if part == "pretrain" else slice(half, None) if part == "task" else None
    if sl is None:
        raise ValueError(f"part must be 'pretrain' or 'task', got {part!r}")
    idx = np.arange(len(labels))[sl]
    return {k: idx[labels[sl] == k] for k in range(10)}


@lru_cache(maxsize=4)
def _grid(size: int) -> Tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    return yy, xx


# Position jitter as a fraction of the free room around the object. Small: a tiny ViT
# pre-trained for a minute on a CPU learns shapes and digits only when they sit
# near the middle (with free placement it learns colours and textures only).
POSITION_JITTER = 0.2


def _texture(name: str, rng: np.random.Generator, s: int) -> np.ndarray:
    """A grey background pattern in [0, 1] with random scale, phase and contrast."""
    y, x = _grid(s)
    k = s / 32.0
    period = rng.uniform(5.0, 8.0) * k
    phase = rng.uniform(0, period, size=2)
    base = rng.uniform(0.35, 0.65)
    contrast = rng.uniform(0.22, 0.35)
    if name == "plain":
        pat = np.zeros((s, s), np.float32)
    elif name == "stripes":
        theta = rng.choice([0.0, np.pi / 2]) + rng.uniform(-0.2, 0.2)
        u = x * np.cos(theta) + y * np.sin(theta)
        pat = np.where(((u + phase[0]) % period) < period / 2, 1.0, -1.0)
    elif name == "checks":
        pat = np.where((((x + phase[0]) // (period / 2)) + ((y + phase[1]) // (period / 2))) % 2 == 0, 1.0, -1.0)
    elif name == "dots":
        dx = ((x + phase[0]) % period) - period / 2
        dy = ((y + phase[1]) % period) - period / 2
        pat = np.where(dx * dx + dy * dy < (period * 0.28) ** 2, 1.0, -1.0)
    elif name == "grid":
        on = (((x + phase[0]) % period) < 1.3) | (((y + phase[1]) % period) < 1.3)
        pat = np.where(on, 1.0, -0.35)
    elif name == "waves":
        amp = rng.uniform(1.5, 2.5)
        u = y + amp * np.sin(2 * np.pi * x / rng.uniform(8, 12) + phase[1])
        pat = np.where(((u + phase[0]) % period) < period / 2, 1.0, -1.0)
    else:
        raise ValueError(f"unknown texture {name!r}; known: {', '.join(TEXTURES)}")
    return (base + contrast * pat).astype(np.float32)


def _shape_mask(name: str, cx: float, cy: float, r: float, s: int) -> np.ndarray:
    yy, xx = _grid(s)
    x, y = xx - cx, yy - cy
    if name == "circle":
        m = x * x + y * y <= r * r
    elif name == "ring":
        d2 = x * x + y * y
        m = (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    elif name == "square":
        m = (np.abs(x) <= 0.85 * r) & (np.abs(y) <= 0.85 * r)
    elif name == "diamond":
        m = np.abs(x) + np.abs(y) <= 1.1 * r
    elif name == "triangle":
        m = (y <= 0.8 * r) & (np.abs(x) <= (y + r) * 0.58)
    elif name == "cross":
        w = 0.33 * r
        m = ((np.abs(x) <= w) & (np.abs(y) <= r)) | ((np.abs(y) <= w) & (np.abs(x) <= r))
    else:
        raise ValueError(f"unknown shape {name!r}")
    return m.astype(np.float32)


def _digit_mask(glyph: np.ndarray, cx: float, cy: float, r: float, s: int) -> np.ndarray:
    """The 8x8 glyph scaled (bilinear) to a 2r x 2r box centred at (cx, cy)."""
    yy, xx = _grid(s)
    # Sample the glyph at the pixel centres mapped into glyph coordinates.
    gx = (xx - (cx - r)) / (2 * r) * 8 - 0.5
    gy = (yy - (cy - r)) / (2 * r) * 8 - 0.5
    inside = (gx > -1) & (gx < 8) & (gy > -1) & (gy < 8)
    x0, y0 = np.floor(gx).astype(np.int64), np.floor(gy).astype(np.int64)
    fx, fy = gx - x0, gy - y0
    pad = np.pad(glyph, 1)

    def at(yy, xx):
        return pad[np.clip(yy + 1, 0, 9), np.clip(xx + 1, 0, 9)]

    v = (at(y0, x0) * (1 - fx) * (1 - fy) + at(y0, x0 + 1) * fx * (1 - fy)
         + at(y0 + 1, x0) * (1 - fx) * fy + at(y0 + 1, x0 + 1) * fx * fy)
    return np.clip(np.where(inside, v, 0.0) * 1.6, 0.0, 1.0).astype(np.float32)


def render(scene: Scene, rng: np.random.Generator, glyph_part: str = "task", size: int = IMAGE_SIZE) -> np.ndarray:
    """Render a scene as a uint8 [size, size, 3] image; ``rng`` draws the jitter (position, size, noise)."""
    bg = _texture(scene.texture, rng, size)
    img = np.repeat(bg[:, :, None], 3, axis=2)
    img = img * rng.uniform(0.9, 1.1, size=3).astype(np.float32)  # a slight tint
    k = size / 32.0
    r = rng.uniform(7.0, 10.5) * k
    c = size / 2
    cx, cy = c + POSITION_JITTER * rng.uniform(-1, 1, size=2) * (c - r - 1)
    if scene.obj in SHAPES:
        mask = _shape_mask(scene.obj, cx, cy, r, size)
    elif scene.obj in DIGITS:
        glyphs, _ = _digit_glyphs()
        pool = digit_glyph_indices(glyph_part)[DIGITS.index(scene.obj)]
        mask = _digit_mask(glyphs[rng.choice(pool)], cx, cy, r * 1.05, size)
    else:
        raise ValueError(f"unknown object {scene.obj!r}; known: {', '.join(OBJECTS)}")
    if scene.colour not in COLOURS:
        raise ValueError(f"unknown colour {scene.colour!r}; known: {', '.join(COLOURS)}")
    colour = np.asarray(COLOURS[scene.colour], np.float32) / 255.0
    colour = np.clip(colour * rng.uniform(0.85, 1.1) + rng.normal(0, 0.03, size=3), 0, 1)
    img = img * (1 - mask[:, :, None]) + colour[None, None, :] * mask[:, :, None]
    img = img + rng.normal(0, 0.04, size=img.shape)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


# --------------------------------------------------------------------------- tokenizer
class ToyTokenizer:
    """Word-level tokenizer of the toy world, shaped like open_clip's tokenizers.

    ``tok(texts) -> LongTensor [N, context_length]``: ``<sot> words... <eot>`` then
    padding 0. ``<eot>`` has the largest id, so open_clip's default text pooling
    (argmax of the token ids) picks it, as with CLIP's BPE tokenizer. Words
    outside the vocabulary map to ``<unk>``.
    """

    def __init__(self, context_length: int = 16):
        words = sorted(set(FILLER_WORDS) | set(COLOURS) | set(OBJECTS) | set(TEXTURES))
        self.vocab = ["<pad>", "<sot>", "<unk>"] + words + ["<eot>"]
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.context_length = context_length
        self.vocab_size = len(self.vocab)
        self.sot_token_id, self.eot_token_id = self.index["<sot>"], self.index["<eot>"]

    def words(self, text: str) -> List[str]:
        return re.findall(r"[a-z]+|\.", text.lower())

    def __call__(self, texts, context_length: Optional[int] = None) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        n = context_length or self.context_length
        out = torch.zeros(len(texts), n, dtype=torch.long)
        unk = self.index["<unk>"]
        for row, text in enumerate(texts):
            ids = [self.sot_token_id] + [self.index.get(w, unk) for w in self.words(text)][: n - 2]
            ids.append(self.eot_token_id)
            out[row, : len(ids)] = torch.tensor(ids)
        return out


# --------------------------------------------------------------------------- data
def _to_chw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def normalize_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> the float input of the tiny CLIP (mean = std = 0.5)."""
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def random_scene(rng: np.random.Generator, objects: Sequence[str] = OBJECTS, colour: Optional[str] = None,
                 obj: Optional[str] = None, texture: Optional[str] = None) -> Scene:
    return Scene(colour or str(rng.choice(list(COLOURS))), obj or str(rng.choice(list(objects))),
                 texture or str(rng.choice(list(TEXTURES))))


def pretraining_scenes(n: int, seed: int, size: int = IMAGE_SIZE) -> Tuple[torch.Tensor, List[Scene]]:
    """n random scenes of the pre-training part (first half of the digit writers), uint8 images."""
    rng = np.random.default_rng([seed, 7])
    scenes = [random_scene(rng) for _ in range(n)]
    images = np.stack([render(s, rng, glyph_part="pretrain", size=size) for s in scenes])
    return _to_chw(images), scenes


# Which attributes a pre-training caption names. The pre-training part of the world
# never names the background: textures are a concept the continual tasks bring
# (like a downstream domain CLIP knows little about), while shapes, digits and
# colours are known zero-shot.
CAPTION_PARTS: Tuple[Tuple[str, ...], ...] = (("colour", "obj"), ("obj",), ("colour",))
# In the first phase of pre-training the captions name the object only (see ToyPretrainConfig).
OBJECT_PHASE_PARTS: Tuple[Tuple[str, ...], ...] = (("obj",),)

ATTRIBUTES = ("colour", "obj", "texture")
_VALUES = {"colour": tuple(COLOURS), "obj": OBJECTS, "texture": TEXTURES}


def parse_prompt(prompt: str) -> Dict[str, Optional[str]]:
    """The attributes a prompt names: ``{"colour": "red" | None, "obj": ..., "texture": ...}``."""
    words = set(re.findall(r"[a-z]+", prompt.lower()))
    out: Dict[str, Optional[str]] = {}
    for attr in ATTRIBUTES:
        named = [v for v in _VALUES[attr] if v in words]
        out[attr] = named[0] if len(named) == 1 else None   # none or ambiguous: drawn at random
    return out


# --------------------------------------------------------------------------- the tasks
@dataclass(frozen=True)
class ToyTaskDef:
    name: str
    attribute: str                    # which attribute is the class
    classnames: Tuple[str, ...]
    objects: Tuple[str, ...] = OBJECTS  # the objects its images show


TOY_TASKS: Dict[str, ToyTaskDef] = {
    "ToyDigits": ToyTaskDef("ToyDigits", "obj", DIGITS, DIGITS),
    "ToyTextures": ToyTaskDef("ToyTextures", "texture", TEXTURES),
    "ToyShapes": ToyTaskDef("ToyShapes", "obj", SHAPES, SHAPES),
    "ToyColours": ToyTaskDef("ToyColours", "colour", tuple(COLOURS)),
}
# The tiny preset's sequence. ToyTextures exists too (pass it with --tasks): the
# pre-training never names textures, so its zero-shot accuracy is chance and the
# teacher's features ignore backgrounds; distilling towards that teacher slows its
# learning a lot (a concept the teacher lacks), which makes it a hard case.
DEFAULT_TOY_ORDER: Tuple[str, ...] = ("ToyDigits", "ToyShapes", "ToyColours")


def _task_images(td: ToyTaskDef, n: int, rng: np.random.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    labels = rng.integers(len(td.classnames), size=n)
    images = []
    for k in labels:
        fixed = {td.attribute: td.classnames[k]}
        scene = random_scene(rng, objects=td.objects, **fixed)
        images.append(render(scene, rng, glyph_part="task"))
    return normalize_uint8(_to_chw(np.stack(images))), torch.from_numpy(labels.astype(np.int64))


def toy_task(name: str, *, train_size: int = 1000, test_size: int = 300, seed: int = 0, lr: float = 1e-3):
    """One toy task as a TaskSpec (train / test: TensorDatasets of normalized images and labels).

    Its images show the task-part digit writers (never seen in pre-training) and
    random nuisance attributes; the data depend only on (name, sizes, seed).
    """
    from torch.utils.data import TensorDataset

    from gift_fast.data.base import TaskSpec

    if name not in TOY_TASKS:
        raise ValueError(f"unknown toy task {name!r}; known: {', '.join(TOY_TASKS)}")
    td = TOY_TASKS[name]
    key = sum(ord(c) * (i + 1) for i, c in enumerate(name))
    train = TensorDataset(*_task_images(td, train_size, np.random.default_rng([seed, key, 1])))
    test = TensorDataset(*_task_images(td, test_size, np.random.default_rng([seed, key, 2])))
    return TaskSpec(name=name, classnames=list(td.classnames), templates=list(TEMPLATES), train=train, test=test,
                    lr=lr, meta={"toy": True, "attribute": td.attribute, "train_size": train_size,
                                 "test_size": test_size, "image_size": IMAGE_SIZE})


def toy_tasks(names: Sequence[str] = DEFAULT_TOY_ORDER, **kw) -> list:
    return [toy_task(n, **kw) for n in names]


# --------------------------------------------------------------------------- the generator
class ToyGenerator:
    """Renders an image from a prompt: the toy world's stand-in for Stable Diffusion.

    Implements ``gift_fast.synth.generators.ImageGenerator``: the attributes the
    prompt names ("a photo of a red circle.") are fixed, the others and the jitter
    are drawn from ``np.random.default_rng(seed)``, so image k depends only on
    ``(prompts[k], seeds[k])``. ``background`` fixes the texture of prompts that
    name none (default: random, as in the pre-training images). Like Stable Diffusion it knows only its own
    training data: the digit glyphs of the pre-training writers.
    """

    name = "toy"

    def __init__(self, glyph_part: str = "pretrain", background: Optional[str] = None):
        self.glyph_part = glyph_part
        self.background = background

    def generate(self, prompts: List[str], seeds: List[int]) -> list:
        from PIL import Image

        if len(prompts) != len(seeds):
            raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds: one seed per prompt")
        out = []
        for prompt, seed in zip(prompts, seeds):
            rng = np.random.default_rng(int(seed))
            attrs = parse_prompt(prompt)
            if attrs["texture"] is None and self.background is not None:
                attrs["texture"] = self.background
            scene = random_scene(rng, **{k: v for k, v in attrs.items() if v is not None})
            out.append(Image.fromarray(render(scene, rng, glyph_part=self.glyph_part)))
        return out

    def describe(self) -> Dict[str, object]:
        return {"name": self.name, "config": {"generator": "toy", "world_version": WORLD_VERSION,
                                              "glyph_part": self.glyph_part, "background": self.background,
                                              "image_size": IMAGE_SIZE}}


# --------------------------------------------------------------------------- pre-training
WORLD_VERSION = 1   # bump when rendering or captions change: it keys the cached tiny CLIP


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
        vals = torch.tensor([_VALUES[attr].index(getattr(s, attr)) for s in scenes])
        named = torch.tensor([attr in p for p in parts])
        M &= (~named[:, None]) | (vals[:, None] == vals[None, :])
    return M.float()


def pretrain_toy_clip(cfg: ToyPretrainConfig = ToyPretrainConfig(), *, progress: bool = True):
    """Pre-train the tiny CLIP; returns the model (float32, CPU)."""
    threads = torch.get_num_threads()
    # One thread: a model this small gains little from two, and OpenMP threads that spin while
    # another process holds the cores slow it down tenfold.
    torch.set_num_threads(1)
    try:
        return _pretrain(cfg, progress)
    finally:
        torch.set_num_threads(threads)


def _pretrain(cfg: ToyPretrainConfig, progress: bool):
    import math

    import torch.nn.functional as F
    from tqdm.auto import tqdm

    from gift_fast.models import build_tiny_clip, tiny_tokenizer

    torch.manual_seed(cfg.seed)
    model = build_tiny_clip(cfg.model_name)
    torch.nn.init.normal_(model.token_embedding.weight, std=cfg.token_init_std)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(cfg.logit_scale))
    model.logit_scale.requires_grad_(cfg.learn_logit_scale)
    tok = tiny_tokenizer(cfg.model_name)
    images, scenes = pretraining_scenes(cfg.images, cfg.seed)
    x_all = normalize_uint8(images)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = np.random.default_rng([cfg.seed, 11])
    model.train()
    bar = tqdm(range(cfg.steps), desc="pre-training the toy CLIP", disable=not progress, leave=False)
    for step in bar:
        warm = min(1.0, (step + 1) / cfg.warmup)
        lr = cfg.lr * warm * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
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
    return Path(os.environ.get("GIFT_FAST_CACHE") or Path.home() / ".cache" / "gift_fast")


def pretrain_key(cfg: ToyPretrainConfig) -> str:
    import dataclasses
    import hashlib
    import json

    from gift_fast.models import TINY_MODEL_CONFIGS, tiny_tokenizer

    blob = json.dumps({"world": WORLD_VERSION, "pretrain": dataclasses.asdict(cfg),
                       "model": TINY_MODEL_CONFIGS[cfg.model_name],
                       "vocab": tiny_tokenizer(cfg.model_name).vocab}, sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def pretrained_toy_clip_path(model_name: str = "toy-vit", cfg: Optional[ToyPretrainConfig] = None,
                             progress: bool = True) -> Path:
    """The cached pre-trained tiny CLIP (pre-trained now if absent; atomic write).

    Under ``$GIFT_FAST_CACHE`` (default ``~/.cache/gift_fast``)``/toy/<model>-<key>.safetensors``;
    the key hashes the world version, the pre-training config, the architecture and
    the vocabulary, so any change gives a new file.
    """
    from gift_fast.models import save_model

    cfg = cfg or ToyPretrainConfig(model_name=model_name)
    path = cache_root() / "toy" / f"{model_name}-{pretrain_key(cfg)}.safetensors"
    if path.exists() and not _readable_safetensors(path):
        import warnings

        warnings.warn(f"the cached toy CLIP {path} is unreadable (truncated or damaged): pre-training it again",
                      RuntimeWarning)
        path.unlink()
    if not path.exists():
        model = pretrain_toy_clip(cfg, progress=progress)
        save_model(model, path, metadata={"toy_pretrain": dataclasses_asdict(cfg), "world_version": WORLD_VERSION})
    return path


def _readable_safetensors(path: Path) -> bool:
    """The whole file loads (a tiny model: milliseconds), so a truncated cache file is rebuilt, not an error."""
    from safetensors.torch import load_file

    try:
        load_file(str(path))
    except Exception:
        return False
    return True


def dataclasses_asdict(obj) -> dict:
    import dataclasses

    return dataclasses.asdict(obj)
