"""``ToyGenerator``: the toy world's image generator, its stand-in for Stable Diffusion.

It renders an image from a prompt behind the same ``ImageGenerator`` interface as
``gift_fast.synth.generators.StableDiffusionGenerator``, so the synthesis engine
(``gift_fast.synth.engine``) writes toy synthetic folders exactly as it writes real ones.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
from PIL import Image

from gift_fast.toy.world import IMAGE_SIZE, WORLD_VERSION, parse_prompt, random_scene, render


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

