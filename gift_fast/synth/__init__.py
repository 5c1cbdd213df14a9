"""Synthetic data engine: prompts from class names, image generators, the writer.

* ``prompts``: the prompt pool (ImageNet names + learned tasks, each with its data set's
  template), ``sequence_prompts`` (the draws; hash or the authors' scheme), per-image seeds,
  sharding of image indices.
* ``generators``: the ``ImageGenerator`` protocol, ``StableDiffusionGenerator`` (diffusers,
  fast batched path) and the tiny random pipeline for tests / CI. The toy world's
  ``ToyGenerator`` (``gift_fast.toy.generator``) implements the same protocol.
* ``engine``: ``synthesize_task`` / ``synthesize_sequence`` (batches, black-image retries,
  resume, sharding, atomic writes, ``image_text.csv``, ``manifest.json``).

Submodules import torch / diffusers lazily; importing this package is cheap.
"""
from .prompts import (DEFAULT_TEMPLATE, PoolSource, authors_image_seed, build_class_pool, image_seed,
                      imagenet_classnames, pool_source, sample_prompts, seed_for, sequence_prompts, shard_indices,
                      task_pools)

__all__ = ["DEFAULT_TEMPLATE", "PoolSource", "authors_image_seed", "build_class_pool", "image_seed",
           "imagenet_classnames", "pool_source", "sample_prompts", "seed_for", "sequence_prompts", "task_pools",
           "shard_indices", "synthesize_task", "synthesize_sequence", "StableDiffusionGenerator", "ImageGenerator"]


def __getattr__(name):  # lazy: the engine and generators pull in PIL / torch / diffusers
    if name in ("synthesize_task", "synthesize_sequence"):
        from . import engine
        return getattr(engine, name)
    if name in ("StableDiffusionGenerator", "ImageGenerator"):
        from . import generators
        return getattr(generators, name)
    raise AttributeError(f"module 'gift_fast.synth' has no attribute {name!r}")
