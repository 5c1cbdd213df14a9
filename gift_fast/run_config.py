"""The configuration of a run: ``TrainConfig``, its identity, the presets, and ``--config FILE``.

``TrainConfig`` holds everything a run depends on (written to ``<out>/config.json``); ``identity_of`` is the part
that changes its numbers (recorded in ``state.json``; a resume must match it). ``consolidation_weight`` is the
strength of every weight consolidation kind (uniform L2, adaptive AWC, static EWC-V); its old name ``l2`` is still
accepted (``TrainConfig(l2=...)``, ``cfg.l2``, ``--l2``, and the identity of run folders written before).

``gift-fast train --config FILE`` reruns a run from its ``config.json``, or from the authors' JSON. Three formats
are read (``load_config_file``):

* **a run's own** ``<out>/config.json`` (written by ``gift-fast train``): its ``"config"`` object
  holds every ``TrainConfig`` field, so the rerun has the same identity (``identity_of``) and,
  on the same machine, the same numbers. Options given on the command line override the file;
  ``--out``, ``--resume``, ``--quiet`` and ``--no-plots`` always come from the command line.
* **a flat JSON object of TrainConfig fields** (``{"method": "l2", "steps": 500, ...}``): the
  fields given, the defaults for the rest.
* **the authors' format** (``configs/mtil_order_I.json`` / ``mtil_order_II.json`` of
  Luo-Jiaming/GIFT_CL, read by their ``scripts/run_exp.py``): keys mapped as in ``AUTHORS_KEYS``
  below. Keys that set something gift-fast does not do are refused by name; unknown keys
  are named in the error.

The result is the ``TrainConfig`` keyword arguments, with the method and seed apart (they are
``--method`` / ``--seeds`` on the command line).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from gift_fast.config import ORDERS, task_lr
from gift_fast.losses import DISTILL_MODES
from gift_fast.method import METHOD_DEFAULTS, MethodSpec, normalize_distill, resolve_method
from gift_fast.synth.generators import GeneratorConfig


# =============================================================================== the configuration of a run
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
    distill: str = "contrastive"       # gift_fast.losses.DISTILL_MODES (image-only / text-only are read as image_only...)
    teacher: str = "last"
    cd_weight: float = 1.0
    ita_weight: float = 0.25
    consolidation_weight: float = 1.0  # lambda_l2: strength of the (adaptive / uniform / static) consolidation (was l2)
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
    synth_seed_scheme: str = "hash"    # on-the-fly: hash | authors (their txt2img.py's prompt draws and image seeds)
    keep_synth: bool = False
    # optimisation (docs/METHOD.md, "The MTIL protocol")
    steps: int = 1000
    batch_size: int = 64
    syn_batch_size: int = 64
    warmup: int = 100
    lr: Optional[float] = None         # one learning rate for every task (None: each task's own, TaskSpec.lr)
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

    def __post_init__(self):
        if isinstance(self.distill, str) and normalize_distill(self.distill) in DISTILL_MODES:
            self.distill = normalize_distill(self.distill)     # the old spellings image-only / text-only

    @property
    def l2(self) -> float:
        """The old name of ``consolidation_weight``."""
        return self.consolidation_weight

    @l2.setter
    def l2(self, value: float) -> None:
        self.consolidation_weight = value

    def method_spec(self) -> MethodSpec:
        return resolve_method(self.method, cd=self.cd, ita=self.ita, awc=self.awc, consolidation=self.consolidation,
                              distill=self.distill, teacher=self.teacher)

    def generator_config(self) -> GeneratorConfig:
        """The on-the-fly Stable Diffusion generator's ``GeneratorConfig`` (the one ``gift-fast synth`` uses)."""
        return GeneratorConfig(**{g: getattr(self, t) for g, t in SD_FIELDS.items()})

    def compiles(self, device: torch.device) -> bool:
        """``compile`` resolved: None compiles on CUDA (the faster measured step, bench/RESULTS.md run 2), not on the CPU."""
        return bool(self.compile) if self.compile is not None else torch.device(device).type == "cuda"

    def task_lr(self, task) -> float:
        """The learning rate of ``task`` (a TaskSpec): ``lr`` when given, else the task's own (the MTIL rule of
        gift_fast.config.task_lr, the toy world's, a class-incremental benchmark's). The one place of the rule."""
        return self.lr if self.lr is not None else task.lr


# Old field names -> their names now (TrainConfig(l2=...), an old config.json, an old state.json identity).
RENAMED_FIELDS = {"l2": "consolidation_weight"}

_dataclass_init = TrainConfig.__init__


def _init_accepting_old_names(self, *args, **kw):
    for old, new in RENAMED_FIELDS.items():
        if old in kw:
            if new in kw:
                raise TypeError(f"TrainConfig: give {new} or its old name {old}, not both")
            kw[new] = kw.pop(old)
    _dataclass_init(self, *args, **kw)


_init_accepting_old_names.__doc__ = _dataclass_init.__doc__
TrainConfig.__init__ = _init_accepting_old_names


def upgrade_fields(fields: Dict[str, Any]) -> Dict[str, Any]:
    """TrainConfig fields as an older gift-fast wrote them (config.json's "config", state.json's "identity"),
    in today's names and spellings: ``l2`` -> ``consolidation_weight``, ``image-only`` -> ``image_only``."""
    out = {RENAMED_FIELDS.get(k, k): v for k, v in fields.items()}
    if isinstance(out.get("distill"), str) and normalize_distill(out["distill"]) in DISTILL_MODES:
        out["distill"] = normalize_distill(out["distill"])
    return out


# GeneratorConfig field -> TrainConfig field (the CLI's --sd-* options of both commands)
SD_FIELDS = {"model": "sd_model", "steps": "sd_steps", "batch_size": "synth_batch_size", "compile": "sd_compile",
             "compile_mode": "sd_compile_mode", "channels_last": "sd_channels_last", "fuse_qkv": "sd_fused_qkv",
             "attention": "sd_attention", "sdpa_backend": "sd_sdpa_backend", "safety_checker": "sd_safety_checker"}


# Fields that do not change a run's numbers (may differ between a run and its resume).
RESUME_FREE = frozenset({
    "out", "resume", "progress", "device", "compile", "kernels", "threads", "num_workers", "eval_batch_size",
    "log_every", "keep_checkpoints", "plots", "label", "keep_synth", "synth_batch_size", "data_cache",
    "checkpoint_every", "report_to", "name", "track", "track_every", "sd_compile", "sd_compile_mode",
    "sd_channels_last", "sd_fused_qkv", "sd_attention", "sd_sdpa_backend", "force"})
# Fields added after runs were written, with the value those runs used: left out of the identity at that
# value, so a run folder written before resumes (its identity has no such key).
_ADDED_WITH = {"sd_safety_checker": True, "synth_seed_scheme": "hash"}


def identity_of(cfg: TrainConfig) -> Dict[str, Any]:
    """The fields that change a run's numbers (state.json's "identity"; a resume must match it)."""
    return {k: v for k, v in dataclasses.asdict(cfg).items()
            if k not in RESUME_FREE and not (k in _ADDED_WITH and v == _ADDED_WITH[k])}


def identity_differences(recorded: Dict[str, Any], cfg: TrainConfig) -> List[str]:
    """``"field: old -> new"`` for each field of the identity ``recorded`` in a state.json (any gift-fast
    version: old names are read as today's) that ``cfg`` changes; empty when the run may resume."""
    old = upgrade_fields(recorded or {})
    new = json.loads(json.dumps(identity_of(cfg), default=str))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


# =============================================================================== presets
# The tiny preset: the toy world (gift_fast.toy) on a CPU, GIFT against continual
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
    overrides = {RENAMED_FIELDS.get(k, k): v for k, v in overrides.items()}
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    bad = [k for k in overrides if k not in fields]
    if bad:
        raise ValueError(f"unknown TrainConfig fields {bad}")
    kw = dict(PRESETS[name])
    kw.update(overrides)
    return TrainConfig(**kw)


# =============================================================================== --config FILE
# The authors' keys and what they become (scripts/run_exp.py and src/args.py of GIFT_CL).
AUTHORS_KEYS: Dict[str, str] = {
    "_comment": "ignored (a note)",
    "train": "must be true (gift-fast train trains)",
    "evaluate": "ignored (gift-fast evaluates every task after every task)",
    "zero-shot": "ignored (the zero-shot row is always measured)",
    "exp_no": "--name",
    "train_dataset": "--order 1 / --order 2 when it is an MTIL order, else --tasks",
    "eval_dataset": "must equal train_dataset (the run is evaluated on its own sequence)",
    "learning_rate": "--lr (one rate) or the per-task rule (5e-5 Aircraft / MNIST, 1e-5 otherwise); entries past "
                     "the last task are unused, as in run_exp.py",
    "iterations": "--steps",
    "label_smoothing": "--label-smoothing",
    "ita": "--ita-weight (0: --no-ita)",
    "L2": "--consolidation-weight (the strength of the weight consolidation; 0 and no awc: none)",
    "distill": "--cd-weight (0: --no-cd)",
    "train_loss": "must be cross_entropy",
    "devices": "ignored (GPUs: --device, or torchrun for several)",
    "ref_model": "--teacher: load -> last (the default), merge:R -> wise:R (R * initial + (1 - R) * last)",
    "ref_dataset": "ignored (the synthetic pairs come from --synth)",
    "awc": "adaptive weight consolidation (false with L2 > 0: the uniform L2 baseline)",
    "static_awc": "N > 0: the static Fisher (EWC-V) from N synthetic batches (--fisher-batches N)",
    "image_nums": "--images-per-task",
    "ablate_image_only": "--distill image-only",
    "ablate_text_only": "--distill text-only",
    "feature_mse": "--distill feature",
    "kl_div": "--distill kl",
    "save_path": "ignored (checkpoints go to --out)",
}
# The authors' switches gift-fast does not implement: refused when set.
AUTHORS_UNSUPPORTED = {"we": "weight ensembling (--we)", "pwe": "--pwe", "avg_freq": "weight ensembling's --avg_freq",
                       "dump": "--dump", "exclude_sun397": "exclude_sun397"}


def _train_fields() -> Dict[str, Any]:
    return {f.name: f for f in dataclasses.fields(TrainConfig)}


def load_config_file(path) -> Tuple[Dict[str, Any], Optional[str], Optional[int]]:
    """``(TrainConfig kwargs, method, seed)`` from ``path`` (module docstring); clear errors naming the file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--config {path}: no such file")
    try:
        with open(p) as fh:
            data = json.load(fh)
    except json.JSONDecodeError as e:
        raise ValueError(f"--config {path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a JSON object, got {type(data).__name__}")
    if "train_dataset" in data:
        kw = from_authors_config(data, source=str(path))
    else:
        kw = data["config"] if isinstance(data.get("config"), dict) else data
        kw = upgrade_fields(kw)             # a config.json written before a field was renamed
        fields = _train_fields()
        unknown = sorted(k for k in kw if k not in fields)
        if unknown:
            raise ValueError(f"--config {path}: unknown key(s) {', '.join(unknown)}; a gift-fast config holds "
                             f"TrainConfig fields ({', '.join(sorted(fields))}) or is the authors' format "
                             f"(with train_dataset)")
        kw = dict(kw)
    method = kw.pop("method", None)
    seed = kw.pop("seed", None)
    for k in ("out", "resume", "progress", "plots"):      # the command line's, always
        kw.pop(k, None)
    return kw, method, seed


def _float(v, key: str, source: str) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{source}: {key} must be a number, got {v!r}") from None


def _truthy(v) -> bool:
    if isinstance(v, str):
        return v.strip().lower() not in ("", "0", "false", "no", "none")
    return bool(v)


def from_authors_config(data: Dict[str, Any], source: str = "config") -> Dict[str, Any]:
    """TrainConfig kwargs (with ``method``) of one of the authors' experiment JSON files.

    Only what differs from gift-fast's defaults (the paper's settings) is set, so the authors'
    Order I file gives the same run identity as ``gift-fast train --order 1``."""
    unknown = sorted(k for k in data if k not in AUTHORS_KEYS and k not in AUTHORS_UNSUPPORTED)
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {', '.join(unknown)} in the authors' config format; known: "
                         f"{', '.join(sorted(AUTHORS_KEYS))}")
    unsupported = sorted(k for k in data if k in AUTHORS_UNSUPPORTED and _truthy(data[k]))
    if unsupported:
        raise ValueError(f"{source}: {', '.join(f'{k} ({AUTHORS_UNSUPPORTED[k]})' for k in unsupported)} is not "
                         f"implemented by gift-fast; remove the key(s) to run the rest")
    if "train" in data and not _truthy(data["train"]):
        raise ValueError(f"{source}: \"train\": false runs the authors' evaluation only; use `gift-fast eval` "
                         f"for that")
    if data.get("train_loss", "cross_entropy") != "cross_entropy":
        raise ValueError(f"{source}: train_loss {data['train_loss']!r}: gift-fast trains with cross_entropy only")
    d = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    kw: Dict[str, Any] = {}
    tasks = data.get("train_dataset")
    if not isinstance(tasks, list) or not tasks:
        raise ValueError(f"{source}: train_dataset must be a non-empty list of data set names")
    tasks = [str(t) for t in tasks]
    evals = data.get("eval_dataset")
    if evals is not None and list(evals) != tasks:
        raise ValueError(f"{source}: eval_dataset {evals} differs from train_dataset {tasks}: gift-fast evaluates "
                         f"a run on its own task sequence")
    order = next((o for o, seq in ORDERS.items() if list(seq) == tasks), None)
    if order is None:
        kw["order"], kw["tasks"] = None, tasks
    elif order != d["order"]:
        kw["order"] = order
    if "learning_rate" in data:
        lrs = data["learning_rate"]
        lrs = [lrs] if not isinstance(lrs, list) else lrs
        if len(lrs) < len(tasks):
            raise ValueError(f"{source}: learning_rate has {len(lrs)} entries for {len(tasks)} tasks")
        lrs = [_float(v, "learning_rate", source) for v in lrs[:len(tasks)]]
        try:
            rule = [task_lr(t) for t in tasks]
        except ValueError:
            rule = None
        if rule is not None and all(abs(a - b) <= 1e-12 for a, b in zip(lrs, rule)):
            pass                                      # the per-task rule: lr stays None
        elif len(set(lrs)) == 1:
            kw["lr"] = lrs[0]
        else:
            raise ValueError(f"{source}: learning_rate {lrs} is neither one rate nor the paper's per-task rule "
                             f"({rule}); gift-fast takes one --lr or the rule")
    for key, field, cast in (("iterations", "steps", int), ("label_smoothing", "label_smoothing", float),
                             ("image_nums", "images_per_task", int)):
        if key in data:
            v = cast(_float(data[key], key, source))
            if v != d[field]:
                kw[field] = v
    cd_w = _float(data.get("distill", 0), "distill", source)
    ita_w = _float(data.get("ita", 0), "ita", source)
    l2 = _float(data.get("L2", 0), "L2", source)
    static = int(_float(data.get("static_awc", 0) or 0, "static_awc", source))
    awc = _truthy(data.get("awc", False))
    cd, ita = cd_w > 0, ita_w > 0
    if cd_w > 0 and cd_w != d["cd_weight"]:
        kw["cd_weight"] = cd_w
    if ita_w > 0 and ita_w != d["ita_weight"]:
        kw["ita_weight"] = ita_w
    if l2 > 0 and l2 != d["consolidation_weight"]:
        kw["consolidation_weight"] = l2
    if awc and static > 0:
        cons = "static"
        kw["fisher_batches"] = static
    elif awc:
        cons = "adaptive"
    else:
        cons = "uniform" if l2 > 0 else "none"
    if awc and l2 <= 0:
        raise ValueError(f"{source}: awc is on but L2 is {l2}: the consolidation's strength must be positive")
    method = {"adaptive": "gift", "static": "ewc-v", "uniform": "l2"}.get(cons, "gift" if (cd or ita) else "finetune")
    m_cd, m_ita, m_cons = METHOD_DEFAULTS[method]
    if cd != m_cd:
        kw["cd"] = cd
    if ita != m_ita:
        kw["ita"] = ita
    if cons != m_cons:
        kw["consolidation"] = cons
    kw["method"] = method
    variants = [("ablate_image_only", "image-only"), ("ablate_text_only", "text-only"), ("feature_mse", "feature"),
                ("kl_div", "kl")]
    chosen = [v for k, v in variants if _truthy(data.get(k, False))]
    if len(chosen) > 1:
        raise ValueError(f"{source}: several distillation variants at once ({', '.join(chosen)}); choose one")
    if chosen:
        assert normalize_distill(chosen[0]) in DISTILL_MODES
        kw["distill"] = chosen[0]
    if (cd or ita) and "ref_model" in data:
        ref = data["ref_model"]
        if ref is None:
            kw["teacher"] = "initial"
        elif str(ref) == "load":
            pass                                        # the last model: the default
        elif str(ref).startswith("merge:"):
            kw["teacher"] = f"wise:{_float(str(ref).split(':', 1)[1], 'ref_model', source)}"
        else:
            raise ValueError(f"{source}: ref_model {ref!r}: use load (the last model), merge:R or leave it out "
                             f"(the initial model)")
    if data.get("exp_no") is not None:
        kw["name"] = str(data["exp_no"])
    return kw


def authors_key_table() -> List[Tuple[str, str]]:
    """(key, what it becomes) rows for the documentation."""
    return sorted(AUTHORS_KEYS.items()) + sorted((k, f"refused: {v} is not implemented")
                                                 for k, v in AUTHORS_UNSUPPORTED.items())


__all__ = ["TrainConfig", "identity_of", "identity_differences", "upgrade_fields", "RENAMED_FIELDS",
           "RESUME_FREE", "SD_FIELDS", "PRESETS", "PRESET_RUNS", "preset_config", "load_config_file",
           "from_authors_config", "AUTHORS_KEYS", "AUTHORS_UNSUPPORTED", "authors_key_table"]
