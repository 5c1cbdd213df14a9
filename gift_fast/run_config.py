"""``gift-fast train --config FILE``: rerun a run from its ``config.json``, or from the authors' JSON.

Three formats are read (``load_config_file``):

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
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

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
    "L2": "--l2 (the strength of the weight consolidation; 0 and no awc: none)",
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
    from gift_fast.train import TrainConfig

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
    from gift_fast.config import ORDERS, task_lr
    from gift_fast.train import DISTILL_LOSSES, TrainConfig

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
    if l2 > 0 and l2 != d["l2"]:
        kw["l2"] = l2
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
    from gift_fast.train import METHOD_DEFAULTS

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
        assert chosen[0] in DISTILL_LOSSES
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


__all__ = ["load_config_file", "from_authors_config", "AUTHORS_KEYS", "AUTHORS_UNSUPPORTED", "authors_key_table"]
