"""The toy world: 32 x 32 captioned images rendered in code, and the word tokenizer of its captions.

A *scene* is one coloured object (a shape, or a hand-written digit from scikit-learn's bundled
``load_digits``) on a grey textured background; ``render`` draws it with random jitter, and a
caption names some of its attributes ("a photo of a red circle on stripes."). The digit writers
are split in two parts: ``"pretrain"`` (the first half: the tiny CLIP's pre-training data and all
the toy generator knows) and ``"task"`` (the second half: the toy tasks' images).
``ToyTokenizer`` is the word-level tokenizer of the world's vocabulary (a tiny CLIP needs no
49k-token BPE table). ``WORLD_VERSION`` keys the cached pre-trained tiny CLIP
(``gift_fast.toy.pretrain``): bump it when rendering or captions change.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from gift_fast.data.cache import normalize_uint8

WORLD_VERSION = 1   # bump when rendering or captions change: it keys the cached tiny CLIP

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
    from sklearn.datasets import load_digits   # local: scikit-learn takes a second to import

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


# --------------------------------------------------------------------------- images and captions
def _to_chw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def normalize_toy_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> the float input of the tiny CLIP (mean = std = 0.5), the one normalization rule
    (gift_fast.data.cache.normalize_uint8) with the toy world's statistics."""
    return normalize_uint8(images, MEAN, STD)


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
ATTRIBUTE_VALUES = {"colour": tuple(COLOURS), "obj": OBJECTS, "texture": TEXTURES}


def parse_prompt(prompt: str) -> Dict[str, Optional[str]]:
    """The attributes a prompt names: ``{"colour": "red" | None, "obj": ..., "texture": ...}``."""
    words = set(re.findall(r"[a-z]+", prompt.lower()))
    out: Dict[str, Optional[str]] = {}
    for attr in ATTRIBUTES:
        named = [v for v in ATTRIBUTE_VALUES[attr] if v in words]
        out[attr] = named[0] if len(named) == 1 else None   # none or ambiguous: drawn at random
    return out

