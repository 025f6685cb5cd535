"""The results of a benchmark: numbers and markdown tables for its report, the header naming the
machine and command, and the results JSON (written atomically).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Sequence

from utils.core.atomic import atomic_write_text


def mean_spread(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value) of ``values``."""
    values = [float(v) for v in values]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def fmt(value: float | None, digits: int = 3) -> str:
    """A number for a table cell; '-' for missing or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def fmt_spread(values: Sequence[float], digits: int = 3) -> str:
    """``mean ± std`` over seeds (just the value for one seed)."""
    mean, std = mean_spread(values)
    return fmt(mean, digits) if len(values) < 2 else f"{fmt(mean, digits)} ± {fmt(std, digits)}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table (cells converted with ``str``)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def report_header(title: str, info: dict, command: str, dry_run: bool) -> str:
    """Title, machine, date and command lines above a benchmark's tables."""
    lines = [f"## {title}" + (" (DRY RUN: a CPU check on a tiny synthetic set, not a result)" if dry_run else ""),
             "",
             f"Machine: GPU {info['gpu']}; CPU {info['cpu']} ({info['cpus']} CPUs); torch {info['torch']}, "
             f"Python {info['python']}. Date: {info['date']}.",
             f"Command: `{command}`", ""]
    return "\n".join(lines)


def write_results(path: str | Path, payload: dict) -> Path:
    """Write the results JSON (atomically: an interrupted benchmark leaves the previous file)."""
    return atomic_write_text(path, json.dumps(payload, indent=1, default=str) + "\n")


def results_path(opt: argparse.Namespace) -> Path:
    """Where the results JSON goes: ``--out``, else ``WORK/results.json``."""
    return Path(opt.out) if opt.out else Path(opt.work) / "results.json"
