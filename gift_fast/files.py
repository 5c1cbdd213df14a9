"""Writing the files of a run, a cache or a synthetic folder: atomically, fsynced, with errors that name the file.

Every file the project writes goes through ``atomic_write_bytes`` (tmp file in the same folder + flush + fsync +
``os.replace``): a kill or a full disk at any moment leaves either the old file or the new one, never half of
one. A failed write becomes an ``OSError`` that names the file and the fix (``write_error``). Log files that grow
by one line per record use ``append_text_line``.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import threading
from pathlib import Path
from typing import Any, Optional


def write_error(path: str | Path, e: OSError) -> OSError:
    """An OSError that names the file and the fix (a full disk or a permission says neither by itself)."""
    why = e.strerror or str(e)
    fix = {errno.ENOSPC: "free disk space or choose another folder",
           errno.EDQUOT: "free disk space (quota) or choose another folder",
           errno.EACCES: "fix the folder's permissions or choose another folder",
           errno.EROFS: "the file system is read-only: choose another folder"}.get(e.errno, "choose another folder")
    return OSError(e.errno, f"cannot write {path}: {why}; {fix}")


def tmp_path(path: str | Path) -> Path:
    """The temporary name a write goes to before ``os.replace``: same folder (same file system), unique per
    process and thread (several ranks or writer threads never share one)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically: tmp file + flush + fsync + ``os.replace``."""
    path = Path(path)
    tmp = tmp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise write_error(path, e) from None
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def write_json(path: str | Path, obj: Any, indent: int = 2) -> Path:
    """``obj`` as JSON (paths and dataclasses allowed), atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, default=_json_default) + "\n")


def read_json(path: str | Path) -> Optional[dict]:
    """A JSON object file, or None when it is missing, unreadable or not an object (callers decide what that
    means: a folder never written, or one to rebuild)."""
    try:
        with open(path, "r", encoding="utf-8") as fh:
            obj = json.load(fh)
        return obj if isinstance(obj, dict) else None
    except (OSError, ValueError):
        return None


def check_free_space(folder: str | Path, need_bytes: int, what: str, fix: str, margin: float = 1.05) -> None:
    """Refuse to start writing ``need_bytes`` (with a 5% margin) under ``folder`` (or its nearest existing parent)
    when the disk cannot hold them: an OSError that says how much is needed, how much is free and ``fix``."""
    if need_bytes <= 0:
        return
    probe = os.path.abspath(os.path.expanduser(str(folder)))
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    free = shutil.disk_usage(probe).free
    if free < need_bytes * margin:
        gb = 2 ** 30
        raise OSError(errno.ENOSPC, f"not enough disk space for {what}: it needs {need_bytes / gb:.1f} GB in {folder}, "
                                    f"but only {free / gb:.1f} GB are free: free some space or {fix}")


def append_text_line(path: str | Path, line: str) -> None:
    """Append one line to a run's log file (log.jsonl, curves.jsonl); a full disk or a permission problem
    becomes an OSError that names the file and the fix, as every other write of a run does."""
    try:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(line.rstrip("\n") + "\n")
    except OSError as e:
        raise write_error(path, e) from None
