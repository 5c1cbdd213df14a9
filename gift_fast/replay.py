"""Where each task's synthetic replay set comes from: a `gift-fast synth` folder, on-the-fly generation, or
reference images.

* ``--synth DIR``: the task's ``<DIR>/<Task>_Syn`` folder, read with the synth engine's class pool (the base
  names and every earlier task's names). Every task's folder is checked before the first step, and the folders'
  fingerprints are recorded in ``state.json`` (a resume refuses changed data).
* ``--synth on-the-fly``: the same pool, generated before the task into ``<out>/synthetic/<Task>_Syn`` (a folder
  this run created and marked) and deleted after it unless ``--keep-synth``.
* ``--reference-images DIR``: real images instead (Tab. 5).

A method that does not distill (and has no static Fisher) reads no replay set.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from gift_fast.data.synthetic import load_reference_set, load_synthetic_set
from gift_fast.toy.generator import ToyGenerator
from gift_fast.toy.world import BASE_CLASSNAMES
from gift_fast.distributed import SINGLE, DistContext
from gift_fast.method import MethodSpec
from gift_fast import preflight
from gift_fast.run_folder import (REFERENCE_KEY, claim_synthetic_folder, compare_reference, compare_synthetic,
                                  discard_synthetic_folder, reference_fingerprint, synthetic_fingerprint)
from gift_fast.synth.engine import sequence_sources, synthesize_task
from gift_fast.synth.generators import StableDiffusionGenerator
from gift_fast.synth.prompts import imagenet_classnames, sequence_prompts


def check_replay_source(cfg, method: MethodSpec) -> None:
    """The options that say where the replay comes from, before any work (cfg: a TrainConfig)."""
    if not method.needs_synthetic:
        return
    if cfg.reference_images:
        if not os.path.isdir(cfg.reference_images):
            raise FileNotFoundError(f"--reference-images {cfg.reference_images} is not a folder")
        return
    if cfg.synth is None:
        raise ValueError(f"method {method.label()!r} distills on synthetic data: pass --synth DIR (a `gift-fast synth` "
                         f"folder), --synth on-the-fly, or --reference-images DIR")
    if cfg.synth != "on-the-fly" and not os.path.isdir(cfg.synth):
        raise FileNotFoundError(f"--synth {cfg.synth}: no such folder. Generate it with `gift-fast synth --out "
                                f"{cfg.synth} ...` or use --synth on-the-fly")
    if cfg.synth == "on-the-fly" and cfg.generator not in ("sd", "toy"):
        raise ValueError(f"--generator must be sd or toy, got {cfg.generator!r}")


class SyntheticReplay:
    """The distillation sets of a run's tasks (module docstring).

    ``tasks``: the run's TaskSpecs; ``out``: the run folder (on-the-fly images go to ``<out>/synthetic``);
    ``generator``: an on-the-fly generator to use instead of building one from ``cfg``; ``base_classnames``: the
    class pool's base names (default: the toy world's, or ImageNet's)."""

    def __init__(self, cfg, method: Optional[MethodSpec] = None, tasks: Sequence = (), *, out: Optional[Path] = None,
                 device: torch.device = torch.device("cpu"), dist: DistContext = SINGLE, image_size: int = 224,
                 generator=None, base_classnames: Optional[Sequence[str]] = None, progress: bool = False):
        self.cfg, self.tasks = cfg, list(tasks)
        self.method = method if method is not None else cfg.method_spec()
        self.out = Path(out if out is not None else cfg.out)
        self.device, self.dist, self.image_size, self.progress = device, dist, image_size, progress
        self._generator = generator
        self._base_classnames = None if base_classnames is None else list(base_classnames)

    # ------------------------------------------------------------------ what the run reads
    @property
    def reads_folder(self) -> bool:
        """The replay is a `gift-fast synth` folder (checked up front, fingerprinted)."""
        cfg = self.cfg
        return self.method.needs_synthetic and not cfg.reference_images and cfg.synth not in (None, "on-the-fly")

    @property
    def on_the_fly(self) -> bool:
        cfg = self.cfg
        return self.method.needs_synthetic and cfg.synth == "on-the-fly" and not cfg.reference_images

    @property
    def seed(self) -> int:
        """The seed of the prompts and images (--synth-seed, default the run's seed)."""
        return self.cfg.seed if self.cfg.synth_seed is None else self.cfg.synth_seed

    def check_folders(self) -> None:
        """Every task's folder must be there before the first step (not hours later, at task 7)."""
        if not self.reads_folder:
            return
        synth = self.cfg.synth
        missing = [t.name for t in self.tasks if not (Path(synth) / f"{t.name}_Syn" / "image_text.csv").is_file()]
        if missing:
            raise FileNotFoundError(
                f"no synthetic folder for task(s) {missing} under {synth} (expected <Task>_Syn/image_text.csv): "
                f"generate them with `gift-fast synth --out {synth} ...`, or train with --synth on-the-fly")

    def fingerprints(self, recorded: Optional[Dict[str, Any]], state_path: Path) -> Optional[Dict[str, Any]]:
        """Fingerprints of the synthetic folders the run reads (None when it reads none), compared with those
        ``recorded`` in the run's state (a resume refuses changed data)."""
        if self.method.needs_synthetic and self.cfg.reference_images:
            record = {REFERENCE_KEY: reference_fingerprint(self.cfg.reference_images)}
            if recorded is not None:       # (runs started before this record existed have none: not compared)
                compare_reference(recorded, record, self.cfg.reference_images, state_path)
            return record
        if not self.reads_folder:
            return None
        record = {t.name: synthetic_fingerprint(self.cfg.synth, t.name) for t in self.tasks}
        if recorded is not None:
            compare_synthetic(recorded, record, self.cfg.synth, state_path)
        return record

    # ------------------------------------------------------------------ the on-the-fly generator
    def generator(self):
        """The on-the-fly generator, built on first use."""
        if self._generator is None:
            if self.cfg.generator == "toy":
                self._generator = ToyGenerator()
            else:
                gen_cfg = self.cfg.generator_config().resolve(self.device)
                if self.progress:
                    print(f"on-the-fly generator: {gen_cfg.model}, {gen_cfg.steps} steps | {gen_cfg.summary()}",
                          file=sys.stderr, flush=True)
                self._generator = StableDiffusionGenerator.from_config(
                    gen_cfg, device=self.device, local_files_only=preflight.check_sd_model(gen_cfg.model))
        return self._generator

    def synth_batch_size(self) -> int:
        """Images per generator call: --sd-batch-size, else the generator's measured default."""
        if self.cfg.synth_batch_size is not None:
            return self.cfg.synth_batch_size
        if self.cfg.generator == "toy":
            return 16
        return self.cfg.generator_config().resolve(self.device).batch_size

    def base_classnames(self) -> List[str]:
        if self._base_classnames is not None:
            return list(self._base_classnames)
        if self.cfg.toy or getattr(self._generator, "name", "") == "toy":
            return list(BASE_CLASSNAMES)
        return imagenet_classnames()

    # ------------------------------------------------------------------ one task
    def distill_set(self, t: int):
        """The distillation set of task ``t`` (None when the method does not distill)."""
        cfg, task = self.cfg, self.tasks[t]
        if not self.method.needs_synthetic:
            return None
        if cfg.reference_images:
            return load_reference_set(cfg.reference_images, cfg.images_per_task, seed=self.seed, task_index=t,
                                      image_size=self.image_size, progress=self.progress)
        # The synth engine's pool (one rule for both): base names and every earlier task's names, each
        # entry templated with its own data set's first template.
        # A task may name another pool template in its meta (the CIL steps do).
        base, sources = sequence_sources([(x.name, x.classnames, x.meta.get("pool_template") or x.templates[0])
                                          for x in self.tasks], base_classnames=self.base_classnames())
        if cfg.synth == "on-the-fly":
            gen = self.generator()
            prompts = sequence_prompts(base, sources, cfg.images_per_task, seed=self.seed,
                                       scheme=cfg.synth_seed_scheme)[t]
            root = self.out / "synthetic"
            if self.dist.is_main:          # writes (and later deletes) only a folder it created and marked
                claim_synthetic_folder(root / f"{task.name}_Syn")
            self.dist.barrier()
            fmt = "png" if getattr(gen, "name", "") == "toy" else "jpeg"
            # each process generates its share (the engine's rank sharding); rank 0 writes the index
            synthesize_task(gen, task.name, prompts, root, seed=self.seed, task_index=t,
                            batch_size=self.synth_batch_size(), progress=self.progress, image_format=fmt,
                            overwrite=True, rank=self.dist.rank, world_size=self.dist.world_size,
                            seed_scheme=cfg.synth_seed_scheme)
            self.dist.barrier()          # the index is complete before anyone reads it
            return load_synthetic_set(root, task.name, image_size=self.image_size, progress=self.progress)
        return load_synthetic_set(cfg.synth, task.name, image_size=self.image_size, limit=cfg.images_per_task,
                                  progress=self.progress, sequence=[x.name for x in self.tasks],
                                  pool_sources=[(s.name, s.prompts()) for s in [base] + sources[:t]])

    def discard(self, t: int) -> None:
        """After task ``t``: delete its on-the-fly folder (unless --keep-synth)."""
        if self.cfg.synth == "on-the-fly" and not self.cfg.keep_synth and self.dist.is_main:
            discard_synthetic_folder(self.out / "synthetic" / f"{self.tasks[t].name}_Syn")


__all__ = ["check_replay_source", "SyntheticReplay"]
