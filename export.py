"""Export a trained model to ONNX (FP32, FP16 or INT8 Q/DQ; plain or with NMS) and a TensorRT engine.

Examples:
    python export.py --weights runs/distill/exp/weights/best.pt --include onnx --img 640 --simplify
    python export.py --weights best.pt --half                                  # FP16 ONNX (strongly typed build)
    python export.py --weights best.pt --int8 --data data.yaml                 # INT8 Q/DQ ONNX, calibrated
    python export.py --weights best.pt --include onnx --end2end --topk-all 100 --iou-thres 0.45 --conf-thres 0.25
    python export.py --weights best.pt --include onnx_end2end                  # YOLOv9's spelling of the same
    python export.py --weights best.pt --half --include onnx engine --device 0  # engine needs TensorRT 10 or 11
Without TensorRT the ONNX file is written and the trtexec command for the device is printed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from utils.core.device import select_device
from utils.core.errors import ArgumentParser, UserError, cli_main
from utils.core.log import LOGGER, setup_logging
from utils.export.model import prepare_model
from utils.export.onnx import DEFAULT_OPSET, FP16_QDQ_OPSET, MIN_OPSET, OnnxSettings, export_onnx
from utils.export.quantize import (CALIB_METHODS, DEFAULT_CALIB_IMAGES, MIN_CALIB_IMAGES, CalibrationSettings,
                                   check_calibration)
from utils.export.trt import ORIN_NANO_WORKSPACE_MIB, TRT_VERSIONS, engine_or_command

FORMATS = ("onnx", "engine")
END2END_FORMAT = "onnx_end2end"  # YOLOv9's --include spelling of onnx with --end2end
NMS_BACKENDS = ("trt", "ort")
DEFAULT_NMS = "trt"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--weights", required=True, help="model checkpoint (.pt, ours or official YOLOv9)")
    add("--include", nargs="+", default=["onnx"],
        help=f"formats: {', '.join(FORMATS)} (engine implies onnx); {END2END_FORMAT} = onnx with --end2end")
    add("--img", "--imgsz", "--img-size", dest="img", nargs="+", type=int, default=[640], help="image size h [w]")
    add("--batch", "--batch-size", dest="batch", type=int, default=1, help="batch size (the fixed one unless --dynamic)")
    add("--device", default="", help="cpu or cuda device (0); '' = the first GPU, else the CPU")
    add("--half", action="store_true", help="FP16 ONNX (convs FP16, decode/NMS FP32, FP32 I/O): an FP16 engine")
    add("--fp16-io", action="store_true", help="with --half: FP16 input (and plain output) instead of FP32")
    add("--dynamic", action="store_true", help="dynamic batch and image size axes")
    add("--simplify", action="store_true", help="simplify the ONNX graph with onnxslim")
    add("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (at least {MIN_OPSET})")
    add("--transpose", action="store_true", help="output [B, anchors, 4+nc] instead of [B, 4+nc, anchors]")
    add("--end2end", action="store_true", help=f"NMS inside the graph, with the --nms back-end ({DEFAULT_NMS} "
        "unless given)")
    add("--nms", nargs="?", const=DEFAULT_NMS, default=None, choices=NMS_BACKENDS,
        help="NMS inside the graph (implies --end2end) with this back-end: trt = EfficientNMS_TRT plugin "
             f"(TensorRT), ort = standard ONNX NonMaxSuppression; a bare --nms means {DEFAULT_NMS}")
    add("--topk-all", type=int, default=100, help="end2end: detections kept per image")
    add("--iou-thres", type=float, default=0.45, help="end2end: NMS IoU threshold")
    add("--conf-thres", type=float, default=0.25, help="end2end: score threshold")
    add("--int8", action="store_true", help="INT8 Q/DQ ONNX calibrated on the train images of --data "
        "(with --half: FP16 between the Q/DQ pairs)")
    add("--data", default="", help="data.yaml whose train split calibrates --int8")
    add("--calib-images", type=int, default=DEFAULT_CALIB_IMAGES, help="at most this many calibration images")
    add("--calib-method", choices=CALIB_METHODS, default="minmax", help="INT8 activation range calibration")
    add("--int8-exclude-head", action="store_true", help="keep the head's last 1x1 convs in float (accuracy)")
    add("--trt-version", default="auto", choices=["auto", *map(str, TRT_VERSIONS)],
        help="TensorRT major version of the printed trtexec line (auto: the installed one, else both)")
    add("--workspace", type=float, default=None,
        help=f"TensorRT workspace in GiB (default 4 here, {ORIN_NANO_WORKSPACE_MIB} MiB in the printed trtexec line)")
    return normalize_args(parser.parse_args(argv))


def normalize_args(opt: argparse.Namespace) -> argparse.Namespace:
    """Fold the YOLOv9 spellings into ours: ``--include onnx_end2end`` is ``onnx`` plus ``--end2end``, and
    ``--nms`` (bare or with a back-end) turns NMS on; ``opt.nms`` is then always a back-end name."""
    if END2END_FORMAT in opt.include:
        rest = [f for f in opt.include if f != END2END_FORMAT]
        opt.include = rest if "onnx" in rest else ["onnx", *rest]
        opt.end2end = True
    if opt.nms is not None:
        opt.end2end = True
    opt.nms = opt.nms or DEFAULT_NMS
    return opt


def check_args(opt: argparse.Namespace) -> None:
    """Raise UserError for flags that cannot work together, before any model is loaded."""
    unknown = [f for f in opt.include if f not in FORMATS]
    if unknown:
        raise UserError(f"--include {' '.join(unknown)}: unknown format (choose from "
                        f"{', '.join((*FORMATS, END2END_FORMAT))})")
    if opt.int8 and not opt.data:
        raise UserError("--int8 needs calibration images: add --data data.yaml")
    if opt.int8 and opt.dynamic:
        raise UserError("--int8 needs fixed shapes to calibrate: drop --dynamic")
    if opt.fp16_io and not opt.half:
        raise UserError("--fp16-io needs --half")
    if opt.int8 and opt.calib_images < MIN_CALIB_IMAGES:
        raise UserError(f"--calib-images {opt.calib_images}: INT8 calibration needs at least {MIN_CALIB_IMAGES}")
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
    if opt.workspace is not None and opt.workspace <= 0:
        raise UserError(f"--workspace {opt.workspace} must be positive (GiB)")


def calibration(opt: argparse.Namespace) -> CalibrationSettings:
    """INT8 calibration settings: the train split of ``--data`` (UserError when it has too few images)."""
    from utils.data.config import load_data_config
    from utils.data.dataset import image_files

    data = load_data_config(opt.data)
    images = image_files(data["train"]) if data["train"] else []
    check_calibration(images, opt.data)
    return CalibrationSettings(images=tuple(images), method=opt.calib_method, max_images=opt.calib_images,
                               exclude_head_convs=opt.int8_exclude_head)


def precision(opt: argparse.Namespace) -> str:
    """The ONNX precision the flags ask for: fp32, fp16, int8 or int8-fp16."""
    if opt.int8:
        return "int8-fp16" if opt.half else "int8"
    return "fp16" if opt.half else "fp32"


def onnx_settings(opt: argparse.Namespace, precision_kind: str, opset: int, calib: CalibrationSettings | None,
                  names: list[str], stride: int) -> OnnxSettings:
    """The :class:`OnnxSettings` of the parsed flags, with the resolved precision, opset and calibration."""
    return OnnxSettings(batch=opt.batch, opset=opset, dynamic=opt.dynamic, simplify=opt.simplify,
                        precision=precision_kind, fp16_io=opt.fp16_io, calibration=calib, transpose=opt.transpose,
                        end2end=opt.nms if opt.end2end else None, max_det=opt.topk_all, iou_thres=opt.iou_thres,
                        conf_thres=opt.conf_thres, names=names, stride=stride)


@cli_main
def main(argv: list[str] | None = None) -> list[Path]:
    setup_logging()
    opt = parse_args(argv)
    check_args(opt)
    device = select_device(opt.device)
    img = (opt.img[0], opt.img[-1])
    calib = calibration(opt) if opt.int8 else None
    model = prepare_model(opt.weights, device)
    stride = int(model.stride.max())
    if any(size % stride for size in img):
        raise UserError(f"--img {img[0]} {img[1]} must be a multiple of the model stride {stride}")
    kind = precision(opt)
    opset = max(opt.opset, FP16_QDQ_OPSET) if kind == "int8-fp16" else opt.opset
    if opset != opt.opset:
        LOGGER.info(f"--opset {opt.opset} -> {opset}: FP16 Q/DQ scales need opset {FP16_QDQ_OPSET}")
    weights = Path(opt.weights)  # best.onnx (FP32), best-fp16.onnx, best-int8.onnx, best-int8-fp16.onnx
    onnx_path = weights.with_name(weights.stem + ("" if kind == "fp32" else f"-{kind}") + ".onnx")
    export_onnx(model, onnx_path, img, onnx_settings(opt, kind, opset, calib, list(model.names), stride))
    LOGGER.info(f"ONNX ({kind}): {onnx_path} ({onnx_path.stat().st_size / 2**20:.1f} MB)")
    written = [onnx_path]
    if "engine" in opt.include:
        engine_path = engine_or_command(onnx_path, device, img, stride, opt.batch, opt.dynamic, opt.workspace,
                                        opt.trt_version)
        written += [engine_path] if engine_path else []
    return written


if __name__ == "__main__":
    main(sys.argv[1:])
