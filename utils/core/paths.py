"""Run folders: runs/train/exp, exp2, exp3, ... as YOLO users expect."""

from __future__ import annotations

import re
from pathlib import Path


def increment_path(path: str | Path, exist_ok: bool = False, mkdir: bool = True) -> Path:
    """Return ``path`` if it is free (or ``exist_ok``), else ``path2``, ``path3``, ... (first free)."""
    path = Path(path)
    if not (path.exists() and not exist_ok):
        if mkdir:
            path.mkdir(parents=True, exist_ok=True)
        return path
    stem = re.sub(r"\d+$", "", path.name) if path.name[-1:].isdigit() and path.name.rstrip("0123456789") else path.name
    n = 2
    while (candidate := path.with_name(f"{stem}{n}")).exists():
        n += 1
    if mkdir:
        candidate.mkdir(parents=True, exist_ok=True)
    return candidate
