"""The run folder's rules: it is the run's alone, nothing read from it leaves it, what it holds is verified.

A run folder (``gift-fast train --out DIR``) holds::

    .gift-fast-run              marker: this folder is a gift-fast run (written first)
    .gift-fast-lock             lock of the process working in it (flock: released when the process dies)
    config.json state.json log.jsonl metrics.json acc_matrix.csv *.png report.md <Task>-split.json
    checkpoints/                task checkpoints, the in-task pair and its pointer in_task.json
    synthetic/<Task>_Syn/       on-the-fly synthesis (each folder marked .gift-fast-synthetic)

Rules (each one answers a way a folder was damaged or misused):

* A new run refuses a non-empty folder that is not a run (a user's files would be
  replaced). ``--force`` adds the run to such a folder, but only when none of the
  names the run writes exist there: it never replaces or deletes a file it did not write.
* A folder left by a run that failed before finishing its first task (no finished
  task, no in-task checkpoint) holds nothing worth keeping: a new command restarts it.
* Every path read from ``state.json`` / ``in_task.json`` is resolved inside the folder;
  an absolute path, a ``..`` or a link that leads out is refused (resuming a crafted
  folder must not load or delete files elsewhere).
* Checkpoints carry a sha256 in the file that points to them (``state.json`` for task
  checkpoints, ``in_task.json`` for the in-task pair); it is verified before a resume
  uses them, and by ``gift-fast eval`` on a run's checkpoint. The pointer and its
  files must agree on task and step.
* One process at a time: a second process resuming the same run refuses (lock file).
* What the run trained on is recorded and compared on resume: the synthetic folders'
  fingerprints here, the seeded data splits as ``<Task>-split.json`` (gift_fast.data.mtil).

Errors are ``RunFolderError`` (a ``ValueError``), each naming the file and the fix.
"""
from __future__ import annotations

import hashlib
import fcntl
import io
import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from gift_fast.data.synthetic import reference_pairs
from gift_fast.files import atomic_write_bytes, atomic_write_text, read_json, write_json
from gift_fast.metrics import continual_metrics
# checkpoint I/O (another part of issue 15 moves these to gift_fast.checkpoints, the old names staying)
from gift_fast.checkpoints import atomic_save_safetensors, load_weights, save_model, state_dict_fp32

MARKER = ".gift-fast-run"
LOCK = ".gift-fast-lock"
SYNTHETIC_MARKER = ".gift-fast-synthetic"
# Names a run writes at the top of its folder (plus <Task>-split.json): --force refuses a folder holding any.
RUN_NAMES = ("config.json", "state.json", "log.jsonl", "metrics.json", "acc_matrix.csv", "acc_matrix.png",
             "acc_curves.png", "report.md", "checkpoints", "synthetic", "curves.jsonl", "tensorboard", "wandb",
             "cil.json", "cil_accuracies.json", "cil_report.md", "synth-tasks.json")
IN_TASK_STEM = re.compile(r"^in_task_\d{2,}_step\d{6,}$")


class RunFolderError(ValueError):
    """A run folder that cannot be used as asked; the message names the file and the fix."""


# ----------------------------------------------------------------------------- checksums
def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def verify_checksum(path: Path, expected: Optional[str], pointer: Path) -> None:
    """Refuse a file whose sha256 differs from the one ``pointer`` recorded (or that is missing)."""
    if not path.is_file():
        raise RunFolderError(f"{path} is missing, but {pointer} names it: the run folder is incomplete; restore the "
                             f"file or start a new run (another --out)")
    if not isinstance(expected, str):
        raise RunFolderError(f"{pointer} records no checksum for {path.name} (written by an older gift-fast, or "
                             f"edited): the file cannot be verified; start a new run (another --out)")
    actual = sha256_file(path)
    if actual != expected:
        raise RunFolderError(f"{path} does not match the checksum recorded in {pointer} (the file was changed or "
                             f"damaged on disk): restore it or start a new run (another --out)")


# ----------------------------------------------------------------------------- paths
def inside(root: Path, rel: Any, source: Path, what: str = "path") -> Path:
    """``root / rel`` if it stays inside ``root`` (links resolved); else a clear refusal naming ``source``."""
    if not isinstance(rel, str) or not rel:
        raise RunFolderError(f"{source}: the {what} {rel!r} is not a file name inside the run folder")
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts:
        raise RunFolderError(f"{source} names {rel!r}, a {what} outside the run folder {root}: a run only reads "
                             f"and deletes its own files; the file was edited or does not belong to this run")
    full = root / p
    real_root = root.resolve()
    real = full.resolve()
    if real != real_root and real_root not in real.parents:
        raise RunFolderError(f"{source} names {rel!r}, which leads out of the run folder {root} (through a link): "
                             f"a run only reads and deletes its own files")
    return full


def read_json_file(path: Path, what: str) -> Any:
    """JSON of a run file, or a clear error naming it (truncated, not JSON)."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunFolderError(f"{path} is not valid JSON ({e}): the {what} is damaged; restore it or start a new run "
                             f"(another --out)") from None


# ----------------------------------------------------------------------------- the folder
def is_run_folder(folder: Path) -> bool:
    """A gift-fast run: the marker, or (runs of older versions) a state.json."""
    return (folder / MARKER).is_file() or (folder / "state.json").is_file()


def _entries(folder: Path) -> List[str]:
    return sorted(os.listdir(folder)) if folder.is_dir() else []


def check_new_folder(folder: Path, force: bool = False) -> None:
    """May a new run write into ``folder``? (read-only; ``mark`` then claims it)."""
    if folder.exists() and not folder.is_dir():
        raise RunFolderError(f"--out {folder} is a file, not a folder: choose another --out")
    # (a marker being written by another process of the same run is ours too)
    entries = [e for e in _entries(folder) if not e.startswith(MARKER + ".tmp")]
    if not entries or is_run_folder(folder):
        return
    if not force:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise RunFolderError(f"--out {folder} is not empty ({shown}) and is not a gift-fast run folder: choose a new "
                             f"or empty folder, or pass --force to add the run to it (--force never replaces or "
                             f"deletes a file the run did not write)")
    clash = [e for e in entries if e in RUN_NAMES or e.endswith("-split.json") or e == LOCK]
    if clash:
        raise RunFolderError(f"--force: --out {folder} already holds {', '.join(clash)}, which the run would "
                             f"replace: move them away or choose another --out")


def mark(folder: Path, kind: str = "run") -> bool:
    """Create ``folder`` if needed and write its marker; True when this call created the folder."""
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / MARKER
    if not marker.is_file():
        atomic_write_text(marker, json.dumps({"gift_fast": kind, "format": 1}) + "\n")
    return created


def remove_own_files(folder: Path, created: bool) -> None:
    """Undo ``mark`` (and the split records a failed start wrote) in a folder this command created."""
    if not created or not folder.is_dir():
        return
    entries = _entries(folder)
    if any(not (e in (MARKER, LOCK) or e.endswith("-split.json")) for e in entries):
        return                            # the run got further (or others wrote here): leave it marked
    for e in entries:
        (folder / e).unlink(missing_ok=True)
    try:
        folder.rmdir()                    # only if nothing else is there
    except OSError:
        pass


def restartable(folder: Path, state: Optional[Dict[str, Any]]) -> bool:
    """A run that finished no task and holds no in-task checkpoint: nothing in it is worth keeping."""
    if not is_run_folder(folder):
        return False
    if state is not None and int(state.get("finished") or 0) > 0:
        return False
    return not (folder / "checkpoints" / "in_task.json").exists()


def clear_for_restart(folder: Path) -> None:
    """Remove the files of a run that failed before its first task (only names the run writes)."""
    for name in ("state.json", "log.jsonl", "metrics.json", "acc_matrix.csv", "config.json"):
        (folder / name).unlink(missing_ok=True)
    for e in _entries(folder):
        if e.endswith("-split.json"):
            (folder / e).unlink(missing_ok=True)


# ----------------------------------------------------------------------------- lock
class RunLock:
    """An exclusive ``flock`` on ``<folder>/.gift-fast-lock`` (the kernel drops it when the process dies)."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK
        self._fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                pid = os.read(fd, 32).decode(errors="replace").strip() or "?"
            finally:
                os.close(fd)
            raise RunFolderError(f"{self.path.parent} is in use by another gift-fast process (pid {pid}, lock "
                                 f"{self.path}): wait for it to end, or choose another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


# ----------------------------------------------------------------------------- state and pointer
def read_state(folder: Path) -> Optional[Dict[str, Any]]:
    p = folder / "state.json"
    if not p.is_file():
        return None
    state = read_json_file(p, "run state")
    need = {"tasks": list, "finished": int, "checkpoints": list, "acc": list}
    bad = [k for k, t in need.items() if not isinstance(state, dict) or not isinstance(state.get(k), t)]
    if bad:
        raise RunFolderError(f"{p} lacks valid {', '.join(bad)}: the run state is damaged; start a new run "
                             f"(another --out)")
    return state


def verify_task_checkpoints(folder: Path, state: Dict[str, Any]) -> Optional[Path]:
    """Every listed checkpoint path stays inside; the one a resume loads (the last) matches its checksum.

    Returns the path of the last checkpoint (None when no task is finished)."""
    src = folder / "state.json"
    paths = [inside(folder, rel, src, "checkpoint") for rel in state["checkpoints"]]
    if state["finished"] > 0:
        if len(paths) < 1:
            raise RunFolderError(f"{src} says {state['finished']} tasks are finished but lists no checkpoint: the "
                                 f"run state is damaged; start a new run (another --out)")
        last = paths[-1]
        if "checksums" not in state:      # a run started by a gift-fast without checksums: cannot verify
            _legacy(src, last)
        else:
            verify_checksum(last, state["checksums"].get(state["checkpoints"][-1]), src)
        return last
    return None


def read_in_task_pointer(folder: Path, steps: Optional[int] = None) -> Optional[Dict[str, Any]]:
    """``checkpoints/in_task.json`` checked: its fields, a stem inside the folder, files with their checksums
    (``steps``: a task's length now; the pointer's step must lie inside it)."""
    p = folder / "checkpoints" / "in_task.json"
    if not p.is_file():
        return None
    ptr = read_json_file(p, "in-task checkpoint pointer")
    fix = "the in-task checkpoint is damaged: delete checkpoints/in_task* to resume from the last finished task"
    if not isinstance(ptr, dict):
        raise RunFolderError(f"{p} is not a JSON object: {fix}")
    for key, kind in (("task_index", int), ("step", int), ("stem", str), ("task", str)):
        v = ptr.get(key)
        if not isinstance(v, kind) or isinstance(v, bool):
            raise RunFolderError(f"{p}: {key!r} is {v!r}, expected {'an integer' if kind is int else 'a name'}: {fix}")
    if steps is not None and not 0 < ptr["step"] < steps:
        raise RunFolderError(f"cannot resume {folder}: its in-task checkpoint is at step {ptr['step']} of task "
                             f"{ptr['task_index'] + 1}, but a task now has {steps} steps ({p})")
    if not IN_TASK_STEM.match(ptr["stem"]):
        raise RunFolderError(f"{p} names {ptr['stem']!r}, not an in-task checkpoint of this folder "
                             f"(in_task_<task>_step<step>): {fix}")
    want = in_task_stem(ptr["task_index"], ptr["step"])
    if ptr["stem"] != want:
        raise RunFolderError(f"{p} says task {ptr['task_index'] + 1} step {ptr['step']}, but names the files "
                             f"{ptr['stem']}.* (expected {want}.*): {fix}")
    ckdir = folder / "checkpoints"
    for ext in (".safetensors", ".pt"):
        f = inside(folder, f"checkpoints/{ptr['stem']}{ext}", p, "checkpoint")
        if "sha256" not in ptr:           # written by a gift-fast without checksums
            _legacy(p, f)
        elif not isinstance(ptr["sha256"], dict):
            raise RunFolderError(f"{p}: 'sha256' is {ptr['sha256']!r}, expected the checksums of the files: {fix}")
        else:
            verify_checksum(f, ptr["sha256"].get(ext), p)
    ptr["_dir"] = str(ckdir)
    return ptr


def _legacy(pointer: Path, path: Path) -> None:
    if not path.is_file():
        raise RunFolderError(f"{path} is missing, but {pointer} names it: the run folder is incomplete; restore the "
                             f"file or start a new run (another --out)")
    warnings.warn(f"{pointer} records no checksums (a run started by an older gift-fast): {path.name} is used "
                  f"without verification", RuntimeWarning)


def in_task_stem(task_index: int, step: int) -> str:
    return f"in_task_{task_index + 1:02d}_step{step:06d}"


def check_in_task_files(pointer_path: Path, ptr: Dict[str, Any], tensors_meta: Dict[str, str],
                        rest: Dict[str, Any]) -> None:
    """The files' own task and step (safetensors metadata, the .pt's fields) equal the pointer's."""
    fix = "delete checkpoints/in_task* to resume from the last finished task"
    for what, t, k in (("the .pt file", rest.get("task_index"), rest.get("step")),
                       ("the .safetensors metadata", _int(tensors_meta.get("task_index")),
                        _int(tensors_meta.get("step")))):
        if what.endswith("metadata") and t is None and k is None:
            continue                       # written before the metadata was added: the .pt still agrees
        if (t, k) != (ptr["task_index"], ptr["step"]):
            raise RunFolderError(f"{pointer_path} says task {ptr['task_index'] + 1} step {ptr['step']}, but "
                                 f"{what} of {ptr['stem']} holds task {None if t is None else t + 1} step {k}: {fix}")


def _int(v: Optional[str]) -> Optional[int]:
    try:
        return int(json.loads(v)) if v is not None else None
    except (ValueError, TypeError):
        return None


# ----------------------------------------------------------------------------- synthetic folders
def synthetic_fingerprint(root: str | os.PathLike, task_name: str) -> Dict[str, Optional[str]]:
    """sha256 of ``<root>/<task>_Syn``'s manifest.json and image_text.csv (None for an absent file)."""
    folder = Path(root) / f"{task_name}_Syn"
    return {name: (sha256_file(folder / name) if (folder / name).is_file() else None)
            for name in ("manifest.json", "image_text.csv")}


REFERENCE_KEY = "--reference-images"     # its entry in state.json's synthetic_fingerprints


def reference_fingerprint(root: str | os.PathLike) -> Dict[str, str]:
    """What ``--reference-images`` reads (``data.synthetic.reference_pairs``), fingerprinted: the sha256 of each
    pair's file name, size and prompt (an added, removed, renamed or resized image, or a changed prompt, changes
    it; a file rewritten to the same size does not: sizes, not contents, keep a resume cheap)."""
    root = Path(root)
    h = hashlib.sha256()
    for path, text in reference_pairs(root):
        size = path.stat().st_size if path.is_file() else -1
        h.update(f"{os.path.relpath(path, root)}\t{size}\t{text}\n".encode())
    return {"images": h.hexdigest()}


def compare_reference(recorded: Dict[str, Any], now: Dict[str, Any], root: str, state_path: Path) -> None:
    """Refuse a resume whose reference images differ from those the run started with."""
    if recorded != now:
        raise RunFolderError(f"cannot resume: the reference images under {root} changed since the run started (their "
                             f"listing differs from what {state_path} recorded). Restore the folder the run started "
                             f"with, or start a new run (another --out)")


def compare_synthetic(recorded: Dict[str, Dict[str, Optional[str]]], now: Dict[str, Dict[str, Optional[str]]],
                      root: str, state_path: Path) -> None:
    """Refuse a resume whose synthetic folders differ from those the run started with, naming what changed."""
    changed = []
    for task, files in recorded.items():
        for name, digest in files.items():
            if now.get(task, {}).get(name) != digest:
                changed.append(str(Path(root) / f"{task}_Syn" / name))
    if changed:
        raise RunFolderError(f"cannot resume: the synthetic data changed since the run started ({', '.join(changed)} "
                             f"differ from what {state_path} recorded). Restore the folder the run started with, or "
                             f"start a new run (another --out)")


# ----------------------------------------------------------------------------- on-the-fly synthesis
def claim_synthetic_folder(folder: Path) -> None:
    """On-the-fly synthesis writes only into a folder it created (and marked), never into someone else's."""
    if folder.exists() and not (folder / SYNTHETIC_MARKER).is_file():
        if folder.is_dir() and not os.listdir(folder):
            pass
        else:
            raise RunFolderError(f"{folder} exists and was not made by this run's on-the-fly synthesis: move it away "
                                 f"(the run would write into it and delete it after the task)")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SYNTHETIC_MARKER).touch()


def discard_synthetic_folder(folder: Path) -> None:
    """Delete an on-the-fly folder, only when it carries this run's marker."""
    if (folder / SYNTHETIC_MARKER).is_file():
        shutil.rmtree(folder, ignore_errors=True)


# ----------------------------------------------------------------------------- eval of a run's checkpoint
def verify_if_run_checkpoint(path: str | os.PathLike) -> bool:
    """When ``path`` is a checkpoint inside a run folder, verify it against the checksum recorded there.

    True when it was verified; False for a file that is not a run's recorded checkpoint."""
    p = Path(path)
    if p.parent.name != "checkpoints":
        return False
    folder = p.parent.parent
    state = read_state(folder) if (folder / "state.json").is_file() else None
    if state is None:
        return False
    rel = f"checkpoints/{p.name}"
    sums = state.get("checksums") or {}
    if rel in sums:
        verify_checksum(p, sums[rel], folder / "state.json")
        return True
    return False


def finite_check(named: Iterable, source: str) -> None:
    """Refuse non-finite floating tensors (a run that diverged, a damaged file): name the first few."""
    bad = [n for n, v in named if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise FloatingPointError(f"{source} holds non-finite weights (NaN or inf) in {len(bad)} tensors, e.g. "
                                 f"{bad[:3]}: it comes from a run that diverged or the file is damaged; use another "
                                 f"checkpoint")


# ----------------------------------------------------------------------------- claiming a folder for a run
@dataclass
class Claim:
    """What ``claim`` decided about a run folder: the state to resume (None: a new run), the in-task pointer to
    resume from, the lock held (rank 0), whether the folder was created, whether a failed run was restarted."""
    state: Optional[Dict[str, Any]] = None
    pointer: Optional[Dict[str, Any]] = None
    lock: Optional[RunLock] = None
    created: bool = False
    restarted: bool = False


def claim(out: Path, *, resume: bool, force: bool, steps: int, same_identity: Callable[[Dict[str, Any]], bool],
          dist) -> Claim:
    """New run: the folder must be new, empty, a run that never finished a task, or --force'd (and then hold none
    of the run's names). Resume: the state, checkpoints and pointer must be sound. Rank 0 takes the lock; every
    process reads the same folder and reaches the same decision. ``same_identity(state)``: the recorded identity
    equals this run's; ``steps``: a task's steps now."""
    state = read_state(out) if out.is_dir() else None
    if state is not None and not resume and not restartable(out, state):
        raise FileExistsError(
            f"{out} already holds a run ({state.get('finished', 0)} of {len(state.get('tasks', []))} tasks "
            f"finished): pass --resume to continue it, or choose another --out")
    restart = False
    if state is not None and restartable(out, state):
        # nothing finished and no in-task checkpoint: resume only if the options are the same, else restart
        restart = not (resume and same_identity(state))
    if state is None and resume and (out / IN_TASK_POINTER).is_file():
        # a pointer without a state (the state is written before any step): check it before anything else
        read_in_task_pointer(out, steps=steps)
    if state is None or restart:
        check_new_folder(out, force=force)
    dist.barrier()                       # every process has decided on the folder before rank 0 writes to it
    c = Claim(restarted=restart)
    if dist.is_main:
        c.created = mark(out)
        c.lock = RunLock(out).acquire()
        if restart:
            clear_for_restart(out)
    dist.barrier()
    c.state = None if restart else state
    try:
        if c.state is not None:
            verify_task_checkpoints(out, c.state)
            ptr = read_in_task_pointer(out) if c.state["finished"] < len(c.state["tasks"]) else None
            if ptr is not None and ptr["task_index"] == c.state["finished"]:
                if not 0 < ptr["step"] < steps:
                    raise ValueError(f"cannot resume {out}: its in-task checkpoint is at step {ptr['step']} of "
                                     f"task {ptr['task_index'] + 1}, but a task now has {steps} steps")
                c.pointer = ptr
        elif resume and (out / IN_TASK_POINTER).is_file():
            c.pointer = read_in_task_pointer(out, steps=steps)
    except BaseException:
        if c.lock is not None:
            c.lock.release()
        remove_own_files(out, c.created)
        raise
    return c


def check_resumable(out: Path, state: Dict[str, Any], differences: Sequence[str], task_names: Sequence[str]) -> None:
    """Refuse a resume with other settings (``differences``: ``"field: old -> new"``) or other tasks."""
    if differences:
        raise ValueError(f"cannot resume {out}: the run was started with other settings "
                         f"({', '.join(differences)}). Resume with the same options, or choose another --out")
    if state.get("tasks") != list(task_names):
        raise ValueError(f"cannot resume {out}: its tasks were {state.get('tasks')}, now {list(task_names)}")


# ----------------------------------------------------------------------------- task checkpoints and state
STATE = "state.json"
LOG = "log.jsonl"
IN_TASK_POINTER = "checkpoints/in_task.json"


def task_checkpoint_path(out: Path, t: int, task_name: str) -> Path:
    return out / "checkpoints" / f"task_{t + 1:02d}_{task_name}.safetensors"


def write_state(out: Path, state: Dict[str, Any]) -> None:
    write_json(out / STATE, state)


def save_task_checkpoint(out: Path, model, state: Dict[str, Any], metadata: Dict[str, Any],
                         keep_last_only: bool = False) -> Path:
    """After a task: the model (safetensors, atomic) at ``state["checkpoints"][-1]``, its sha256 into the state
    (the file that points to the checkpoint; verified on resume and by eval), the state; with
    ``keep_last_only`` the earlier task checkpoints are deleted."""
    rel = state["checkpoints"][-1]
    path = out / rel
    save_model(model, path, metadata=metadata)
    state.setdefault("checksums", {})[rel] = sha256_file(path)
    write_state(out, state)
    if keep_last_only:
        for old in state["checkpoints"][:-1]:
            inside(out, old, out / STATE, "checkpoint").unlink(missing_ok=True)
    return path


# ----------------------------------------------------------------------------- in-task checkpoints
# Files: checkpoints/in_task_<task>_<step>.safetensors (model.* and awc.* tensors) and .pt
# (optimizer, schedule, RNG; torch.save of plain containers, loaded with weights_only=True),
# then checkpoints/in_task.json, written last and atomically, names the pair: a kill at any
# moment leaves either the previous complete pair or the new one. The teacher embeddings and
# the anchor are not stored: they are recomputed from the task's starting weights (the last
# finished task's checkpoint), exactly as the uninterrupted run computed them.
def save_in_task(out: Path, t: int, task_name: str, k: int, model, awc, optimizer, scheduler,
                 device: torch.device) -> None:
    """The in-task checkpoint after step ``k`` of task ``t`` (rank 0 calls it)."""
    ckdir = out / "checkpoints"
    ckdir.mkdir(parents=True, exist_ok=True)
    stem = in_task_stem(t, k)
    tensors = {f"model.{n}": v.detach().to("cpu").clone() for n, v in state_dict_fp32(model).items()}
    if awc is not None:
        tensors.update({f"awc.{n}": v.detach().to("cpu").clone() for n, v in awc.state_dict().items()})
    atomic_save_safetensors(tensors, ckdir / f"{stem}.safetensors",
                            metadata={"task_index": json.dumps(t), "step": json.dumps(k)})
    rng = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    rest = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng,
            "task_index": t, "step": k}
    buf = io.BytesIO()
    torch.save(rest, buf)
    atomic_write_bytes(ckdir / f"{stem}.pt", buf.getvalue())
    old = read_json(out / IN_TASK_POINTER)        # None when missing, or replaced by the pointer being written
    sums = {ext: sha256_file(ckdir / f"{stem}{ext}") for ext in (".safetensors", ".pt")}
    write_json(out / IN_TASK_POINTER, {"task_index": t, "task": task_name, "step": k, "stem": stem, "sha256": sums})
    old_stem = old.get("stem") if isinstance(old, dict) else None
    if isinstance(old_stem, str) and IN_TASK_STEM.match(old_stem) and old_stem != stem:
        for ext in (".safetensors", ".pt"):     # only a name of ours, inside checkpoints/
            (ckdir / f"{old_stem}{ext}").unlink(missing_ok=True)


def load_in_task(out: Path, ptr: Dict[str, Any], model, awc, optimizer, scheduler, device: torch.device) -> int:
    """Restore the in-task checkpoint ``ptr`` names (checked and verified by ``claim``): the model, AWC,
    optimizer, schedule and RNG after its step; returns that step."""
    k = int(ptr["step"])
    ckdir = out / "checkpoints"
    tensors = load_file(str(ckdir / f"{ptr['stem']}.safetensors"))
    with safe_open(str(ckdir / f"{ptr['stem']}.safetensors"), framework="pt") as fh:
        meta = fh.metadata() or {}
    rest = torch.load(ckdir / f"{ptr['stem']}.pt", map_location="cpu", weights_only=True)
    check_in_task_files(out / IN_TASK_POINTER, ptr, meta, rest)
    load_weights(model, {n[len("model."):]: v for n, v in tensors.items() if n.startswith("model.")})
    if awc is not None:
        awc.load_state_dict({n[len("awc."):]: v for n, v in tensors.items() if n.startswith("awc.")})
    optimizer.load_state_dict(rest["optimizer"])
    scheduler.load_state_dict(rest["scheduler"])
    torch.set_rng_state(rest["rng"]["cpu"])
    if "cuda" in rest["rng"] and device.type == "cuda":
        torch.cuda.set_rng_state(rest["rng"]["cuda"], device)
    return k


def clear_in_task(out: Path) -> None:
    """Remove the in-task checkpoint once its task is finished (the task checkpoint supersedes it)."""
    (out / IN_TASK_POINTER).unlink(missing_ok=True)
    for f in (out / "checkpoints").glob("in_task_*"):
        f.unlink(missing_ok=True)


def trim_log(log_path: Path, t: int, k: int) -> None:
    """Drop the records of a JSON-lines log of the run (log.jsonl, curves.jsonl) that a killed attempt wrote after
    step ``k`` of task ``t``: the resumed run writes them again. ``k == 0`` (the task starts over) drops all of task
    ``t``, its step-0 curve point included; a line cut by the kill is dropped."""
    if not log_path.is_file():
        return
    keep = []
    with open(log_path) as fh:
        for line in fh:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:      # a line cut by the kill
                continue
            if rec.get("task_index", -1) > t or (rec.get("task_index") == t and (rec.get("step", 0) > k or k == 0)):
                continue
            keep.append(line if line.endswith("\n") else line + "\n")
    atomic_write_text(log_path, "".join(keep))


# ----------------------------------------------------------------------------- result files
def write_acc_csv(path: Path, task_names: Sequence[str], zero_shot: Sequence[float],
                  rows: Sequence[Sequence[float]]) -> None:
    """``acc_matrix.csv``: the zero-shot row, then one row per finished task."""
    lines = ["after," + ",".join(task_names), "zero-shot," + ",".join(f"{v:.4f}" for v in zero_shot)]
    for name, row in zip(task_names, rows):
        lines.append(f"{name}," + ",".join(f"{v:.4f}" for v in row))
    atomic_write_text(path, "\n".join(lines) + "\n")


def run_metrics(state: Dict[str, Any], task_names: Sequence[str], label: str) -> Optional[Dict[str, Any]]:
    """``metrics.json`` of a finished run (None while tasks remain): the continual metrics of its accuracy
    matrix, and of its zero-shot row."""
    if len(state["acc"]) < len(task_names):
        return None
    metrics = continual_metrics(state["acc"])
    zs = state["zero_shot"]
    metrics["zero_shot"] = continual_metrics([zs] * len(zs))
    metrics["tasks"] = list(task_names)
    metrics["label"] = label
    return metrics


__all__ = ["RunFolderError", "MARKER", "LOCK", "SYNTHETIC_MARKER", "sha256_file", "verify_checksum", "inside",
           "is_run_folder", "check_new_folder", "mark", "remove_own_files", "restartable", "clear_for_restart",
           "RunLock", "read_state", "verify_task_checkpoints", "read_in_task_pointer", "in_task_stem",
           "check_in_task_files", "synthetic_fingerprint", "compare_synthetic", "REFERENCE_KEY",
           "reference_fingerprint", "compare_reference", "claim_synthetic_folder",
           "discard_synthetic_folder", "verify_if_run_checkpoint", "finite_check", "Claim", "claim",
           "check_resumable", "task_checkpoint_path", "write_state", "save_task_checkpoint", "save_in_task",
           "load_in_task", "clear_in_task", "trim_log", "write_acc_csv", "run_metrics"]
