"""Training-loader throughput: the public one-image-at-a-time loop against our loaders.

    python -m benchmarks.loader [--data bccd | synthetic | DATA.yaml] [--img 640] [--batch 16]
                                [--workers 8] [--batches 20] [--warmup 3] [--device ''] [--out FILE.json]

Every mode ends with what a training step needs, a ``float`` batch in [0, 1] on the device, and is
timed over ``--batches`` batches after ``--warmup`` batches (the loader restarts at each epoch end):

- (a) the public code style: the main process augments one image at a time (``workers=0``, no
  cache) with the CPU functions of ``utils/data/augment.py``;
- (b) ``create_dataloader`` with CPU augmentation in persistent workers and a RAM cache;
- (c) ``create_dataloader(gpu_augment=True)`` (letterbox only, persistent workers, RAM cache) plus
  ``GPUAugment`` on the device;
- (d) ``GPUAugment`` alone on one batch already on the device (its own ceiling).

``--data bccd`` (default) converts the bundled data/bccd into a temporary folder first;
``--data synthetic`` (or ``--synthetic``) uses the built-in synthetic set. The output is a markdown
table with the machine and the date; ``--out`` also writes it as JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import cv2
import torch
import yaml

from benchmarks.harness.commands import command_line
from benchmarks.harness.data import BCCD_DATA
from benchmarks.harness.machine import machine_info
from utils.core.device import select_device
from utils.core.errors import ArgumentParser, UserError, cli_main
from utils.core.log import LOGGER, setup_logging
from utils.data.config import load_data_config
from utils.data.dataset import LoaderOptions, create_dataloader
from utils.data.gpu_augment import GPUAugment

ROOT = Path(__file__).resolve().parents[1]
SYNTHETIC_YAML = ROOT / "data" / "synthetic.yaml"
DEFAULT_HYP = ROOT / "hyp" / "hyp.scratch-high.yaml"
DEFAULT_WORKERS = 8
SEED = 0

Batch = tuple[torch.Tensor, torch.Tensor, list, list]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="bccd", help="bccd, synthetic or a data.yaml (its train split)")
    parser.add_argument("--synthetic", action="store_true", help="same as --data synthetic")
    parser.add_argument("--hyp", default=str(DEFAULT_HYP), help="augmentation hyper-parameters")
    parser.add_argument("--img", "--img-size", type=int, default=640, help="training image size (px)")
    parser.add_argument("--batch", "--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS,
                        help="loader worker processes for (b) and (c), capped at the CPU count")
    parser.add_argument("--batches", type=int, default=20, help="timed batches per mode")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches per mode first")
    parser.add_argument("--device", default="", help="device of (c) and (d): '' (CUDA if there is one), cpu, 0")
    parser.add_argument("--modes", default="abcd", help="which modes to run, e.g. 'ac'")
    parser.add_argument("--out", default="", help="also write the results to this JSON file")
    return parser.parse_args(argv)


def _check(opt: argparse.Namespace) -> None:
    for flag in ("img", "batch", "batches"):
        if getattr(opt, flag) < 1:
            raise UserError(f"--{flag} must be a positive integer, got {getattr(opt, flag)}")
    if opt.warmup < 0 or opt.workers < 0:
        raise UserError("--warmup and --workers must not be negative")
    unknown = set(opt.modes) - set("abcd")
    if unknown or not opt.modes:
        raise UserError(f"--modes {opt.modes!r}: use letters from 'abcd'")


def resolve_train_split(data: str, tmp_dir: str) -> tuple[str | list[str], str]:
    """The train split to read and a short description of it (BCCD through its data config)."""
    if data == "bccd":
        config = load_data_config(BCCD_DATA)
        name = "BCCD train (data/bccd.yaml)"
    elif data == "synthetic":
        config = load_data_config(SYNTHETIC_YAML)
        name = "synthetic train (data/synthetic.yaml)"
    else:
        config = load_data_config(data)
        name = f"{data} train"
    if not config["train"]:
        raise UserError(f"--data {data}: the data set has no train split")
    return config["train"], name


def endless(loader) -> Iterator[Batch]:
    """Batches of a loader epoch after epoch (persistent workers survive the restarts)."""
    while True:
        yield from loader


def timed(batches: Iterator, step: Callable[[object], torch.Tensor], n: int, warmup: int,
          sync: Callable[[], None]) -> float:
    """Images per second of ``step`` over ``n`` items of ``batches`` after ``warmup`` items."""
    for _ in range(warmup):
        step(next(batches))
    sync()
    start, images = time.perf_counter(), 0
    for _ in range(n):
        images += step(next(batches)).shape[0]
    sync()
    return images / (time.perf_counter() - start)


def run_modes(opt: argparse.Namespace, source: str | list[str], hyp: dict, device: torch.device) -> list[dict]:
    """Time each mode of ``opt.modes``; returns one dict per mode (mode, what, images_s, setup_s)."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    common = dict(hyp=hyp, augment=True, shuffle=True, seed=SEED)
    workers = min(opt.workers, max((os.cpu_count() or 1) - 1, 0))  # the cap create_dataloader applies
    results = []

    def to_float(batch: Batch) -> torch.Tensor:
        return batch[0].to(device, non_blocking=True).float().div_(255)

    def measure(mode: str, what: str, make_loader: Callable, step: Callable) -> Iterator[Batch]:
        start = time.perf_counter()
        loader, _ = make_loader()
        setup = time.perf_counter() - start
        batches = endless(loader)
        rate = timed(batches, step, opt.batches, opt.warmup, sync)
        results.append(dict(mode=mode, what=what, images_s=rate, setup_s=setup))
        LOGGER.info(f"({mode}) {what}: {rate:.1f} images/s")
        return batches

    if "a" in opt.modes:
        measure("a", "public style: main process, one image at a time, no cache",
                lambda: create_dataloader(source, LoaderOptions(opt.img, opt.batch, workers=0, cache=None, **common)),
                to_float)
    if "b" in opt.modes:
        measure("b", f"create_dataloader, CPU augment, {workers} persistent workers, RAM cache",
                lambda: create_dataloader(source, LoaderOptions(opt.img, opt.batch, workers=workers, cache="ram",
                                                                **common)),
                to_float)
        gc.collect()  # let the persistent workers of (b) go before (c) starts its own
    if "c" in opt.modes or "d" in opt.modes:
        gpu_aug = GPUAugment(hyp, opt.img, seed=SEED)

        def augment(batch: Batch) -> torch.Tensor:
            imgs = batch[0].to(device, non_blocking=True)
            return gpu_aug(imgs, batch[1])[0]

        batches = measure("c", f"gpu_augment loader ({workers} persistent workers, RAM cache) + GPUAugment "
                          f"on {device.type}",
                          lambda: create_dataloader(source, LoaderOptions(opt.img, opt.batch, workers=workers,
                                                                          cache="ram", gpu_augment=True, **common)),
                          augment)
        if "c" not in opt.modes:
            results.pop()
        if "d" in opt.modes:
            imgs, targets, _, _ = next(batches)
            del batches  # stop the workers of (c): (d) times the device work alone
            gc.collect()
            resident = (imgs.to(device), targets)
            rate = timed(iter(lambda: resident, None), lambda b: gpu_aug(*b)[0], opt.batches, opt.warmup, sync)
            results.append(dict(mode="d", what=f"GPUAugment alone on {device.type} (batch already there)",
                                images_s=rate, setup_s=0.0))
            LOGGER.info(f"(d) GPUAugment alone: {rate:.1f} images/s")
    return results


def markdown(results: list[dict], info: dict, settings: dict) -> str:
    """The results as a markdown table with the machine, the command and the date."""
    base = next((r["images_s"] for r in results if r["mode"] == "a"), None)
    lines = [f"Loader throughput, {settings['data']}, {settings['img']} px, batch {settings['batch']}, "
             f"{settings['batches']} batches after {settings['warmup']} warm-up batches, hyp {settings['hyp']}.",
             f"Machine: {info['cpus']} CPUs ({info['cpu']}), GPU: {info['gpu']}, torch {info['torch']}, "
             f"date {info['date']}.",
             f"Command: `{settings['command']}`", "",
             "| mode | what | images/s | vs (a) | setup s |", "|---|---|---|---|---|"]
    for r in results:
        ratio = f"{r['images_s'] / base:.2f}x" if base else "-"
        lines.append(f"| ({r['mode']}) | {r['what']} | {r['images_s']:.1f} | {ratio} | {r['setup_s']:.1f} |")
    return "\n".join(lines)


@cli_main
def main(argv: list[str] | None = None) -> list[dict]:
    opt = parse_args(argv)
    setup_logging()
    _check(opt)
    if opt.synthetic:
        opt.data = "synthetic"
    hyp_file = Path(opt.hyp)
    if not hyp_file.is_file():
        raise UserError(f"--hyp {opt.hyp}: file not found")
    hyp = yaml.safe_load(hyp_file.read_text()) or {}
    if not isinstance(hyp, dict):
        raise UserError(f"--hyp {opt.hyp}: expected a mapping of hyper-parameters")
    device = select_device(opt.device)
    torch.manual_seed(SEED)
    # As the public code does: no OpenCV thread pool in the main process. It would serve only (a),
    # and forking loader workers while its threads hold locks can hang them.
    cv2.setNumThreads(0)
    with tempfile.TemporaryDirectory(prefix="loader-bench-") as tmp:
        source, data_name = resolve_train_split(opt.data, tmp)
        results = run_modes(opt, source, hyp, device)
        gc.collect()
    info = machine_info(device)
    settings = dict(data=data_name, img=opt.img, batch=opt.batch, batches=opt.batches, warmup=opt.warmup,
                    workers=opt.workers, device=str(device), hyp=hyp_file.name,
                    command=command_line("loader", argv))
    print(markdown(results, info, settings))
    if opt.out:
        out = Path(opt.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(dict(machine=info, settings=settings, results=results), indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
