"""Atomic writes: a reader sees either the previous file (or folder) or the complete new one, never half.

The files a later run reads back go through here: checkpoints, the label cache, a resumed
run's results.csv, the benchmarks' records and run markers. The data goes to a temporary file in the same
folder (so the rename cannot cross file systems), which is renamed over the target with
``os.replace``. If writing fails (disk full, an exception in the writer, Ctrl-C), the temporary
file is removed and the previous file is left as it was.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX); not possible, nor needed, everywhere."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temporary_name(path: Path) -> Path:
    """A hidden name beside ``path`` that no other process or call picks (pid + random)."""
    return path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


def atomic_write(path: str | Path, write: Callable[[IO[Any]], object], *, text: bool = False,
                 durable: bool = False) -> Path:
    """Call ``write(file)`` on a temporary file, then rename it over ``path``; returns ``path``.

    ``text``: the file is opened for text (UTF-8, newlines as written, for csv), else binary.
    ``durable``: fsync the data and the folder before returning (checkpoints: a power cut after
    the call must not leave an empty file behind a name that says the run got that far).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    # os.open with 0o666 lets the umask decide the mode, as for any other file the user writes
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with (os.fdopen(fd, "w", encoding="utf-8", newline="") if text else os.fdopen(fd, "wb")) as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, content: str) -> Path:
    """Write ``content`` (UTF-8) to ``path`` atomically; returns ``path``."""
    return atomic_write(path, lambda f: f.write(content), text=True)


def swap_in_folder(tmp: Path, root: Path, marker: str) -> None:
    """Put the finished folder ``tmp`` in place of ``root`` by renames, so that a reader never sees
    half a folder; an older ``root`` is removed. ``marker``: the file a complete folder holds; when
    the rename fails because another process put its complete folder there first, ours is dropped.
    """
    stale: Path | None = root.with_name(f".{root.name}.old-{os.getpid()}")
    try:
        os.rename(root, stale)
    except FileNotFoundError:
        stale = None
    try:
        os.rename(tmp, root)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (root / marker).is_file():  # not another process that won the race
            raise
    finally:
        if stale is not None:
            shutil.rmtree(stale, ignore_errors=True)
