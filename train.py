"""Train a YOLO detector (teachers, scratch baselines).

Example:
    python train.py --cfg models/detect/gelan-s.yaml --data data/bccd.yaml --hyp hyp/hyp.scratch-high.yaml \
        --img 640 --batch 16 --epochs 100 --close-mosaic 10 --name gelan-s
    torchrun --nproc_per_node 2 train.py ...   # several GPUs
    python -m torch.distributed.launch --nproc_per_node 2 train.py ...   # the same, through --local-rank
"""

from __future__ import annotations

import argparse
import sys

from utils.core.errors import cli_main
from utils.core.log import setup_logging
from utils.engine.args import apply_local_rank, build_parser
from utils.engine.trainer import run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser(distill=False).parse_args(argv)


@cli_main
def main(argv: list[str] | None = None) -> dict:
    setup_logging()
    opt = parse_args(argv)
    apply_local_rank(opt)
    return run(opt)


if __name__ == "__main__":
    main(sys.argv[1:])
