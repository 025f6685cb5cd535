"""Distil a small student from a frozen teacher (ours or an official YOLOv9 checkpoint).

Example:
    python train_distill.py --data data/bccd.yaml --img 640 --batch 32 --epochs 100 --close-mosaic 10 \
        --cfg models/detect/yolov9-tiny.yaml --teacher runs/train/gelan-s/weights/best.pt \
        --hyp hyp/hyp.distill.yaml --name yolov9-tiny-distill
The distillation terms, weights, temperatures and schedule are read from the --hyp file (docs/distillation.md);
KD stops when mosaic closes, so --close-mosaic is the plain-detection tail of the run.
"""

from __future__ import annotations

import argparse
import sys

from utils.core.errors import UserError, cli_main
from utils.core.log import setup_logging
from utils.engine.args import apply_local_rank, build_parser
from utils.engine.trainer import run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser(distill=True).parse_args(argv)


@cli_main
def main(argv: list[str] | None = None) -> dict:
    setup_logging()
    opt = parse_args(argv)
    apply_local_rank(opt)
    if not opt.teacher and not opt.resume:
        raise UserError("--teacher is required: a checkpoint of a trained teacher (ours or official YOLOv9)")
    return run(opt)


if __name__ == "__main__":
    main(sys.argv[1:])
