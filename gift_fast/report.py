"""Paper-style tables and plots of finished runs.

``load_run(folder)`` reads a run folder (``config.json``, ``state.json`` /
``acc_matrix.csv``); ``report_tables(runs)`` gives Markdown tables as the paper
prints them: a summary (Transfer, Avg, Last) with the zero-shot row, and per
data set tables of each metric (Tab. 9 / 10 of the paper). Runs that differ only
in their seed are averaged (mean, and +- the standard deviation over seeds).
``plot_run(folder)`` draws the accuracy-matrix heat map and the accuracy of each
task against the task index (the paper's Fig. 6).
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from gift_fast.files import atomic_write_bytes, atomic_write_text
from gift_fast.metrics import continual_metrics
from gift_fast.paper import (MTIL_PER_TASK, PER_TASK_TABLE_OF_ORDER, PROTOCOL_TEXT, TABLE_OF_ORDER, PaperMatch,
                             mtil_order_of, paper_rows)


@dataclass
class RunResult:
    path: Path
    label: str
    tasks: List[str]
    zero_shot: List[float]
    acc: List[List[float]]            # rows finished so far
    seed: Optional[int] = None
    config: Dict[str, Any] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return len(self.acc) == len(self.tasks)

    def metrics(self) -> Dict[str, Any]:
        return continual_metrics(self.acc)

    def zero_shot_metrics(self) -> Dict[str, Any]:
        return continual_metrics([self.zero_shot] * len(self.zero_shot))


def read_acc_csv(path: Path):
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows or rows[0][0] != "after":
        raise ValueError(f"{path} is not an accuracy matrix written by gift-fast train (header 'after,<tasks>')")
    tasks = rows[0][1:]
    zero = [float(v) for v in rows[1][1:]] if len(rows) > 1 and rows[1][0] == "zero-shot" else None
    acc = [[float(v) for v in r[1:]] for r in rows[2:] if r]
    return tasks, zero, acc


def load_run(path) -> RunResult:
    """A run folder (or its acc_matrix.csv); clear errors for anything else."""
    p = Path(path)
    if p.is_file() and p.name == "acc_matrix.csv":
        p = p.parent
    if not p.is_dir():
        raise FileNotFoundError(f"{path}: no such run folder")
    csv_path = p / "acc_matrix.csv"
    if not csv_path.is_file():
        raise FileNotFoundError(f"{p} is not a gift-fast run folder (no acc_matrix.csv); pass folders written by "
                                f"`gift-fast train --out DIR`")
    tasks, zero, acc = read_acc_csv(csv_path)
    cfg: Dict[str, Any] = {}
    if (p / "config.json").is_file():
        with open(p / "config.json") as fh:
            cfg = json.load(fh)
    label = cfg.get("label") or p.name
    seed = cfg.get("config", {}).get("seed")
    if zero is None:
        raise ValueError(f"{csv_path} has no zero-shot row")
    return RunResult(p, label, tasks, zero, acc, seed, cfg)


# ----------------------------------------------------------------------------- grouping
@dataclass
class Group:
    label: str
    runs: List[RunResult]

    @property
    def tasks(self) -> List[str]:
        return self.runs[0].tasks

    def stat(self, fn) -> "tuple[float, float]":
        """Mean and sample standard deviation over the seeds (NaN for a metric that does not exist,
        such as Transfer of a one-task sequence)."""
        vals = np.array([np.nan if fn(r) is None else fn(r) for r in self.runs], dtype=np.float64)
        return float(vals.mean()), float(vals.std(ddof=1)) if len(vals) > 1 else 0.0


def group_runs(runs: Sequence[RunResult], by_seed: bool = True) -> List[Group]:
    """Finished runs with the same label and tasks form one group (its seeds); order of first appearance."""
    groups: Dict[tuple, Group] = {}
    for r in runs:
        if not r.finished:
            raise ValueError(f"{r.path} is not finished ({len(r.acc)} of {len(r.tasks)} tasks): resume it with "
                             f"`gift-fast train ... --out {r.path} --resume`")
        key = (r.label, tuple(r.tasks)) if by_seed else (str(r.path),)
        label = r.label if by_seed else f"{r.label} ({r.path.name})"
        groups.setdefault(key, Group(label, [])).runs.append(r)
    return list(groups.values())


def _fmt(mean: Optional[float], std: float, n: int) -> str:
    if mean is None or not np.isfinite(mean):
        return "-"
    return f"{mean:.1f}" if n == 1 else f"{mean:.1f} ± {std:.1f}"


def summary_table(groups: Sequence[Group]) -> str:
    """| Method | Transfer | Avg | Last | with the initial model's zero-shot row first."""
    lines = ["| Method | Seeds | Transfer | Avg | Last |", "| --- | --- | --- | --- | --- |"]
    seen_zs = set()
    for g in groups:
        key = tuple(g.tasks)
        if key in seen_zs:
            continue
        seen_zs.add(key)
        zs = [r.zero_shot_metrics() for r in g.runs]
        cells = [_fmt(None if zs[0][m] is None else float(np.mean([z[m] for z in zs])), 0.0, 1)
                 for m in ("transfer", "avg", "last")]
        lines.append(f"| Zero-shot ({len(g.tasks)} tasks) | | " + " | ".join(cells) + " |")
    for g in groups:
        n = len(g.runs)
        cells = [_fmt(*g.stat(lambda r, m=m: r.metrics()[m]), n) for m in ("transfer", "avg", "last")]
        lines.append(f"| {g.label} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_task_table(groups: Sequence[Group], metric: str) -> str:
    """One metric per data set (columns) and its average, one row per group (Tab. 9 / 10)."""
    tasks = groups[0].tasks
    lines = ["| Method | " + " | ".join(tasks) + " | Average |", "|" + " --- |" * (len(tasks) + 2)]
    g0 = groups[0]
    zs_row = []
    for j in range(len(tasks)):
        zs_row.append(f"{np.mean([r.zero_shot[j] for r in g0.runs]):.1f}" if (metric != "transfer" or j > 0) else "")
    zvals = [r.zero_shot_metrics()[metric] for r in g0.runs]
    zavg = _fmt(None if zvals[0] is None else float(np.mean(zvals)), 0.0, 1)
    lines.append("| Zero-shot | " + " | ".join(zs_row) + f" | {zavg} |")
    for g in groups:
        if g.tasks != tasks:
            continue
        cells = []
        for j in range(len(tasks)):
            if metric == "transfer" and j == 0:
                cells.append("")
                continue
            mean, std = g.stat(lambda r, j=j: r.metrics()["per_task"][j][metric])
            cells.append(_fmt(mean, std, len(g.runs)))
        cells.append(_fmt(*g.stat(lambda r: r.metrics()[metric]), len(g.runs)))
        lines.append(f"| {g.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report_tables(runs: Sequence[RunResult], by_seed: bool = True, paper: bool = True) -> str:
    """The Markdown report: the summary and the per-data-set Transfer / Avg / Last tables, then (``paper``)
    the paper's published rows beside the runs (``paper_section``)."""
    if not runs:
        raise ValueError("no run to report")
    groups = group_runs(runs, by_seed)
    parts = ["## Summary", "", summary_table(groups)]
    for metric, title in (("transfer", "Transfer"), ("avg", "Avg"), ("last", "Last")):
        parts += ["", f"## {title} per data set", "", per_task_table(groups, metric)]
    others = [g.label for g in groups if g.tasks != groups[0].tasks]
    if others:
        parts += ["", f"(per-data-set tables omit {others}: other task sequences)"]
    if paper:
        parts += ["", paper_section(groups)]
    return "\n".join(parts) + "\n"


# ----------------------------------------------------------------------------- the paper beside the runs
def _signed(d: Optional[float]) -> str:
    return "-" if d is None or not np.isfinite(d) else f"{round(d, 1) + 0.0:+.1f}"     # + 0.0: no "-0.0"


def _cell(v: Optional[float]) -> str:
    return "-" if v is None or not np.isfinite(v) else f"{v:.1f}"


def group_match(g: Group):
    """The paper's rows (gift_fast.paper.PaperMatch) for a group of runs, from its first run's config.json."""
    cfg = g.runs[0].config
    if not cfg.get("config") or not cfg.get("method"):
        return PaperMatch(mtil_order_of(g.tasks), ["no config.json (the run's settings are unknown)"])
    return paper_rows(cfg["config"], cfg["method"], g.tasks)


def paper_section(groups: Sequence[Group]) -> str:
    """"## Beside the paper": per group, the published rows its protocol and configuration match
    (gift_fast.paper), the run's numbers and the difference (run - paper); the per-data-set table of
    Tab. 9 / Tab. 10 for a main-table row; or why there is none."""
    parts = ["## Beside the paper", ""]
    for g in groups:
        m = group_match(g)
        n = len(g.runs)
        title = f"### {g.label}" + (f" (MTIL Order {'I' * m.order})" if m.order else "")
        parts += [title, ""]
        if not m.on_protocol:
            parts += [f"No published row: the paper's protocol is {PROTOCOL_TEXT}; this run differs in "
                      f"{'; '.join(m.differences)}.", ""]
            continue
        run_vals = [g.stat(lambda r, k=k: r.metrics()[k])[0] for k in ("transfer", "avg", "last")]
        zs_vals = [float(np.mean([r.zero_shot_metrics()[k] for r in g.runs])) for k in ("transfer", "avg", "last")]
        lines = ["| | Transfer | Avg | Last |", "| --- | --- | --- | --- |"]

        def add(label, paper_vals, mine):
            lines.append(f"| {label} | " + " | ".join(_cell(v) for v in paper_vals) + " |")
            lines.append(f"| {'this run' if n == 1 else f'these runs ({n} seeds, mean)'} | " +
                         " | ".join(_cell(v) for v in mine) + " |")
            lines.append("| difference (run - paper) | " + " | ".join(
                _signed(None if p is None else b - p) for p, b in zip(paper_vals, mine)) + " |")

        add(f"paper, {TABLE_OF_ORDER[m.order]}: Zero-shot", m.zero_shot(), zs_vals)
        same: Dict[tuple, List[str]] = {}          # one published run often fills rows of several tables
        for row in m.rows:
            same.setdefault(tuple(row.values), []).append(f"{row.table}: {row.row}" +
                                                          (f" ({row.note})" if row.note else ""))
        for vals, names in same.items():
            add("paper, " + " = ".join(names), vals, run_vals)
        parts += ["\n".join(lines), ""]
        if not m.rows:
            parts += ["No published row has this method configuration (the zero-shot row above is the protocol's).",
                      ""]
        main = next((r for r in m.rows if r.per_task_row), None)
        if main is not None:
            tab = PER_TASK_TABLE_OF_ORDER[m.order]
            per = MTIL_PER_TASK[m.order]
            T = len(g.tasks)
            head = "| " + tab + ": " + main.row + " | " + " | ".join(g.tasks) + " | Average |"
            rows = [head, "|" + " --- |" * (T + 2)]
            zs_run = [float(np.mean([r.zero_shot[j] for r in g.runs])) for j in range(T)]
            zs_run.append(float(np.mean(zs_run)))
            for label, vals in (("Zero-shot accuracy, paper", per["zero_shot"]), ("Zero-shot accuracy, run", zs_run),
                                ("Zero-shot accuracy, difference", [b - a for a, b in zip(per["zero_shot"], zs_run)])):
                fmt = _signed if label.endswith("difference") else _cell
                rows.append(f"| {label} | " + " | ".join(fmt(v) for v in vals) + " |")
            for metric, name in (("transfer", "Transfer"), ("avg", "Avg"), ("last", "Last")):
                paper_vals = list(per[metric][main.per_task_row])
                mine = [g.stat(lambda r, j=j: r.metrics()["per_task"][j][metric])[0] for j in range(T)]
                mine.append(g.stat(lambda r: r.metrics()[metric])[0])
                if metric == "transfer":          # the first task has no Transfer: the paper's row skips it
                    paper_vals = [None] + paper_vals
                    mine[0] = None
                diffs = [None if (a is None or b is None) else b - a for a, b in zip(paper_vals, mine)]
                rows.append(f"| {name}, paper | " + " | ".join(_cell(v) for v in paper_vals) + " |")
                rows.append(f"| {name}, run | " + " | ".join(_cell(v) for v in mine) + " |")
                rows.append(f"| {name}, difference | " + " | ".join(_signed(v) for v in diffs) + " |")
            parts += ["\n".join(rows), ""]
    return "\n".join(parts).rstrip() + "\n"


def expand_run_paths(paths: Sequence[str]) -> List[Path]:
    """Run folders from the arguments: a folder that is not a run but holds runs stands for all of them."""
    out: List[Path] = []
    for p in map(Path, paths):
        if (p / "acc_matrix.csv").is_file() or p.name == "acc_matrix.csv":
            out.append(p)
        elif p.is_dir():
            subs = sorted(q.parent for q in p.glob("*/acc_matrix.csv"))
            if not subs:
                raise FileNotFoundError(f"{p} holds no gift-fast run (no acc_matrix.csv in it or its sub-folders)")
            out.extend(subs)
        else:
            raise FileNotFoundError(f"{p}: no such run folder")
    return out


def report(paths: Sequence[str], *, markdown: Optional[str] = None, by_seed: bool = True, paper: bool = True) -> str:
    """Load runs, build the tables, write them as Markdown (``markdown`` path), return the text."""
    runs = [load_run(p) for p in expand_run_paths(paths)]
    text = report_tables(runs, by_seed=by_seed, paper=paper)
    if markdown:
        atomic_write_text(markdown, "# gift-fast report\n\nRuns: " +
                          ", ".join(str(r.path) for r in runs) + "\n\n" + text)
    return text


# ----------------------------------------------------------------------------- plots
def save_figure(fig, path, dpi: int = 120) -> Path:
    """Render a matplotlib figure to PNG and write it atomically (gift_fast.files), then close it: a kill
    mid-write leaves the previous plot, never half of one."""
    import matplotlib.pyplot as plt   # lazy: matplotlib only when a plot is made

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def plot_run(path) -> List[Path]:
    """``acc_matrix.png`` (heat map) and ``acc_curves.png`` (accuracy per task vs task index) in the run folder."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = load_run(path)
    mat = np.array([run.zero_shot] + run.acc, dtype=np.float64)
    rows = ["zero-shot"] + [f"after {n}" for n in run.tasks[:len(run.acc)]]
    T = len(run.tasks)
    out = []
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * T, 1.0 + 0.5 * len(rows)))
    im = ax.imshow(mat, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(T), run.tasks, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    for i in range(mat.shape[0]):
        for j in range(T):
            ax.text(j, i, f"{mat[i, j]:.0f}", ha="center", va="center", fontsize=7,
                    color="white" if mat[i, j] < 50 else "black")
    fig.colorbar(im, ax=ax, label="top-1 accuracy (%)")
    ax.set_title(f"{run.label}: accuracy on each task (columns) after each task (rows)")
    fig.tight_layout()
    out.append(run.path / "acc_matrix.png")
    save_figure(fig, out[-1])

    fig, ax = plt.subplots(figsize=(6, 4))
    x = np.arange(mat.shape[0])
    for j, name in enumerate(run.tasks):
        ax.plot(x, mat[:, j], marker="o", label=name)
    ax.set_xticks(x, ["0"] + [str(i + 1) for i in range(len(run.acc))])
    ax.set_xlabel("task index (0 = before training)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(f"{run.label}: accuracy per task (as the paper's Fig. 6)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out.append(run.path / "acc_curves.png")
    save_figure(fig, out[-1])
    return out


__all__ = ["RunResult", "load_run", "report", "report_tables", "summary_table", "per_task_table", "plot_run",
           "group_runs", "expand_run_paths", "paper_section"]
