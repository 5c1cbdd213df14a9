"""Checks before cost: what a command needs is checked before any model is loaded or downloaded.

A run that would stop after downloading gigabytes of weights, or after an hour of
synthesis, should stop in its first second instead. ``check_train`` (``gift-fast
train``, ``ContinualTrainer``), ``check_eval`` and the synthesis command call these, in
this order: the data sets are there, the synthetic folder is there, the disk can hold
what will be written, then the model weights are on this machine or the model hub can
be reached. Every failure is one message that names the option that fixes it.

``hub_reachable`` is the only function here that touches the network (one TCP connect,
a few seconds at most, and none when ``HF_HUB_OFFLINE`` is set); tests patch it.
"""
from __future__ import annotations

import os
import socket
import sys
from typing import Iterable, List, Optional, Sequence, Tuple
from urllib.parse import urlparse

from gift_fast.config import MTIL_TASKS, task_order
from gift_fast.data.mtil import check_task_data
from gift_fast.toy.tasks import TOY_TASKS
from gift_fast.toy.clip import is_tiny
from gift_fast.errors import ModelUnavailable
from gift_fast.files import check_free_space
from gift_fast.synth.generators import DEFAULT_MODEL

GB = 2 ** 30
# On-disk sizes used for the free-space estimates (upper-end values, the check keeps a 5% margin):
CACHE_BYTES_PER_IMAGE = 3 * 224 * 224      # one decoded uint8 image of the pixel cache at 224 px
SYNTH_JPEG_BYTES = 80_000                 # one 512x512 JPEG at quality 75 (typically 30-60 KB)
PARAM_BYTES = 4                           # checkpoints are float32 state dicts
# Parameter counts of the architectures whose checkpoints the disk check can size without building the model
# (counted on the real models in bench/RESULTS.md, AWC table); other architectures are not sized.
CLIP_PARAMS = {"ViT-B-16": 149_600_000, "ViT-L-14": 427_600_000}


def hub_reachable(timeout: float = 5.0) -> Tuple[bool, str]:
    """(True, "") when the Hugging Face hub answers a TCP connect; (False, why) otherwise."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False, "HF_HUB_OFFLINE is set"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme != "http" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True, ""
    except OSError as e:
        return False, f"cannot reach {host}:{port} ({e.strerror or type(e).__name__})"


def _hf_cached(repo_id: str, filenames: Iterable[str]) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    for f in filenames:
        try:
            hit = try_to_load_from_cache(repo_id, f)
        except Exception:
            hit = None
        if isinstance(hit, str) and os.path.isfile(hit):
            return True
    return False


def check_sd_model(model: str, option: str = "--sd-model") -> Optional[bool]:
    """Is the Stable Diffusion pipeline ``model`` loadable without a long wait for the network?

    Returns ``True`` when a Hub id is in the local cache (load it with ``local_files_only``),
    ``None`` when it will be downloaded (the hub answers) or is a local folder (checked when
    loaded). Raises ``ModelUnavailable`` when it is not here and the hub cannot be reached.
    """
    expanded = os.path.expanduser(model)
    if os.path.exists(expanded) or model.startswith((".", "/", "~")) or model.count("/") > 1:
        return None       # a folder: StableDiffusionGenerator.from_pretrained checks its layout
    if _hf_cached(model, ["model_index.json"]):
        return True
    ok, why = hub_reachable()
    if ok:
        return None
    raise ModelUnavailable(f"Stable Diffusion model {model!r} is not in the local Hugging Face cache and cannot be "
                           f"downloaded ({why}): pass a local diffusers pipeline folder with {option} /path/to/sd15 "
                           f"(saved elsewhere with pipe.save_pretrained), or run once with network access")


def check_clip_weights(model: str, pretrained: Optional[str], option: str = "--pretrained") -> None:
    """Are open_clip's weights ``model`` / ``pretrained`` here, or downloadable? (Files and tiny models
    are checked by ``create_clip``.)"""
    if pretrained in (None, "", "none", "random", "toy") or os.sep in pretrained or pretrained.startswith(".") \
            or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors", ".ckpt")):
        return
    try:
        if is_tiny(model):
            return
        from open_clip.pretrained import get_pretrained_cfg
        cfg = get_pretrained_cfg(model, pretrained)
    except Exception:
        return            # unknown model / tag: create_clip names the known ones
    if not cfg or "file" in cfg:
        return
    hub = cfg.get("hf_hub", "")
    if hub:
        model_id, filename = os.path.split(hub)
        names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        names = names + [n.replace(".bin", ".safetensors") for n in names if n.endswith(".bin")]
        if _hf_cached(model_id, names):
            return
    url = cfg.get("url", "")
    if url and os.path.isfile(os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(url))):
        return
    ok, why = hub_reachable()
    if ok:
        return
    raise ModelUnavailable(f"CLIP weights {model} / {pretrained} are not on this machine and cannot be downloaded "
                           f"({why}): download them where there is network and pass the file with {option} "
                           f"/path/to/{model}.pt")


def check_mtil_data(names: Sequence[str], data_root: str) -> List[dict]:
    """Every MTIL data set of the run is where torchvision expects it (``gift-fast data check``'s rows)."""
    root = os.path.abspath(os.path.expanduser(str(data_root)))
    rows = [check_task_data(n, root) for n in names]
    missing = [r for r in rows if not r["present"]]
    if missing:
        first = (missing[0]["problem"] or "not found").splitlines()[0]
        raise FileNotFoundError(f"{len(missing)} of the run's {len(rows)} data sets are missing under {root} "
                                f"({', '.join(r['task'] for r in missing)}; {missing[0]['task']}: {first}): put them "
                                f"there (or pass --data-root DIR); `gift-fast data check --data-root {root}` prints "
                                f"the expected layout")
    return rows


def cache_plan(rows: Sequence[dict], cache_dir: str, image_size: int = 224) -> Tuple[int, List[str]]:
    """Bytes of the decoded-image caches still to build, and the data sets they belong to.

    A data set counts as cached when finished caches of its train and test splits (``<task>-train-*.json``,
    ``<task>-test-*.json``) are in ``cache_dir``; a cache whose key changed is rebuilt at load time anyway.
    """
    per_image = 3 * image_size * image_size
    done = set(os.listdir(cache_dir)) if os.path.isdir(cache_dir) else set()
    need, tasks = 0, []
    for r in rows:
        for part in ("train", "test"):
            prefix = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{r['task']}-{part}") + "-"
            if not any(f.startswith(prefix) and f.endswith(".json") for f in done):
                need += per_image * int(r[part] or 0)
                if r["task"] not in tasks:
                    tasks.append(r["task"])
    return need, tasks


def announce_cache(need: int, tasks: Sequence[str], cache_dir: str, stream=None) -> None:
    if not tasks:
        return
    print(f"decoded-image cache: about {need / GB:.1f} GB of decoded images of {len(tasks)} data set(s) will be "
          f"written under {os.path.abspath(cache_dir)} (first run only, then read by every run); put it elsewhere "
          f"with --data-cache DIR or switch it off with --data-cache none", file=stream or sys.stderr, flush=True)


def check_train(cfg) -> None:
    """All of ``gift-fast train``'s checks before cost, for one ``gift_fast.train.TrainConfig`` (see the module
    docstring)."""
    toy = cfg.toy
    names: List[str] = []
    if not toy:
        if cfg.tasks and all(n in TOY_TASKS for n in cfg.tasks):
            toy = True
    rows: List[dict] = []
    if not toy:
        if cfg.tasks:
            unknown = [n for n in cfg.tasks if n not in MTIL_TASKS]
            if unknown:
                raise ValueError(f"unknown task(s) {unknown}; MTIL tasks: {', '.join(MTIL_TASKS)}")
            names = list(cfg.tasks)
        else:
            names = task_order(cfg.order)
        if not cfg.data_root:
            raise ValueError("the MTIL tasks need --data-root DIR (see `gift-fast data check`), or use --preset tiny")
        rows = check_mtil_data(names, cfg.data_root)
    # the synthetic folder (a folder of `gift-fast synth`: every task's index must be there)
    spec = cfg.method_spec()
    on_the_fly = spec.needs_synthetic and not cfg.reference_images and cfg.synth == "on-the-fly"
    if spec.needs_synthetic and not cfg.reference_images and cfg.synth not in (None, "on-the-fly") and names:
        if not os.path.isdir(cfg.synth):
            raise FileNotFoundError(f"--synth {cfg.synth}: no such folder. Generate it with `gift-fast synth --out "
                                    f"{cfg.synth} ...` or use --synth on-the-fly")
        missing = [n for n in names if not os.path.isfile(os.path.join(cfg.synth, f"{n}_Syn", "image_text.csv"))]
        if missing:
            raise FileNotFoundError(
                f"no synthetic folder for task(s) {missing} under {cfg.synth} (expected <Task>_Syn/image_text.csv): "
                f"generate them with `gift-fast synth --out {cfg.synth} ...`, or train with --synth on-the-fly")
    # disk: the decoded-image cache (MTIL), the on-the-fly images of one task
    cache_need, cache_tasks = (cache_plan(rows, cfg.data_cache) if rows and cfg.data_cache else (0, []))
    if cache_need:
        check_free_space(cfg.data_cache, cache_need, f"the decoded-image cache of {', '.join(cache_tasks)}",
                         "put the cache on a larger disk with --data-cache DIR, or switch it off with --data-cache none")
    run_need, run_what = 0, []
    if on_the_fly and cfg.generator != "toy":
        run_need += cfg.images_per_task * SYNTH_JPEG_BYTES
        run_what.append("one task's on-the-fly synthetic images")
    params = CLIP_PARAMS.get(cfg.model)
    if params and names and not cfg.resume:      # (a resume has written some of them already)
        kept = len(names) if cfg.keep_checkpoints == "all" else 2
        # in-task checkpoints: the model, AdamW's two moments and AWC's buffers (about 5 copies), two kept
        in_task = 2 * 5 * params * PARAM_BYTES if cfg.checkpoint_every else 0
        run_need += kept * params * PARAM_BYTES + in_task
        run_what.append(f"{kept} task checkpoints" + (" and the in-task checkpoints" if in_task else ""))
    if run_need:
        check_free_space(cfg.out, run_need, " and ".join(run_what),
                         "choose another --out" + (" or --keep-checkpoints last" if cfg.keep_checkpoints == "all"
                                                   else ""))
    # weights last (the network, if anything, is asked only now)
    if not toy:
        check_clip_weights(cfg.model, cfg.pretrained)
    if on_the_fly and cfg.generator == "sd":
        check_sd_model(cfg.sd_model or DEFAULT_MODEL)
    if cache_need and getattr(cfg, "progress", True):
        announce_cache(cache_need, cache_tasks, cfg.data_cache)


def check_eval(cfg) -> None:
    """``gift-fast eval``'s checks before cost: the data sets, then the CLIP weights."""
    if cfg.toy or (cfg.tasks and all(n in TOY_TASKS for n in cfg.tasks)):
        return
    names = list(cfg.tasks) if cfg.tasks else task_order(cfg.order)
    if not cfg.data_root:
        raise ValueError("the MTIL tasks need --data-root DIR (see `gift-fast data check`), or use --preset tiny")
    rows = check_mtil_data(names, cfg.data_root)
    cache_need, cache_tasks = cache_plan(rows, cfg.data_cache) if cfg.data_cache else (0, [])
    if cache_need:
        check_free_space(cfg.data_cache, cache_need, f"the decoded-image cache of {', '.join(cache_tasks)}",
                         "put the cache on a larger disk with --data-cache DIR, or switch it off with --data-cache none")
    check_clip_weights(cfg.model, cfg.pretrained)
    if cache_need and getattr(cfg, "progress", True):
        announce_cache(cache_need, cache_tasks, cfg.data_cache)


__all__ = ["ModelUnavailable", "hub_reachable", "check_sd_model", "check_clip_weights", "check_free_space",
           "check_mtil_data", "cache_plan", "announce_cache", "check_train", "check_eval"]
