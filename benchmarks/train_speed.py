"""End-to-end training speed of train.py against the GPU-only rate of the same training step.

(a) train.py trains the model on BCCD (640 px, batch 16, hyp.scratch-high.yaml, validation only
    after the last epoch) once per loader mode: ``cpu`` = augmentation in the loader workers,
    ``gpu`` = ``--gpu-augment``. Its rate is the mean of results.csv's ``speed/img_per_s`` over the
    epochs after the first (start-up, cache filling and cudnn autotuning land in the first); the
    whole command's rate (train images x epochs / wall time, what the public 43 images/s is) is
    shown too. During the warm-up (the first 100 iterations, about 8 BCCD epochs) the engine steps
    the optimizer more often than later, which makes (a) slightly conservative.
(b) In the same benchmark run, the same model at the same batch trains on random 640 px tensors with
    random boxes through the engine's own training step (utils.engine.step.train_step: DetectionLoss,
    backward, clipping, the non-finite guard, the optimizer step and EMA, AMP) with gradient
    accumulation to the hyp's nbs, no data loading. That is the rate the GPU allows.

Reported: (a)/(b) (target >= 0.70: training is limited by the GPU, not by the data) and (a)/43
images/s, the public YOLOv9 loop on the same data and GPU (target >= 5x).

    python -m benchmarks.train_speed                     # gelan-s, both loader modes, 20 epochs
    python -m benchmarks.train_speed --modes gpu --epochs 20 --channels-last
    python -m benchmarks.train_speed --dry-run           # CPU check, synthetic set
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

from benchmarks.harness.cli import DRY, apply_dry_run, check_positive, hyp_file, model_cfg, training_parser
from benchmarks.harness.commands import command_line
from benchmarks.harness.data import count_images, resolve_data
from benchmarks.harness.machine import machine_info
from benchmarks.harness.results import fmt, markdown_table, report_header, results_path, write_results
from benchmarks.harness.runner import Runner, TrainSettings, read_results_csv, train_rate
from utils.core.errors import UserError, cli_main
from utils.core.log import LOGGER, setup_logging

EPOCHS = 20
MODES = {"cpu": "train.py, CPU augmentation in the loader workers", "gpu": "train.py --gpu-augment"}
PUBLIC_IMAGES_S = 43.0  # public YOLOv9 train.py, gelan-s, batch 16, BCCD 640, H100 (peer-measurements.md)
TARGET_GPU_FRACTION = 0.70
TARGET_VS_PUBLIC = 5.0
BOXES_PER_IMAGE = 20  # random targets per image: a BCCD mosaic holds about this many cells
MIN_BOX, MAX_BOX = 0.02, 0.2  # random box sides as a fraction of the image
DRY_STEPS, DRY_WARMUP = 2, 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = training_parser(__doc__, EPOCHS, "train_speed")
    add = parser.add_argument
    add("--model", default="gelan-s", help="model name (models/detect/) or yaml path")
    add("--modes", nargs="+", default=list(MODES), choices=list(MODES), help="loader modes of (a)")
    add("--hyp", default="hyp.scratch-high.yaml", help="hyper-parameter yaml (path or name in hyp/)")
    add("--channels-last", action="store_true", help="channels_last memory format in (a) and (b)")
    add("--steps", type=int, default=100, help="(b): timed training steps")
    add("--warmup", type=int, default=20, help="(b): untimed steps first (cudnn autotuning, allocator)")
    add("--seed", type=int, default=0)
    return parser.parse_args(argv)


def random_batch(batch: int, img: int, nc: int, device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``float [B, 3, img, img]`` in [0, 1] on ``device`` and targets ``[B * BOXES_PER_IMAGE, 6]``
    (image index, class, cx, cy, w, h normalised) on the CPU, where the engine keeps them too."""
    gen = torch.Generator().manual_seed(seed)
    imgs = torch.rand(batch, 3, img, img, generator=gen).to(device)
    n = batch * BOXES_PER_IMAGE
    index = torch.arange(batch).repeat_interleave(BOXES_PER_IMAGE).float()
    cls = torch.randint(0, nc, (n,), generator=gen).float()
    wh = MIN_BOX + (MAX_BOX - MIN_BOX) * torch.rand(n, 2, generator=gen)
    centre = wh / 2 + (1 - wh) * torch.rand(n, 2, generator=gen)
    return imgs, torch.cat([index[:, None], cls[:, None], centre, wh], 1)


def gpu_only_rate(cfg: Path, hyp_path: Path, nc: int, opt: argparse.Namespace) -> dict:
    """(b): images/s of the engine's training step on one fixed random batch, no data loading."""
    from models.yolo import DetectionModel
    from utils.core.device import select_device
    from utils.engine.ema import ModelEMA
    from utils.engine.optim import accumulate_steps, build_optimizer, nominal_batch, scaled_weight_decay
    from utils.engine.setup import load_hyp, resolve_amp
    from utils.engine.step import Optimization, detection_forward_loss, train_step
    from utils.loss import DetectionLoss

    device = select_device(opt.device)
    torch.manual_seed(opt.seed)
    hyp = load_hyp(hyp_path)
    nbs = nominal_batch(hyp)
    model = DetectionModel(cfg, nc=nc).to(device).train()
    for module in model.modules():  # as the engine: the DFL expectation weights stay fixed
        if type(module).__name__ == "DFL":
            module.requires_grad_(False)
    memory_format = torch.channels_last if opt.channels_last else torch.contiguous_format
    model.to(memory_format=memory_format)
    loss_fn = DetectionLoss(model, hyp)
    optimizer = build_optimizer([model], "SGD", hyp["lr0"], hyp["momentum"],
                                scaled_weight_decay(hyp["weight_decay"], opt.batch, nbs))
    amp_dtype = resolve_amp(opt.amp, device)
    parts = Optimization.for_optimizer(model, optimizer, amp_dtype, ema=ModelEMA(model))
    # the engine's accumulation to the hyp's nbs; a dry run steps every batch so that it checks that path too
    accumulate = 1 if opt.dry_run else accumulate_steps(opt.batch, nbs)
    imgs, targets = random_batch(opt.batch, opt.img, nc, device, opt.seed)
    imgs = imgs.contiguous(memory_format=memory_format)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    def step(i: int) -> None:
        train_step(parts, lambda: detection_forward_loss(model, loss_fn, imgs, targets, amp_dtype),
                   update=(i + 1) % accumulate == 0)

    for i in range(opt.warmup):
        step(i)
    sync()
    start = time.perf_counter()
    for i in range(opt.warmup, opt.warmup + opt.steps):
        step(i)
    sync()
    seconds = time.perf_counter() - start
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else math.nan
    return {"images_s": opt.batch * opt.steps / seconds, "steps": opt.steps, "seconds": seconds,
            "amp": str(amp_dtype), "device": str(device), "max_memory_gib": memory}


def end_to_end(runner: Runner, opt: argparse.Namespace, cfg: Path, hyp: Path, settings: TrainSettings,
               train_images: int) -> list[dict]:
    """(a): one train.py run per loader mode; rates from results.csv and from the wall time."""
    rows = []
    for mode in opt.modes:
        mode_settings = TrainSettings(**{**vars(settings), "gpu_augment": mode == "gpu"})
        run = runner.train(f"{cfg.stem}-{mode}", cfg, hyp, opt.seed, mode_settings)
        epochs = read_results_csv(run["dir"])
        per_epoch = min(train_images, opt.max_batches * opt.batch) if opt.max_batches else train_images
        rows.append({"mode": mode, "what": MODES[mode], "images_s": train_rate(run["dir"]),
                     "epoch_rates": [e["speed/img_per_s"] for e in epochs],
                     "wall_images_s": per_epoch * len(epochs) / run["wall_s"], "wall_s": run["wall_s"],
                     "run_dir": run["dir"], "command": run["command"]})
    return rows


def table(rows: list[dict], gpu: dict) -> str:
    """(a) per loader mode, (b), and the public code's rate, with the two target ratios."""
    headers = ["measurement", "images/s (epochs after the 1st)", "whole command images/s",
               f"/ GPU-only (target >= {TARGET_GPU_FRACTION:.2f})", f"/ public {PUBLIC_IMAGES_S:.0f} (target >= "
               f"{TARGET_VS_PUBLIC:.0f}x)"]
    cells = [[f"(a) {r['what']}", fmt(r["images_s"], 1), fmt(r["wall_images_s"], 1),
              fmt(r["images_s"] / gpu["images_s"], 2), f"{fmt(r['images_s'] / PUBLIC_IMAGES_S, 1)}x"]
             for r in rows]
    cells.append([f"(b) GPU-only step: random tensors, same loss/optimizer/EMA, amp {gpu['amp']}",
                  fmt(gpu["images_s"], 1), "-", "1.00", f"{fmt(gpu['images_s'] / PUBLIC_IMAGES_S, 1)}x"])
    cells.append(["public YOLOv9 train.py (reference/peer-measurements.md)", "-", fmt(PUBLIC_IMAGES_S, 1), "-",
                  "1.0x"])
    return markdown_table(headers, cells)


@cli_main
def main(argv: list[str] | None = None) -> dict:
    setup_logging()
    opt = parse_args(argv)
    check_positive(opt, ("epochs", "batch", "img", "steps"))
    if opt.warmup < 0:
        raise UserError(f"--warmup must not be negative, got {opt.warmup}")
    apply_dry_run(opt)
    if opt.dry_run:
        opt.steps, opt.warmup = min(opt.steps, DRY_STEPS), min(opt.warmup, DRY_WARMUP)
    cfg, hyp = model_cfg(opt.model, "--model"), hyp_file(opt.hyp)
    data = resolve_data(opt)
    from utils.data.config import load_data_config

    config = load_data_config(data)
    extra = ["--channels-last"] if opt.channels_last else []
    settings = TrainSettings.from_args(opt, data, noval=True, extra=extra)
    runner = Runner(Path(opt.work), reuse=opt.reuse, in_process=opt.in_process,
                    threads=DRY.threads if opt.dry_run else 0)
    rows = end_to_end(runner, opt, cfg, hyp, settings, count_images(config["train"]))
    LOGGER.info(f"(b) GPU-only: {opt.steps} steps after {opt.warmup} warm-up steps")
    gpu = gpu_only_rate(cfg, hyp, config["nc"], opt)
    command = command_line("train_speed", argv)
    info = machine_info(opt.device)
    title = (f"Training speed, {cfg.stem}, batch {opt.batch}, {opt.img} px, {opt.epochs} epochs, "
             f"{'dry-run synthetic set' if opt.dry_run else 'BCCD train split'}, workers {opt.workers}, "
             f"cache {opt.cache}, amp {opt.amp}{', channels_last' if opt.channels_last else ''}")
    report = report_header(title, info, command, opt.dry_run) + table(rows, gpu)
    payload = {"benchmark": "train_speed", "dry_run": opt.dry_run, "command": command, "machine": info,
               "settings": {**vars(opt), "data": str(data), "hyp": str(hyp)}, "end_to_end": rows, "gpu_only": gpu,
               "public_images_s": PUBLIC_IMAGES_S, "commands": runner.commands, "table": report}
    out = write_results(results_path(opt), payload)
    print(report)
    print(f"\nresults: {out}")
    return payload


if __name__ == "__main__":
    main(sys.argv[1:])
