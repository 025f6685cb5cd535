"""Command-line flags shared by train.py and train_distill.py (YOLOv5/YOLOv9 spellings included)."""

from __future__ import annotations

import argparse
from pathlib import Path

from utils.errors import ArgumentParser

ROOT = Path(__file__).resolve().parents[1]
AMP_CHOICES = ("auto", "bf16", "fp16", "off")


def build_parser(distill: bool = False) -> argparse.ArgumentParser:
    """The training parser; ``distill`` adds the teacher flags."""
    parser = ArgumentParser(
        description="Distil a student from a frozen teacher." if distill else "Train a YOLO detector.")
    add = parser.add_argument
    add("--cfg", type=str, default="", help="model yaml (models/detect/*.yaml)")
    add("--weights", type=str, default="", help="initial weights .pt ('' = from scratch)")
    add("--data", type=str, default=str(ROOT / "data" / "synthetic.yaml"), help="data.yaml")
    default_hyp = "hyp.distill.yaml" if distill else "hyp.scratch-high.yaml"
    add("--hyp", type=str, default=str(ROOT / "hyp" / default_hyp), help="hyper-parameter yaml")
    add("--epochs", type=int, default=100)
    add("--batch", "--batch-size", dest="batch", type=int, default=16, help="total batch size (all GPUs)")
    add("--img", "--imgsz", "--img-size", dest="img", type=int, default=640, help="train/val image size (px)")
    add("--device", default="", help="cuda device (0 or 0,1) or cpu")
    add("--workers", type=int, default=8, help="data loader workers (per process)")
    add("--project", default=str(ROOT / "runs" / ("distill" if distill else "train")), help="runs folder")
    add("--name", default="exp", help="run name: project/name")
    add("--exist-ok", action="store_true", help="reuse project/name instead of incrementing")
    add("--resume", nargs="?", const=True, default=False, help="resume the latest (or the given) last.pt")
    add("--close-mosaic", type=int, default=0, help="switch mosaic off for the last N epochs")
    add("--cache", nargs="?", const="ram", default=None, choices=["ram"], help="cache decoded images in RAM")
    add("--optimizer", default="SGD", choices=["SGD", "Adam", "AdamW"])
    add("--cos-lr", action="store_true", help="cosine learning-rate schedule")
    add("--patience", type=int, default=100, help="stop after N epochs without improvement (0 = never)")
    add("--seed", type=int, default=0)
    add("--deterministic", action="store_true", help="ask for deterministic kernels")
    add("--freeze", type=int, default=0, help="freeze the first N layers")
    add("--save-period", type=int, default=-1, help="also save epochN.pt every N epochs (-1 = off)")
    add("--val-period", type=int, default=1, help="validate every N epochs (and always after the last)")
    add("--noval", action="store_true", help="validate only after the last epoch")
    add("--noplots", action="store_true", help="save no plots")
    add("--amp", default="auto", choices=AMP_CHOICES,
        help="mixed precision: auto = bf16 on GPUs that support it, else fp16; off on CPU")
    add("--sync-bn", action="store_true", help="SyncBatchNorm under torchrun")
    add("--channels-last", action="store_true", help="channels_last memory format")
    add("--compile", action="store_true", help="torch.compile the training model")
    add("--gpu-augment", action="store_true", help="mosaic/affine/HSV/flips on the GPU, batched")
    add("--max-batches", type=int, default=0, help=argparse.SUPPRESS)  # tests: cap batches per epoch
    if distill:
        add("--teacher", type=str, default="", help="teacher checkpoint (ours or an official YOLOv9 .pt); required")
        add("--teacher-img", type=int, default=0, help="teacher input size (0 = same as --img)")
    return parser
