"""Prune a (distilled) detector: remove whole channels with torch-pruning, then fine-tune it.

Example:
    python prune.py --weights runs/distill/yolov9-tiny/weights/best.pt --ratio 0.3 --method l1 \
        --data data/bccd.yaml --img 640 --out runs/prune/tiny-30.pt
    python train_distill.py --weights runs/prune/tiny-30.pt --teacher runs/train/gelan-s/weights/best.pt \
        --data data/bccd.yaml --img 640 --epochs 30 --hyp hyp/hyp.distill.yaml --name tiny-30-ft

``--ratio`` is the fraction of channels removed from every prunable layer group (``--scope
uniform``) or from all of them ranked together (``--scope global``); the head outputs, the DFL and
channels that pass a ShuffleNet shuffle or a split are kept (see ``utils/export/prune.py``). With
``--data`` the model is validated before and after pruning (the pruned model before its fine-tune).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from utils.core.errors import ArgumentParser, cli_main
from utils.core.log import LOGGER, setup_logging
from utils.export.prune import MAX_RATIO, PRUNE_METHODS, SCOPES, PruneSummary, prune_weights

ROOT = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--weights", required=True, help="checkpoint to prune (ours or official YOLOv9 .pt)")
    add("--ratio", type=float, default=0.3, help=f"fraction of channels to remove, in (0, {MAX_RATIO}]")
    add("--method", default="l1", choices=list(PRUNE_METHODS), help="channel importance: weight L1 norm or BN scale")
    add("--scope", default="uniform", choices=list(SCOPES),
        help="the same ratio in every layer group, or one global ranking")
    add("--img", "--imgsz", "--img-size", dest="img", type=int, default=640, help="image size for GFLOPs and --data")
    add("--out", default="", help="pruned checkpoint ('' = <weights>-pruned<ratio%%>.pt next to --weights)")
    add("--data", default="", help="data.yaml: validate before and after pruning ('' = no validation)")
    add("--batch", "--batch-size", dest="batch", type=int, default=32, help="batch size of the --data validation")
    add("--workers", type=int, default=8, help="data loader workers of the --data validation")
    add("--device", default="", help="device of the --data validation, '' = the first GPU, else the CPU (pruning runs on the CPU)")
    return parser.parse_args(argv)


def _report(summary: PruneSummary, path: Path) -> None:
    LOGGER.info(f"pruned {summary.groups} layer groups ({summary.protected_groups} kept whole) with "
                f"{summary.method}, {summary.scope} ratio {summary.ratio}: channels {summary.channels_before} -> "
                f"{summary.channels_after}, params {summary.params_before / 1e6:.3f}M -> "
                f"{summary.params_after / 1e6:.3f}M (-{summary.params_drop:.1%}), GFLOPs@{summary.img_size} "
                f"{summary.gflops_before:.2f} -> {summary.gflops_after:.2f}")
    LOGGER.info(f"saved {path}; fine-tune it with train_distill.py --weights {path} --teacher <teacher.pt> "
                f"(or train.py --weights {path})")


def _validate(weights: str | Path, opt: argparse.Namespace, name: str) -> float:
    import val  # only with --data: the data pipeline is not needed to prune

    metrics = val.run(val.ValOptions(weights=str(weights), data=opt.data, imgsz=opt.img, batch_size=opt.batch,
                                     device=opt.device, workers=opt.workers, project=str(ROOT / "runs" / "prune"),
                                     name=name, noplots=True))
    return float(metrics["map"])


@cli_main
def main(argv: list[str] | None = None) -> Path:
    setup_logging()
    opt = parse_args(argv)
    path, summary = prune_weights(opt.weights, opt.out or None, opt.ratio, opt.method, opt.scope, opt.img,
                                  opt=vars(opt))
    _report(summary, path)
    if opt.data:
        before = _validate(opt.weights, opt, "unpruned")
        after = _validate(path, opt, "pruned")
        LOGGER.info(f"val mAP50-95: {before:.4f} unpruned -> {after:.4f} pruned (before fine-tuning)")
    return path


if __name__ == "__main__":
    main(sys.argv[1:])
