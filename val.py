"""Validate a detector (.pt, .onnx or .engine) on a data set split and print mAP and speed.

Examples:
    python val.py --weights runs/train/exp/weights/best.pt --data data/bccd.yaml --img 640
    python val.py --weights best.onnx --data data/bccd.yaml --task test --save-json --verbose
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from utils.core.errors import ArgumentParser, UserError, cli_main
from utils.core.log import LOGGER, setup_logging
from utils.core.paths import increment_path
from utils.data.config import load_data_config
from utils.data.dataset import LoaderOptions, create_dataloader
from utils.eval.evaluator import EvalSettings, evaluate, format_results
from utils.export.backends import Backend, load_backend

ROOT = Path(__file__).resolve().parent
TASKS = ("val", "test", "speed")
SPEED_CONF, SPEED_IOU = 0.25, 0.45  # --task speed times the deployment thresholds, not the mAP ones


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--weights", required=True, help="model: .pt (ours or official YOLOv9), .onnx or .engine")
    add("--data", default=str(ROOT / "data" / "synthetic.yaml"), help="data.yaml")
    add("--img", "--imgsz", "--img-size", dest="imgsz", type=int, default=640, help="image size (px)")
    add("--batch", "--batch-size", dest="batch_size", type=int, default=32, help="batch size")
    add("--conf-thres", type=float, default=0.001, help="confidence threshold")
    add("--iou-thres", type=float, default=0.7, help="NMS IoU threshold")
    add("--max-det", type=int, default=300, help="detections kept per image")
    add("--task", choices=TASKS, default="val", help="split to validate (speed: timings only)")
    add("--device", default="", help="cuda device (0) or cpu; '' = the first GPU, else the CPU")
    add("--half", action="store_true", help="fp16 inference on CUDA")
    add("--save-json", action="store_true", help="write COCO JSON and score it with the COCO evaluator")
    add("--save-txt", action="store_true", help="write predictions as YOLO txt labels")
    add("--save-conf", action="store_true", help="add the confidence to --save-txt lines")
    add("--project", default=str(ROOT / "runs" / "val"), help="runs folder")
    add("--name", default="exp", help="run name: project/name")
    add("--exist-ok", action="store_true", help="reuse project/name instead of incrementing")
    add("--workers", type=int, default=8, help="data loader workers")
    add("--verbose", action="store_true", help="per-class table")
    add("--noplots", action="store_true", help="no curves, confusion matrix or batch images")
    return parser.parse_args(argv)


@dataclass(frozen=True)
class ValOptions:
    """What val.py does: one field per flag of :func:`parse_args` (same names and defaults)."""

    weights: str
    data: str = str(ROOT / "data" / "synthetic.yaml")
    imgsz: int = 640
    batch_size: int = 32
    conf_thres: float = 0.001
    iou_thres: float = 0.7
    max_det: int = 300
    task: str = "val"
    device: str = ""
    half: bool = False
    save_json: bool = False
    save_txt: bool = False
    save_conf: bool = False
    project: str = str(ROOT / "runs" / "val")
    name: str = "exp"
    exist_ok: bool = False
    workers: int = 8
    verbose: bool = False
    noplots: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ValOptions:
        """The options of parsed flags."""
        return cls(**vars(args))


def _check_flags(opt: ValOptions) -> None:
    if opt.task not in TASKS:
        raise UserError(f"--task {opt.task} is not one of {', '.join(TASKS)}")
    if not 0.0 <= opt.conf_thres < 1.0:
        raise UserError(f"--conf-thres {opt.conf_thres} must be in [0, 1)")
    if not 0.0 < opt.iou_thres <= 1.0:
        raise UserError(f"--iou-thres {opt.iou_thres} must be in (0, 1]")
    if opt.max_det < 1 or opt.batch_size < 1 or opt.imgsz < 1:
        raise UserError("--max-det, --batch-size and --img must be positive")


def _input_size(opt: ValOptions, backend: Backend) -> int:
    """The square size to validate at: a static export's own, else ``--img`` rounded up to the stride."""
    if backend.img_size is not None:  # a static export takes exactly its own square size
        height, width = backend.img_size
        if height != width:
            raise UserError(f"--weights {opt.weights} was exported for {height}x{width}; validate it with a "
                            "square export")
        if opt.imgsz != height:
            LOGGER.info(f"--img {opt.imgsz} -> {height}: {opt.weights} is a static export")
        return height
    if opt.imgsz % backend.stride:
        new = -(-opt.imgsz // backend.stride) * backend.stride
        LOGGER.warning(f"--img {opt.imgsz} is not a multiple of the stride {backend.stride}; using {new}")
        return new
    return opt.imgsz


def run(opt: ValOptions) -> dict:
    """Validate ``opt.weights`` on the ``opt.task`` split of ``opt.data``; returns the dict of
    ``utils.eval.evaluator.evaluate`` plus ``save_dir``. Raises :class:`UserError` for bad flags, files or data."""
    if opt.task == "speed":
        opt = dataclasses.replace(opt, conf_thres=SPEED_CONF, iou_thres=SPEED_IOU, save_json=False, save_txt=False,
                                  noplots=True)
    _check_flags(opt)
    cfg = load_data_config(opt.data)
    split_name = "test" if opt.task == "test" else "val"
    split = cfg[split_name]
    if split is None:
        raise UserError(f"--data {cfg['yaml_file']}: no '{split_name}' split for --task {opt.task}")
    backend = load_backend(opt.weights, opt.device, half=opt.half)
    if backend.nc != cfg["nc"]:
        raise UserError(f"--weights {opt.weights} predicts {backend.nc} classes but --data {cfg['yaml_file']} "
                        f"has {cfg['nc']}")
    imgsz = _input_size(opt, backend)
    loader, _ = create_dataloader(split, LoaderOptions(imgsz, opt.batch_size, stride=backend.stride,
                                                       rect=backend.img_size is None, workers=opt.workers,
                                                       nc=cfg["nc"], prefix=f"{opt.task}: "))
    save_dir = increment_path(Path(opt.project) / opt.name, exist_ok=opt.exist_ok)
    if backend.device.type == "cuda":  # so that CUDA / TensorRT start-up is not in the timings
        backend.warmup((imgsz, imgsz))
    settings = EvalSettings(conf_thres=opt.conf_thres, iou_thres=opt.iou_thres, max_det=opt.max_det, half=opt.half,
                            save_dir=save_dir, plots=not opt.noplots, save_json=opt.save_json, save_txt=opt.save_txt,
                            save_conf=opt.save_conf)
    metrics = evaluate(backend, loader, backend.names, settings)
    LOGGER.info(format_results(metrics, verbose=opt.verbose))
    if "coco" in metrics:
        coco = metrics["coco"]
        LOGGER.info(f"COCO evaluator ({coco['evaluator']}): mAP50-95 {coco['map']:.4f}, mAP50 {coco['map50']:.4f}")
    metrics["save_dir"] = str(save_dir)
    (save_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    LOGGER.info(f"results saved to {save_dir}")
    return metrics


@cli_main
def main(argv: list[str] | None = None) -> dict:
    setup_logging()
    return run(ValOptions.from_args(parse_args(argv)))


if __name__ == "__main__":
    main(sys.argv[1:])
