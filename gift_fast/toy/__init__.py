"""The toy world of the tiny preset: captioned images rendered in code, with no download.

Everything the paper's pipeline needs exists here in miniature:

* ``world``: 32 x 32 images of one coloured object (a shape, or a hand-written digit from
  scikit-learn's bundled ``load_digits``) on a grey textured background, each with a caption naming
  some of its attributes ("a photo of a red circle on stripes."), and the word-level tokenizer of
  the captions (a tiny CLIP needs no 49k-token BPE table);
* ``tasks``: the sequence of toy tasks (digits, shapes, colours; textures as an extra); each asks
  for one attribute and treats the others as nuisances, so fine-tuning on one task teaches the
  model to ignore what the next task needs (forgetting);
* ``generator``: ``ToyGenerator`` renders an image from a prompt behind the same ``ImageGenerator``
  interface as Stable Diffusion; it knows only the digit writers of the pre-training part, as
  Stable Diffusion knows only its own training data;
* ``clip``: the tiny CLIP architectures (``TINY_MODEL_CONFIGS``) and their tokenizer;
* ``pretrain``: the tiny CLIP's contrastive pre-training on a part of the world (the first half of
  the digit writers; captions that name the object, its colour or both, never the background), so
  that it has zero-shot knowledge to lose; cached (``pretrained_toy_clip_path``).

The synthetic class pool's base names (the analogue of ImageNet's 1,000 class names) are
``BASE_CLASSNAMES``: the colour-object names of the pre-training vocabulary.
"""
from gift_fast.toy.clip import TINY_MODEL_CONFIGS, build_tiny_clip, is_tiny, toy_clip_tokenizer
from gift_fast.toy.generator import ToyGenerator
from gift_fast.toy.pretrain import (ToyPretrainConfig, cache_root, pretrain_key, pretrain_toy_clip,
                                    pretrained_toy_clip_path)
from gift_fast.toy.tasks import DEFAULT_TOY_ORDER, TOY_TASKS, ToyTaskDef, toy_task, toy_tasks
from gift_fast.toy.world import (ATTRIBUTE_VALUES, ATTRIBUTES, BASE_CLASSNAMES, CAPTION_PARTS, COLOURS, DIGITS,
                                 FILLER_WORDS, IMAGE_SIZE, MEAN, OBJECT_PHASE_PARTS, OBJECTS, POSITION_JITTER,
                                 SHAPES, STD, TEMPLATES, TEXTURES, WORLD_VERSION, Scene, ToyTokenizer,
                                 digit_glyph_indices, normalize_toy_images, parse_prompt, pretraining_scenes,
                                 random_scene, render)

__all__ = ["TINY_MODEL_CONFIGS", "build_tiny_clip", "is_tiny", "toy_clip_tokenizer", "ToyGenerator",
           "ToyPretrainConfig", "cache_root", "pretrain_key", "pretrain_toy_clip", "pretrained_toy_clip_path",
           "DEFAULT_TOY_ORDER", "TOY_TASKS", "ToyTaskDef", "toy_task", "toy_tasks", "ATTRIBUTE_VALUES", "ATTRIBUTES",
           "BASE_CLASSNAMES", "CAPTION_PARTS", "COLOURS", "DIGITS", "FILLER_WORDS", "IMAGE_SIZE", "MEAN",
           "OBJECT_PHASE_PARTS", "OBJECTS", "POSITION_JITTER", "SHAPES", "STD", "TEMPLATES", "TEXTURES",
           "WORLD_VERSION", "Scene", "ToyTokenizer", "digit_glyph_indices", "normalize_toy_images", "parse_prompt",
           "pretraining_scenes", "random_scene", "render"]
