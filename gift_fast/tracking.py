"""Experiment tracking (TensorBoard, Weights & Biases) and the paper's training curves (Fig. 4, Fig. 5).

The trainer (``gift_fast.train.ContinualTrainer``) owns one ``RunHooks`` and calls it at five
places: after each ``log.jsonl`` record (``on_log``), after each evaluation row (``on_eval``),
at the start of a task (``on_task_start``), at the steps ``--track-every K`` asks for
(``tracks(k)`` / ``on_track``) and at the end of the run (``on_end``: the accuracy-matrix
figure and the metrics, then the writers are closed). Only rank 0 writes (under torchrun
the other processes take part in the tracked evaluations, which are collective, and write
nothing).

``--report-to`` (open_clip's spelling): ``none`` (default), ``tensorboard``
(``torch.utils.tensorboard``, event files in ``<out>/tensorboard``), ``wandb`` (the optional
``[wandb]`` extra; files in ``<out>/wandb``; ``WANDB_MODE=offline`` works without an account)
or ``all``; several may be separated by commas. ``--name`` names the run (default: the run
folder's name). What is logged, with the global step ``sum of the steps of the earlier tasks
+ step``:

* ``train/<key>`` for every number of a ``log.jsonl`` record (losses, lr, steps_per_s,
  images_per_s): the same values, so a tracker and the log file agree;
* ``eval/<task>`` and ``eval/mean`` for each evaluation row (zero-shot at step 0, then after
  each task), and ``metrics/transfer|avg|last`` at the end;
* ``acc_matrix`` (the figure ``acc_matrix.png`` of ``gift_fast.report.plot_run``) at the end;
* ``curves/...``: the --track points below.

``--track TASK[,TASK] --track-every K`` (``curves.jsonl`` in the run folder; ``gift-fast report
--curves`` draws it). A point is taken before the first step of each task and after every
K-th step:

* ``distill_ce`` (Fig. 4): the cross entropy between the teacher's and the student's output
  distributions on the step's synthetic batch, ``H(p_teacher, p_student)`` of the CD's
  contrastive matrices at its temperature tau, the mean of the image->text rows and the
  text->image columns, without tau^2 and without lambda_cd (the paper plots the cross
  entropy rather than the KL, Sec. 4.5); only for methods that distill;
* ``train_loss`` (Fig. 5): the step's L_ce on the current task's batch;
* ``test_loss/<task>`` and ``test_acc/<task>`` (Fig. 5) for each ``--track`` task: the
  cross entropy (no label smoothing) and top-1 accuracy of the zero-shot classifier on the
  task's whole test set.

Off the hot path: an untracked step costs one integer test (``tracks``); the host reads
values back only at tracked steps. The tracked evaluations run under ``no_grad`` in eval
mode and draw no random numbers, so a run's numbers do not depend on them (tested).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from gift_fast.data.cache import normalize_uint8
from gift_fast.distributed import all_reduce_sum, all_reduce_tensors_
from gift_fast.evaluate import iter_eval_batches, zero_shot_classifier
from gift_fast.files import append_text_line
from gift_fast.report import plot_run, save_figure
from gift_fast.run_folder import trim_log
from gift_fast.text import encode_text

REPORT_TO = ("none", "tensorboard", "wandb", "all")
CURVES_FILE = "curves.jsonl"
# log.jsonl keys that are not measurements (they locate the record)
_LOG_KEYS_NOT_LOGGED = frozenset({"task", "task_index", "step", "time"})


def parse_report_to(value: Optional[str]) -> List[str]:
    """``"none"`` / ``""`` -> []; ``"all"`` -> both; ``"tensorboard,wandb"`` -> both; errors name the option."""
    parts = [p.strip().lower() for p in str(value or "none").split(",") if p.strip()]
    bad = [p for p in parts if p not in REPORT_TO]
    if bad:
        raise ValueError(f"--report-to {value!r}: unknown {', '.join(map(repr, bad))}; use none, tensorboard, "
                         f"wandb or all (several separated by commas)")
    if "all" in parts:
        return ["tensorboard", "wandb"]
    return [p for p in dict.fromkeys(parts) if p != "none"]


def check_backends(report_to: Optional[str]) -> List[str]:
    """The backends of ``report_to``, each importable; a clear error (with the install command) otherwise."""
    backends = parse_report_to(report_to)
    if "tensorboard" in backends:
        try:
            import tensorboard  # noqa: F401  (torch.utils.tensorboard needs the tensorboard package)
        except ImportError:
            raise ValueError("--report-to tensorboard needs the tensorboard package: pip install tensorboard "
                             "(it is in gift-fast's [test] extra)") from None
    if "wandb" in backends:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ValueError("--report-to wandb needs the wandb package: pip install 'gift-fast[wandb]' (or pip "
                             "install wandb); set WANDB_MODE=offline to log without an account") from None
    return backends


def parse_track(value) -> Optional[List[str]]:
    if value is None:
        return None
    if isinstance(value, str):
        value = value.split(",")
    out = [str(v).strip() for v in value if str(v).strip()]
    return out or None


# =============================================================================== writers
class _TensorBoard:
    def __init__(self, out: Path, name: str, config: Dict[str, Any]):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"))
        self.writer.add_text("run", f"name: {name}\n\nconfig:\n\n    " +
                             json.dumps(config, indent=2, default=str).replace("\n", "\n    "), 0)

    def scalars(self, values: Dict[str, float], step: int) -> None:
        for tag, v in values.items():
            self.writer.add_scalar(tag, v, step)

    def image(self, tag: str, path: Path, step: int) -> None:
        import matplotlib.image as mpimg

        img = mpimg.imread(str(path))           # float [H, W, 4] in [0, 1] for a PNG
        self.writer.add_image(tag, img[..., :3], step, dataformats="HWC")

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, out: Path, name: str, config: Dict[str, Any]):
        import wandb

        (out / "wandb").mkdir(parents=True, exist_ok=True)
        self.wandb = wandb
        # resume="allow" with a stable id: a resumed run continues the same W&B run
        run_id = "gift-fast-" + _stable_id(out)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "gift-fast"), name=name, id=run_id,
                              resume="allow", dir=str(out), config=config)

    def scalars(self, values: Dict[str, float], step: int) -> None:
        self.run.log(dict(values), step=step)

    def image(self, tag: str, path: Path, step: int) -> None:
        self.run.log({tag: self.wandb.Image(str(path))}, step=step)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.run.finish()


def _stable_id(out: Path) -> str:
    return hashlib.sha256(str(Path(out).resolve()).encode()).hexdigest()[:12]


# =============================================================================== the trainer's hooks
class RunHooks:
    """What the trainer calls (module docstring). Cheap when nothing is asked for."""

    def __init__(self, trainer):
        cfg = trainer.cfg
        self.trainer = trainer
        self.backends = check_backends(cfg.report_to)
        self.track_tasks = parse_track(cfg.track) or []
        unknown = [n for n in self.track_tasks if n not in trainer.task_names]
        if unknown:
            raise ValueError(f"--track {','.join(unknown)}: not a task of this run; its tasks: "
                             f"{', '.join(trainer.task_names)}")
        if cfg.track_every < 0:
            raise ValueError(f"--track-every must be 0 (off) or a positive number of steps, got {cfg.track_every}")
        self.every = int(cfg.track_every) or (int(cfg.log_every) if self.track_tasks else 0)
        self.main = trainer.dist.is_main
        self._writers: Optional[list] = None
        self._classifiers: Dict[str, Any] = {}

    # ------------------------------------------------------------------ writers (rank 0, opened lazily)
    @property
    def writers(self) -> list:
        if self._writers is None:
            self._writers = []
            if self.main and self.backends:
                import atexit

                atexit.register(self.close)     # a run that fails still flushes what it logged
                t = self.trainer
                name = t.cfg.name or t.out.name
                config = _plain_config(t.cfg)
                for b in self.backends:
                    self._writers.append(_TensorBoard(t.out, name, config) if b == "tensorboard"
                                         else _WandB(t.out, name, config))
        return self._writers

    def _scalars(self, values: Dict[str, float], step: int) -> None:
        if values:
            for w in self.writers:
                w.scalars(values, step)

    def global_step(self, t: int, k: int) -> int:
        """Steps of the tasks before ``t`` plus ``k`` (class-incremental steps differ in length)."""
        per_task = getattr(self.trainer, "step_iterations", None)
        if per_task is None:
            return t * int(self.trainer.cfg.steps) + int(k)
        return int(sum(per_task[:t])) + int(k)

    # ------------------------------------------------------------------ the five hooks
    def on_log(self, rec: Dict[str, Any]) -> None:
        if not self.backends or not self.main:
            return
        vals = {f"train/{k}": float(v) for k, v in rec.items()
                if k not in _LOG_KEYS_NOT_LOGGED and isinstance(v, (int, float)) and not isinstance(v, bool)}
        self._scalars(vals, self.global_step(rec["task_index"], rec["step"]))

    def on_eval(self, t: int, row: Sequence[float]) -> None:
        """``t = -1``: the zero-shot row (step 0); else the row after task ``t`` (at its last step)."""
        if not self.backends or not self.main:
            return
        names = self.trainer.task_names
        vals = {f"eval/{n}": float(a) for n, a in zip(names, row)}
        vals["eval/mean"] = float(sum(row) / len(row))
        step = 0 if t < 0 else self.global_step(t + 1, 0)
        self._scalars(vals, step)
        for w in self.writers:
            w.flush()

    def on_end(self, metrics: Optional[Dict[str, Any]]) -> None:
        if not self.main:
            return
        try:
            if self.backends and metrics:
                t = self.trainer
                step = self.global_step(len(t.tasks), 0)
                self._scalars({f"metrics/{m}": float(metrics[m]) for m in ("transfer", "avg", "last")
                               if metrics.get(m) is not None}, step)
                fig = t.out / "acc_matrix.png"
                if not fig.is_file():
                    try:
                        plot_run(t.out)
                    except Exception as e:   # no figure must not cost a finished run
                        t._note(f"accuracy-matrix figure skipped: {type(e).__name__}: {e}")
                if fig.is_file():
                    for w in self.writers:
                        w.image("acc_matrix", fig, step)
        finally:
            self.close()

    def close(self) -> None:
        for w in self._writers or []:
            w.close()
        self._writers = None

    # ------------------------------------------------------------------ the --track curves
    def tracks(self, k: int) -> bool:
        """Is step ``k`` (0-based) a curve point? An integer test: no tensor is touched."""
        return self.every > 0 and (k + 1) % self.every == 0

    def on_task_start(self, t: int, k0: int, syn: Optional[Dict[str, Any]]) -> None:
        if self.every <= 0:
            return
        if self.main:                  # a killed attempt's points after step k0 go (the resume writes them again)
            trim_log(self.trainer.out / CURVES_FILE, t, k0)
        if k0 == 0:
            self._point(t, 0, None, syn, syn_row=0)

    def on_track(self, t: int, k: int, out: Dict[str, Any], syn: Optional[Dict[str, Any]]) -> None:
        self._point(t, k + 1, out, syn, syn_row=k)

    def _point(self, t: int, step: int, out: Optional[Dict[str, Any]], syn, syn_row: int) -> None:
        trainer = self.trainer
        rec: Dict[str, Any] = {"task": trainer.tasks[t].name, "task_index": t, "step": step,
                               "global_step": self.global_step(t, step)}
        if out is not None and "loss_ce" in out:
            v = out["loss_ce"].detach().float().reshape(1)
            if trainer.dist.enabled:              # each process holds its shard's CE: their mean
                all_reduce_tensors_([v], trainer.dist, average=True)
            rec["train_loss"] = float(v)
        model = trainer.model
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                if syn is not None and trainer.method.distills:
                    rec["distill_ce"] = self._distill_ce(syn, syn_row)
                for name in self.track_tasks:
                    loss, acc = self._test_loss_acc(trainer.task_names.index(name))
                    rec[f"test_loss/{name}"], rec[f"test_acc/{name}"] = loss, acc
        finally:
            model.train(was_training)
        if not self.main:
            return
        append_text_line(trainer.out / CURVES_FILE, json.dumps(rec))
        self._scalars({f"curves/{k}": float(v) for k, v in rec.items()
                       if k not in ("task", "task_index", "step", "global_step")}, rec["global_step"])

    def _distill_ce(self, syn: Dict[str, Any], k: int) -> float:
        """H(p_teacher, p_student) on the global synthetic batch of step ``k`` (module docstring)."""
        tr = self.trainer
        i = syn["idx"][k]
        kk = syn["labels"][i]
        x = normalize_uint8(syn["images"][i], tr.bundle.mean, tr.bundle.std)
        with tr.precision.autocast():
            img = tr.model.encode_image(x)
            txt = encode_text(tr.model, syn["tokens"][kk])
        s, tau = tr.logit_scale, tr.cfg.temperature
        S = s * F.normalize(img.float(), dim=-1) @ F.normalize(txt.float(), dim=-1).T
        St = s * F.normalize(syn["t_img"][i].float(), dim=-1) @ F.normalize(syn["t_txt"][kk].float(), dim=-1).T

        def ce(z, zt):
            return -(F.softmax(zt / tau, dim=1) * F.log_softmax(z / tau, dim=1)).sum(dim=1).mean()

        return float(0.5 * (ce(S, St) + ce(S.T, St.T)))

    def _test_loss_acc(self, j: int):
        """Cross entropy (mean over images) and top-1 accuracy (%) of the current model on task j's test set."""
        tr = self.trainer
        task = tr.tasks[j]
        if task.test is None or len(task.test) == 0:
            raise ValueError(f"--track {task.name}: the task has no test data")
        W = zero_shot_classifier(tr.model, tr.bundle.tokenizer, task.classnames, task.templates, device=tr.device,
                                 bf16=tr.precision.bf16)
        sums = torch.zeros(3, dtype=torch.float64, device=tr.device)    # loss sum, correct, count
        start, stop = tr.dist.span(len(task.test))
        for x, y in iter_eval_batches(task.test, tr.cfg.eval_batch_size, tr.device, tr.cfg.num_workers, start, stop):
            with tr.precision.autocast():
                img = tr.model.encode_image(x)
            logits = 100.0 * F.normalize(img.float(), dim=-1) @ W.T
            y = y.long()
            sums[0] += F.cross_entropy(logits, y, reduction="sum").double()
            sums[1] += (logits.argmax(dim=-1) == y).sum()
            sums[2] += y.shape[0]
        sums = all_reduce_sum(sums, tr.dist)
        loss, correct, n = (float(v) for v in sums.tolist())
        return loss / n, 100.0 * correct / n


def _plain_config(cfg) -> Dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


# =============================================================================== reading and plotting curves
def read_curves(run_dir) -> List[Dict[str, Any]]:
    """The points of a run's ``curves.jsonl`` (empty when the run was not tracked)."""
    path = Path(run_dir) / CURVES_FILE
    if not path.is_file():
        return []
    out = []
    with open(path) as fh:
        for line in fh:
            line = line.strip()
            if line:
                out.append(json.loads(line))
    return out


def plot_curves(runs: Sequence, path) -> Path:
    """Fig. 4 and Fig. 5 of the paper from the ``curves.jsonl`` of one run or several (overlaid).

    ``runs``: ``(label, run folder)`` pairs. Panels: the teacher-student cross entropy on the
    synthetic batch (Fig. 4), the train loss on the current task with the test loss of the
    tracked tasks (Fig. 5), and the tracked tasks' test accuracy. Vertical lines mark task
    boundaries. Raises a ValueError naming the folders when none holds curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = [(label, read_curves(folder), folder) for label, folder in runs]
    if not any(pts for _, pts, _ in data):
        raise ValueError(f"no curves in {', '.join(str(f) for _, _, f in data)}: train with --track TASK "
                         f"--track-every K (curves.jsonl in the run folder)")
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    ax_kd, ax_loss, ax_acc = axes
    boundaries = set()
    for label, pts, _ in data:
        if not pts:
            continue
        for p in pts:
            if p["step"] == 0:
                boundaries.add(p["global_step"])
        kd = [(p["global_step"], p["distill_ce"]) for p in pts if "distill_ce" in p]
        if kd:
            ax_kd.plot(*zip(*kd), label=label)
        tl = [(p["global_step"], p["train_loss"]) for p in pts if "train_loss" in p]
        if tl:
            ax_loss.plot(*zip(*tl), label=f"{label}: train loss (current task)")
        tasks = sorted({k.split("/", 1)[1] for p in pts for k in p if k.startswith("test_loss/")})
        for name in tasks:
            ax_loss.plot(*zip(*[(p["global_step"], p[f"test_loss/{name}"]) for p in pts if f"test_loss/{name}" in p]),
                         linestyle="--", label=f"{label}: test loss {name}")
            ax_acc.plot(*zip(*[(p["global_step"], p[f"test_acc/{name}"]) for p in pts if f"test_acc/{name}" in p]),
                        label=f"{label}: {name}")
    for ax in axes:
        for b in sorted(boundaries):
            if b > 0:
                ax.axvline(b, color="grey", alpha=0.3, linewidth=0.8)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    ax_kd.set_title("teacher-student cross entropy, synthetic batch (Fig. 4)")
    ax_kd.set_ylabel("cross entropy")
    ax_loss.set_title("train loss and test loss (Fig. 5)")
    ax_loss.set_ylabel("loss")
    ax_acc.set_title("test accuracy of the tracked tasks")
    ax_acc.set_ylabel("top-1 accuracy (%)")
    fig.tight_layout()
    return save_figure(fig, Path(path))


__all__ = ["RunHooks", "parse_report_to", "check_backends", "read_curves", "plot_curves", "CURVES_FILE", "REPORT_TO"]
