"""What a run is built from: its device, its model (a ``gift_fast.models.ClipBundle``) and its task sequence."""
from __future__ import annotations

from typing import Optional

import torch

from gift_fast.batches import derived_seed
from gift_fast.config import MTIL_TASKS, task_order
from gift_fast.data.mtil import build_tasks
from gift_fast.toy.tasks import DEFAULT_TOY_ORDER, TOY_TASKS, toy_tasks
from gift_fast.distributed import SINGLE, DistContext
from gift_fast.models import create_clip
from gift_fast.run_config import TrainConfig

# The stream of the random initial weights (pretrained=None): a function of the seed alone
STREAM_INIT = 0x494E4954


def resolve_device(device: str, dist: DistContext = SINGLE) -> torch.device:
    """``auto`` / ``cpu`` / ``cuda`` / ``cuda:N``; with several processes, ``auto`` and ``cuda``
    mean this process's GPU (cuda:LOCAL_RANK)."""
    if device in (None, "", "auto"):
        d = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        d = torch.device(device)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine")
    if d.type == "cuda" and d.index is None and dist.enabled:
        d = torch.device("cuda", dist.local_rank)
    return d


def load_bundle(cfg: TrainConfig, device: torch.device):
    """The run's CLIP: ``cfg.model`` with ``cfg.pretrained`` weights (None: random, a function of the seed, so a
    resume rebuilds them)."""
    if cfg.pretrained is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derived_seed(cfg.seed, STREAM_INIT))
            return create_clip(cfg.model, None, device=device)
    return create_clip(cfg.model, cfg.pretrained, device=device)


def build_task_list(cfg: TrainConfig, bundle, split_record_dir: Optional[str] = None) -> list:
    """The TaskSpecs of the run: the toy world's (``cfg.toy`` or toy task names) or MTIL's.

    Each task carries its own learning rate (TaskSpec.lr: the toy world's, or MTIL's per-task rule); the run
    uses ``cfg.lr`` instead when it is given (``TrainConfig.task_lr``).
    ``split_record_dir``: where MTIL's seeded splits are recorded (the run folder), or compared
    with the record already there (gift_fast.data.mtil.open_splits)."""
    if cfg.toy or (cfg.tasks and all(n in TOY_TASKS for n in cfg.tasks)):
        names = cfg.tasks or list(DEFAULT_TOY_ORDER)
        return toy_tasks(names, train_size=cfg.toy_train_size, test_size=cfg.toy_test_size, seed=0)
    if cfg.tasks:
        unknown = [n for n in cfg.tasks if n not in MTIL_TASKS]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; MTIL tasks: {', '.join(MTIL_TASKS)}; toy tasks: "
                             f"{', '.join(TOY_TASKS)}")
        names = list(cfg.tasks)
    else:
        names = task_order(cfg.order)
    if not cfg.data_root:
        raise ValueError("the MTIL tasks need --data-root DIR (see `gift-fast data check`), or use --preset tiny")
    return build_tasks(names, cfg.data_root, image_size=bundle.image_size, mean=bundle.mean, std=bundle.std,
                       cache_dir=cfg.data_cache, progress=cfg.progress, train_augment=cfg.train_augment,
                       split_record_dir=split_record_dir)


__all__ = ["resolve_device", "load_bundle", "build_task_list"]
