"""Option checks that run before any work: ranges, finiteness, combinations, devices, output files.

Every command (train, synth, eval, data) calls these first, so a bad value fails in a
second with a sentence naming the option and the fix, and leaves no folder behind
(instead of failing after a model load or a zero-shot evaluation). Only pure checks
live here (no model, no data); what needs the file system is limited to "can this
output file be written".

Errors are ``OptionError`` (a ``ValueError``): the CLI prints them as one line.
"""
from __future__ import annotations

import math
import os
import re
from typing import Any, Iterable, Optional, Tuple

from gift_fast.backends import BACKENDS
from gift_fast.synth.prompts import SEED_SCHEMES
from gift_fast.config import task_order
from gift_fast.toy.tasks import TOY_TASKS
from gift_fast.toy.clip import is_tiny, TINY_MODEL_CONFIGS

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")


class OptionError(ValueError):
    """A command-line value that cannot work; the message names the option and the fix."""


def _number(option: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise OptionError(f"{option} must be a number, got {value!r}")
    if not math.isfinite(float(value)):
        raise OptionError(f"{option} must be a finite number, got {value!r}")
    return float(value)


def check_int(option: str, value: Any, *, low: Optional[int] = None, high: Optional[int] = None,
              hint: str = "") -> None:
    """``value`` is an integer in [low, high] (either bound may be open)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise OptionError(f"{option} must be an integer, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        span = (f">= {low}" if high is None else f"<= {high}" if low is None else f"between {low} and {high}")
        raise OptionError(f"{option} must be {span}, got {value}" + (f" ({hint})" if hint else ""))


def check_float(option: str, value: Any, *, low: Optional[float] = None, high: Optional[float] = None,
                low_open: bool = False, high_open: bool = False, hint: str = "") -> None:
    """``value`` is a finite number in the interval (``*_open``: the bound itself is excluded)."""
    if value is None:
        return
    v = _number(option, value)
    bad = ((low is not None and (v < low or (low_open and v == low)))
           or (high is not None and (v > high or (high_open and v == high))))
    if bad:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
        span = " and ".join(s for s in (lo, hi) if s)
        raise OptionError(f"{option} must be {span}, got {value!r}" + (f" ({hint})" if hint else ""))


def check_device(option: str, device: Optional[str]) -> None:
    """auto | cpu | cuda | cuda:N | mps (torch.device of anything else raises a RuntimeError deep inside)."""
    if device in (None, ""):
        return
    if not _DEVICE.match(str(device)):
        raise OptionError(f"{option} {device!r} is not a device this program can use: choose auto, cpu, cuda or "
                          f"cuda:N")


def check_output_file(option: str, path: Optional[str]) -> None:
    """The file ``path`` can be written: not a folder, and its nearest existing parent is a writable folder.

    Checked before the work whose result it will hold (an evaluation, a report).
    """
    if not path:
        return
    p = os.path.abspath(os.path.expanduser(str(path)))
    if os.path.isdir(p):
        raise OptionError(f"{option} {path}: that is a folder; give a file name (e.g. {os.path.join(path, 'x.json')})")
    parent = os.path.dirname(p)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise OptionError(f"{option} {path}: {parent} is a file, not a folder; choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OptionError(f"{option} {path}: {parent} is not writable; choose another path or fix its permissions")
    if os.path.exists(p) and not os.access(p, os.W_OK):
        raise OptionError(f"{option} {path}: the file is not writable; choose another path or fix its permissions")


def check_order_and_tasks(order: Optional[int], tasks: Optional[Iterable[str]]) -> None:
    """``--order`` and ``--tasks`` both name the task sequence: only one of them."""
    if order is not None and tasks:
        raise OptionError(f"--order {order} and --tasks both choose the task sequence: give only one of them")
    check_order(order)


def check_order(order: Optional[int]) -> None:
    """MTIL has order 1 and order 2 (gift_fast.config's message)."""
    if order is None:
        return
    try:
        task_order(order)
    except ValueError as e:
        raise OptionError(f"--order: {e}") from None


def check_train_config(cfg, world_size: int = 1) -> None:
    """Every numeric field of a ``TrainConfig`` in range, and its combinations consistent (pure checks)."""
    check_int("--steps", cfg.steps, low=1)
    check_int("--batch-size", cfg.batch_size, low=1)
    check_int("--syn-batch-size", cfg.syn_batch_size, low=1)
    check_int("--warmup", cfg.warmup, low=0)
    check_float("--lr", cfg.lr, low=0, low_open=True, hint="a learning rate of 0 trains nothing")
    check_float("--cd-weight", cfg.cd_weight, low=0)
    check_float("--ita-weight", cfg.ita_weight, low=0)
    check_float("--consolidation-weight", cfg.consolidation_weight, low=0)
    check_float("--awc-decay", cfg.awc_decay, low=0, high=1, high_open=True)
    check_int("--fisher-batches", cfg.fisher_batches, low=1)
    check_float("--temperature", cfg.temperature, low=0, low_open=True)
    check_float("--label-smoothing", cfg.label_smoothing, low=0, high=1, high_open=True)
    check_int("--images-per-task", cfg.images_per_task, low=1)
    check_int("--sd-steps", cfg.sd_steps, low=1)
    check_int("--synth-batch-size", cfg.synth_batch_size, low=1)
    check_int("--threads", cfg.threads, low=1)
    check_int("--num-workers", cfg.num_workers, low=0)
    check_int("--eval-batch-size", cfg.eval_batch_size, low=1)
    check_int("--log-every", cfg.log_every, low=1)
    check_int("--checkpoint-every", cfg.checkpoint_every, low=0, hint="0: only after each task")
    check_int("--track-every", getattr(cfg, "track_every", None), low=0)
    check_int("toy_train_size", cfg.toy_train_size, low=1)
    check_int("toy_test_size", cfg.toy_test_size, low=1)
    check_int("--seeds", cfg.seed)
    check_int("--synth-seed", cfg.synth_seed)
    scheme = getattr(cfg, "synth_seed_scheme", "hash")
    if scheme not in SEED_SCHEMES:
        raise OptionError(f"--seed-scheme must be {' or '.join(SEED_SCHEMES)}, got {scheme!r}")
    if scheme != "hash" and cfg.synth != "on-the-fly":
        raise OptionError(f"--seed-scheme {scheme} sets the prompts and seeds of on-the-fly synthesis "
                          f"(--synth on-the-fly); a synthetic folder got its scheme when it was generated "
                          f"(gift-fast synth --seed-scheme)")
    check_order(cfg.order)
    check_device("--device", cfg.device)
    if cfg.keep_checkpoints not in ("all", "last"):
        raise OptionError(f"--keep-checkpoints must be all or last, got {cfg.keep_checkpoints!r}")
    if cfg.kernels not in BACKENDS:
        raise OptionError(f"--kernels must be {', '.join(BACKENDS[:-1])} or {BACKENDS[-1]}, got {cfg.kernels!r}")
    if cfg.generator not in ("sd", "toy"):
        raise OptionError(f"--generator must be sd or toy, got {cfg.generator!r}")
    if cfg.pretrained == "toy" and not is_tiny(cfg.model):
        raise OptionError(f"--model {cfg.model} has no toy pre-training: 'toy' weights exist only for the tiny "
                          f"models (the tiny preset's toy-vit). Drop --preset tiny (or --pretrained toy) to train "
                          f"{cfg.model}, or keep the preset's model")
    if not is_tiny(cfg.model) and _toy_world(cfg):
        raise OptionError(f"--model {cfg.model}: the toy world (--preset tiny, toy tasks) is made for the tiny "
                          f"models ({', '.join(_tiny_names())}); drop --preset tiny / the toy --tasks to train "
                          f"{cfg.model} on MTIL, or keep the preset's model")
    for name, b in (("--batch-size", cfg.batch_size), ("--syn-batch-size", cfg.syn_batch_size)):
        if b % world_size:
            raise OptionError(f"{name} {b} is the global batch and must split evenly over the {world_size} "
                              f"processes: use a multiple of {world_size}")
    try:
        cfg.method_spec()
    except ValueError as e:
        raise OptionError(str(e)) from None


def _toy_world(cfg) -> bool:
    return bool(cfg.toy or (cfg.tasks and all(n in TOY_TASKS for n in cfg.tasks)))


def _tiny_names():
    return list(TINY_MODEL_CONFIGS)


def check_seeds(value: Optional[str]) -> Optional[Tuple[int, ...]]:
    """``--seeds 0,1,2`` -> (0, 1, 2); an empty list (``--seeds ,``) is an error, not the default."""
    if value is None:
        return None
    parts = [v.strip() for v in str(value).split(",") if v.strip()]
    if not parts:
        raise OptionError(f"--seeds {value!r} names no seed: give integers separated by commas, e.g. --seeds 0,1,2")
    try:
        return tuple(int(v) for v in parts)
    except ValueError:
        raise OptionError(f"--seeds takes integers separated by commas, got {value!r}") from None


def check_synth_options(*, steps=None, images_per_task=None, batch_size=None, guidance=None, height=None,
                        width=None, max_retries=None, jpeg_quality=None, seed=None, device=None) -> None:
    """``gift-fast synth``'s numbers (``--guidance nan`` would turn guidance off and write NaN in the manifest)."""
    check_int("--steps", steps, low=1)
    check_int("--images-per-task", images_per_task, low=1)
    check_int("--batch-size", batch_size, low=1)
    check_float("--guidance", guidance, low=0, hint="7.5 is Stable Diffusion's usual scale; <= 1 turns guidance off")
    for name, v in (("--height", height), ("--width", width)):
        check_int(name, v, low=8)
        if v is not None and v % 8:
            raise OptionError(f"{name} must be a multiple of 8 (the VAE's downsampling), got {v}")
    check_int("--max-retries", max_retries, low=0)
    check_int("--jpeg-quality", jpeg_quality, low=1, high=100)
    check_int("--seed", seed)
    check_device("--device", device)


def check_eval_options(*, batch_size=None, device=None, out=None, order=None, tasks=None) -> None:
    check_int("--batch-size", batch_size, low=1)
    check_device("--device", device)
    check_order_and_tasks(order, tasks)
    check_output_file("--out", out)


def check_data_options(*, image_size=None, num_workers=None) -> None:
    check_int("--image-size", image_size, low=1)
    check_int("--num-workers", num_workers, low=0)


__all__ = ["OptionError", "check_int", "check_float", "check_device", "check_output_file", "check_order_and_tasks",
           "check_train_config", "check_seeds", "check_synth_options", "check_eval_options", "check_data_options"]
