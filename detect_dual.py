"""Run a detector on images, folders, globs, videos, webcams, streams or .txt lists and save the results.

Examples:
    python detect_dual.py --weights best.pt --source data/images --img 640
    python detect_dual.py --weights best.onnx --source video.mp4 --conf-thres 0.4 --save-txt
    python detect_dual.py --weights yolov9-s.pt --source 0 --view-img       # webcam 0
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from utils.core.errors import ArgumentParser, UserError, cli_main
from utils.core.log import LOGGER, setup_logging
from utils.core.paths import increment_path
from utils.data.augment import letterbox
from utils.data.sources import Frame, open_source
from utils.eval.plots import draw_detections
from utils.export.backends import load_backend
from utils.ops.boxes import scale_boxes, xyxy2xywhn
from utils.ops.nms import non_max_suppression

ROOT = Path(__file__).resolve().parent
VIDEO_FOURCC = "mp4v"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--weights", required=True, help="model: .pt (ours or official YOLOv9), .onnx or .engine")
    add("--source", default=str(ROOT / "data" / "images"),
        help="image, folder, glob, video, webcam index, rtsp/http URL or .txt list")
    add("--img", "--imgsz", "--img-size", dest="imgsz", type=int, default=640, help="inference size (px)")
    add("--conf-thres", type=float, default=0.25, help="confidence threshold")
    add("--iou-thres", type=float, default=0.45, help="NMS IoU threshold")
    add("--max-det", type=int, default=1000, help="detections kept per image")
    add("--device", default="", help="cuda device (0) or cpu; '' = the first GPU, else the CPU")
    add("--view-img", action="store_true", help="show results in a window")
    add("--save-txt", action="store_true", help="save YOLO txt labels (normalised cls cx cy w h)")
    add("--save-conf", action="store_true", help="add the confidence to --save-txt lines")
    add("--save-crop", action="store_true", help="save each detected box as an image")
    add("--nosave", action="store_true", help="do not save annotated images or videos")
    add("--classes", nargs="+", type=int, help="keep only these class indices")
    add("--agnostic-nms", action="store_true", help="suppress across classes")
    add("--project", default=str(ROOT / "runs" / "detect"), help="runs folder")
    add("--name", default="exp", help="run name: project/name")
    add("--exist-ok", action="store_true", help="reuse project/name instead of incrementing")
    add("--line-thickness", type=int, default=3, help="box line width (px)")
    add("--hide-labels", action="store_true", help="draw boxes without labels")
    add("--hide-conf", action="store_true", help="draw labels without confidences")
    add("--half", action="store_true", help="fp16 inference on CUDA")
    return parser.parse_args(argv)


@dataclass(frozen=True)
class DetectOptions:
    """What detect_dual.py does: one field per flag of :func:`parse_args` (same names and defaults)."""

    weights: str
    source: str = str(ROOT / "data" / "images")
    imgsz: int = 640
    conf_thres: float = 0.25
    iou_thres: float = 0.45
    max_det: int = 1000
    device: str = ""
    view_img: bool = False
    save_txt: bool = False
    save_conf: bool = False
    save_crop: bool = False
    nosave: bool = False
    classes: list[int] | None = None
    agnostic_nms: bool = False
    project: str = str(ROOT / "runs" / "detect")
    name: str = "exp"
    exist_ok: bool = False
    line_thickness: int = 3
    hide_labels: bool = False
    hide_conf: bool = False
    half: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> DetectOptions:
        """The options of parsed flags."""
        return cls(**vars(args))


class _Outputs:
    """Writes annotated images, videos (one writer per video or stream), labels and crops as ``opt`` says."""

    def __init__(self, save_dir: Path, names: list[str], opt: DetectOptions) -> None:
        self.save_dir, self.names = save_dir, names
        self.save_img, self.save_txt, self.save_conf, self.save_crop = (not opt.nosave, opt.save_txt, opt.save_conf,
                                                                        opt.save_crop)
        self.writers: dict[str, cv2.VideoWriter] = {}
        self.stream_ids: dict[str, int] = {}

    def _stem(self, frame: Frame) -> str:
        if frame.kind == "stream":
            return f"stream{self.stream_ids.setdefault(frame.path, len(self.stream_ids))}"
        return Path(frame.path).stem

    def write(self, frame: Frame, det: torch.Tensor, annotated: np.ndarray) -> None:
        """``det [n, 6]`` in original-image pixels; ``annotated`` the frame with boxes drawn."""
        stem = self._stem(frame)
        suffix = "" if frame.kind == "image" else f"_{frame.index}"
        if self.save_txt:
            h, w = frame.image.shape[:2]
            xywhn = xyxy2xywhn(det[:, :4].double(), w=w, h=h)
            lines = []
            for box, conf, cls in zip(xywhn.tolist(), det[:, 4].tolist(), det[:, 5].tolist()):
                values = [f"{v:.6f}" for v in box] + ([f"{conf:.5f}"] if self.save_conf else [])
                lines.append(" ".join([str(int(cls)), *values]))
            label_file = self.save_dir / "labels" / f"{stem}{suffix}.txt"
            label_file.parent.mkdir(parents=True, exist_ok=True)
            label_file.write_text("".join(line + "\n" for line in lines))
        if self.save_crop:
            for k, (x1, y1, x2, y2, _, cls) in enumerate(det.tolist()):
                crop = frame.image[int(y1):int(np.ceil(y2)), int(x1):int(np.ceil(x2))]
                if crop.size:
                    crop_dir = self.save_dir / "crops" / self.names[int(cls)]
                    crop_dir.mkdir(parents=True, exist_ok=True)
                    cv2.imwrite(str(crop_dir / f"{stem}{suffix}_{k}.jpg"), crop)
        if not self.save_img:
            return
        if frame.kind == "image":
            cv2.imwrite(str(self.save_dir / Path(frame.path).name), annotated)
            return
        writer = self.writers.get(frame.path)
        if writer is None:
            h, w = annotated.shape[:2]
            out = str(self.save_dir / f"{stem}.mp4")
            writer = cv2.VideoWriter(out, cv2.VideoWriter_fourcc(*VIDEO_FOURCC), frame.fps or 30.0, (w, h))
            self.writers[frame.path] = writer
        writer.write(annotated)

    def close(self) -> None:
        for writer in self.writers.values():
            writer.release()


def _show(window: str, image: np.ndarray) -> bool:
    """Show ``image``; False when this OpenCV build has no GUI (headless), so showing stops."""
    try:
        cv2.imshow(window, image)
        cv2.waitKey(1)
        return True
    except cv2.error:
        LOGGER.warning("--view-img: this OpenCV build cannot open windows (headless); not showing")
        return False


def run(opt: DetectOptions) -> Path:
    """Detect objects in every frame of ``opt.source``; returns the folder the results were written to."""
    if not 0.0 <= opt.conf_thres < 1.0 or not 0.0 < opt.iou_thres <= 1.0:
        raise UserError("--conf-thres must be in [0, 1) and --iou-thres in (0, 1]")
    if opt.imgsz < 1 or opt.max_det < 1:
        raise UserError("--img and --max-det must be positive")
    frames = open_source(opt.source)  # a missing source fails before the model is loaded
    backend = load_backend(opt.weights, opt.device, half=opt.half)
    static = backend.img_size is not None
    imgsz = opt.imgsz
    if not static and imgsz % backend.stride:
        rounded = -(-imgsz // backend.stride) * backend.stride
        LOGGER.warning(f"--img {imgsz} is not a multiple of the stride {backend.stride}; using {rounded}")
        imgsz = rounded
    new_shape = backend.img_size if static else (imgsz, imgsz)
    save_dir = increment_path(Path(opt.project) / opt.name, exist_ok=opt.exist_ok)
    outputs = _Outputs(save_dir, backend.names, opt)
    in_dtype = torch.float16 if backend.half else torch.float32
    view_img = opt.view_img
    count, total_dets = 0, 0
    try:
        for frame in frames:
            # a static export takes exactly its size; otherwise pad only up to a stride multiple
            boxed, ratio, pad = letterbox(frame.image, new_shape, auto=not static, stride=backend.stride)
            x = torch.from_numpy(np.ascontiguousarray(boxed[:, :, ::-1].transpose(2, 0, 1)))
            x = (x.to(backend.device).to(in_dtype) / 255).unsqueeze(0)
            pred = backend(x)
            det = non_max_suppression(pred, opt.conf_thres, opt.iou_thres, classes=opt.classes,
                                      agnostic=opt.agnostic_nms, max_det=opt.max_det)[0].cpu()
            scale_boxes(boxed.shape[:2], det[:, :4], frame.image.shape[:2], (ratio, pad))
            annotated = draw_detections(frame.image.copy(), det, backend.names, opt.line_thickness, opt.hide_labels,
                                        opt.hide_conf)
            outputs.write(frame, det, annotated)
            if view_img:
                view_img = _show(str(frame.path), annotated)
            count += 1
            total_dets += len(det)
            LOGGER.info(f"{frame.path}{'' if frame.kind == 'image' else f' frame {frame.index}'}: "
                        f"{boxed.shape[0]}x{boxed.shape[1]}, {len(det)} detections")
    finally:
        outputs.close()
    LOGGER.info(f"{count} image(s), {total_dets} detections; results saved to {save_dir}")
    return save_dir


@cli_main
def main(argv: list[str] | None = None) -> Path:
    setup_logging()
    return run(DetectOptions.from_args(parse_args(argv)))


if __name__ == "__main__":
    main(sys.argv[1:])
