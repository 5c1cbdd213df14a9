"""The continual training loop: GIFT and its baselines over a sequence of tasks.

Data flow of one run (``train(cfg)``)::

    model (open_clip, or the toy world's tiny CLIP)  ->  zero-shot row of the accuracy matrix
    for each task t:
        teacher  = the model after task t-1 (or the initial model, or a WiSE mix of both)   gift_fast.teacher
        anchor   = the weights at the start of task t (AWC's theta*)                        gift_fast.awc
        synthetic set of task t (a `gift-fast synth` folder, generated now, or real images)  gift_fast.replay
        teacher embeddings of the whole synthetic set, once (it is fixed and not augmented)
        schedule of task t (lr, steps, warm-up, weight decay)                                gift_fast.schedule
        steps: GiftStep (gift_fast.step): L_kd backward alone -> awc.step() -> L_ce backward -> AdamW
               on seeded task and synthetic batches                                           gift_fast.batches
        evaluate on every task of the sequence -> row t of the accuracy matrix
        checkpoint (safetensors, atomic) + state.json                                         gift_fast.run_folder
    metrics (continual_metrics), acc_matrix.csv, plots

Methods are flags of this one loop (``gift_fast.method``: ``MethodSpec``, ``resolve_method``); the run's
configuration and presets are ``gift_fast.run_config``; several runs are ``gift_fast.runs``.

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
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from tqdm.auto import tqdm

from gift_fast import run_folder as rf
from gift_fast.awc import AdaptiveWeightConsolidation
from gift_fast.batches import STREAM_FISHER, STREAM_SYN, STREAM_TASK, TaskBatches, derived_seed, synthetic_indices
from gift_fast.checkpoints import load_weights
from gift_fast.data.cache import normalize_uint8
from gift_fast.builders import build_task_list, load_bundle, resolve_device
from gift_fast.distributed import DistContext, all_reduce_tensors_, current, main_first
from gift_fast.evaluate import evaluate_tasks
from gift_fast.files import append_text_line, write_json
# resolve_method and MethodSpec: also gift_fast.train's (the README's Python API names them here)
from gift_fast.method import MethodSpec, resolve_method, step_config  # noqa: F401
from gift_fast.precision import Precision
from gift_fast.preflight import check_train
from gift_fast.replay import SyntheticReplay, check_replay_source
from gift_fast.report import plot_run
# TrainConfig and preset_config: also gift_fast.train's (the README's Python API)
from gift_fast.run_config import TrainConfig, identity_differences, identity_of, preset_config  # noqa: F401
from gift_fast.schedule import TaskSchedule, make_optimizer
from gift_fast.step import GiftStep, compile_blocks
from gift_fast.teacher import Teacher
from gift_fast.text import trim_tokens
from gift_fast.tracking import RunHooks
from gift_fast.validation import check_train_config
from gift_fast.versions import package_versions

class ContinualTrainer:
    """One continual run: a model, a task sequence, a method, a run folder.

    ``bundle`` (a ``gift_fast.models.ClipBundle``) and ``tasks`` (``TaskSpec`` list) may
    be given directly (tests, notebooks); otherwise they are built from ``cfg``. ``dist``:
    this process's place among several (default: the initialized process group, if any).
    """

    def __init__(self, cfg: TrainConfig, *, tasks=None, bundle=None, generator=None,
                 dist: Optional[DistContext] = None):
        self.cfg = cfg
        self.dist = dist if dist is not None else current()
        check_train_config(cfg, self.dist.world_size)      # every option, before any work
        self.method = cfg.method_spec()
        self.device = resolve_device(cfg.device, self.dist)
        self.precision = Precision.resolve(self.device, cfg.bf16)   # bf16 decided once, for every forward pass
        self.out = Path(cfg.out)
        self.log_path = self.out / rf.LOG
        if bundle is None and tasks is None:
            check_train(cfg)    # data, synthetic folder, disk, weights: before any model is loaded
        check_replay_source(cfg, self.method)
        self._folder = rf.Claim()
        try:
            # the run folder is checked, claimed and locked before any work
            self._folder = rf.claim(self.out, resume=cfg.resume, force=cfg.force, steps=cfg.steps, dist=self.dist,
                                    same_identity=lambda s: not identity_differences(s.get("identity"), cfg))
            if self._folder.restarted:
                self._note(f"{self.out}: restarting a run that failed before its first task")
            self._setup(cfg, tasks, bundle, generator)
        except BaseException:
            self._release()
            if self.dist.is_main:         # a command that fails before any work leaves no folder behind
                rf.remove_own_files(self.out, self._folder.created)
            raise

    def _setup(self, cfg: TrainConfig, tasks, bundle, generator) -> None:
        with main_first(self.dist):      # several processes: rank 0 builds the caches, the others read them
            self.bundle = bundle if bundle is not None else load_bundle(cfg, self.device)
            self.bundle.model.to(self.device)
            # MTIL's seeded splits are recorded in the run folder (and compared on resume)
            self.tasks = tasks if tasks is not None else build_task_list(
                cfg, self.bundle, split_record_dir=str(self.out) if self.dist.is_main else None)
        if not self.tasks:
            raise ValueError("the task sequence is empty")
        self.task_names = [t.name for t in self.tasks]
        if len(set(self.task_names)) != len(self.task_names):
            raise ValueError(f"task names must be unique, got {self.task_names}")
        state = self._folder.state
        self.replay = SyntheticReplay(cfg, self.method, self.tasks, out=self.out, device=self.device,
                                      dist=self.dist, image_size=self.bundle.image_size, generator=generator,
                                      base_classnames=self.base_classnames(), progress=self._progress)
        self.replay.check_folders()
        self._synthetic_record = self.replay.fingerprints((state or {}).get("synthetic_fingerprints"),
                                                          self.out / rf.STATE)
        self.model = self.bundle.model
        self.model.logit_scale.requires_grad_(False)
        self.logit_scale = float(self.model.logit_scale.detach().exp())
        self.teacher = Teacher(self.method.teacher, self.model, mean=self.bundle.mean, std=self.bundle.std,
                               precision=self.precision, distills=self.method.distills)
        self.awc = None
        if self.method.consolidation != "none":
            self.awc = AdaptiveWeightConsolidation(
                self.model.named_parameters(), strength=cfg.consolidation_weight, decay=cfg.awc_decay,
                fisher=self.method.consolidation, exclude=("logit_scale",), backend=cfg.kernels)
        if cfg.compiles(self.device):
            compile_blocks(self.model, dynamic=None)
        if self.replay.on_the_fly and (state is None or state["finished"] < len(self.tasks)):
            self.replay.generator()     # a missing Stable Diffusion model fails now, not after the zero-shot row
        self.hooks = RunHooks(self)      # TensorBoard / W&B and the --track curves (rank 0 writes)

    def _release(self) -> None:
        if self._folder.lock is not None:
            self._folder.lock.release()
            self._folder.lock = None

    # ------------------------------------------------------------------ the parts a variant changes
    def base_classnames(self) -> Optional[List[str]]:
        """The base names of the synthetic class pool (None: the replay's default, toy or ImageNet)."""
        return None

    def task_schedule(self, t: int) -> TaskSchedule:
        """How task ``t`` is optimized: the run's steps and warm-up, the task's learning rate, no weight decay."""
        return TaskSchedule(lr=self.cfg.task_lr(self.tasks[t]), steps=self.cfg.steps, warmup=self.cfg.warmup)

    def evaluate_all(self) -> List[float]:
        return evaluate_tasks(self.model, self.bundle.tokenizer, self.tasks, device=self.device,
                              bf16=self.precision.bf16, precision=self.precision,
                              batch_size=self.cfg.eval_batch_size, num_workers=self.cfg.num_workers,
                              progress=self._progress, dist=self.dist)

    # ------------------------------------------------------------------ the parts of a task
    def distill_set(self, t: int):
        """The distillation set of task ``t`` (None when the method does not distill)."""
        return self.replay.distill_set(t)

    def teacher_embeddings(self, distill_set, tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The teacher's embeddings of the task's fixed distillation set, computed once per task."""
        return self.teacher.embeddings(self.model, distill_set, tokens)

    def make_step(self, schedule: Union[TaskSchedule, float]):
        """The task's ``GiftStep`` (gift_fast.step), optimizer and schedule. A bare learning rate means task 1's
        schedule at that rate."""
        if not isinstance(schedule, TaskSchedule):
            schedule = dataclasses.replace(self.task_schedule(0), lr=float(schedule))
        optimizer, scheduler = make_optimizer([p for p in self.model.parameters() if p.requires_grad], schedule,
                                              self.device)
        step = GiftStep(self.model, optimizer, step_config(self.method, self.cfg, self.logit_scale), awc=self.awc,
                        scheduler=scheduler, dist=self.dist, precision=self.precision)
        return step, optimizer, scheduler

    def checkpoint_path(self, t: int) -> Path:
        return rf.task_checkpoint_path(self.out, t, self.tasks[t].name)

    # ------------------------------------------------------------------ one task
    def train_task(self, t: int) -> Dict[str, Any]:
        cfg, task, model = self.cfg, self.tasks[t], self.model
        torch.manual_seed(derived_seed(cfg.seed, t, 0))
        sched = self.task_schedule(t)
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
                       idx=synthetic_indices(len(dset), cfg.syn_batch_size, sched.steps,
                                             derived_seed(cfg.seed, t, STREAM_SYN)).to(self.device))
        if self.awc is not None:
            self.awc.set_anchor()          # theta* = the weights at the start of the task (= the last teacher)
            self.awc.reset_fisher()
        step, optimizer, scheduler = self.make_step(sched)
        # in-task resume: the model, optimizer, schedule, AWC and RNG state after step k0 of this task
        k0 = self._resume_in_task(t, sched, optimizer, scheduler)
        if self.method.consolidation == "static" and k0 == 0:
            self._static_fisher(step, syn, t)
        rows, syn_rows = self.dist.rows(cfg.batch_size), self.dist.rows(cfg.syn_batch_size)
        batches = TaskBatches(task.train, cfg.batch_size, derived_seed(cfg.seed, t, STREAM_TASK), self.device,
                              cfg.num_workers, start=k0, rows=rows)
        model.train()
        sums: Dict[str, torch.Tensor] = {}
        n_acc, t_last, k_last, t0 = 0, time.perf_counter(), k0, time.perf_counter()
        bar = tqdm(range(k0, sched.steps), desc=f"task {t + 1}/{len(self.tasks)} {task.name}",
                   disable=not self._progress, leave=False, initial=k0, total=sched.steps)
        self.hooks.on_task_start(t, k0, syn)
        try:
            for k in bar:
                images, labels = next(batches)
                if syn is not None:
                    i = syn["idx"][k]                 # the global synthetic batch
                    kk = syn["labels"][i]
                    il = i[syn_rows]                  # this process's rows (the loss gathers the rest)
                    out = step(images, labels, class_tokens,
                               normalize_uint8(syn["images"][il], self.bundle.mean, self.bundle.std),
                               syn["tokens"][kk[syn_rows]], kk, syn["t_img"][i], syn["t_txt"][kk])
                else:
                    out = step(images, labels, class_tokens)
                for name, v in out.items():
                    v = v.detach().float()
                    sums[name] = sums[name] + v if name in sums else v
                n_acc += 1
                if self.hooks.tracks(k):          # --track-every K: the curve points (off: no host sync here)
                    self.hooks.on_track(t, k, out, syn)
                if (k + 1) % cfg.log_every == 0 or k + 1 == sched.steps:
                    self._check_finite_weights(t, k)     # the last step too: a NaN there is no finished run
                    now = time.perf_counter()
                    rec = self._log_record(t, k, sums, n_acc, optimizer, now - t_last, k + 1 - k_last)
                    bar.set_postfix({n: f"{v:.3f}" for n, v in rec.items() if n.startswith("loss")})
                    sums, n_acc, t_last, k_last = {}, 0, now, k + 1
                if (cfg.checkpoint_every > 0 and (k + 1) % cfg.checkpoint_every == 0 and k + 1 < sched.steps
                        and self.dist.is_main):
                    rf.save_in_task(self.out, t, task.name, k + 1, model, self.awc, optimizer, scheduler,
                                    self.device)
        finally:
            batches.close()
            bar.close()
        wall = time.perf_counter() - t0
        self.replay.discard(t)
        return {"task": task.name, "steps": sched.steps, "lr": sched.lr, "wall_s": wall,
                "synthetic": None if dset is None else {"pairs": len(dset), "prompts": len(dset.prompts),
                                                        "dropped_black": dset.dropped_black,
                                                        "source": dset.source}}

    def _resume_in_task(self, t: int, sched: TaskSchedule, optimizer, scheduler) -> int:
        """Restore the in-task checkpoint of task ``t`` if ``--resume`` found one; the step to start at."""
        if not self.cfg.resume:
            return 0
        # the pointer was checked and its files verified (sha256) by run_folder.claim, before any work
        ptr, k = self._folder.pointer, 0
        if ptr is not None and ptr.get("task_index") == t and ptr.get("task") == self.tasks[t].name:
            self._folder.pointer = None   # used once
            k = rf.load_in_task(self.out, ptr, self.model, self.awc, optimizer, scheduler, self.device)
            self._note(f"resuming task {t + 1} ({self.tasks[t].name}) after step {k} of {sched.steps}")
        if self.dist.is_main:
            rf.trim_log(self.log_path, t, k)   # drop what a killed attempt logged after step k
        return k

    def _static_fisher(self, step, syn, t: int) -> None:
        """EWC-V: F = running mean of g^2 / mean(g^2) over ``fisher_batches`` synthetic batches of L_kd
        (``GiftStep.fisher_batch``: the step's own L_kd half, the gradients cleared before and after each batch;
        the authors' static-Fisher loop stops clearing them once its estimate ends, so later steps add up old
        gradients: docs/METHOD.md, "Defects")."""
        idx_all = synthetic_indices(len(syn["images"]), self.cfg.syn_batch_size, self.cfg.fisher_batches,
                                    derived_seed(self.cfg.seed, t, STREAM_FISHER)).to(self.device)
        rows = self.dist.rows(self.cfg.syn_batch_size)
        for i in idx_all:
            kk = syn["labels"][i]
            step.fisher_batch(normalize_uint8(syn["images"][i[rows]], self.bundle.mean, self.bundle.std),
                              syn["tokens"][kk[rows]], kk, syn["t_img"][i], syn["t_txt"][kk])

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
            append_text_line(self.log_path, json.dumps(rec))
        self.hooks.on_log(rec)
        return rec

    # ------------------------------------------------------------------ the whole run
    def run(self) -> Dict[str, Any]:
        try:
            return self._run()
        finally:
            self._release()

    def _run(self) -> Dict[str, Any]:
        state = self._folder.state       # read, checked and verified by run_folder.claim
        self.dist.barrier()              # every process has read the folder before rank 0 writes to it
        self.out.mkdir(parents=True, exist_ok=True)
        if state is not None:
            rf.check_resumable(self.out, state, identity_differences(state.get("identity"), self.cfg),
                               self.task_names)
            if state["finished"] > 0:
                load_weights(self.model, rf.inside(self.out, state["checkpoints"][-1], self.out / rf.STATE,
                                                   "checkpoint"))
            self._note(f"resuming {self.out} after task {state['finished']} of {len(self.tasks)}")
        else:
            state = self._start()
        for t in range(state["finished"], len(self.tasks)):
            info = self.train_task(t)
            row = self.evaluate_all()
            self.hooks.on_eval(t, row)
            state["acc"].append(row)
            info["acc"] = row
            self._save_task(t, state, info)
            if self.dist.is_main:
                rf.clear_in_task(self.out)
            self._write_results(state)
            self._note(f"task {t + 1}/{len(self.tasks)} {self.tasks[t].name}: " +
                       " ".join(f"{n}={a:.1f}" for n, a in zip(self.task_names, row)))
        metrics = self._write_results(state)
        if self.cfg.plots and self.dist.is_main:
            try:
                plot_run(self.out)
            except Exception as e:   # a plotting problem must not cost a finished run
                self._note(f"plots skipped: {type(e).__name__}: {e}")
        self.hooks.on_end(metrics)
        return metrics

    def _start(self) -> Dict[str, Any]:
        """A new run: config.json, the zero-shot row, the first state.json."""
        cfg, main = self.cfg, self.dist.is_main
        if main:
            self.log_path.unlink(missing_ok=True)
            self.log_path.touch()
        config = {
            "config": dataclasses.asdict(cfg), "method": dataclasses.asdict(self.method), "label": self.label,
            "tasks": self.task_names, "task_lrs": [cfg.task_lr(t) for t in self.tasks],
            "model": {"name": self.bundle.model_name, "pretrained": self.bundle.pretrained,
                      "logit_scale": self.logit_scale, "image_size": self.bundle.image_size,
                      "activation": self.bundle.info.get("activation")},
            "device": str(self.device), "processes": self.dist.world_size,
            "versions": package_versions(("torch", "open_clip", "triton"), python=True)}
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
            rf.write_state(self.out, state)
        self._write_results(state)
        return state

    def _save_task(self, t: int, state: Dict[str, Any], info: Dict[str, Any]) -> None:
        state["finished"] = t + 1
        state["checkpoints"].append(str(self.checkpoint_path(t).relative_to(self.out)))
        state["tasks_info"].append(info)
        if not self.dist.is_main:        # rank 0 writes; the others keep the same state in memory
            return
        identity = hashlib.sha256(json.dumps(identity_of(self.cfg), sort_keys=True, default=str).encode()).hexdigest()
        rf.save_task_checkpoint(self.out, self.model, state, keep_last_only=self.cfg.keep_checkpoints == "last",
                                metadata={"model": self.bundle.model_name, "task_index": t,
                                          "task": self.tasks[t].name, "finished": True, "step": self.cfg.steps,
                                          "identity": identity})

    def _write_results(self, state: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        """acc_matrix.csv after every task; metrics.json (returned) once every task is finished."""
        if self.dist.is_main:
            rf.write_acc_csv(self.out / "acc_matrix.csv", self.task_names, state["zero_shot"], state["acc"])
        metrics = rf.run_metrics(state, self.task_names, self.label)
        if metrics is not None and self.dist.is_main:
            write_json(self.out / "metrics.json", metrics)
        return metrics

    @property
    def label(self) -> str:
        """The run's name in reports: --label, or the method's label."""
        return self.cfg.label or self.method.label()

    @property
    def _progress(self) -> bool:
        """Progress bars and notes: rank 0's only."""
        return self.cfg.progress and self.dist.is_main

    def _note(self, msg: str) -> None:
        if self._progress:
            print(msg, file=sys.stderr, flush=True)


def train(cfg: TrainConfig, **kw) -> Dict[str, Any]:
    """Run (or resume) one continual run; returns its metrics (see ``gift_fast.metrics``)."""
    check_train_config(cfg)              # before the thread count or anything else changes
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return ContinualTrainer(cfg, **kw).run()
    finally:
        torch.set_num_threads(threads)


__all__ = ["TrainConfig", "MethodSpec", "resolve_method", "preset_config", "ContinualTrainer", "train"]
