"""The continual training loop: GIFT and its baselines over a sequence of tasks.

Data flow of one run (``train(cfg)``)::

    model (open_clip, or the toy world's tiny CLIP)  ->  zero-shot row of the accuracy matrix
    for each task t:
        teacher  = the model after task t-1 (or the initial model, or a WiSE mix of both)
        anchor   = the weights at the start of task t (AWC's theta*)
        synthetic set of task t (a `gift-fast synth` folder, generated now, or real reference images)
        teacher embeddings of the whole synthetic set, once (it is fixed and not augmented)
        steps: GiftStep (gift_fast.step): L_kd backward alone -> awc.step() -> L_ce backward -> AdamW
        evaluate on every task of the sequence -> row t of the accuracy matrix
        checkpoint (safetensors, atomic) + state.json
    metrics (continual_metrics), acc_matrix.csv, plots

Methods are flags of this one loop (``MethodSpec``): ``finetune`` = L_ce only;
``l2`` = L_ce + uniform weight consolidation; ``ewc-v`` = CD + ITA + a static Fisher
estimated on synthetic batches before each task; ``gift`` = CD + ITA + adaptive
AWC. Switches override a method's parts (Tab. 3 and 4 of the paper).

Randomness is derived per task from (seed, task index), never from the process's
history, so ``--resume`` after task k gives the same final numbers as an
uninterrupted run.

Several processes (``torchrun``, gift_fast.distributed): every process draws the same
global batch and keeps its rows; the step reduces the gradients; evaluation is sharded;
rank 0 alone writes the run folder. N processes compute what one does.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from gift_fast.distributed import SINGLE, DistContext
from gift_fast.schedule import cosine_lr_lambda  # noqa: F401  (also gift_fast.train.cosine_lr_lambda, its old home)

METHODS = ("gift", "finetune", "l2", "ewc-v")
CONSOLIDATIONS = ("none", "uniform", "adaptive", "static")
DISTILL_LOSSES = ("contrastive", "feature", "image-only", "text-only", "kl")
_STEP_DISTILL = {"contrastive": "contrastive", "feature": "feature", "image-only": "image_only",
                 "text-only": "text_only", "kl": "kl"}

# method -> (cd, ita, consolidation)
METHOD_DEFAULTS: Dict[str, Tuple[bool, bool, str]] = {
    "gift": (True, True, "adaptive"),
    "finetune": (False, False, "none"),
    "l2": (False, False, "uniform"),
    "ewc-v": (True, True, "static"),
}


# =============================================================================== methods
@dataclass(frozen=True)
class MethodSpec:
    """What a method computes: which losses, which consolidation, which teacher."""
    name: str
    cd: bool
    ita: bool
    consolidation: str            # none | uniform | adaptive | static
    distill: str = "contrastive"  # contrastive | feature | image-only | text-only | kl
    teacher: str = "last"         # last | initial | wise:ALPHA

    @property
    def distills(self) -> bool:
        return self.cd or self.ita

    @property
    def needs_synthetic(self) -> bool:
        return self.distills or self.consolidation == "static"

    def label(self) -> str:
        """A short name for tables: the method, plus what differs from its defaults."""
        cd, ita, cons = METHOD_DEFAULTS[self.name]
        extra = []
        if self.cd != cd:
            extra.append("+CD" if self.cd else "-CD")
        if self.ita != ita:
            extra.append("+ITA" if self.ita else "-ITA")
        if self.consolidation != cons:
            extra.append(f"wc={self.consolidation}")
        if self.distills and self.distill != "contrastive":
            extra.append(f"distill={self.distill}")
        if self.distills and self.teacher != "last":
            extra.append(f"teacher={self.teacher}")
        return self.name + (" " + " ".join(extra) if extra else "")


def parse_teacher(spec: str) -> Tuple[str, float]:
    """``"last"`` -> ("last", 0), ``"initial"`` -> ("initial", 1), ``"wise:0.2"`` -> ("wise", 0.2).

    WiSE convention: teacher weights = alpha * initial + (1 - alpha) * last, so alpha = 0
    is the last model and alpha = 1 the initial one (the paper's WiSE(0.2) is closer to
    the last model than WiSE(0.5)).
    """
    s = str(spec).strip().lower()
    if s == "last":
        return "last", 0.0
    if s == "initial":
        return "initial", 1.0
    if s.startswith("wise:"):
        try:
            alpha = float(s.split(":", 1)[1])
        except ValueError:
            alpha = float("nan")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"--teacher {spec!r}: ALPHA must be a number in [0, 1] (wise:0.2 = 0.2 * initial + "
                             f"0.8 * last)")
        return "wise", alpha
    raise ValueError(f"unknown teacher {spec!r}: use last, initial or wise:ALPHA (e.g. wise:0.2)")


def resolve_method(method: str = "gift", *, cd: Optional[bool] = None, ita: Optional[bool] = None,
                   awc: Optional[bool] = None, consolidation: Optional[str] = None, distill: str = "contrastive",
                   teacher: str = "last") -> MethodSpec:
    """A method's defaults with the switches applied; clear errors for combinations that make no sense.

    ``awc=True`` asks for the adaptive consolidation, ``awc=False`` for none;
    ``consolidation`` names one of none / uniform / adaptive / static directly (it wins
    over ``awc``). Tab. 3's rows are ``l2``, ``l2 --cd``, ``l2 --cd --ita``, ``gift``;
    Tab. 4 uses ``l2 --cd --ita`` with ``--distill`` / ``--teacher``.
    """
    if method not in METHOD_DEFAULTS:
        raise ValueError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    d_cd, d_ita, d_cons = METHOD_DEFAULTS[method]
    if distill not in DISTILL_LOSSES:
        raise ValueError(f"unknown distillation loss {distill!r}: choose one of {', '.join(DISTILL_LOSSES)}")
    parse_teacher(teacher)
    cons = d_cons
    if awc is not None:
        cons = "adaptive" if awc else "none"
    if consolidation is not None:
        if consolidation not in CONSOLIDATIONS:
            raise ValueError(f"unknown consolidation {consolidation!r}: choose one of {', '.join(CONSOLIDATIONS)}")
        cons = consolidation
    use_cd = d_cd if cd is None else bool(cd)
    use_ita = d_ita if ita is None else bool(ita)
    if cons == "adaptive" and not (use_cd or use_ita):
        raise ValueError("adaptive weight consolidation takes its Fisher from the distillation gradients, but CD and "
                         "ITA are both off: enable --cd or --ita, or use --consolidation uniform (the L2 baseline)")
    if cons == "static" and not (use_cd or use_ita):
        raise ValueError("the static (EWC-V) Fisher is estimated from the distillation loss on synthetic batches: "
                         "enable --cd or --ita")
    return MethodSpec(method, use_cd, use_ita, cons, distill, str(teacher).strip().lower())


# =============================================================================== config
@dataclass
class TrainConfig:
    """Everything a run depends on (written to ``<out>/config.json``)."""
    out: str = "runs/gift"
    # model
    model: str = "ViT-B-16"
    pretrained: Optional[str] = "openai"
    # tasks: an MTIL order (with data_root), a list of MTIL task names, or the toy world
    order: Optional[int] = 1
    tasks: Optional[List[str]] = None
    data_root: Optional[str] = None
    data_cache: Optional[str] = None
    train_augment: bool = True         # MTIL task images: the authors' RandomResizedCrop(scale=(0.9, 1)) in training
    toy: bool = False
    toy_train_size: int = 1000
    toy_test_size: int = 300
    # method
    method: str = "gift"
    cd: Optional[bool] = None
    ita: Optional[bool] = None
    awc: Optional[bool] = None
    consolidation: Optional[str] = None
    distill: str = "contrastive"
    teacher: str = "last"
    cd_weight: float = 1.0
    ita_weight: float = 0.25
    l2: float = 1.0                    # lambda_l2: strength of the (adaptive / uniform / static) consolidation
    awc_decay: float = 0.0             # running Fisher estimate: F <- decay * F + (1 - decay) * F_new
    fisher_batches: int = 10           # EWC-V: synthetic batches of the static Fisher
    temperature: float = 2.0
    label_smoothing: float = 0.2
    # synthetic data
    synth: Optional[str] = None        # a `gift-fast synth` folder, or "on-the-fly"
    reference_images: Optional[str] = None
    images_per_task: int = 1000
    generator: str = "sd"              # on-the-fly generator: sd (Stable Diffusion) | toy
    sd_model: Optional[str] = None
    sd_steps: int = 50
    synth_batch_size: Optional[int] = None   # images per generator call (None: the measured default, --sd-batch-size)
    # the rest of the on-the-fly generator's configuration (gift_fast.synth.generators.GeneratorConfig; None: the
    # measured default for the device, see bench/RESULTS.md)
    sd_compile: Optional[str] = None   # auto | none | unet | all
    sd_compile_mode: Optional[str] = None
    sd_channels_last: Optional[bool] = None
    sd_fused_qkv: Optional[bool] = None
    sd_attention: str = "auto"
    sd_sdpa_backend: Optional[str] = None
    sd_safety_checker: bool = True
    synth_seed: Optional[int] = None   # default: seed
    keep_synth: bool = False
    # optimisation (docs/METHOD.md, "The MTIL protocol")
    steps: int = 1000
    batch_size: int = 64
    syn_batch_size: int = 64
    warmup: int = 100
    lr: Optional[float] = None         # one learning rate for every task (default: each task's own)
    # speed
    device: str = "auto"
    bf16: bool = False
    compile: Optional[bool] = None     # regional torch.compile of the blocks (None: on CUDA, not on the CPU)
    kernels: str = "auto"
    threads: Optional[int] = None
    num_workers: int = 4
    # evaluation and logging
    eval_batch_size: int = 256
    log_every: int = 50
    progress: bool = True
    # run
    seed: int = 0
    resume: bool = False
    keep_checkpoints: str = "all"      # all | last
    checkpoint_every: int = 0          # in-task checkpoint every K steps (0: only at the end of each task)
    plots: bool = True
    label: Optional[str] = None        # name of the run in reports (default: the method's label)
    force: bool = False                # a new run may go into a non-empty folder (gift_fast.run_folder)
    # experiment tracking and the paper's curves (gift_fast.tracking); they do not change the numbers
    report_to: str = "none"            # none | tensorboard | wandb | all (open_clip's --report-to)
    name: Optional[str] = None         # the run's name in TensorBoard / W&B (default: the run folder's name)
    track: Optional[List[str]] = None  # tasks whose test loss / accuracy are logged during training (Fig. 5)
    track_every: int = 0               # steps between curve points (0: no curves; with track: log_every)

    def method_spec(self) -> MethodSpec:
        return resolve_method(self.method, cd=self.cd, ita=self.ita, awc=self.awc, consolidation=self.consolidation,
                              distill=self.distill, teacher=self.teacher)

    def generator_config(self):
        """The on-the-fly Stable Diffusion generator's ``GeneratorConfig`` (the one ``gift-fast synth`` uses)."""
        from gift_fast.synth.generators import GeneratorConfig

        return GeneratorConfig(**{g: getattr(self, t) for g, t in SD_FIELDS.items()})

    def compiles(self, device: torch.device) -> bool:
        """``compile`` resolved: None compiles on CUDA (the faster measured step, bench/RESULTS.md run 2), not on the CPU."""
        return bool(self.compile) if self.compile is not None else torch.device(device).type == "cuda"


# GeneratorConfig field -> TrainConfig field (the CLI's --sd-* options of both commands)
SD_FIELDS = {"model": "sd_model", "steps": "sd_steps", "batch_size": "synth_batch_size", "compile": "sd_compile",
             "compile_mode": "sd_compile_mode", "channels_last": "sd_channels_last", "fuse_qkv": "sd_fused_qkv",
             "attention": "sd_attention", "sdpa_backend": "sd_sdpa_backend", "safety_checker": "sd_safety_checker"}


# Fields that do not change a run's numbers (may differ between a run and its resume).
_RESUME_FREE = {"out", "resume", "progress", "device", "compile", "kernels", "threads", "num_workers",
                "eval_batch_size", "log_every", "keep_checkpoints", "plots", "label", "keep_synth",
                "synth_batch_size", "data_cache", "checkpoint_every", "report_to", "name", "track", "track_every",
                "sd_compile", "sd_compile_mode", "sd_channels_last", "sd_fused_qkv", "sd_attention", "sd_sdpa_backend",
                "force"}
# Fields added after runs were written, with the value those runs used: left out of the identity at that
# value, so a run folder written before resumes (its identity has no such key).
_ADDED_WITH = {"sd_safety_checker": True}


def identity_of(cfg: TrainConfig) -> Dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(cfg).items()
            if k not in _RESUME_FREE and not (k in _ADDED_WITH and v == _ADDED_WITH[k])}


def _derived_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


STREAM_TASK, STREAM_SYN, STREAM_FISHER = 1, 2, 3


# =============================================================================== batches
class _SeededItems(torch.utils.data.Dataset):
    """``dataset[i]`` under torch's RNG seeded by (seed, i): a random transform (the training crops) draws the
    same for an item of an epoch whatever the worker or the process, so a resumed run sees the same batches."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_derived_seed(self.seed, i))
            return self.dataset[i]


class TaskBatches:
    """An endless, seeded stream of ``(images, labels)`` training batches of one task on ``device``.

    Tensor data sets (the toy world) are indexed on the device; cached data sets
    (``gift_fast.data.cache``) use their uint8 fast path; anything else goes through
    a seeded DataLoader. Each epoch is a fresh permutation; the last partial batch
    of an epoch is dropped.
    """

    def __init__(self, dataset, batch_size: int, seed: int, device: torch.device, num_workers: int = 0,
                 start: int = 0, rows: slice = slice(None)):
        if dataset is None or len(dataset) == 0:
            raise ValueError("the task has no training data")
        if len(dataset) < batch_size:
            raise ValueError(f"the task has {len(dataset)} training images, fewer than one batch ({batch_size}): "
                             f"lower --batch-size")
        self.dataset, self.batch_size, self.seed, self.device = dataset, batch_size, seed, device
        self.num_workers = num_workers
        self.rows = rows          # this process's rows of each global batch (all of them with one process)
        # The stream is a function of (seed, batch index) only: a run resumed at step k skips k batches
        # (index-only for tensor data sets; the other paths draw and drop them) and sees the same batches.
        self.start = int(start)
        self._it = self._make()
        if getattr(dataset, "tensors", None) is None:
            for _ in range(self.start):
                next(self._it)

    def _perms(self) -> Iterator[torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed)
        n = len(self.dataset)
        skip = self.start
        while True:
            perm = torch.randperm(n, generator=g)
            for a in range(0, n - self.batch_size + 1, self.batch_size):
                if skip > 0:
                    skip -= 1
                    continue
                yield perm[a:a + self.batch_size]

    def _make(self):
        tensors = getattr(self.dataset, "tensors", None)
        if tensors is not None:
            images, labels = (t.to(self.device) for t in tensors[:2])
            for idx in self._perms():
                idx = idx[self.rows].to(self.device)
                yield images[idx], labels[idx]
        elif hasattr(self.dataset, "iter_batches"):
            yield from self.dataset.iter_batches(self.batch_size, shuffle=True, seed=self.seed, drop_last=True,
                                                 epochs=None, device=self.device, rows=self.rows)
        else:
            epoch = 0
            while True:
                g = torch.Generator().manual_seed(_derived_seed(self.seed, epoch))
                loader = torch.utils.data.DataLoader(
                    _SeededItems(self.dataset, _derived_seed(self.seed, epoch, 1)), batch_size=self.batch_size,
                    shuffle=True, drop_last=True, generator=g,
                    num_workers=self.num_workers, pin_memory=self.device.type == "cuda",
                    persistent_workers=False)
                for x, y in loader:     # (several processes: each decodes the global batch and keeps its rows)
                    x, y = x[self.rows], torch.as_tensor(y)[self.rows]
                    yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                epoch += 1

    def __next__(self):
        return next(self._it)

    def __iter__(self):
        return self

    def close(self):
        self._it.close()


def synthetic_indices(n: int, batch_size: int, steps: int, seed: int) -> torch.Tensor:
    """[steps, batch] indices into a synthetic set of n pairs: epochs of seeded permutations.

    A set smaller than a batch is drawn with replacement.
    """
    g = torch.Generator().manual_seed(seed)
    if n < batch_size:
        return torch.randint(0, n, (steps, batch_size), generator=g)
    rows, need = [], steps * batch_size
    while sum(r.numel() for r in rows) < need:
        perm = torch.randperm(n, generator=g)
        rows.append(perm[: n - n % batch_size])
    return torch.cat(rows)[:need].view(steps, batch_size)


# =============================================================================== teacher
@torch.no_grad()
def mix_state(initial: Dict[str, torch.Tensor], last: Dict[str, torch.Tensor], alpha: float) -> Dict[str, torch.Tensor]:
    """WiSE: ``alpha * initial + (1 - alpha) * last`` for floating tensors (others from ``last``)."""
    out = {}
    for k, v in last.items():
        if v.is_floating_point():
            out[k] = alpha * initial[k].to(v.device, v.dtype) + (1.0 - alpha) * v
        else:
            out[k] = v
    return out


@torch.no_grad()
def embed_distill_set(model, distill_set, tokens: torch.Tensor, *, mean, std, device: torch.device,
                      bf16: bool = False, batch_size: int = 256) -> Tuple[torch.Tensor, torch.Tensor]:
    """Image embeddings of every pair [N, D] and text embeddings of every distinct prompt [P, D] (float32)."""
    from gift_fast.evaluate import autocast
    from gift_fast.text import encode_text

    was_training = model.training
    model.eval()
    try:
        imgs, txts = [], []
        for a in range(0, len(distill_set), batch_size):
            x = normalize_batch(distill_set.images[a:a + batch_size].to(device), mean, std)
            with autocast(device, bf16):
                imgs.append(model.encode_image(x).float())
        for a in range(0, tokens.shape[0], batch_size):
            with autocast(device, bf16):
                txts.append(encode_text(model, tokens[a:a + batch_size].to(device)).float())
    finally:
        model.train(was_training)
    return torch.cat(imgs), torch.cat(txts)


def normalize_batch(x_uint8: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.tensor(mean, device=x_uint8.device, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x_uint8.device, dtype=torch.float32).view(1, 3, 1, 1)
    return (x_uint8.float() / 255.0 - m) / s


# =============================================================================== run folder
def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def write_json(path: Path, obj) -> None:
    from gift_fast.models import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def write_acc_csv(path: Path, task_names: Sequence[str], zero_shot: Sequence[float],
                  rows: Sequence[Sequence[float]]) -> None:
    from gift_fast.models import atomic_write_text

    lines = ["after," + ",".join(task_names), "zero-shot," + ",".join(f"{v:.4f}" for v in zero_shot)]
    for name, row in zip(task_names, rows):
        lines.append(f"{name}," + ",".join(f"{v:.4f}" for v in row))
    atomic_write_text(path, "\n".join(lines) + "\n")


def _versions() -> Dict[str, str]:
    import platform

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("open_clip", "triton"):
        try:
            out[pkg] = __import__(pkg).__version__
        except Exception:
            pass
    return out


# =============================================================================== the run
class ContinualTrainer:
    """One continual run: a model, a task sequence, a method, a run folder.

    ``bundle`` (a ``gift_fast.models.ClipBundle``) and ``tasks`` (``TaskSpec`` list) may
    be given directly (tests, notebooks); otherwise they are built from ``cfg``. ``dist``:
    this process's place among several (default: the initialized process group, if any).
    """

    def __init__(self, cfg: TrainConfig, *, tasks=None, bundle=None, generator=None,
                 dist: Optional[DistContext] = None):
        from gift_fast.distributed import current

        from gift_fast.validation import check_train_config

        self.cfg = cfg
        self.dist = dist if dist is not None else current()
        check_train_config(cfg, self.dist.world_size)      # every option, before any work
        self.method = cfg.method_spec()
        if cfg.keep_checkpoints not in ("all", "last"):
            raise ValueError(f"keep_checkpoints must be 'all' or 'last', got {cfg.keep_checkpoints!r}")
        if cfg.kernels not in ("torch", "triton", "auto"):
            raise ValueError(f"--kernels must be torch, triton or auto, got {cfg.kernels!r}")
        if cfg.steps <= 0 or cfg.batch_size <= 0 or cfg.syn_batch_size <= 0:
            raise ValueError("steps, batch_size and syn_batch_size must be positive")
        for name, b in (("--batch-size", cfg.batch_size), ("--syn-batch-size", cfg.syn_batch_size)):
            if b % self.dist.world_size:
                raise ValueError(f"{name} {b} is the global batch and must split evenly over the "
                                 f"{self.dist.world_size} processes: use a multiple of {self.dist.world_size}")
        self.device = resolve_device(cfg.device, self.dist)
        if cfg.bf16 and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError("--bf16 needs a GPU with bfloat16 support")
        self.out = Path(cfg.out)
        if bundle is None and tasks is None:
            from gift_fast.preflight import check_train

            check_train(cfg)    # data, synthetic folder, disk, weights: before any model is loaded
        self._check_synthetic_source()
        self._lock, self._created_out, self._state, self._pointer = None, False, None, None
        try:
            self._prepare_folder()       # the run folder is checked, claimed and locked before any work
            self._setup(cfg, tasks, bundle, generator)
        except BaseException:
            self._release()
            if self.dist.is_main:         # a command that fails before any work leaves no folder behind
                from gift_fast.run_folder import remove_own_files

                remove_own_files(self.out, self._created_out)
            raise

    def _setup(self, cfg: TrainConfig, tasks, bundle, generator) -> None:
        from gift_fast.distributed import main_first

        with main_first(self.dist):      # several processes: rank 0 builds the caches, the others read them
            self.bundle = bundle if bundle is not None else load_bundle(cfg, self.device)
            self.bundle.model.to(self.device)
            # MTIL's seeded splits are recorded in the run folder (and compared on resume)
            self.tasks = tasks if tasks is not None else build_task_list(
                cfg, self.bundle, split_record_dir=str(self.out) if self.dist.is_main else None)
        if not self.tasks:
            raise ValueError("the task sequence is empty")
        self._check_synthetic_folders()
        self._synthetic_record = self._record_synthetic()
        self.generator = generator
        self.task_names = [t.name for t in self.tasks]
        if len(set(self.task_names)) != len(self.task_names):
            raise ValueError(f"task names must be unique, got {self.task_names}")
        self.model = self.bundle.model
        self.model.logit_scale.requires_grad_(False)
        self.logit_scale = float(self.model.logit_scale.detach().exp())
        self.initial_state = None
        kind, _ = parse_teacher(self.method.teacher)
        if kind != "last" and self.method.distills:
            self.initial_state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        self.awc = None
        if self.method.consolidation != "none":
            from gift_fast.awc import AdaptiveWeightConsolidation

            awc_backend = self.cfg.kernels
            self.awc = AdaptiveWeightConsolidation(
                self.model.named_parameters(), strength=cfg.l2, decay=cfg.awc_decay,
                fisher=self.method.consolidation, exclude=("logit_scale",), backend=awc_backend)
        if cfg.compiles(self.device):
            from gift_fast.step import compile_blocks

            compile_blocks(self.model, dynamic=None)
        self.log_path = self.out / "log.jsonl"
        if (self.method.needs_synthetic and cfg.synth == "on-the-fly" and not cfg.reference_images
                and (self._state is None or self._state["finished"] < len(self.tasks))):
            self._get_generator()         # a missing Stable Diffusion model fails now, not after the zero-shot row
        from gift_fast.tracking import RunHooks

        self.hooks = RunHooks(self)      # TensorBoard / W&B and the --track curves (rank 0 writes)

    # ------------------------------------------------------------------ the run folder (gift_fast.run_folder)
    def _prepare_folder(self) -> None:
        """New run: the folder must be new, empty, a run that never finished a task, or --force'd (and then
        hold none of the run's names). Resume: the state, checkpoints and pointer must be sound. Rank 0 takes
        the lock; every process reads the same folder and reaches the same decision."""
        from gift_fast import run_folder as rf

        cfg, out = self.cfg, self.out
        state = rf.read_state(out) if out.is_dir() else None
        if state is not None and not cfg.resume and not rf.restartable(out, state):
            raise FileExistsError(
                f"{out} already holds a run ({state.get('finished', 0)} of {len(state.get('tasks', []))} tasks "
                f"finished): pass --resume to continue it, or choose another --out")
        restart = False
        if state is not None and rf.restartable(out, state):
            # nothing finished and no in-task checkpoint: resume only if the options are the same, else restart
            same = state.get("identity") == json.loads(json.dumps(identity_of(cfg), default=str))
            restart = not (cfg.resume and same)
        if state is None and cfg.resume and (out / "checkpoints" / "in_task.json").is_file():
            # a pointer without a state (the state is written before any step): check it before anything else
            rf.read_in_task_pointer(out, steps=cfg.steps)
        if state is None or restart:
            rf.check_new_folder(out, force=cfg.force)
        self.dist.barrier()              # every process has decided on the folder before rank 0 writes to it
        if self.dist.is_main:
            self._created_out = rf.mark(out)
            self._lock = rf.RunLock(out).acquire()
            if restart:
                self._note(f"{out}: restarting a run that failed before its first task")
                rf.clear_for_restart(out)
        self.dist.barrier()
        self._state = None if restart else state
        self._pointer = None
        if self._state is not None:
            rf.verify_task_checkpoints(out, self._state)
            ptr = rf.read_in_task_pointer(out) if self._state["finished"] < len(self._state["tasks"]) else None
            if ptr is not None and ptr["task_index"] == self._state["finished"]:
                if not 0 < ptr["step"] < cfg.steps:
                    raise ValueError(f"cannot resume {out}: its in-task checkpoint is at step {ptr['step']} of task "
                                     f"{ptr['task_index'] + 1}, but a task now has {cfg.steps} steps")
                self._pointer = ptr
        elif cfg.resume and (out / "checkpoints" / "in_task.json").is_file():
            self._pointer = rf.read_in_task_pointer(out, steps=cfg.steps)

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _record_synthetic(self) -> Optional[Dict[str, Any]]:
        """Fingerprints of the synthetic folders the run reads (a `gift-fast synth` folder), checked on resume."""
        from gift_fast.run_folder import compare_synthetic, synthetic_fingerprint

        cfg = self.cfg
        if not self.method.needs_synthetic or cfg.reference_images or cfg.synth in (None, "on-the-fly"):
            return None
        record = {t.name: synthetic_fingerprint(cfg.synth, t.name) for t in self.tasks}
        old = (self._state or {}).get("synthetic_fingerprints")
        if old is not None:
            compare_synthetic(old, record, cfg.synth, self._state_path())
        return record

    # ------------------------------------------------------------------ setup helpers
    def _check_synthetic_source(self) -> None:
        cfg, m = self.cfg, self.method
        if not m.needs_synthetic:
            return
        if cfg.reference_images:
            if not os.path.isdir(cfg.reference_images):
                raise FileNotFoundError(f"--reference-images {cfg.reference_images} is not a folder")
            return
        if cfg.synth is None:
            raise ValueError(f"method {m.label()!r} distills on synthetic data: pass --synth DIR (a `gift-fast synth` "
                             f"folder), --synth on-the-fly, or --reference-images DIR")
        if cfg.synth != "on-the-fly" and not os.path.isdir(cfg.synth):
            raise FileNotFoundError(f"--synth {cfg.synth}: no such folder. Generate it with `gift-fast synth --out "
                                    f"{cfg.synth} ...` or use --synth on-the-fly")
        if cfg.synth == "on-the-fly" and cfg.generator not in ("sd", "toy"):
            raise ValueError(f"--generator must be sd or toy, got {cfg.generator!r}")

    def _check_synthetic_folders(self) -> None:
        """Every task's folder must be there before the first step (not hours later, at task 7)."""
        cfg = self.cfg
        if not self.method.needs_synthetic or cfg.reference_images or cfg.synth in (None, "on-the-fly"):
            return
        missing = [t.name for t in self.tasks
                   if not (Path(cfg.synth) / f"{t.name}_Syn" / "image_text.csv").is_file()]
        if missing:
            raise FileNotFoundError(
                f"no synthetic folder for task(s) {missing} under {cfg.synth} (expected <Task>_Syn/image_text.csv): "
                f"generate them with `gift-fast synth --out {cfg.synth} ...`, or train with --synth on-the-fly")

    def _synth_seed(self) -> int:
        return self.cfg.seed if self.cfg.synth_seed is None else self.cfg.synth_seed

    def _get_generator(self):
        if self.generator is None:
            if self.cfg.generator == "toy":
                from gift_fast.data.toy import ToyGenerator

                self.generator = ToyGenerator()
            else:
                from gift_fast.preflight import check_sd_model
                from gift_fast.synth.generators import StableDiffusionGenerator

                gen_cfg = self.cfg.generator_config().resolve(self.device)
                self._note(f"on-the-fly generator: {gen_cfg.model}, {gen_cfg.steps} steps | {gen_cfg.summary()}")
                self.generator = StableDiffusionGenerator.from_config(
                    gen_cfg, device=self.device, local_files_only=check_sd_model(gen_cfg.model))
        return self.generator

    def _synth_batch_size(self) -> int:
        if self.cfg.synth_batch_size is not None:
            return self.cfg.synth_batch_size
        if self.cfg.generator == "toy":
            return 16
        return self.cfg.generator_config().resolve(self.device).batch_size

    def _base_classnames(self) -> List[str]:
        if self.cfg.toy or getattr(self.generator, "name", "") == "toy":
            from gift_fast.data.toy import BASE_CLASSNAMES

            return list(BASE_CLASSNAMES)
        from gift_fast.synth.prompts import imagenet_classnames

        return imagenet_classnames()

    def distill_set(self, t: int):
        """The distillation set of task ``t`` (None when the method does not distill)."""
        from gift_fast.data.synthetic import load_reference_set, load_synthetic_set

        cfg, task = self.cfg, self.tasks[t]
        if not self.method.needs_synthetic:
            return None
        size = self.bundle.image_size
        if cfg.reference_images:
            return load_reference_set(cfg.reference_images, cfg.images_per_task, seed=self._synth_seed(),
                                      task_index=t, image_size=size, progress=self._progress)
        from gift_fast.synth.engine import sequence_sources
        from gift_fast.synth.prompts import sequence_prompts

        # The synth engine's pool (one rule for both): base names and every earlier task's names, each
        # entry templated with its own data set's first template.
        # A task may name another pool template in its meta (the CIL steps do).
        base, sources = sequence_sources([(x.name, x.classnames, x.meta.get("pool_template") or x.templates[0])
                                          for x in self.tasks], base_classnames=self._base_classnames())
        if cfg.synth == "on-the-fly":
            from gift_fast.synth.engine import synthesize_task

            gen = self._get_generator()
            prompts = sequence_prompts(base, sources, cfg.images_per_task, seed=self._synth_seed())[t]
            root = self.out / "synthetic"
            if self.dist.is_main:          # writes (and later deletes) only a folder it created and marked
                from gift_fast.run_folder import claim_synthetic_folder

                claim_synthetic_folder(root / f"{task.name}_Syn")
            self.dist.barrier()
            fmt = "png" if getattr(gen, "name", "") == "toy" else "jpeg"
            # each process generates its share (the engine's rank sharding); rank 0 writes the index
            synthesize_task(gen, task.name, prompts, root, seed=self._synth_seed(), task_index=t,
                            batch_size=self._synth_batch_size(), progress=self._progress, image_format=fmt,
                            overwrite=True, rank=self.dist.rank, world_size=self.dist.world_size)
            self.dist.barrier()          # the index is complete before anyone reads it
            return load_synthetic_set(root, task.name, image_size=size, progress=self._progress)
        return load_synthetic_set(cfg.synth, task.name, image_size=size, limit=cfg.images_per_task,
                                  progress=self._progress, sequence=[x.name for x in self.tasks],
                                  pool_sources=[(s.name, s.prompts()) for s in [base] + sources[:t]])

    @property
    def _progress(self) -> bool:
        """Progress bars and notes: rank 0's only."""
        return self.cfg.progress and self.dist.is_main

    def _discard_synthetic(self, t: int) -> None:
        if self.cfg.synth == "on-the-fly" and not self.cfg.keep_synth and self.dist.is_main:
            from gift_fast.run_folder import discard_synthetic_folder

            discard_synthetic_folder(self.out / "synthetic" / f"{self.tasks[t].name}_Syn")

    def teacher_embeddings(self, distill_set, tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The teacher's embeddings of the task's fixed distillation set, computed once per task."""
        kind, alpha = parse_teacher(self.method.teacher)
        kw = dict(mean=self.bundle.mean, std=self.bundle.std, device=self.device, bf16=self.cfg.bf16)
        if kind == "last":
            return embed_distill_set(self.model, distill_set, tokens, **kw)   # the student, before any step
        # Another teacher: load its weights into the model for the embedding pass, then put the
        # student's back (in place, so compiled blocks and AWC's flat parameter buffers stay valid).
        current = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        initial = {k: v.to(current[k].device) for k, v in self.initial_state.items()}
        state = initial if kind == "initial" else mix_state(initial, current, alpha)
        try:
            self.model.load_state_dict(state)
            return embed_distill_set(self.model, distill_set, tokens, **kw)
        finally:
            self.model.load_state_dict(current)

    def make_step(self, lr: float):
        """The task's optimizer, schedule and ``GiftStep`` (gift_fast.step)."""
        from gift_fast.step import GiftStep, StepConfig

        cfg, m = self.cfg, self.method
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt_kw = dict(lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        if self.device.type == "cuda":
            opt_kw["fused"] = True          # one kernel for all parameters
        else:
            opt_kw["foreach"] = True        # fewer, larger ops (the tiny preset is overhead-bound)
        optimizer = torch.optim.AdamW(params, **opt_kw)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_lr_lambda(cfg.warmup, cfg.steps))
        step_cfg = StepConfig(logit_scale=self.logit_scale, label_smoothing=cfg.label_smoothing,
                              temperature=cfg.temperature, cd_weight=cfg.cd_weight if m.cd else 0.0,
                              ita_weight=cfg.ita_weight if m.ita else 0.0,
                              distill=_STEP_DISTILL[m.distill] if m.distills else "none", bf16=cfg.bf16,
                              kernels=cfg.kernels)
        return (GiftStep(self.model, optimizer, step_cfg, awc=self.awc, scheduler=scheduler, dist=self.dist),
                optimizer, scheduler)

    # ------------------------------------------------------------------ one task
    def train_task(self, t: int) -> Dict[str, Any]:
        from tqdm.auto import tqdm

        cfg, task, model = self.cfg, self.tasks[t], self.model
        torch.manual_seed(_derived_seed(cfg.seed, t, 0))
        lr = cfg.lr if cfg.lr is not None else task.lr
        from gift_fast.text import trim_tokens

        # prompts tokenized once per task, cut after their last end-of-text token (gift_fast.text: exact)
        tok = lambda texts: trim_tokens(model, self.bundle.tokenizer(texts))  # noqa: E731
        class_tokens = tok(task.prompts()).to(self.device)
        dset = self.distill_set(t)
        syn = None
        if dset is not None:
            syn_tokens = tok(dset.prompts).to(self.device)
            t_img, t_txt = self.teacher_embeddings(dset, syn_tokens)
            syn = dict(images=dset.images.to(self.device), labels=dset.labels.to(self.device), tokens=syn_tokens,
                       t_img=t_img, t_txt=t_txt,
                       idx=synthetic_indices(len(dset), cfg.syn_batch_size, cfg.steps,
                                             _derived_seed(cfg.seed, t, STREAM_SYN)).to(self.device))
        if self.awc is not None:
            self.awc.set_anchor()          # theta* = the weights at the start of the task (= the last teacher)
            self.awc.reset_fisher()
        step, optimizer, scheduler = self.make_step(lr)
        # in-task resume: the model, optimizer, schedule, AWC and RNG state after step k0 of this task
        k0 = self._load_in_task(t, optimizer, scheduler)
        if self.method.consolidation == "static" and k0 == 0:
            self._static_fisher(step, syn, t)
        rows, syn_rows = self.dist.rows(cfg.batch_size), self.dist.rows(cfg.syn_batch_size)
        batches = TaskBatches(task.train, cfg.batch_size, _derived_seed(cfg.seed, t, STREAM_TASK), self.device,
                              cfg.num_workers, start=k0, rows=rows)
        model.train()
        sums: Dict[str, torch.Tensor] = {}
        n_acc, t_last, k_last = 0, time.perf_counter(), 0
        t0 = time.perf_counter()
        bar = tqdm(range(k0, cfg.steps), desc=f"task {t + 1}/{len(self.tasks)} {task.name}",
                   disable=not self._progress, leave=False, initial=k0, total=cfg.steps)
        n_acc, k_last = 0, k0
        self.hooks.on_task_start(t, k0, syn)
        try:
            for k in bar:
                images, labels = next(batches)
                if syn is not None:
                    i = syn["idx"][k]                 # the global synthetic batch
                    kk = syn["labels"][i]
                    il = i[syn_rows]                  # this process's rows (the loss gathers the rest)
                    out = step(images, labels, class_tokens,
                               normalize_batch(syn["images"][il], self.bundle.mean, self.bundle.std),
                               syn["tokens"][kk[syn_rows]], kk, syn["t_img"][i], syn["t_txt"][kk])
                else:
                    out = step(images, labels, class_tokens)
                for name, v in out.items():
                    v = v.detach().float()
                    sums[name] = sums[name] + v if name in sums else v
                n_acc += 1
                if self.hooks.tracks(k):          # --track-every K: the curve points (off: no host sync here)
                    self.hooks.on_track(t, k, out, syn)
                if (k + 1) % cfg.log_every == 0 or k + 1 == cfg.steps:
                    self._check_finite_weights(t, k)     # the last step too: a NaN there is no finished run
                    now = time.perf_counter()
                    rec = self._log_record(t, k, sums, n_acc, optimizer, now - t_last, k + 1 - k_last)
                    bar.set_postfix({n: f"{v:.3f}" for n, v in rec.items() if n.startswith("loss")})
                    sums, n_acc, t_last, k_last = {}, 0, now, k + 1
                if (cfg.checkpoint_every > 0 and (k + 1) % cfg.checkpoint_every == 0 and k + 1 < cfg.steps
                        and self.dist.is_main):
                    self._save_in_task(t, k + 1, optimizer, scheduler)
        finally:
            batches.close()
            bar.close()
        wall = time.perf_counter() - t0
        self._discard_synthetic(t)
        return {"task": task.name, "steps": cfg.steps, "lr": lr, "wall_s": wall,
                "synthetic": None if dset is None else {"pairs": len(dset), "prompts": len(dset.prompts),
                                                        "dropped_black": dset.dropped_black,
                                                        "source": dset.source}}

    def _static_fisher(self, step, syn, t: int) -> None:
        """EWC-V: F = running mean of g^2 / mean(g^2) over ``fisher_batches`` synthetic batches of L_kd.

        The gradients are cleared before each batch and after the last (the authors' static-Fisher loop stops
        clearing them once its estimate ends, so later steps add up old gradients: docs/METHOD.md, "Defects")."""
        from gift_fast.evaluate import autocast
        from gift_fast.step import distillation_loss

        idx_all = synthetic_indices(len(syn["images"]), self.cfg.syn_batch_size, self.cfg.fisher_batches,
                                    _derived_seed(self.cfg.seed, t, STREAM_FISHER)).to(self.device)
        rows = self.dist.rows(self.cfg.syn_batch_size)
        for i in idx_all:
            step.zero_grad()
            kk = syn["labels"][i]
            with autocast(self.device, step.cfg.bf16):
                loss = distillation_loss(self.model, normalize_batch(syn["images"][i[rows]], self.bundle.mean,
                                                                     self.bundle.std),
                                         syn["tokens"][kk[rows]], kk, syn["t_img"][i], syn["t_txt"][kk], step.cfg,
                                         self.dist)
            loss.backward()
            step.reduce_grads(average=False)      # the Fisher of the global batch, as in the steps
            self.awc.update_fisher()
        step.zero_grad()

    def _check_finite_weights(self, t: int, k: int) -> None:
        """The NaN guard on the weights (one host sync): a step can leave finite losses but NaN weights."""
        params = [p for p in self.model.parameters() if p.is_floating_point()]
        if bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
            return
        bad = [n for n, p in self.model.named_parameters() if not bool(torch.isfinite(p).all())]
        raise FloatingPointError(
            f"non-finite weights in task {t + 1} ({self.tasks[t].name}) after step {k + 1}: {bad[:3]}. "
            f"Lower the learning rate (--lr) or check the data; with --bf16, try without it")

    def _log_record(self, t, k, sums, n, optimizer, dt, dk) -> Dict[str, Any]:
        if self.dist.enabled:            # the mean over processes (L_ce is per shard; the others agree anyway)
            from gift_fast.distributed import all_reduce_tensors_

            names = sorted(sums)
            packed = torch.stack([sums[name] for name in names])
            all_reduce_tensors_([packed], self.dist, average=True)
            sums = dict(zip(names, packed.unbind()))
        vals = {name: float(v) / n for name, v in sums.items()}     # the one host sync per logging step
        bad = {name: v for name, v in vals.items() if not math.isfinite(v)}
        if bad:
            raise FloatingPointError(
                f"non-finite loss in task {t + 1} ({self.tasks[t].name}) before step {k + 1}: {bad}. "
                f"Lower the learning rate (--lr) or check the data; with --bf16, try without it")
        per_step = self.cfg.batch_size + (self.cfg.syn_batch_size if self.method.distills else 0)
        rec = {"task": self.tasks[t].name, "task_index": t, "step": k + 1,
               "lr": optimizer.param_groups[0]["lr"], **vals,
               "steps_per_s": dk / dt if dt > 0 else None,
               "images_per_s": dk * per_step / dt if dt > 0 else None, "time": time.time()}
        if self.dist.is_main:
            from gift_fast.models import append_text_line

            append_text_line(self.log_path, json.dumps(rec))
        self.hooks.on_log(rec)
        return rec

    # ------------------------------------------------------------------ evaluation and state
    def evaluate_all(self) -> List[float]:
        from gift_fast.evaluate import evaluate_tasks

        return evaluate_tasks(self.model, self.bundle.tokenizer, self.tasks, device=self.device, bf16=self.cfg.bf16,
                              batch_size=self.cfg.eval_batch_size, num_workers=self.cfg.num_workers,
                              progress=self._progress, dist=self.dist)

    def checkpoint_path(self, t: int) -> Path:
        return self.out / "checkpoints" / f"task_{t + 1:02d}_{self.tasks[t].name}.safetensors"

    def _state_path(self) -> Path:
        return self.out / "state.json"

    def _save_task(self, t: int, state: Dict[str, Any], info: Dict[str, Any]) -> None:
        from gift_fast.models import save_model

        path = self.checkpoint_path(t)
        state["finished"] = t + 1
        state["checkpoints"].append(str(path.relative_to(self.out)))
        state["tasks_info"].append(info)
        if not self.dist.is_main:        # rank 0 writes; the others keep the same state in memory
            return
        save_model(self.model, path, metadata={
            "model": self.bundle.model_name, "task_index": t, "task": self.tasks[t].name, "finished": True,
            "step": self.cfg.steps, "identity": hashlib.sha256(json.dumps(identity_of(self.cfg), sort_keys=True,
                                                                         default=str).encode()).hexdigest()})
        from gift_fast.run_folder import inside, sha256_file

        # the checksum goes into the file that points to the checkpoint (verified on resume and by eval)
        state.setdefault("checksums", {})[state["checkpoints"][-1]] = sha256_file(path)
        write_json(self._state_path(), state)
        if self.cfg.keep_checkpoints == "last":
            for rel in state["checkpoints"][:-1]:
                inside(self.out, rel, self._state_path(), "checkpoint").unlink(missing_ok=True)

    # ---- in-task checkpoints (--checkpoint-every K) --------------------------------------------
    # Files: checkpoints/in_task_<task>_<step>.safetensors (model.* and awc.* tensors) and .pt
    # (optimizer, schedule, RNG; torch.save of plain containers, loaded with weights_only=True),
    # then checkpoints/in_task.json, written last and atomically, names the pair: a kill at any
    # moment leaves either the previous complete pair or the new one. The teacher embeddings and
    # the anchor are not stored: they are recomputed from the task's starting weights (the last
    # finished task's checkpoint), exactly as the uninterrupted run computed them.
    def _in_task_pointer(self) -> Path:
        return self.out / "checkpoints" / "in_task.json"

    def _save_in_task(self, t: int, k: int, optimizer, scheduler) -> None:
        from gift_fast.models import atomic_save_safetensors, state_dict_fp32

        ckdir = self.out / "checkpoints"
        ckdir.mkdir(parents=True, exist_ok=True)
        stem = f"in_task_{t + 1:02d}_step{k:06d}"
        tensors = {f"model.{n}": v.detach().to("cpu").clone() for n, v in state_dict_fp32(self.model).items()}
        if self.awc is not None:
            tensors.update({f"awc.{n}": v.detach().to("cpu").clone() for n, v in self.awc.state_dict().items()})
        atomic_save_safetensors(tensors, ckdir / f"{stem}.safetensors",
                                metadata={"task_index": json.dumps(t), "step": json.dumps(k)})
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        rest = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng,
                "task_index": t, "step": k}
        tmp = ckdir / f"{stem}.pt.tmp{os.getpid()}"
        try:
            with open(tmp, "wb") as fh:
                torch.save(rest, fh)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as e:
            tmp.unlink(missing_ok=True)
            from gift_fast.models import write_error

            raise write_error(ckdir / f"{stem}.pt", e) from None
        os.replace(tmp, ckdir / f"{stem}.pt")
        from gift_fast.run_folder import IN_TASK_STEM, sha256_file

        old = self._read_in_task_pointer()
        sums = {ext: sha256_file(ckdir / f"{stem}{ext}") for ext in (".safetensors", ".pt")}
        write_json(self._in_task_pointer(), {"task_index": t, "task": self.tasks[t].name, "step": k, "stem": stem,
                                             "sha256": sums})
        old_stem = old.get("stem") if isinstance(old, dict) else None
        if isinstance(old_stem, str) and IN_TASK_STEM.match(old_stem) and old_stem != stem:
            for ext in (".safetensors", ".pt"):     # only a name of ours, inside checkpoints/
                (ckdir / f"{old_stem}{ext}").unlink(missing_ok=True)

    def _read_in_task_pointer(self) -> Optional[Dict[str, Any]]:
        p = self._in_task_pointer()
        if not p.is_file():
            return None
        try:
            with open(p) as fh:
                return json.load(fh)
        except (OSError, ValueError):
            return None                   # replaced by the pointer being written

    def _load_in_task(self, t: int, optimizer, scheduler) -> int:
        """Restore the in-task checkpoint of task ``t`` if ``--resume`` found one; the step to start at."""
        if not self.cfg.resume:
            return 0
        # the pointer was checked and its files verified (sha256) by _prepare_folder, before any work
        ptr = self._pointer
        if ptr is None or ptr.get("task_index") != t or ptr.get("task") != self.tasks[t].name:
            self._trim_log(t, 0)          # the task starts over: drop what a killed attempt logged
            return 0
        self._pointer = None              # used once
        from safetensors import safe_open
        from safetensors.torch import load_file

        from gift_fast.models import load_weights
        from gift_fast.run_folder import check_in_task_files

        k = int(ptr["step"])
        ckdir = self.out / "checkpoints"
        tensors = load_file(str(ckdir / f"{ptr['stem']}.safetensors"))
        with safe_open(str(ckdir / f"{ptr['stem']}.safetensors"), framework="pt") as fh:
            meta = fh.metadata() or {}
        rest = torch.load(ckdir / f"{ptr['stem']}.pt", map_location="cpu", weights_only=True)
        check_in_task_files(self._in_task_pointer(), ptr, meta, rest)
        load_weights(self.model, {n[len("model."):]: v for n, v in tensors.items() if n.startswith("model.")})
        if self.awc is not None:
            self.awc.load_state_dict({n[len("awc."):]: v for n, v in tensors.items() if n.startswith("awc.")})
        optimizer.load_state_dict(rest["optimizer"])
        scheduler.load_state_dict(rest["scheduler"])
        torch.set_rng_state(rest["rng"]["cpu"])
        if "cuda" in rest["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(rest["rng"]["cuda"], self.device)
        self._trim_log(t, k)
        self._note(f"resuming task {t + 1} ({self.tasks[t].name}) after step {k} of {self.cfg.steps}")
        return k

    def _trim_log(self, t: int, k: int) -> None:
        """Drop log records written after the checkpoint (the resumed run writes them again)."""
        if not self.dist.is_main or not self.log_path.is_file():
            return
        from gift_fast.models import atomic_write_text

        keep = []
        with open(self.log_path) as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:      # a line cut by the kill
                    continue
                if rec.get("task_index", -1) > t or (rec.get("task_index") == t and rec.get("step", 0) > k):
                    continue
                keep.append(line if line.endswith("\n") else line + "\n")
        atomic_write_text(self.log_path, "".join(keep))

    def _clear_in_task(self) -> None:
        """Remove the in-task checkpoint once its task is finished (the task checkpoint supersedes it)."""
        if not self.dist.is_main:
            return
        self._in_task_pointer().unlink(missing_ok=True)
        for f in (self.out / "checkpoints").glob("in_task_*"):
            f.unlink(missing_ok=True)
    # ---- end of in-task checkpoints --------------------------------------------------------------

    def _check_resumable(self, state: Dict[str, Any]) -> None:
        old = state.get("identity", {})
        new = json.loads(json.dumps(identity_of(self.cfg), default=str))
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if diff:
            raise ValueError(f"cannot resume {self.out}: the run was started with other settings "
                             f"({', '.join(f'{k}: {old.get(k)!r} -> {new.get(k)!r}' for k in diff)}). "
                             f"Resume with the same options, or choose another --out")
        if state.get("tasks") != self.task_names:
            raise ValueError(f"cannot resume {self.out}: its tasks were {state.get('tasks')}, now {self.task_names}")

    # ------------------------------------------------------------------ the whole run
    def run(self) -> Dict[str, Any]:
        try:
            return self._run()
        finally:
            self._release()

    def _run(self) -> Dict[str, Any]:
        cfg = self.cfg
        state = self._state              # read, checked and verified by _prepare_folder
        self.dist.barrier()              # every process has read the folder before rank 0 writes to it
        main = self.dist.is_main
        self.out.mkdir(parents=True, exist_ok=True)
        if state is not None:
            self._check_resumable(state)
            if state["finished"] > 0:
                from gift_fast.models import load_weights
                from gift_fast.run_folder import inside

                load_weights(self.model, inside(self.out, state["checkpoints"][-1], self._state_path(), "checkpoint"))
            self._note(f"resuming {self.out} after task {state['finished']} of {len(self.tasks)}")
        else:
            if main:
                if self.log_path.exists():
                    self.log_path.unlink()
                self.log_path.touch()
            config = {
                "config": dataclasses.asdict(cfg), "method": dataclasses.asdict(self.method),
                "label": cfg.label or self.method.label(), "tasks": self.task_names,
                "task_lrs": [cfg.lr if cfg.lr is not None else t.lr for t in self.tasks],
                "model": {"name": self.bundle.model_name, "pretrained": self.bundle.pretrained,
                          "logit_scale": self.logit_scale, "image_size": self.bundle.image_size,
                          "activation": self.bundle.info.get("activation")},
                "device": str(self.device), "processes": self.dist.world_size, "versions": _versions()}
            if main:
                write_json(self.out / "config.json", config)
            self._note(f"model {self.bundle.model_name} ({self.bundle.pretrained}), activation "
                       f"{self.bundle.info.get('activation')}, {len(self.tasks)} tasks, method {config['label']}")
            zero_shot = self.evaluate_all()
            self.hooks.on_eval(-1, zero_shot)
            state = {"tasks": self.task_names, "identity": identity_of(cfg), "zero_shot": zero_shot, "acc": [],
                     "finished": 0, "checkpoints": [], "checksums": {}, "tasks_info": []}
            if self._synthetic_record is not None:
                state["synthetic_fingerprints"] = self._synthetic_record
            if main:
                write_json(self._state_path(), state)
            self._write_results(state)
        for t in range(state["finished"], len(self.tasks)):
            info = self.train_task(t)
            row = self.evaluate_all()
            self.hooks.on_eval(t, row)
            state["acc"].append(row)
            info["acc"] = row
            self._save_task(t, state, info)
            self._clear_in_task()
            self._write_results(state)
            self._note(f"task {t + 1}/{len(self.tasks)} {self.tasks[t].name}: " +
                       " ".join(f"{n}={a:.1f}" for n, a in zip(self.task_names, row)))
        metrics = self._write_results(state)
        if cfg.plots and main:
            from gift_fast.report import plot_run

            try:
                plot_run(self.out)
            except Exception as e:   # a plotting problem must not cost a finished run
                self._note(f"plots skipped: {type(e).__name__}: {e}")
        self.hooks.on_end(metrics)
        return metrics

    def _write_results(self, state: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        from gift_fast.metrics import continual_metrics

        main = self.dist.is_main
        if main:
            write_acc_csv(self.out / "acc_matrix.csv", self.task_names, state["zero_shot"], state["acc"])
        if len(state["acc"]) < len(self.tasks):
            return None
        metrics = continual_metrics(state["acc"])
        zs = state["zero_shot"]
        metrics["zero_shot"] = continual_metrics([zs] * len(zs))
        metrics["tasks"] = self.task_names
        metrics["label"] = self.cfg.label or self.method.label()
        if main:
            write_json(self.out / "metrics.json", metrics)
        return metrics

    def _note(self, msg: str) -> None:
        if self._progress:
            print(msg, file=sys.stderr, flush=True)


# =============================================================================== builders
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
    from gift_fast.models import create_clip

    if cfg.pretrained is None:           # random weights: a function of the seed, so a resume rebuilds them
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_derived_seed(cfg.seed, 0x494E4954))
            return create_clip(cfg.model, None, device=device)
    return create_clip(cfg.model, cfg.pretrained, device=device)


def build_task_list(cfg: TrainConfig, bundle, split_record_dir: Optional[str] = None) -> list:
    """The TaskSpecs of the run: the toy world's (``cfg.toy`` or toy task names) or MTIL's.

    ``split_record_dir``: where MTIL's seeded splits are recorded (the run folder), or compared
    with the record already there (gift_fast.data.mtil.open_splits)."""
    from gift_fast.data.toy import DEFAULT_TOY_ORDER, TOY_TASKS, toy_tasks

    if cfg.toy or (cfg.tasks and all(n in TOY_TASKS for n in cfg.tasks)):

        names = cfg.tasks or list(DEFAULT_TOY_ORDER)
        return toy_tasks(names, train_size=cfg.toy_train_size, test_size=cfg.toy_test_size, seed=0,
                         lr=cfg.lr if cfg.lr is not None else 1e-3)
    from gift_fast.config import task_order

    if cfg.tasks:
        from gift_fast.config import MTIL_TASKS

        unknown = [n for n in cfg.tasks if n not in MTIL_TASKS]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; MTIL tasks: {', '.join(MTIL_TASKS)}; toy tasks: "
                             f"{', '.join(TOY_TASKS)}")
        names = list(cfg.tasks)
    else:
        names = task_order(cfg.order)
    if not cfg.data_root:
        raise ValueError("the MTIL tasks need --data-root DIR (see `gift-fast data check`), or use --preset tiny")
    from gift_fast.data.mtil import build_tasks

    return build_tasks(names, cfg.data_root, image_size=bundle.image_size, mean=bundle.mean, std=bundle.std,
                       cache_dir=cfg.data_cache, progress=cfg.progress, train_augment=cfg.train_augment,
                       split_record_dir=split_record_dir)


def train(cfg: TrainConfig, **kw) -> Dict[str, Any]:
    """Run (or resume) one continual run; returns its metrics (see ``gift_fast.metrics``)."""
    from gift_fast.validation import check_train_config

    check_train_config(cfg)              # before the thread count or anything else changes
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return ContinualTrainer(cfg, **kw).run()
    finally:
        torch.set_num_threads(threads)


# =============================================================================== presets and several runs
# The tiny preset: the toy world (gift_fast.data.toy) on a CPU, GIFT against continual
# fine-tuning over three seeds. Hyper-parameters are the paper's except where the toy
# scale needs its own (a tiny model learns at 1e-3, not 1e-5; 150 steps per task, 15 of
# them warm-up as the paper's 100 of 1,000; batches of 32; 200 synthetic images per task).
PRESETS: Dict[str, Dict[str, Any]] = {
    "tiny": dict(model="toy-vit", pretrained="toy", toy=True, order=None, steps=150, batch_size=32,
                 syn_batch_size=32, images_per_task=200, warmup=15, lr=1e-3, synth="on-the-fly", generator="toy",
                 eval_batch_size=500, log_every=50, device="cpu", threads=1, num_workers=0, toy_train_size=1000,
                 toy_test_size=300),
}
PRESET_RUNS: Dict[str, Dict[str, Any]] = {
    "tiny": dict(methods=("gift", "finetune"), seeds=(0, 1, 2), jobs=None),   # jobs None: min(2, CPUs)
}


def preset_config(name: str, /, **overrides) -> TrainConfig:
    """The TrainConfig of a preset with ``overrides`` applied (a None value sets None, e.g. pretrained=None)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    bad = [k for k in overrides if k not in fields]
    if bad:
        raise ValueError(f"unknown TrainConfig fields {bad}")
    kw = dict(PRESETS[name])
    kw.update(overrides)
    return TrainConfig(**kw)


def plan_runs(base: TrainConfig, methods: Sequence[str], seeds: Sequence[int]) -> List[TrainConfig]:
    """One config per (method, seed); with more than one run each gets ``<out>/<method>-seed<k>``."""
    methods, seeds = list(methods), list(seeds)
    if not methods or not seeds:
        raise ValueError("give at least one method and one seed")
    for m in methods:
        if m not in METHOD_DEFAULTS:
            raise ValueError(f"unknown method {m!r}: choose one of {', '.join(METHODS)}")
    if len(methods) * len(seeds) == 1:
        return [dataclasses.replace(base, method=methods[0], seed=seeds[0])]
    return [dataclasses.replace(base, method=m, seed=k, out=str(Path(base.out) / f"{m}-seed{k}"))
            for m in methods for k in seeds]


def _run_config(cfg_dict: Dict[str, Any]) -> Dict[str, Any]:
    """Entry point of a worker process (spawned): one run, metrics back."""
    return train(TrainConfig(**cfg_dict))


def _finished(cfg: TrainConfig) -> bool:
    p = Path(cfg.out) / "metrics.json"
    return p.is_file()


def run_many(cfgs: Sequence[TrainConfig], jobs: int = 1, progress: bool = True) -> List[Dict[str, Any]]:
    """Run several configs, ``jobs`` at a time in worker processes (1: in this process, in order).

    Runs already finished in their folder are skipped when ``resume`` is set. Shared
    inputs are prepared first (the toy CLIP's pre-training), so workers never race
    to build them. Under torchrun (an initialized process group) the runs go one after
    the other, each over all the processes.
    """
    from tqdm.auto import tqdm

    from gift_fast.distributed import current

    dist = current()
    if dist.enabled:
        jobs = 1                          # every process takes part in every run
        progress = progress and dist.is_main

    todo, results = [], [None] * len(cfgs)
    for i, c in enumerate(cfgs):
        if c.resume and _finished(c):
            with open(Path(c.out) / "metrics.json") as fh:
                results[i] = json.load(fh)
        else:
            todo.append(i)
    if any(cfgs[i].toy and cfgs[i].pretrained == "toy" for i in todo):
        from gift_fast.data.toy import pretrained_toy_clip_path

        from gift_fast.distributed import main_first

        with main_first(dist):            # one process builds it, the others then find it cached
            pretrained_toy_clip_path(cfgs[todo[0]].model, progress=progress)
    if jobs <= 1 or len(todo) <= 1:
        for i in todo:
            results[i] = train(cfgs[i])
            _say(cfgs[i], results[i], progress)
        return results
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
        futs = {pool.submit(_run_config, dataclasses.asdict(dataclasses.replace(cfgs[i], progress=False))): i
                for i in todo}
        bar = tqdm(total=len(todo), desc=f"runs ({jobs} at a time)", disable=not progress)
        for f in as_completed(futs):
            i = futs[f]
            results[i] = f.result()
            bar.update(1)
            _say(cfgs[i], results[i], progress, bar)
        bar.close()
    return results


def _say(cfg: TrainConfig, metrics: Dict[str, Any], progress: bool, bar=None) -> None:
    if not progress:
        return
    msg = (f"{cfg.out}: Transfer {metrics['transfer']:.1f}  Avg {metrics['avg']:.1f}  Last {metrics['last']:.1f}"
           if metrics.get("transfer") is not None else f"{cfg.out}: Avg {metrics['avg']:.1f}  Last {metrics['last']:.1f}")
    (bar.write if bar is not None else (lambda m: print(m, file=sys.stderr, flush=True)))(msg)


__all__ = ["TrainConfig", "MethodSpec", "resolve_method", "parse_teacher", "ContinualTrainer", "train",
           "PRESETS", "PRESET_RUNS", "preset_config", "plan_runs", "run_many",
           "cosine_lr_lambda", "synthetic_indices", "TaskBatches", "embed_distill_set", "mix_state", "METHODS"]
