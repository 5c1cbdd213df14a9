"""The versions a run, a synthetic folder or a benchmark records: one function, each caller its list."""
from __future__ import annotations

import platform
from typing import Dict, Optional, Sequence


def package_versions(modules: Sequence[str], *, python: bool = True, missing: Optional[str] = None) -> Dict[str, str]:
    """``{"python": ..., module: module.__version__, ...}``; a module that does not import is left out, or
    recorded as ``missing`` when that is given (a generator's identity records "missing" on purpose: it keys
    synthetic folders, and must stay what folders written before recorded)."""
    out: Dict[str, str] = {"python": platform.python_version()} if python else {}
    for mod in modules:
        try:
            out[mod] = str(__import__(mod).__version__)
        except Exception:
            if missing is not None:
                out[mod] = missing
    return out


def gift_fast_version() -> Optional[str]:
    """The installed distribution's version (None when gift-fast runs from a source tree without metadata)."""
    try:
        from importlib.metadata import version

        return version("gift-fast")
    except Exception:
        return None
