"""The synthesis engine: batches, black-image retries, resume, sharding, atomic writes, CSV, manifest.

Layout (the reference's, plus a manifest)::

    <out_root>/manifest.json                 the run: model, scheduler, steps, guidance, seed, versions, counts
    <out_root>/<Task>_Syn/<i>.jpeg           image i of the task (i = 0 .. n-1)
    <out_root>/<Task>_Syn/image_text.csv     header "image,text"; one row per image: "<i>.jpeg,<prompt>"
    <out_root>/<Task>_Syn/manifest.json      the task: generator config, seed, counts, per-image retries

Every image carries its provenance in the file (a JPEG comment / PNG text chunk:
index, prompt, seed, attempt, config fingerprint). A second run keeps an image only
when it decodes completely and its provenance matches what this run would
generate; everything else (missing, truncated, corrupt, other prompt or seed) is
generated again. ``image_text.csv`` is written last, only when all n images are
there: its presence means the task folder is complete. All files are written to a
temporary name, fsynced and renamed (``os.replace``; ``gift_fast.files``), so an interrupted
run leaves no half-written file under a final name.

Image i's seed follows the run's seed scheme (``seed_for``: ``"hash"``, the default, or
``"authors"``, the authors' ``txt2img.py`` seeds; docs/PROTOCOL_PROMPTS.md). Black images
(the safety checker's replacement for flagged content) are generated again with the next
seed of that image: attempt k uses ``seed_for(scheme, seed, task_index, i, attempt=k)``
(= base + k * 1,000,000,007, mod 2**63 for the hash scheme),
up to ``max_retries`` times; retries join the next batch, so batches stay full.
An image still black after ``max_retries`` is kept (the reference's loader drops
black images) and counted as ``black_kept``.

Sharding: rank r of W owns the indices ``r, r + W, ...`` (disjoint, complete). With
``torch.distributed`` initialized, ranks meet at a barrier and rank 0 writes the
CSV and manifest; without it (ranks run as separate jobs), whichever rank finds
all n images present writes them.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from PIL import Image
from PIL.PngImagePlugin import PngInfo
from tqdm.auto import tqdm

from ..config import task_order
from ..files import atomic_write_bytes, atomic_write_text, read_json, write_json
from ..versions import gift_fast_version, package_versions
from .prompts import (IMAGENET_SYNTHETIC_TEMPLATE, SEED_SCHEMES, PoolSource, imagenet_pool_source,
                      pool_source, pool_task_names, seed_for, sequence_prompts, shard_indices, task_pools)

logger = logging.getLogger("gift_fast.synth")

CSV_NAME = "image_text.csv"
MANIFEST_NAME = "manifest.json"
META_KEY = "gift_fast"          # PNG text chunk key; JPEG uses the COM segment
MANIFEST_VERSION = 1
IMAGE_FORMATS = {"jpeg": "JPEG", "png": "PNG"}


SEED_RULES = {
    "hash": "image_seed(seed, task_index, i, attempt) = splitmix-hash(seed, task_index, i) "
            "+ attempt * 1000000007 (mod 2**63); latents from torch.Generator('cpu').manual_seed",
    "authors": "i + 100000 * (task_index - 1) + 10**7 * seed + attempt * 1000000007 (the authors' txt2img.py seed; "
               "task_index 0-based); latents from torch.Generator('cpu').manual_seed",
}


class SynthError(RuntimeError):
    """A synthesis run cannot proceed (bad output folder, mismatching existing data, ...)."""


# ----------------------------------------------------------------------------------------------
# small utilities

def check_writable(folder: Path) -> Path:
    """Create ``folder`` and prove we can write in it; a clear error otherwise."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-probe-{os.getpid()}-{threading.get_ident()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise SynthError(f"output folder {folder} is not writable ({e.strerror or e}): choose another --out "
                         f"or fix its permissions") from None
    return folder


def generator_identity(generator) -> Dict[str, Any]:
    """What images depend on: ``describe()["config"]`` (or the whole description) and the name."""
    try:
        desc = generator.describe()
    except Exception as e:
        raise TypeError(f"the generator's describe() failed ({e}); an ImageGenerator needs describe() -> dict") from e
    if not isinstance(desc, dict):
        raise TypeError(f"describe() must return a dict, got {type(desc).__name__}")
    config = desc.get("config", {k: v for k, v in desc.items() if k != "runtime"})
    return {"name": getattr(generator, "name", desc.get("name", type(generator).__name__)), "config": config}


def _fingerprint(identity: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _versions() -> Dict[str, str]:
    """What a manifest records: python and the packages images depend on, then gift-fast's own version."""
    out = package_versions(("torch", "diffusers", "transformers", "PIL", "numpy"))
    own = gift_fast_version()
    if own is not None:
        out["gift_fast"] = own
    return out


def _dist():
    """torch.distributed when initialized (else None); imported lazily."""
    try:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            return dist
    except Exception:
        pass
    return None


def is_black(image) -> bool:
    """True when every pixel is 0: what the safety checker returns for flagged content."""
    extrema = image.getextrema()
    if isinstance(extrema[0], tuple):
        return all(hi == 0 for _, hi in extrema)
    return extrema[1] == 0


# ----------------------------------------------------------------------------------------------
# per-image provenance

def encode_image(image, fmt: str, meta: Dict[str, Any], quality: int) -> bytes:
    """The file bytes of ``image`` in ``fmt`` with ``meta`` embedded (JPEG comment / PNG text chunk)."""
    text = json.dumps(meta, sort_keys=True, ensure_ascii=True)
    buf = io.BytesIO()
    if image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    if fmt == "jpeg":
        image.save(buf, format="JPEG", quality=int(quality), comment=text.encode("ascii"))
    else:
        info = PngInfo()
        info.add_text(META_KEY, text)
        image.save(buf, format="PNG", pnginfo=info, compress_level=1)
    return buf.getvalue()


def read_image_meta(path: Path, *, decode: bool) -> Optional[Dict[str, Any]]:
    """The embedded provenance of an image file; None if absent, unreadable or (``decode``) corrupt.

    ``decode=True`` decodes the whole entropy-coded stream (JPEG at 1/8 scale: fast) so a
    truncated or corrupted file is caught.
    """
    try:
        with Image.open(path) as im:
            raw = im.info.get("comment") if im.format == "JPEG" else im.info.get(META_KEY)
            if raw is None:
                return None
            meta = json.loads(raw.decode("ascii") if isinstance(raw, bytes) else raw)
            if decode:
                if im.format == "JPEG":
                    im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
                im.load()
        return meta if isinstance(meta, dict) else None
    except Exception:  # missing, truncated, not an image, bad JSON: all mean "not valid"
        return None


# ----------------------------------------------------------------------------------------------
# the per-task engine

def _check_generated(images, n: int, where: str) -> list:
    if not isinstance(images, (list, tuple)) or len(images) != n:
        raise TypeError(f"{where}: generate() must return a list of {n} PIL images, "
                        f"got {type(images).__name__} of length {len(images) if hasattr(images, '__len__') else '?'}")
    for k, im in enumerate(images):
        if not isinstance(im, Image.Image):
            raise TypeError(f"{where}: generate() returned {type(im).__name__} at position {k}, not a PIL image")
    return list(images)


class _Writer:
    """Encodes and writes images on background threads while the generator runs the next batch."""

    def __init__(self, threads: int, max_pending: int):
        self.pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="gift-fast-writer")
        self.pending: deque = deque()
        self.max_pending = max(1, max_pending)

    def submit(self, fn: Callable, *args) -> None:
        self.pending.append(self.pool.submit(fn, *args))
        while len(self.pending) > self.max_pending:
            self.pending.popleft().result()  # re-raises a failed write here

    def drain(self) -> None:
        while self.pending:
            self.pending.popleft().result()

    def close(self) -> None:
        try:
            self.drain()
        finally:
            self.pool.shutdown(wait=True)


def synthesize_task(generator, task_name: str, prompts: Sequence[str], out_root, *, seed: int, task_index: int,
                    batch_size: int = 16, rank: int = 0, world_size: int = 1, progress: bool = True,
                    image_format: str = "jpeg", jpeg_quality: int = 75, max_retries: int = 10,
                    overwrite: bool = False, writer_threads: Optional[int] = None,
                    extra_manifest: Optional[Dict[str, Any]] = None, seed_scheme: str = "hash") -> Path:
    """Generate ``len(prompts)`` images of one task into ``<out_root>/<task_name>_Syn`` (this rank's share).

    Image i uses ``prompts[i]`` and ``seed_for(seed_scheme, seed, task_index, i)`` (``"hash"``:
    ``image_seed``; ``"authors"``: the authors' ``i + 100000 * (task_index - 1) + 10**7 * seed``); valid images
    from an earlier run of the same config are kept. Returns the task folder; its
    ``image_text.csv`` and ``manifest.json`` are complete when ``world_size == 1``, or on
    rank 0 after all ranks when ``torch.distributed`` is initialized.

    ``overwrite=False`` refuses a folder whose manifest names another generator config,
    seed or task index; ``overwrite=True`` regenerates the images that do not match.
    """
    t_start = time.perf_counter()
    _validate_task_args(generator, task_name, prompts, seed, task_index, batch_size, rank, world_size,
                        image_format, jpeg_quality, max_retries)
    prompts = list(prompts)
    n = len(prompts)
    ext = image_format
    folder = check_writable(Path(out_root) / f"{task_name}_Syn")
    if seed_scheme not in SEED_SCHEMES:
        raise ValueError(f"unknown seed scheme {seed_scheme!r}; use one of {', '.join(SEED_SCHEMES)}")
    identity = {"task": task_name, "task_index": int(task_index), "seed": int(seed),
                "generator": generator_identity(generator), "image_format": ext}
    if seed_scheme != "hash":   # absent for the default: folders made before the option keep their fingerprint
        identity["seed_scheme"] = seed_scheme
    fp = _fingerprint(identity)

    def image_seed(seed_, task_index_, i, attempt=0):
        return seed_for(seed_scheme, seed_, task_index_, i, attempt)

    manifest_path = folder / MANIFEST_NAME
    old = read_json(manifest_path)
    if old is not None and old.get("prompts_only"):
        old = None   # written by --prompts-only: prompts, no images, nothing to conflict with
    if old is not None and old.get("fingerprint") != fp and not overwrite:
        raise SynthError(_mismatch_message(folder, old.get("identity", {}), identity))

    owned = shard_indices(n, rank, world_size)
    _remove_stale_tmp(folder, owned, ext)

    # which of this rank's images are already valid?
    def expected(i: int, meta: Optional[dict]) -> bool:
        if not meta or meta.get("i") != i or meta.get("prompt") != prompts[i] or meta.get("fp") != fp:
            return False
        a = meta.get("attempt")
        return isinstance(a, int) and 0 <= a <= max_retries and meta.get("seed") == image_seed(seed, task_index, i, a)

    threads = writer_threads or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        metas = list(pool.map(lambda i: read_image_meta(folder / f"{i}.{ext}", decode=True), owned))
    todo = [i for i, m in zip(owned, metas) if not expected(i, m)]
    skipped = len(owned) - len(todo)

    if rank == 0 and (old is None or old.get("fingerprint") != fp or todo):
        write_json(manifest_path, {"version": MANIFEST_VERSION, "complete": False, "fingerprint": fp,
                                   "identity": identity, "images": n})
    if todo:
        (folder / CSV_NAME).unlink(missing_ok=True)  # the CSV marks a complete folder

    stats = _generate_indices(generator, folder, prompts, todo, ext=ext, seed=seed, task_index=task_index, fp=fp,
                              batch_size=batch_size, max_retries=max_retries, jpeg_quality=jpeg_quality,
                              threads=threads, progress=progress, desc=_desc(task_name, rank, world_size),
                              total=len(owned), initial=skipped, image_seed=image_seed)
    stats.update(skipped_valid=skipped, owned=len(owned))
    wall = time.perf_counter() - t_start

    dist = _dist() if world_size > 1 else None
    if dist is not None:
        gathered = [None] * world_size
        dist.all_gather_object(gathered, dict(stats, wall_s=wall))
        run_stats = _sum_stats([g for g in gathered if g])
        dist.barrier()
        if rank == 0:
            _finalize(folder, prompts, ext, fp, identity, seed, task_index, max_retries, run_stats, wall,
                      world_size, extra_manifest, must_complete=True, seed_scheme=seed_scheme)
        dist.barrier()
    else:
        run_stats = dict(stats, wall_s=wall)
        _finalize(folder, prompts, ext, fp, identity, seed, task_index, max_retries, run_stats, wall,
                  world_size, extra_manifest, must_complete=(world_size == 1), seed_scheme=seed_scheme)
    return folder


def _desc(task: str, rank: int, world: int) -> str:
    return task if world == 1 else f"{task} [rank {rank}/{world}]"


def _validate_task_args(generator, task_name, prompts, seed, task_index, batch_size, rank, world_size,
                        image_format, jpeg_quality, max_retries):
    if not callable(getattr(generator, "generate", None)) or not callable(getattr(generator, "describe", None)):
        raise TypeError(f"{type(generator).__name__} is not an ImageGenerator: it needs generate(prompts, seeds) "
                        f"and describe()")
    if not isinstance(task_name, str) or not task_name or any(c in task_name for c in "/\\:\0") \
            or task_name.startswith("."):
        raise ValueError(f"task name {task_name!r} cannot name a folder: use letters, digits, '-' or '_'")
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not one string")
    for k, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompts[{k}] is {type(p).__name__}, not a string")
    for name, v, lo in (("seed", seed, 0), ("task_index", task_index, 0), ("batch_size", batch_size, 1),
                        ("rank", rank, 0), ("world_size", world_size, 1), ("max_retries", max_retries, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    if rank >= world_size:
        raise ValueError(f"rank {rank} is out of range for world_size {world_size}")
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"unknown image format {image_format!r}; use {' or '.join(IMAGE_FORMATS)}")
    if not 1 <= int(jpeg_quality) <= 100:
        raise ValueError(f"jpeg_quality must be in 1..100, got {jpeg_quality}")


def _mismatch_message(folder: Path, old: dict, new: dict) -> str:
    diffs = []

    def walk(a, b, path):
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(a.get(k), b.get(k), f"{path}.{k}" if path else k)
        elif a != b:
            diffs.append(f"{path}: {a!r} there, {b!r} now")

    walk(old, new, "")
    detail = "; ".join(diffs[:6]) or "unknown differences"
    return (f"{folder} holds images of another configuration ({detail}). Use another output folder, "
            f"or pass overwrite (--overwrite) to regenerate them")


def _remove_stale_tmp(folder: Path, owned: Sequence[int], ext: str) -> None:
    """Temporary files of this rank's images left by a killed run (other ranks' are not touched); the pattern is
    ``files.tmp_path``'s name, ``.<name>.tmp-<pid>-<thread>``."""
    mine = {f".{i}.{ext}" for i in owned}
    for p in folder.glob(f".*.{ext}.tmp-*"):
        if p.name.split(".tmp-")[0] in mine:
            p.unlink(missing_ok=True)


def _generate_indices(generator, folder: Path, prompts, todo: List[int], *, ext, seed, task_index, fp,
                      batch_size, max_retries, jpeg_quality, threads, progress, desc, total, initial,
                      image_seed: Callable[..., int]) -> dict:
    """Run the generator over ``todo`` in batches; retries of black images join the next batch."""
    stats = {"generated": 0, "black_retries": 0, "black_kept": 0, "gen_s": 0.0}
    if not todo:
        return stats

    queue: deque = deque((i, 0) for i in todo)
    writer = _Writer(threads, max_pending=4 * batch_size)
    bar = tqdm(total=total, initial=initial, desc=desc, unit="img", disable=not progress, dynamic_ncols=True,
               smoothing=0.1)

    def write(i: int, image, attempt: int, black: bool):
        meta = {"i": i, "prompt": prompts[i], "seed": image_seed(seed, task_index, i, attempt), "attempt": attempt,
                "fp": fp}
        if black:
            meta["black"] = True
        atomic_write_bytes(folder / f"{i}.{ext}", encode_image(image, ext, meta, jpeg_quality))

    try:
        while queue:
            batch = [queue.popleft() for _ in range(min(batch_size, len(queue)))]
            seeds = [image_seed(seed, task_index, i, a) for i, a in batch]
            t0 = time.perf_counter()
            images = _check_generated(generator.generate([prompts[i] for i, _ in batch], seeds), len(batch),
                                      desc)
            stats["gen_s"] += time.perf_counter() - t0
            retry = []
            for (i, attempt), im in zip(batch, images):
                black = is_black(im)
                if black and attempt < max_retries:
                    retry.append((i, attempt + 1))
                    stats["black_retries"] += 1
                    continue
                if black:
                    stats["black_kept"] += 1
                    logger.warning("%s: image %d is still black after %d retries; kept (loaders drop black images)",
                                   desc, i, max_retries)
                writer.submit(write, i, im, attempt, black)
                stats["generated"] += 1
                bar.update(1)
            queue.extendleft(reversed(retry))  # retries go first into the next batch
            if stats["black_retries"]:
                bar.set_postfix(black_retries=stats["black_retries"], refresh=False)
        writer.drain()
    finally:
        writer.close()
        bar.close()
    return stats


def _sum_stats(items: Iterable[dict]) -> dict:
    out: Dict[str, Any] = {}
    for s in items:
        for k, v in s.items():
            if k == "wall_s":
                out[k] = max(out.get(k, 0.0), v)
            elif isinstance(v, (int, float)):
                out[k] = out.get(k, 0) + v
    return out


def _finalize(folder: Path, prompts, ext, fp, identity, seed, task_index, max_retries, run_stats, wall,
              world_size, extra_manifest, must_complete: bool, seed_scheme: str = "hash") -> bool:
    """Write image_text.csv and the task manifest once all n images are present. True when written."""
    n = len(prompts)
    metas = []
    for i in range(n):
        # the own shard was decoded and checked above; a header read is enough to confirm each file
        m = read_image_meta(folder / f"{i}.{ext}", decode=False)
        if not m or m.get("i") != i or m.get("fp") != fp or m.get("prompt") != prompts[i]:
            if must_complete:
                raise SynthError(f"{folder}: image {i} is missing or invalid after generation (was the folder "
                                 f"modified during the run?)")
            return False
        metas.append(m)
    write_prompt_csv(folder, prompts, ext)
    retries = {str(i): m["attempt"] for i, m in enumerate(metas) if m.get("attempt", 0) > 0}
    gen_s = run_stats.get("gen_s", 0.0)
    wall_s = run_stats.get("wall_s", wall)  # the slowest rank's
    manifest = {
        "version": MANIFEST_VERSION, "complete": True, "fingerprint": fp, "identity": identity,
        "task": identity["task"], "task_index": task_index, "seed": seed, "images": n,
        "distinct_prompts": len(set(prompts)), "image_format": ext,
        "seed_scheme": seed_scheme, "seed_rule": SEED_RULES[seed_scheme],
        "counts": {
            "images": n,
            "black_regenerated_images": len(retries),
            "black_regenerations": int(sum(retries.values())),
            "black_kept": sum(1 for m in metas if m.get("black")),
            "max_retries": max_retries,
        },
        "retries": retries,
        "last_run": {
            "generated": run_stats.get("generated", 0), "skipped_valid": run_stats.get("skipped_valid", 0),
            "black_retries": run_stats.get("black_retries", 0), "world_size": world_size,
            "wall_time_s": round(wall_s, 3), "generate_time_s_all_ranks": round(gen_s, 3),
            "images_per_s": round(run_stats.get("generated", 0) / wall_s, 3) if wall_s > 0 else None,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
        "versions": _versions(),
    }
    if extra_manifest:
        manifest.update(extra_manifest)
    write_json(folder / MANIFEST_NAME, manifest)
    return True


# ----------------------------------------------------------------------------------------------
# a whole continual sequence

def sequence_sources(tasks, *, base_classnames: Optional[Sequence[str]] = None,
                     template: Optional[str] = None) -> Tuple[PoolSource, List[PoolSource]]:
    """The pool sources of a sequence: the base (ImageNet's names with ``"a photo of a {}."`` unless
    ``base_classnames`` is given) and one per task, each with its own first template.

    ``tasks``: ``(name, classnames)`` or ``(name, classnames, template)`` items (no template:
    ``DEFAULT_TEMPLATE``). ``template`` given: every entry, base included, uses it (the old
    single-template rule; not the authors')."""
    tasks = _check_tasks(tasks)
    if base_classnames is None:
        base = imagenet_pool_source()
        if template is not None:
            base = pool_source(base.name, base.classnames, template)
    else:
        base = pool_source("base", base_classnames, template or IMAGENET_SYNTHETIC_TEMPLATE)
    sources = [pool_source(name, names, template or own) for name, names, own in tasks]
    return base, sources


def synthesize_sequence(generator, tasks: Sequence[Tuple[str, Sequence[str]]], out_root, *, images_per_task: int,
                        seed: int, base_classnames: Optional[Sequence[str]] = None,
                        template: Optional[str] = None, only: Optional[Iterable[str]] = None,
                        batch_size: int = 16, rank: int = 0, world_size: int = 1, progress: bool = True,
                        image_format: str = "jpeg", jpeg_quality: int = 75, max_retries: int = 10,
                        overwrite: bool = False, run_info: Optional[Dict[str, Any]] = None,
                        seed_scheme: str = "hash", pool_exclude: Iterable[str] = (),
                        prompts_from=None, prompts_only: bool = False) -> Dict[str, Any]:
    """Synthesize every task of a sequence (or those named in ``only``) and write ``<out_root>/manifest.json``.

    Task t (0-based) draws its prompts from the base (the 1,000 ImageNet names by default) plus
    the class names of tasks 0..t-1 (whether or not those are synthesized in this run), each
    entry templated with its own data set's template (``sequence_sources``), leaving out the
    data sets named in ``pool_exclude``; ``gift_fast.synth.prompts.sequence_prompts`` draws them
    under ``seed_scheme``. ``prompts_from``: a folder of ``<Task>_Syn/image_text.csv`` files whose
    prompts are used instead (e.g. the authors' released ones; ``images_per_task`` then takes
    the first rows, None: all). ``prompts_only``: write each task's ``image_text.csv`` and
    manifests without images (``generator`` may be None). Returns the run manifest (complete on rank 0).
    """
    t_start = time.perf_counter()
    base, sources = sequence_sources(tasks, base_classnames=base_classnames, template=template)
    names = [src.name for src in sources]
    selected = list(names)
    if only is not None:
        only = [o for o in only]
        unknown = [o for o in only if o not in names]
        if unknown:
            raise ValueError(f"unknown task(s) {', '.join(map(repr, unknown))}; this sequence has: {', '.join(names)}")
        selected = [n for n in names if n in set(only)]
    if prompts_from is None or images_per_task is not None:
        if isinstance(images_per_task, bool) or not isinstance(images_per_task, int) or images_per_task < 1:
            raise ValueError(f"images_per_task must be a positive int, got {images_per_task!r}")
    if seed_scheme not in SEED_SCHEMES:
        raise ValueError(f"unknown seed scheme {seed_scheme!r}; use one of {', '.join(SEED_SCHEMES)}")
    pool_exclude = list(dict.fromkeys(pool_exclude))
    if generator is None and not prompts_only:
        raise ValueError("a generator is needed to make images (or pass prompts_only=True)")
    out_root = check_writable(Path(out_root))

    pools = task_pools(base, sources, pool_exclude)   # checks pool_exclude; pool sizes for the manifests
    if prompts_from is not None:
        src_root = Path(prompts_from)
        if src_root.resolve() == out_root.resolve():
            raise SynthError(f"--prompts-from {src_root} is the output folder: the engine rewrites image_text.csv "
                             f"there, which would lose the prompts if interrupted. Give another --out")
        all_prompts = {n: read_prompt_csv(src_root / f"{n}_Syn" / CSV_NAME, images_per_task)
                       for n in selected}
        for t, n in enumerate(names):   # prompts of another order or pool would be mislabelled by the manifests
            if n in all_prompts:
                allowed = set(pools[t])
                foreign = [p for p in all_prompts[n] if p not in allowed]
                if foreign:
                    raise SynthError(
                        f"{src_root / f'{n}_Syn' / CSV_NAME}: {len(foreign)} of its {len(all_prompts[n])} prompts "
                        f"are not in this sequence's pool for {n} (the classes of "
                        f"{[base.name] + pool_task_names(sources, t, pool_exclude)}), "
                        f"e.g. {foreign[0]!r}. Were they made for another order (--order 1 / 2), another "
                        f"--pool-exclude or --template?")
        prompt_source = f"prompts from {src_root}"
    else:
        drawn = sequence_prompts(base, sources, images_per_task, seed=seed, scheme=seed_scheme,
                                 exclude=pool_exclude)
        all_prompts = {n: drawn[t] for t, n in enumerate(names)}
        prompt_source = f"drawn ({seed_scheme} scheme)"
    pool_info = {"base": base.name, "base_template": base.template, "pool_exclude": pool_exclude,
                 "templates": {src.name: src.template for src in sources}}

    task_entries = {}
    for t, src in enumerate(sources):
        name = src.name
        if name not in selected:
            continue
        prompts = all_prompts[name]
        extra = {"pool_size": len(pools[t]), "pool_base": base.name,
                 "pool_tasks": pool_task_names(sources, t, pool_exclude), "pool_exclude": pool_exclude,
                 "template": src.template, "prompt_source": prompt_source, "sequence": names}
        if prompts_only:
            folder = write_prompts_only(name, prompts, out_root, seed=seed, task_index=t, seed_scheme=seed_scheme,
                                        extra_manifest=extra, rank=rank)
        else:
            folder = synthesize_task(generator, name, prompts, out_root, seed=seed, task_index=t,
                                     batch_size=batch_size, rank=rank, world_size=world_size, progress=progress,
                                     image_format=image_format, jpeg_quality=jpeg_quality, max_retries=max_retries,
                                     overwrite=overwrite, extra_manifest=extra, seed_scheme=seed_scheme)
        tm = read_json(folder / MANIFEST_NAME) or {}
        task_entries[name] = {"task_index": t, "folder": folder.name, "pool_size": len(pools[t]),
                              "pool_tasks": extra["pool_tasks"], "images": len(prompts),
                              "complete": bool(tm.get("complete")), "counts": tm.get("counts"),
                              "last_run": tm.get("last_run")}

    desc = generator.describe() if callable(getattr(generator, "describe", None)) else {}
    config = desc.get("config", {})
    manifest_path = out_root / MANIFEST_NAME
    manifest = read_json(manifest_path) or {}
    manifest.update({
        "version": MANIFEST_VERSION,
        "generator": getattr(generator, "name", type(generator).__name__) if generator is not None else None,
        "model": config.get("model"), "scheduler": config.get("scheduler"), "steps": config.get("steps"),
        "guidance": config.get("guidance"), "height": config.get("height"), "width": config.get("width"),
        "runtime": desc.get("runtime"), "seed": seed, "images_per_task": images_per_task,
        "template": template if template is not None else "per data set (see pool.templates)",
        "base_classnames": ("imagenet-1k (open_clip zero_shot_metadata)" if base_classnames is None
                            else f"custom ({len(base.classnames)} names)"),
        "order": names, "seed_scheme": seed_scheme, "prompt_source": prompt_source, "pool": pool_info,
        "prompts_only": bool(prompts_only), "image_format": image_format, "jpeg_quality": jpeg_quality,
        "world_size": world_size, "versions": _versions(),
    })
    if run_info:
        manifest.update(run_info)
    manifest.setdefault("tasks", {}).update(task_entries)
    all_tasks = manifest["tasks"]
    manifest["counts"] = {
        "tasks_complete": sum(1 for v in all_tasks.values() if v.get("complete")),
        "images": sum((v.get("counts") or {}).get("images", 0) for v in all_tasks.values()),
        "black_regenerations": sum((v.get("counts") or {}).get("black_regenerations", 0)
                                   for v in all_tasks.values()),
        "black_kept": sum((v.get("counts") or {}).get("black_kept", 0) for v in all_tasks.values()),
    }
    manifest["wall_time_s"] = round(time.perf_counter() - t_start, 3)
    manifest["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if rank == 0:
        write_json(manifest_path, manifest)
    return manifest


def write_prompts_only(task_name: str, prompts: Sequence[str], out_root, *, seed: int, task_index: int,
                       seed_scheme: str = "hash", extra_manifest: Optional[Dict[str, Any]] = None,
                       rank: int = 0) -> Path:
    """``<out_root>/<task_name>_Syn/image_text.csv`` (``<i>.jpeg,<prompt>`` rows) and a manifest that says
    the folder holds prompts only; no model is loaded. A later ``gift-fast synth`` into the same folder
    (same options) or ``--prompts-from`` it generates the images."""
    folder = check_writable(Path(out_root) / f"{task_name}_Syn")
    if rank != 0:
        return folder
    old = read_json(folder / MANIFEST_NAME)
    if old is not None and not old.get("prompts_only"):
        raise SynthError(f"{folder} holds generated images (manifest.json): --prompts-only would replace their "
                         f"prompt list. Use another --out")
    write_prompt_csv(folder, prompts, "jpeg")
    manifest = {"version": MANIFEST_VERSION, "complete": False, "prompts_only": True, "task": task_name,
                "task_index": int(task_index), "seed": int(seed), "images": len(prompts),
                "distinct_prompts": len(set(prompts)), "seed_scheme": seed_scheme,
                "seed_rule": SEED_RULES[seed_scheme], "versions": _versions()}
    if extra_manifest:
        manifest.update(extra_manifest)
    write_json(folder / MANIFEST_NAME, manifest)
    return folder


def csv_image_index(value: str) -> int:
    """The image index of a CSV ``image`` cell, resolved by file name: ``12.jpeg``,
    ``./data/synthetic/synthetic_data_a/Aircraft_Syn/12.jpeg`` (the authors' paths) -> 12."""
    name = str(value).replace("\\", "/").rsplit("/", 1)[-1]
    stem = name.rsplit(".", 1)[0]
    if not stem.isdigit():
        raise ValueError(f"image name {value!r} is not <index>.<ext>")
    return int(stem)


def write_prompt_csv(folder: Path, prompts: Sequence[str], ext: str) -> None:
    """``image_text.csv`` of a task folder: header ``image,text``, then ``<i>.<ext>,<prompt>`` rows (the
    authors' layout), written atomically (the CSV marks a complete folder)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["image", "text"])
    for i, p in enumerate(prompts):
        w.writerow([f"{i}.{ext}", p])
    atomic_write_text(folder / CSV_NAME, buf.getvalue())


def read_prompt_csv(path, limit: Optional[int] = None) -> List[str]:
    """The prompts of an ``image_text.csv`` (this project's or the authors'), image i's at position i.

    Rows are matched to images by file name (``<i>.jpeg``), whatever folder the ``image`` column
    names; the indices must be exactly ``0..n-1``. ``limit``: the first ``limit`` images."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: --prompts-from needs <Task>_Syn/{CSV_NAME} for every task "
                                f"to synthesize")
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or not {"image", "text"} <= set(reader.fieldnames):
            raise ValueError(f"{path} must have the header 'image,text', got {reader.fieldnames}")
        by_index: Dict[int, str] = {}
        for r, row in enumerate(reader, start=2):
            try:
                i = csv_image_index(row["image"])
            except ValueError as e:
                raise ValueError(f"{path}, line {r}: {e}") from None
            if i in by_index:
                raise ValueError(f"{path}, line {r}: image {i} appears twice")
            by_index[i] = row["text"]
    n = len(by_index)
    if n == 0 or sorted(by_index) != list(range(n)):
        raise ValueError(f"{path}: the images must be numbered 0..n-1 (got {n} rows)")
    if limit is not None:
        if limit > n:
            raise ValueError(f"{path} has {n} prompts; --images-per-task {limit} asks for more")
        n = limit
    return [by_index[i] for i in range(n)]


def _check_tasks(tasks) -> List[Tuple[str, List[str], Optional[str]]]:
    """``(name, classnames, template or None)`` triples from ``(name, classnames[, template])`` items."""
    if isinstance(tasks, (str, bytes)) or not hasattr(tasks, "__iter__"):
        raise TypeError("tasks must be a list of (name, classnames) pairs")
    out = []
    for k, item in enumerate(tasks):
        if isinstance(item, PoolSource):
            item = (item.name, list(item.classnames), item.template)
        try:
            name, classnames, *rest = item
            if len(rest) > 1:
                raise ValueError
        except (TypeError, ValueError):
            raise TypeError(f"tasks[{k}] must be a (name, classnames) pair or (name, classnames, template), "
                            f"got {item!r}") from None
        if isinstance(classnames, str) or not classnames:
            raise ValueError(f"task {name!r} needs a non-empty list of class names")
        out.append((str(name), [str(c) for c in classnames], rest[0] if rest else None))
    seen = set()
    for name, _, _ in out:
        if name in seen:
            raise ValueError(f"task {name!r} appears twice in the sequence")
        seen.add(name)
    if not out:
        raise ValueError("the task sequence is empty")
    return out


# ----------------------------------------------------------------------------------------------
# task lists: the MTIL orders and custom files

def load_task_file(path) -> Tuple[List[Tuple[str, List[str], Optional[str]]], Optional[List[str]]]:
    """Tasks ``(name, classnames, template or None)`` (and optional base class names) from a JSON or CSV file.

    JSON: ``{"tasks": [{"name": "Birds", "classnames": ["robin", "wren"], "template": "a photo of a {}, a bird."
    (optional; the task's entries in the prompt pool)}, ...], "base_classnames": [...] (optional; default:
    the 1,000 ImageNet names)}``.
    CSV: header ``task,classname``; one row per class, tasks in order of first appearance.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json" or text.lstrip().startswith("{"):
        try:
            obj = json.loads(text)
        except ValueError as e:
            raise ValueError(f"task file {path} is not valid JSON: {e}") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("tasks"), list):
            raise ValueError(f"task file {path}: expected {{\"tasks\": [{{\"name\": ..., \"classnames\": [...]}}]}}")
        tasks = []
        for k, t in enumerate(obj["tasks"]):
            if not isinstance(t, dict) or "name" not in t or not isinstance(t.get("classnames"), list):
                raise ValueError(f"task file {path}: tasks[{k}] needs \"name\" and a \"classnames\" list")
            tmpl = t.get("template")
            if tmpl is not None and (not isinstance(tmpl, str) or tmpl.count("{}") != 1):
                raise ValueError(f"task file {path}: tasks[{k}].template must contain exactly one '{{}}', got {tmpl!r}")
            tasks.append((str(t["name"]), [str(c) for c in t["classnames"]], tmpl))
        base = obj.get("base_classnames")
        if base is not None and (not isinstance(base, list) or not base):
            raise ValueError(f"task file {path}: base_classnames must be a non-empty list of names")
        return _check_tasks(tasks), ([str(b) for b in base] if base is not None else None)
    rows = list(csv.reader(io.StringIO(text)))
    if not rows or [c.strip().lower() for c in rows[0][:2]] != ["task", "classname"]:
        raise ValueError(f"task file {path}: a CSV task file needs the header 'task,classname'")
    order: Dict[str, List[str]] = {}
    for r, row in enumerate(rows[1:], start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) < 2 or not row[0].strip() or not row[1].strip():
            raise ValueError(f"task file {path}, line {r}: expected 'task,classname', got {row!r}")
        order.setdefault(row[0].strip(), []).append(row[1].strip())
    return _check_tasks(list(order.items())), None


def mtil_tasks(order: int) -> List[Tuple[str, List[str], str]]:
    """The 11 MTIL tasks of order 1 or 2: ``(name, class names, first template)`` (``gift_fast.data.mtil``)."""
    names = task_order(order)
    try:   # local: the data module pulls in torch, which importing the engine does not
        from ..data.mtil import classnames, templates
    except ImportError as e:
        raise SynthError(f"MTIL class names are unavailable ({e}); give a --task-file instead") from e
    return [(n, list(classnames(n)), templates(n)[0]) for n in names]
