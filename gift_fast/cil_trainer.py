"""Class-incremental runs: GIFT (or a baseline) on CIFAR100 / TinyImageNet in N steps, no task identity.

The protocol and the data are ``gift_fast.data.cil``'s (DyTox's protocol, as ZSCL's CIL code runs it
for CLIP). This module runs it with the continual trainer of ``gift_fast.train``, changing only what
class-incremental learning changes (the trainer's ``task_schedule``, ``evaluate_all``, ``base_classnames`` and
result files):

* the tasks are the steps (``CILBenchmark.tasks``): the CE of step t is over **the step's classes
  only**, as in ZSCL's CIL code (its text classifier during training is the current step's class
  prompts). Old classes get no CE gradient; what keeps them is what the method does against
  forgetting (GIFT's distillation on synthetic data and AWC), which is what the benchmark measures.
  CE over every class seen so far would need old-class images (exemplars) to be meaningful: without
  them the old prompts only act as negatives, pushing their text embeddings away from every current
  image, a bias the paper does not describe;
* evaluation after every step (``evaluate_all``) encodes the whole test set once and scores it with
  one classifier over the classes of steps 0..j for every j: entry j of the row is the accuracy on
  the test images of the classes seen up to step j (no task identity). Row t, entry t is the CIL
  accuracy after step t; the zero-shot row gives the "CLIP Zero-shot" baseline of the paper's tables;
* label smoothing and weight decay per benchmark (0.2 / 0 for CIFAR100, 0 / 0.1 for TinyImageNet);
* the synthetic class pool's base set is the benchmark's 100 non-overlapping ImageNet names;
* iterations per step: by default one epoch of the step's training images (``len // batch``,
  ZSCL's CIL setting; steps differ in size: TinyImageNet's base step has 100 classes), or a fixed
  ``iterations``; the warm-up is ``min(warmup, ceil(10 % of the step's iterations))`` (``task_schedule``).

Run folder (besides the trainer's config.json, log.jsonl, acc_matrix.csv, checkpoints/):
``cil-split.json`` (class order, steps, base class set), ``synth-tasks.json`` (for ``gift-fast synth
--task-file``), ``cil.json`` (the CIL settings; checked on resume), ``cil_accuracies.json`` (after
each step), ``metrics.json`` (Avg / Last, the zero-shot Avg / Last, the published rows under ``"paper"``; runs written
before call it ``"seed_paper"``) and
``cil_report.md`` (this run next to the paper's Tab. 7 / 8).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from gift_fast.builders import load_bundle, resolve_device
from gift_fast.data.cil import (DEFAULT_BASE_SEED, DEFAULT_CLASS_ORDER_SEED, PAPER_TABLE_NAMES, PROTOCOLS, CILBenchmark,
                                build_cil, paper_results, protocol, read_class_order_file)
from gift_fast.evaluate import iter_eval_batches, zero_shot_classifier
from gift_fast.files import atomic_write_text, write_json
from gift_fast.metrics import cil_metrics
from gift_fast.precision import autocast
from gift_fast.run_config import TrainConfig
from gift_fast.run_folder import check_new_folder, is_run_folder, mark, write_acc_csv
from gift_fast.runs import plan_runs, run_many
from gift_fast.schedule import TaskSchedule
from gift_fast.train import ContinualTrainer

CIL_BENCHMARKS = tuple(PROTOCOLS)


@dataclass
class CILConfig:
    """What a class-incremental run adds to a ``TrainConfig`` (written to ``<out>/cil.json``)."""
    benchmark: str                        # cifar100-cil | tinyimagenet-cil
    steps: int                            # incremental steps: 10/20/50 (CIFAR100), 5/10/20 (TinyImageNet)
    class_order: str = "zscl"             # zscl (ZSCL's orders) | seed:N | icarl (CIFAR100) | natural | FILE
    iterations: Optional[int] = None      # per step; None: epochs_per_step epochs of the step's images
    epochs_per_step: float = 1.0
    label_smoothing: Optional[float] = None   # None: the benchmark's (0.2 CIFAR100, 0 TinyImageNet)
    weight_decay: Optional[float] = None      # None: the benchmark's (0 CIFAR100, 0.1 TinyImageNet)
    base_seed: int = DEFAULT_BASE_SEED    # which 100 of the non-overlapping ImageNet names
    templates: Optional[List[str]] = None  # None: ["a bad photo of a {}."]

    def __post_init__(self):
        proto = protocol(self.benchmark)
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps <= 0:
            raise ValueError(f"--steps must be a positive number of class-incremental steps, got {self.steps!r}")
        if proto.incremental_classes % self.steps:
            raise ValueError(f"{self.benchmark}: {proto.incremental_classes} classes cannot be split into {self.steps} "
                             f"equal steps; the paper uses --steps {' | '.join(map(str, proto.paper_steps))}")
        parse_class_order(self.class_order)
        if self.iterations is not None and self.iterations <= 0:
            raise ValueError(f"--iterations must be positive, got {self.iterations}")
        if not self.epochs_per_step > 0:
            raise ValueError(f"epochs_per_step must be positive, got {self.epochs_per_step}")

    @property
    def protocol(self):
        return protocol(self.benchmark)

    def resolved_label_smoothing(self) -> float:
        return self.protocol.label_smoothing if self.label_smoothing is None else float(self.label_smoothing)

    def resolved_weight_decay(self) -> float:
        return self.protocol.weight_decay if self.weight_decay is None else float(self.weight_decay)


def parse_class_order(spec: str):
    """``"seed:N"`` -> ("seeded", N); ``"zscl"`` / ``"icarl"`` / ``"natural"`` -> (name, None); a file
    (ZSCL's YAML format ``class_order: [...]``, or JSON) -> ("file", path)."""
    s = str(spec).strip().lower()
    if s.startswith("seed:"):
        try:
            return "seeded", int(s.split(":", 1)[1])
        except ValueError:
            pass
    elif s in ("zscl", "icarl", "natural"):
        return s, None
    elif str(spec).strip().endswith((".yaml", ".yml", ".json")) or os.path.isfile(str(spec)):
        return "file", str(spec).strip()
    raise ValueError(f"--class-order {spec!r}: use zscl (ZSCL's orders, the default), seed:N (a seeded permutation), "
                     f"icarl (CIFAR100's fixed iCaRL order), natural (the data set's label order) or a YAML / JSON "
                     f"file with class_order: [...]")


# =============================================================================== evaluation
@torch.no_grad()
def cil_step_accuracies(model, tokenizer, bench: CILBenchmark, *, device: torch.device, bf16: bool = False,
                        batch_size: int = 256, num_workers: int = 0, progress: bool = False) -> List[float]:
    """Accuracy (percent) after the model's current state on the cumulative test set of every step:
    entry j = top-1 over the classes of steps 0..j, on the test images of those classes.

    Equal to ``evaluate_tasks(model, tokenizer, bench.eval_tasks)``, with one pass over the images:
    the classifier of step j is the first n_j rows of the classifier over all classes in class order
    (each row depends on its class alone), and the test images of step j are those with label < n_j."""
    last = bench.eval_tasks[-1]
    ends = torch.tensor([len(e.classnames) for e in bench.eval_tasks], device=device)
    was_training = model.training
    model.eval()
    try:
        W = zero_shot_classifier(model, tokenizer, last.classnames, last.templates, device=device, bf16=bf16)
        correct = torch.zeros(len(ends), dtype=torch.int64, device=device)
        total = torch.zeros(len(ends), dtype=torch.int64, device=device)
        n_batches = -(-len(last.test) // batch_size)
        for x, y in tqdm(iter_eval_batches(last.test, batch_size, device, num_workers), total=n_batches,
                         desc="eval (all steps)", disable=not progress, leave=False):
            with autocast(device, bf16):
                img = model.encode_image(x)
            logits = 100.0 * F.normalize(img.float(), dim=-1) @ W.T            # [B, C], classes in class order
            y = y.long()
            for j, n in enumerate(ends.tolist()):
                seen = y < n
                pred = logits[:, :n].argmax(dim=-1)
                correct[j] += ((pred == y) & seen).sum()
                total[j] += seen.sum()
    finally:
        model.train(was_training)
    if bool((total == 0).any()):
        raise ValueError("a step has no test image: every class needs test images")
    return (100.0 * correct.double() / total.double()).tolist()


# =============================================================================== the trainer
class CILTrainer(ContinualTrainer):
    """``ContinualTrainer`` over the steps of a class-incremental benchmark (module docstring)."""

    def __init__(self, cfg: TrainConfig, cil: CILConfig, *, benchmark: Optional[CILBenchmark] = None, bundle=None,
                 generator=None):
        self.cil = cil
        out = Path(cfg.out)
        if not is_run_folder(out):       # the benchmark writes its records into the folder: claim it first
            check_new_folder(out, force=cfg.force)
        mark(out)
        if bundle is None:
            bundle = load_bundle(cfg, resolve_device(cfg.device))
        if benchmark is None:
            if not cfg.data_root:
                raise ValueError(f"{cil.benchmark} needs --data-root DIR (docs/CLASS_INCREMENTAL.md shows the folder "
                                 f"layout)")
            rule, seed = parse_class_order(cil.class_order)
            source = None
            if rule == "file":               # seed holds the path: the order is the file's list
                rule, source, seed = read_class_order_file(seed), f"file {seed}", None
            benchmark = build_cil(cil.benchmark, cil.steps, cfg.data_root, order=rule, order_source=source,
                                  seed=seed if seed is not None else DEFAULT_CLASS_ORDER_SEED,
                                  base_seed=cil.base_seed, image_size=bundle.image_size, mean=bundle.mean,
                                  std=bundle.std, cache_dir=cfg.data_cache, record_dir=str(out),
                                  templates=cil.templates, progress=cfg.progress, num_workers=cfg.num_workers)
        if benchmark.protocol.name != cil.benchmark or benchmark.split.steps != cil.steps:
            raise ValueError(f"the benchmark given is {benchmark.protocol.name} in {benchmark.split.steps} steps, the "
                             f"config asks for {cil.benchmark} in {cil.steps}")
        self.bench = benchmark
        self.step_iterations = [self._iterations(len(t.train), cfg.batch_size) for t in benchmark.tasks]
        cfg = dataclasses.replace(cfg, label_smoothing=cil.resolved_label_smoothing(),
                                  steps=max(self.step_iterations))
        out.mkdir(parents=True, exist_ok=True)
        task_file = benchmark.write_synth_task_file(str(out / "synth-tasks.json"))
        try:
            super().__init__(cfg, tasks=benchmark.tasks, bundle=bundle, generator=generator)
        except FileNotFoundError as e:
            if cfg.synth and cfg.synth != "on-the-fly" and not cfg.reference_images:
                raise FileNotFoundError(
                    f"{e}\nThis benchmark's synthetic data (its steps in this class order, and its 100 ImageNet base "
                    f"names): gift-fast synth --task-file {task_file} --out {cfg.synth}") from None
            raise
        self.weight_decay = cil.resolved_weight_decay()

    def _iterations(self, n_train: int, batch_size: int) -> int:
        if self.cil.iterations is not None:
            return int(self.cil.iterations)
        return max(1, int(self.cil.epochs_per_step * n_train) // batch_size)

    def settings(self) -> Dict[str, Any]:
        """What ``cil.json`` records (and a resume must match)."""
        return {"cil": dataclasses.asdict(self.cil), "label_smoothing": self.cfg.label_smoothing,
                "weight_decay": self.weight_decay, "step_iterations": self.step_iterations,
                "num_training_steps": len(self.tasks), "base_classnames": self.bench.base_classnames,
                "protocol": dataclasses.asdict(self.bench.protocol)}

    # ------------------------------------------------------------------ what CIL changes
    def base_classnames(self) -> List[str]:
        return list(self.bench.base_classnames)

    def task_schedule(self, t: int) -> TaskSchedule:
        """Step ``t``'s own iterations, a warm-up of at most 10 % of them, the benchmark's weight decay."""
        iters = self.step_iterations[t]
        return TaskSchedule(lr=self.cfg.task_lr(self.tasks[t]), steps=iters,
                            warmup=min(self.cfg.warmup, max(1, math.ceil(0.1 * iters))),
                            weight_decay=self.weight_decay)

    def train_task(self, t: int) -> Dict[str, Any]:
        info = super().train_task(t)
        info["warmup"] = self.task_schedule(t).warmup
        return info

    def evaluate_all(self) -> List[float]:
        return cil_step_accuracies(self.model, self.bundle.tokenizer, self.bench, device=self.device,
                                   bf16=self.precision.bf16, batch_size=self.cfg.eval_batch_size,
                                   num_workers=self.cfg.num_workers, progress=self.cfg.progress)

    def run(self) -> Dict[str, Any]:
        path = self.out / "cil.json"
        new = json.loads(json.dumps(self.settings(), default=str))
        if path.is_file() and self.cfg.resume:
            with open(path) as fh:
                old = json.load(fh)
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            if diff:
                raise ValueError(f"cannot resume {self.out}: its class-incremental settings differ "
                                 f"({', '.join(diff)}). Resume with the same options, or choose another --out")
        elif not (self.out / "state.json").is_file():
            write_json(path, new)
        return super().run()

    def _write_results(self, state: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        write_acc_csv(self.out / "acc_matrix.csv", self.task_names, state["zero_shot"], state["acc"])
        done = len(state["acc"])
        steps_acc = [float(state["acc"][t][t]) for t in range(done)]
        zero_shot = [float(v) for v in state["zero_shot"]]
        write_json(self.out / "cil_accuracies.json", {
            "benchmark": self.cil.benchmark, "steps": self.cil.steps, "finished_steps": done,
            "num_training_steps": len(self.tasks), "step_accuracies": steps_acc,
            "zero_shot_step_accuracies": zero_shot,
            "seen_classes": [len(e.classnames) for e in self.bench.eval_tasks]})
        if done < len(self.tasks):
            return None
        label = self.label
        metrics = {**cil_metrics(steps_acc), "transfer": None, "step_accuracies": steps_acc,
                   "zero_shot": {**cil_metrics(zero_shot), "step_accuracies": zero_shot},
                   "benchmark": self.cil.benchmark, "cil_steps": self.cil.steps, "tasks": self.task_names,
                   "label": label, "seed": self.cfg.seed,
                   "paper": {k: list(v) for k, v in paper_results(self.cil.benchmark, self.cil.steps).items()}}
        write_json(self.out / "metrics.json", metrics)
        atomic_write_text(self.out / "cil_report.md", cil_report_table([metrics]) + "\n")
        return metrics


# =============================================================================== reports
def _fmt(vals: Sequence[float]) -> str:
    a = np.asarray(vals, dtype=np.float64)
    return f"{a.mean():.2f}" if a.size == 1 else f"{a.mean():.2f} ± {a.std(ddof=1):.2f}"


def cil_report_table(metrics: Sequence[Dict[str, Any]]) -> str:
    """A Markdown table of finished CIL runs (their ``metrics.json``) next to the paper's table for the
    same benchmark and step count: the paper's rows as published, then the zero-shot row measured here
    and each run label (mean ± std over seeds when several runs share a label)."""
    if not metrics:
        raise ValueError("no finished class-incremental run to report")
    keys = {(m["benchmark"], m["cil_steps"]) for m in metrics}
    if len(keys) != 1:
        raise ValueError(f"one table per benchmark and step count; got {sorted(keys)}")
    bench, steps = keys.pop()
    n_train = len(metrics[0]["step_accuracies"])
    lines = [f"### {bench}, {steps} steps ({n_train} training steps) — Avg / Last top-1 (%)", "",
             "| Method | Avg | Last | Source |", "| --- | --- | --- | --- |"]
    for name, (avg, last) in paper_results(bench, steps).items():
        lines.append(f"| {name} | {'-' if avg is None else f'{avg:.2f}'} | {'-' if last is None else f'{last:.2f}'} "
                     f"| the paper, {PAPER_TABLE_NAMES[bench]} |")
    zs = [m["zero_shot"] for m in metrics]
    lines.append(f"| CLIP Zero-shot (measured) | {_fmt([z['avg'] for z in zs])} | {_fmt([z['last'] for z in zs])} "
                 f"| this run{'s' if len(zs) > 1 else ''} |")
    groups: Dict[str, List[Dict[str, Any]]] = {}
    for m in metrics:
        groups.setdefault(m["label"], []).append(m)
    for label, ms in groups.items():
        seeds = sorted(str(m.get("seed")) for m in ms)
        lines.append(f"| {label} (measured) | {_fmt([m['avg'] for m in ms])} | {_fmt([m['last'] for m in ms])} | "
                     f"this project, seed{'s' if len(seeds) > 1 else ''} {', '.join(seeds)} |")
    return "\n".join(lines)


def cil_report(paths: Sequence[str], markdown: Optional[str] = None) -> str:
    """The tables of the finished CIL run folders in ``paths`` (one per benchmark and step count)."""
    found: Dict[tuple, List[Dict[str, Any]]] = {}
    for p in paths:
        mp = Path(p) / "metrics.json"
        if not mp.is_file():
            raise FileNotFoundError(f"{p}: no metrics.json (the run is not finished: resume it with --resume)")
        with open(mp) as fh:
            m = json.load(fh)
        if "cil_steps" not in m:
            raise ValueError(f"{p} is not a class-incremental run (its metrics.json has no cil_steps)")
        found.setdefault((m["benchmark"], m["cil_steps"]), []).append(m)
    text = "\n\n".join(cil_report_table(ms) for _, ms in sorted(found.items()))
    if markdown:
        Path(markdown).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(markdown, text + "\n")
    return text


# =============================================================================== runs
# Defaults of the command line: CIFAR100 is read from the MTIL folder (the same torchvision files),
# TinyImageNet from DIR/tiny-imagenet-200.
CLI_DEFAULTS = {"cifar100-cil": dict(data_root="data/mtil", data_cache="data/cache"),
                "tinyimagenet-cil": dict(data_root="data", data_cache="data/cache")}


def train_cil(cfg: TrainConfig, cil: CILConfig, **kw) -> Dict[str, Any]:
    """Run (or resume) one class-incremental run; returns its metrics (``avg``, ``last``, ...)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return CILTrainer(cfg, cil, **kw).run()


def cil_summary_line(cil: CILConfig, cfg: TrainConfig, metrics: Dict[str, Any]) -> str:
    """One line per finished class-incremental run."""
    return f"{cfg.out}: {cil.benchmark} {cil.steps} steps  Avg {metrics['avg']:.2f}  Last {metrics['last']:.2f}"


def run_many_cil(cfgs: Sequence[TrainConfig], cil: CILConfig, progress: bool = True) -> List[Dict[str, Any]]:
    """Run several configs (methods x seeds) one after the other (``gift_fast.runs.run_many``); finished ones are
    skipped on resume."""
    return run_many(cfgs, progress=progress, run_one=functools.partial(train_cil, cil=cil),
                    summary=functools.partial(cil_summary_line, cil))


def recorded_class_order(out: str) -> Optional[str]:
    """The ``--class-order`` a run folder (or the run folders inside it) was started with (its cil.json),
    so that ``--resume`` without ``--class-order`` continues an old run on its own order (runs started
    before ZSCL's orders became the default used seed:1993). None when there is no record."""
    found = []
    for p in [Path(out) / "cil.json"] + sorted(Path(out).glob("*/cil.json")):
        if p.is_file():
            with open(p) as fh:
                found.append(json.load(fh).get("cil", {}).get("class_order"))
    found = [f for f in found if f]
    if len(set(found)) > 1:
        raise ValueError(f"the runs in {out} were started with different class orders ({sorted(set(found))}): "
                         f"resume them one at a time with --class-order")
    return found[0] if found else None


def run_cil_command(benchmark: str, opts: Dict[str, Any], *, out: Optional[str], resume: bool,
                    methods: Optional[Sequence[str]], seeds: Optional[Sequence[int]], plots: bool, progress: bool,
                    class_order: Optional[str] = None, iterations: Optional[int] = None) -> str:
    """``gift-fast train --benchmark cifar100-cil|tinyimagenet-cil --steps N ...``: the runs (methods x seeds)
    and their report (also written to ``<out>/report.md``). ``opts``: the TrainConfig options given on
    the command line; ``opts["steps"]`` is the number of class-incremental steps here."""
    opts = dict(opts)
    steps = opts.pop("steps", None)
    if steps is None:
        proto = protocol(benchmark)
        raise ValueError(f"--benchmark {benchmark} needs --steps N, the number of class-incremental steps (the paper: "
                         f"{' | '.join(map(str, proto.paper_steps))})")
    for mtil_only in ("order", "tasks", "toy"):
        if opts.pop(mtil_only, None) is not None:
            raise ValueError(f"--{mtil_only} is an MTIL option; --benchmark {benchmark} defines its own tasks")
    if class_order is None and resume:
        class_order = recorded_class_order(out or f"runs/{benchmark}-{steps}-{'-'.join(methods or ['gift'])}")
    cil = CILConfig(benchmark, int(steps), class_order=class_order or CILConfig.class_order, iterations=iterations,
                    label_smoothing=opts.pop("label_smoothing", None))
    for k, v in CLI_DEFAULTS[benchmark].items():
        opts.setdefault(k, v)
    opts.setdefault("synth", f"data/synthetic-cil/{benchmark}-{steps}")
    methods = list(methods or ["gift"])
    base = TrainConfig(order=None, out=out or f"runs/{benchmark}-{steps}-{'-'.join(methods)}", resume=resume,
                       plots=plots, progress=progress, **opts)
    cfgs = plan_runs(base, methods, list(seeds or [0]))
    for c in cfgs:
        c.method_spec()          # bad method / switch combinations fail before any work
    run_many_cil(cfgs, cil, progress=progress)
    return cil_report([c.out for c in cfgs], markdown=os.path.join(base.out, "report.md"))


__all__ = ["CILConfig", "CILTrainer", "cil_step_accuracies", "cil_report_table", "cil_report", "train_cil",
           "run_many_cil", "run_cil_command", "parse_class_order", "recorded_class_order", "CIL_BENCHMARKS"]
