"""Export a trained model to ONNX (plain or with NMS) and a TensorRT engine.

Examples:
    python export.py --weights runs/distill/exp/weights/best.pt --include onnx --img 640 --simplify
    python export.py --weights best.pt --include onnx --end2end --topk-all 100 --iou-thres 0.45 --conf-thres 0.25
    python export.py --weights best.pt --include onnx engine --device 0      # engine needs TensorRT
Without TensorRT the ONNX file is written and the trtexec command for the device is printed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from models.yolo import DetectionModel, reparameterize
from utils.checkpoint import load_model
from utils.device import select_device
from utils.errors import UserError, cli_main
from utils.export_onnx import DEFAULT_OPSET, MIN_OPSET, export_onnx
from utils.export_trt import (ORIN_NANO_WORKSPACE_MIB, build_engine, shape_profile, tensorrt_available,
                              trtexec_command)
from utils.log import LOGGER, setup_logging

FORMATS = ("onnx", "engine")
DEFAULT_WORKSPACE_GIB = 4.0  # for a build on this machine; the printed device line uses the Orin Nano value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--weights", required=True, help="model checkpoint (.pt, ours or official YOLOv9)")
    add("--include", nargs="+", default=["onnx"], help=f"formats: {', '.join(FORMATS)} (engine implies onnx)")
    add("--img", "--imgsz", "--img-size", dest="img", nargs="+", type=int, default=[640], help="image size h [w]")
    add("--batch", "--batch-size", dest="batch", type=int, default=1, help="batch size (the fixed one unless --dynamic)")
    add("--device", default="", help="cpu or cuda device (0); default: the first GPU, else the CPU")
    add("--half", action="store_true", help="fp16 ONNX graph (fixed shapes); engines are FP16 anyway")
    add("--dynamic", action="store_true", help="dynamic batch and image size axes")
    add("--simplify", action="store_true", help="simplify the ONNX graph with onnxslim")
    add("--opset", type=int, default=DEFAULT_OPSET)
    add("--transpose", action="store_true", help="output [B, anchors, 4+nc] instead of [B, 4+nc, anchors]")
    add("--end2end", action="store_true", help="NMS inside the graph")
    add("--nms", choices=["trt", "ort"], default="trt",
        help="end2end NMS: trt = EfficientNMS_TRT plugin (TensorRT), ort = standard ONNX NonMaxSuppression")
    add("--topk-all", type=int, default=100, help="end2end: detections kept per image")
    add("--iou-thres", type=float, default=0.45, help="end2end: NMS IoU threshold")
    add("--conf-thres", type=float, default=0.25, help="end2end: score threshold")
    add("--int8", action="store_true", help="INT8 engine (calibrated on the train images of --data)")
    add("--data", default="", help="data.yaml with calibration images for --int8")
    add("--workspace", type=float, default=None,
        help=f"TensorRT workspace in GiB (default {DEFAULT_WORKSPACE_GIB:g} here, "
             f"{ORIN_NANO_WORKSPACE_MIB} MiB in the printed trtexec line)")
    return parser.parse_args(argv)


def check_args(opt: argparse.Namespace) -> None:
    """Raise UserError for flags that cannot work together, before any model is loaded."""
    unknown = [f for f in opt.include if f not in FORMATS]
    if unknown:
        raise UserError(f"--include {' '.join(unknown)}: unknown format (choose from {', '.join(FORMATS)})")
    if opt.int8 and "engine" not in opt.include:
        raise UserError("--int8 applies to TensorRT engines: add --include engine")
    if opt.int8 and not opt.data:
        raise UserError("--int8 needs calibration images: add --data data.yaml")
    if not Path(opt.weights).is_file():
        raise UserError(f"--weights {opt.weights} does not exist")
    if len(opt.img) > 2 or min(opt.img) < 1:
        raise UserError(f"--img {' '.join(map(str, opt.img))}: give one size or height and width, positive")
    if opt.batch < 1 or opt.topk_all < 1:
        raise UserError("--batch and --topk-all must be at least 1")
    if not (0.0 <= opt.conf_thres < 1.0 and 0.0 < opt.iou_thres <= 1.0):
        raise UserError("--conf-thres must be in [0, 1) and --iou-thres in (0, 1]")
    if opt.opset < MIN_OPSET:
        raise UserError(f"--opset {opt.opset} is too old: use {MIN_OPSET} or newer")
    if opt.half and opt.dynamic:
        raise UserError("--half needs fixed shapes: drop --dynamic (or export fp32; TensorRT --fp16 converts it)")
    if opt.workspace is not None and opt.workspace <= 0:
        raise UserError(f"--workspace {opt.workspace} must be positive (GiB)")


def prepare_model(weights: str | Path, device: torch.device, half: bool = False) -> DetectionModel:
    """Load for export: dual heads reparameterized to the gelan layout, RepConvN and Conv+BN fused,
    eval, no gradients, head in export mode (one output, the main branch's decode)."""
    model = reparameterize(load_model(weights, device=device))
    model.fuse().eval()
    for param in model.parameters():
        param.requires_grad_(False)
    model.head.export = True
    return model.half() if half else model


def calibration_images(data_yaml: str) -> list[str]:
    """Image paths for INT8 calibration: the train split of ``data_yaml`` (else its val split)."""
    from utils.data_config import load_data_config
    from utils.datasets import image_files

    data = load_data_config(data_yaml)
    split = data["train"] or data["val"]
    images = image_files(split) if split else []
    if not images:
        raise UserError(f"--data {data_yaml}: no images in its train or val split to calibrate INT8 with")
    return images


def _engine(opt: argparse.Namespace, onnx_path: Path, img: tuple[int, int], stride: int,
            device: torch.device) -> Path | None:
    """Build the engine here when possible; otherwise print the trtexec line for the device."""
    engine_path = onnx_path.with_suffix(".engine")
    profile = shape_profile(img, opt.batch, stride) if opt.dynamic else None
    if tensorrt_available() and device.type == "cuda":
        calib = calibration_images(opt.data) if opt.int8 else None
        build_engine(onnx_path, engine_path, half=True, int8=opt.int8,
                     workspace_gib=opt.workspace or DEFAULT_WORKSPACE_GIB, calib_images=calib, img_size=img,
                     profile=profile)
        LOGGER.info(f"TensorRT engine: {engine_path}")
        return engine_path
    reason = "TensorRT is not installed" if not tensorrt_available() else "no CUDA device selected"
    workspace_mib = int(opt.workspace * 1024) if opt.workspace else ORIN_NANO_WORKSPACE_MIB
    calib_note = ""
    if opt.int8:
        calib_note = ("\nWithout a calibration cache trtexec --int8 uses placeholder scales (speed only): "
                      "run this export with --int8 --data on a machine with TensorRT to write the .calib file.")
    command = trtexec_command(onnx_path, engine_path, half=True, int8=opt.int8, workspace_mib=workspace_mib,
                              calib_cache=engine_path.with_suffix(".calib") if opt.int8 else None, profile=profile)
    print(f"{reason}: build the engine on the device with\n  {command}{calib_note}")
    return None


@cli_main
def main(argv: list[str] | None = None) -> list[Path]:
    setup_logging()
    opt = parse_args(argv)
    check_args(opt)
    device = select_device(opt.device)
    img = (opt.img[0], opt.img[-1])
    model = prepare_model(opt.weights, device, opt.half)
    stride = int(model.stride.max())
    if any(size % stride for size in img):
        raise UserError(f"--img {img[0]} {img[1]} must be a multiple of the model stride {stride}")
    onnx_path = Path(opt.weights).with_suffix(".onnx")
    export_onnx(model, onnx_path, img, batch=opt.batch, opset=opt.opset, dynamic=opt.dynamic,
                simplify=opt.simplify, half=opt.half, transpose=opt.transpose,
                end2end=opt.nms if opt.end2end else None, max_det=opt.topk_all, iou_thres=opt.iou_thres,
                conf_thres=opt.conf_thres, names=list(model.names), stride=stride)
    LOGGER.info(f"ONNX: {onnx_path} ({onnx_path.stat().st_size / 2**20:.1f} MB)")
    written = [onnx_path]
    if "engine" in opt.include:
        engine_path = _engine(opt, onnx_path, img, stride, device)
        written += [engine_path] if engine_path else []
    return written


if __name__ == "__main__":
    main(sys.argv[1:])
