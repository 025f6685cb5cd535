"""The one command-line formatter of the benchmarks.

Two uses: how a benchmark itself was started (``python -m benchmarks.NAME ...``, printed in its report
and saved in its results) and the entry-script commands the runner starts, shown with paths under the
repository made relative. The runner's strings are what ``--reuse`` compares with recorded runs, so
their spelling (``shlex.join``, the root prefix removed) is part of a benchmark's identity.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[2]


def display(parts: Sequence[str]) -> str:
    """A command line with paths under the repository shortened to relative ones."""
    prefix = str(ROOT) + os.sep
    return shlex.join(p[len(prefix):] if p.startswith(prefix) else p for p in parts)


def command_line(module: str, argv: Sequence[str] | None) -> str:
    """How the benchmark ``benchmarks.<module>`` was started, as a runnable command (``argv`` None: this
    process's own arguments)."""
    return f"python -m benchmarks.{module} " + shlex.join(sys.argv[1:] if argv is None else list(argv))
