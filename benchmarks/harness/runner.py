"""The runner: the entry scripts (``train.py``, ``train_distill.py``, ``val.py``) run as subprocesses
or in this process, one folder per run with its log, finished runs reused with ``--reuse`` (matched by
command string and hyp bytes) and interrupted ones resumed; and the readers of a run's results.csv.
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

from benchmarks.harness.commands import ROOT, display
from utils.core.atomic import atomic_write_text
from utils.core.errors import UserError
from utils.core.log import LOGGER


RUN_MARKER = "benchmark-run.json"  # written into a run folder once its command succeeded
PENDING_MARKER = "benchmark-pending.json"  # written when a run starts: --reuse resumes it from last.pt
LOG_TAIL_LINES = 15


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
