"""Helpers shared by the training benchmarks (train_bccd, train_speed, distill_gain).

- the command-line flags every training benchmark takes, and the ``--dry-run`` shrink that turns a
  GPU benchmark into a CPU check of a few seconds per run on a tiny synthetic set;
- the data: a data.yaml (BCCD by default, converted by its data config), or the dry-run synthetic set;
- :class:`Runner`, which runs ``train.py`` / ``train_distill.py`` / ``val.py`` as subprocesses (each
  run in its own folder with its log), reuses finished runs with ``--reuse`` and reads the results;
- the report: machine description, markdown tables, mean and spread, results JSON.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from benchmarks.harness.commands import display
from benchmarks.harness.machine import cpu_name, machine_info  # noqa: F401  (re-exported to the benchmarks)
from utils.core.atomic import atomic_write_text
from utils.core.errors import ArgumentParser, UserError
from utils.core.log import LOGGER

ROOT = Path(__file__).resolve().parents[1]
MODELS_DIR = ROOT / "models" / "detect"
HYP_DIR = ROOT / "hyp"
RUNS_DIR = ROOT / "runs" / "benchmarks"
BCCD_DATA = ROOT / "data" / "bccd.yaml"  # its convert: block makes the YOLO labels on first use
RUN_MARKER = "benchmark-run.json"  # written into a run folder once its command succeeded
PENDING_MARKER = "benchmark-pending.json"  # written when a run starts: --reuse resumes it from last.pt
LOG_TAIL_LINES = 15


@dataclass(frozen=True)
class DryRun:
    """What ``--dry-run`` shrinks a benchmark to: a CPU check, not a measurement."""

    img: int = 64
    batch: int = 4
    epochs: int = 2
    max_batches: int = 2
    workers: int = 0
    threads: int = 2  # the CPU machines that run dry runs are shared
    n_train: int = 16
    n_val: int = 8
    seed: int = 0


DRY = DryRun()


# ------------------------------------------------------------------------------------------ flags
def training_parser(description: str, epochs: int, work_name: str) -> argparse.ArgumentParser:
    """A parser with the flags every training benchmark shares; scripts add their own."""
    parser = ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--epochs", type=int, default=epochs, help="training epochs per run")
    add("--batch", "--batch-size", dest="batch", type=int, default=16, help="training batch size")
    add("--img", "--imgsz", dest="img", type=int, default=640, help="train and val image size (px)")
    add("--device", default="", help="cuda device (0) or cpu; '' = the first GPU when there is one")
    add("--workers", type=int, default=8, help="data loader workers per run")
    add("--cache", default="ram", choices=["ram", "off"], help="cache decoded training images in RAM")
    add("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"], help="mixed precision of train.py")
    add("--gpu-augment", action="store_true", help="train with --gpu-augment (augmentation on the GPU)")
    add("--data", default="", help="a data.yaml with train/val/test (default: data/bccd.yaml)")
    add("--work", default=str(RUNS_DIR / work_name), help="folder for the runs, their logs and the results")
    add("--reuse", action="store_true",
        help="keep the finished runs of an earlier call in --work whose command is unchanged, instead of rerunning")
    add("--out", default="", help="results JSON (default: WORK/results.json)")
    add("--dry-run", action="store_true",
        help=f"CPU check: synthetic set, {DRY.epochs} epochs at most, --img {DRY.img}, --max-batches {DRY.max_batches}")
    add("--in-process", action="store_true", help="run train.py/val.py inside this process (quicker start; tests)")
    return parser


def check_positive(opt: argparse.Namespace, names: Sequence[str]) -> None:
    """UserError naming the first of ``names`` (flag attributes) that is not a positive integer."""
    for name in names:
        value = getattr(opt, name)
        if value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    if opt.workers < 0:
        raise UserError(f"--workers must not be negative, got {opt.workers}")


def apply_dry_run(opt: argparse.Namespace) -> None:
    """Shrink the shared flags in place for ``--dry-run`` (CPU, tiny images, few batches)."""
    opt.max_batches = DRY.max_batches if opt.dry_run else 0
    if not opt.dry_run:
        return
    opt.img, opt.batch, opt.workers = DRY.img, DRY.batch, DRY.workers
    opt.epochs = min(opt.epochs, DRY.epochs)
    opt.device, opt.amp = "cpu", "off"
    torch.set_num_threads(min(torch.get_num_threads(), DRY.threads))


def model_cfg(name: str, flag: str = "--models") -> Path:
    """A model yaml from a name (``gelan-s``) or a path; UserError naming ``flag`` when it does not exist."""
    path = Path(name)
    if path.suffix not in (".yaml", ".yml"):
        path = MODELS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise UserError(f"{flag} {name}: {path} not found (give a name from models/detect/ or a yaml path)")
    return path.resolve()


def hyp_file(name: str, flag: str = "--hyp") -> Path:
    """A hyp yaml from a path or a bare file name in hyp/; UserError naming ``flag`` when it does not exist."""
    for path in (Path(name), HYP_DIR / name):
        if path.is_file():
            return path.resolve()
    raise UserError(f"{flag} {name}: file not found (give a path or a file name in hyp/)")


# ------------------------------------------------------------------------------------------- data
def dry_run_data(work: Path) -> Path:
    """A tiny synthetic set for ``--dry-run``; its val images double as the test split."""
    import yaml

    from utils.data.synthetic import generate

    root = work / "data" / "synthetic-dry"
    shutil.rmtree(root, ignore_errors=True)
    yaml_file = generate(root, DRY.n_train, DRY.n_val, DRY.img, DRY.seed)
    config = yaml.safe_load(yaml_file.read_text())
    config["test"] = config["val"]
    yaml_file.write_text("# dry-run set: synthetic, test = val\n" + yaml.safe_dump(config, sort_keys=False))
    return yaml_file


def resolve_data(opt: argparse.Namespace) -> Path:
    """The data.yaml a benchmark trains on: dry-run synthetic, ``--data``, or BCCD (data/bccd.yaml,
    converted by the data config on first use)."""
    from utils.data.config import load_data_config

    if opt.dry_run:
        return dry_run_data(Path(opt.work))
    config = load_data_config(opt.data or BCCD_DATA)
    if not config.get("val") or not config.get("test"):
        raise UserError(f"--data {opt.data} needs both a val and a test split")
    return Path(config["yaml_file"])


def count_images(split: str | list[str]) -> int:
    """Images in a split as utils.data.config resolves it (folders or list files); the suffixes the
    data loader reads."""
    from utils.data.labels import IMG_FORMATS

    total = 0
    for entry in split if isinstance(split, list) else [split]:
        path = Path(entry)
        if path.is_dir():
            total += sum(1 for p in path.rglob("*") if p.suffix[1:].lower() in IMG_FORMATS)
        else:
            total += sum(1 for line in path.read_text().splitlines() if line.strip())
    return total


# ---------------------------------------------------------------------------------------- running
class RunFailed(UserError):
    """A train/val command exited with an error; the message names its log."""


@dataclass
class TrainSettings:
    """The train.py flags a benchmark holds fixed across its runs."""

    data: Path
    epochs: int
    batch: int
    img: int
    device: str = ""
    workers: int = 8
    cache: str = "ram"
    amp: str = "auto"
    gpu_augment: bool = False
    close_mosaic: int = 0
    max_batches: int = 0
    noval: bool = False
    extra: list[str] = field(default_factory=list)

    @classmethod
    def from_args(cls, opt: argparse.Namespace, data: Path, **overrides) -> "TrainSettings":
        values = dict(data=data, epochs=opt.epochs, batch=opt.batch, img=opt.img, device=opt.device,
                      workers=opt.workers, cache=opt.cache, amp=opt.amp, gpu_augment=opt.gpu_augment,
                      max_batches=opt.max_batches)
        values.update(overrides)
        return cls(**values)

    def flags(self) -> list[str]:
        out = ["--data", str(self.data), "--epochs", str(self.epochs), "--batch", str(self.batch),
               "--img", str(self.img), "--workers", str(self.workers), "--amp", self.amp, "--noplots"]
        if self.device:
            out += ["--device", self.device]
        if self.cache != "off":
            out += ["--cache", self.cache]
        if self.gpu_augment:
            out.append("--gpu-augment")
        if self.close_mosaic:
            out += ["--close-mosaic", str(self.close_mosaic)]
        if self.max_batches:
            out += ["--max-batches", str(self.max_batches)]
        if self.noval:
            out.append("--noval")
        return out + list(self.extra)


class Runner:
    """Runs the entry scripts, one folder per run under ``work/runs``, and reads their results."""

    def __init__(self, work: Path, reuse: bool = False, in_process: bool = False, threads: int = 0) -> None:
        self.work = Path(work).resolve()
        self.runs = self.work / "runs"
        self.reuse, self.in_process, self.threads = reuse, in_process, threads
        self.commands: list[str] = []

    def _execute(self, script: str, args: list[str], log: Path) -> float:
        """Run ``python script args`` (logging to ``log``); returns the wall time in seconds."""
        shown = display(["python", script, *args])
        self.commands.append(shown)
        LOGGER.info(f"$ {shown}")
        log.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        if self.in_process:
            self._execute_here(script, args, log)
        else:
            env = dict(os.environ)
            if self.threads:
                env.update(OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads))
            with open(log, "w") as f:
                code = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, env=env,
                                      stdout=f, stderr=subprocess.STDOUT).returncode
            if code:
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:])
                raise RunFailed(f"{script} exited with code {code}; log {log}:\n{tail}")
        return time.perf_counter() - start

    @staticmethod
    def _execute_here(script: str, args: list[str], log: Path) -> None:
        """Run an entry script's ``main`` in this process; the root is on sys.path (``python -m`` from it)."""
        log.write_text(f"ran in-process: {display(['python', script, *args])}\n")
        try:
            importlib.import_module(Path(script).stem).main(args)
        except SystemExit as exc:  # cli_main turns a UserError into exit code 2
            if exc.code:
                raise RunFailed(f"{script} exited with code {exc.code} (message above)") from None

    def _finished(self, run_dir: Path, command: str, hyp_sha: str) -> dict | None:
        """The record of a finished run made by the very same command and hyp bytes (``--reuse`` only)."""
        marker = run_dir / RUN_MARKER
        if not (self.reuse and marker.is_file() and (run_dir / "weights" / "best.pt").is_file()):
            return None
        done = json.loads(marker.read_text())
        return done if done.get("command") == command and done.get("hyp_sha256") == hyp_sha else None

    def _train_args(self, name: str, cfg: Path, hyp: Path, seed: int, settings: TrainSettings,
                    teacher: Path | None) -> tuple[str, list[str]]:
        script = "train_distill.py" if teacher is not None else "train.py"
        args = ["--cfg", str(cfg), "--hyp", str(hyp), "--seed", str(seed), *settings.flags(),
                "--project", str(self.runs), "--name", name, "--exist-ok"]
        if teacher is not None:
            args += ["--teacher", str(teacher)]
        return script, args

    def train_command(self, name: str, cfg: Path, hyp: Path, seed: int, settings: TrainSettings,
                      teacher: Path | None = None) -> str:
        """The command line :meth:`train` runs for these arguments (as recorded in its result)."""
        script, args = self._train_args(name, cfg, hyp, seed, settings, teacher)
        return display(["python", script, *args])

    def train(self, name: str, cfg: Path, hyp: Path, seed: int, settings: TrainSettings,
              teacher: Path | None = None) -> dict:
        """Train (``train.py``) or distil (``train_distill.py`` when ``teacher``) one run.

        Returns ``{name, dir, best, wall_s, command}``. With ``--reuse`` a finished run of the same
        command is kept and an interrupted one (same command, ``last.pt`` written) is resumed with
        ``--resume`` (which gives the weights of an uninterrupted run); otherwise its folder is
        emptied first (results.csv must not mix two runs).
        """
        from utils.engine.setup import file_sha256

        run_dir = self.runs / name
        script, args = self._train_args(name, cfg, hyp, seed, settings, teacher)
        shown, hyp_sha = display(["python", script, *args]), file_sha256(hyp)
        done = self._finished(run_dir, shown, hyp_sha)
        if done is not None:
            LOGGER.info(f"reusing {run_dir} (--reuse: same command, finished)")
            self.commands.append(done["command"])
            return done
        pending, last = run_dir / PENDING_MARKER, run_dir / "weights" / "last.pt"
        earlier = json.loads(pending.read_text()) if self.reuse and pending.is_file() and last.is_file() else {}
        resumed = earlier.get("command") == shown and earlier.get("hyp_sha256") == hyp_sha
        if resumed:
            LOGGER.info(f"resuming {run_dir} (--reuse: same command, interrupted)")
            wall = epoch_seconds(run_dir) + self._execute(script, ["--resume", str(last)],
                                                          run_dir / "train-resumed.log")
        else:
            shutil.rmtree(run_dir, ignore_errors=True)
            run_dir.mkdir(parents=True)
            atomic_write_text(pending, json.dumps({"command": shown, "hyp_sha256": hyp_sha}))
            wall = self._execute(script, args, run_dir / "train.log")
        result = {"name": name, "dir": str(run_dir), "best": str(run_dir / "weights" / "best.pt"),
                  "wall_s": wall, "command": shown, "hyp_sha256": hyp_sha, "resumed": resumed}
        atomic_write_text(run_dir / RUN_MARKER, json.dumps(result, indent=1))  # --reuse trusts it
        pending.unlink(missing_ok=True)
        return result

    def validate(self, weights: str | Path, settings: TrainSettings, task: str, folder: Path,
                 batch: int = 0) -> dict:
        """``val.py`` of ``weights`` on the ``task`` split (val or test); returns its metrics dict
        (``map50``, ``map`` = mAP50-95, ``per_class``, ...), reused when ``metrics.json`` is there."""
        out_dir = Path(folder) / f"val-{task}"
        metrics_file = out_dir / "metrics.json"
        if self.reuse and metrics_file.is_file():
            return json.loads(metrics_file.read_text())
        args = ["--weights", str(weights), "--data", str(settings.data), "--img", str(settings.img),
                "--batch", str(batch or settings.batch * 2), "--task", task, "--workers", str(settings.workers),
                "--project", str(out_dir.parent), "--name", out_dir.name, "--exist-ok", "--noplots"]
        if settings.device:
            args += ["--device", settings.device]
        self._execute("val.py", args, out_dir / "val.log")
        return json.loads(metrics_file.read_text())


# ---------------------------------------------------------------------------------------- results
def read_results_csv(run_dir: str | Path) -> list[dict[str, float]]:
    """The rows of a run's results.csv as floats (empty cells become NaN)."""
    with open(Path(run_dir) / "results.csv", newline="") as f:
        return [{k.strip(): _to_float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _to_float(value: str | None) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def train_rate(run_dir: str | Path, skip: int = 1) -> float:
    """Mean training images/s (``speed/img_per_s``) over the epochs after the first ``skip`` ones
    (start-up, cache filling and cudnn autotuning land in the first); all epochs when there are no more."""
    rates = [row["speed/img_per_s"] for row in read_results_csv(run_dir)]
    kept = rates[skip:] or rates
    return statistics.fmean(kept) if kept else math.nan


def epoch_seconds(run_dir: str | Path) -> float:
    """Seconds the epochs logged in a run's results.csv took (``time/epoch_s``); 0 without the file."""
    if not (Path(run_dir) / "results.csv").is_file():
        return 0.0
    return sum(t for row in read_results_csv(run_dir) if math.isfinite(t := row.get("time/epoch_s", math.nan)))


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
