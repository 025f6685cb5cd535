"""``python -m utils.checkpoint convert SRC DST``: an official YOLOv9 ``.pt`` -> our checkpoint format.

The conversion itself is :func:`utils.checkpoint.ours.convert_checkpoint`; this module only reads the
command line and reports.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from utils.checkpoint.ours import convert_checkpoint, load_checkpoint
from utils.core.errors import ArgumentParser, cli_main
from utils.core.log import LOGGER, setup_logging


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags of ``python -m utils.checkpoint`` (one subcommand, ``convert``)."""
    parser = ArgumentParser(prog="python -m utils.checkpoint",
                            description="Checkpoint tools: convert an official YOLOv9 .pt to the yolo-distill format.")
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert", help="official YOLOv9 .pt -> yolo-distill .pt (plain dicts, "
                                  "loads with torch.load(weights_only=True))")
    convert.add_argument("src", help="official YOLOv9 checkpoint (training, stripped or *-converted.pt)")
    convert.add_argument("dst", help="where to write the yolo-distill checkpoint")
    convert.add_argument("--raw-model", action="store_true",
                         help="take ckpt['model'] (the raw training weights) instead of the EMA")
    return parser.parse_args(argv)


@cli_main
def main(argv: list[str] | None = None) -> Path:
    """``python -m utils.checkpoint convert SRC DST``; bad input is one line on stderr and exit code 2."""
    setup_logging()
    opt = parse_args(argv)
    out = convert_checkpoint(opt.src, opt.dst, prefer_ema=not opt.raw_model)
    ckpt = load_checkpoint(out)
    LOGGER.info(f"converted {opt.src} ({ckpt['extra'].get('official_branch')} weights, {len(ckpt['state_dict'])} "
                f"tensors, {ckpt['nc']} classes) -> {out}")
    return out

