"""The command line every training benchmark shares, on the project's error-reporting parser.

:func:`training_parser` holds the flags of train_bccd, train_speed and distill_gain (a script adds its
own); :func:`apply_dry_run` shrinks them for ``--dry-run``, which turns a GPU benchmark into a CPU check
of a few seconds per run; :func:`model_cfg` and :func:`hyp_file` turn a name into a file or one line
naming the flag (exit code 2 through ``cli_main``).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from benchmarks.harness.commands import ROOT
from utils.core.errors import ArgumentParser, UserError


MODELS_DIR = ROOT / "models" / "detect"
HYP_DIR = ROOT / "hyp"
RUNS_DIR = ROOT / "runs" / "benchmarks"


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
