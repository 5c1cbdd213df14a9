"""Several runs: one config per (method, seed), run one after the other or in worker processes.

``plan_runs`` gives the configs (``<out>/<method>-seed<k>`` each when there are several); ``run_many`` runs them,
skipping the runs already finished in their folder when ``resume`` is set. The class-incremental benchmarks
(gift_fast.cil_trainer) run through the same ``run_many`` with their own one-run function and summary line.
"""
from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from tqdm.auto import tqdm

from gift_fast.toy.pretrain import pretrained_toy_clip_path
from gift_fast.distributed import current, main_first
from gift_fast.method import METHOD_DEFAULTS, METHODS
from gift_fast.run_config import TrainConfig
from gift_fast.train import train


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


def _finished(cfg: TrainConfig) -> Optional[Dict[str, Any]]:
    """The metrics of a run already finished in its folder (None otherwise)."""
    p = Path(cfg.out) / "metrics.json"
    if not p.is_file():
        return None
    with open(p) as fh:
        return json.load(fh)


def summary_line(cfg: TrainConfig, metrics: Dict[str, Any]) -> str:
    """One line per finished run of an MTIL / toy sequence."""
    if metrics.get("transfer") is not None:
        return f"{cfg.out}: Transfer {metrics['transfer']:.1f}  Avg {metrics['avg']:.1f}  Last {metrics['last']:.1f}"
    return f"{cfg.out}: Avg {metrics['avg']:.1f}  Last {metrics['last']:.1f}"


def run_many(cfgs: Sequence[TrainConfig], jobs: int = 1, progress: bool = True, *,
             run_one: Optional[Callable[[TrainConfig], Dict[str, Any]]] = None,
             summary: Callable[[TrainConfig, Dict[str, Any]], str] = summary_line) -> List[Dict[str, Any]]:
    """Run several configs, ``jobs`` at a time in worker processes (1: in this process, in order).

    Runs already finished in their folder are skipped when ``resume`` is set. Shared
    inputs are prepared first (the toy CLIP's pre-training), so workers never race
    to build them. Under torchrun (an initialized process group) the runs go one after
    the other, each over all the processes. ``run_one``: how one run is run (default
    ``gift_fast.train.train``; another one runs in this process, one run at a time);
    ``summary``: the line printed after each run.
    """
    dist = current()
    if dist.enabled:
        jobs = 1                          # every process takes part in every run
        progress = progress and dist.is_main
    if run_one is not None:
        jobs = 1
    run_one = run_one or train

    todo, results = [], [None] * len(cfgs)
    for i, c in enumerate(cfgs):
        done = _finished(c) if c.resume else None
        if done is not None:
            results[i] = done
        else:
            todo.append(i)
    if any(cfgs[i].toy and cfgs[i].pretrained == "toy" for i in todo):
        with main_first(dist):            # one process builds it, the others then find it cached
            pretrained_toy_clip_path(cfgs[todo[0]].model, progress=progress)
    if jobs <= 1 or len(todo) <= 1:
        for i in todo:
            results[i] = run_one(cfgs[i])
            if progress:
                print(summary(cfgs[i], results[i]), file=sys.stderr, flush=True)
        return results
    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
        futs = {pool.submit(_run_config, dataclasses.asdict(dataclasses.replace(cfgs[i], progress=False))): i
                for i in todo}
        bar = tqdm(total=len(todo), desc=f"runs ({jobs} at a time)", disable=not progress)
        for f in as_completed(futs):
            i = futs[f]
            try:
                results[i] = f.result()
            except BrokenProcessPool:
                # a worker died outright (SIGKILL, out of memory, a crash in native code): no Python error to show
                bar.close()
                finished = [str(cfgs[j].out) for j in todo if results[j] is not None]
                raise ChildProcessError(
                    f"a worker process died while running {len(todo)} runs {jobs} at a time (killed, out of memory, "
                    f"or a crash in native code); finished runs are kept ({', '.join(finished) or 'none yet'}). "
                    f"Rerun the same command with --resume to continue the others (each from its last checkpoint), "
                    f"and --jobs 1 to run them in this process, where an error shows itself") from None
            bar.update(1)
            if progress:
                bar.write(summary(cfgs[i], results[i]))
        bar.close()
    return results


__all__ = ["plan_runs", "run_many", "summary_line"]
