"""Validation: run a model or back-end over a loader, suppress, match in original pixels, report.

:class:`Evaluator` holds the loop: one :class:`utils.eval.inference.Inference` for a module or a
back-end, the settings of :class:`EvalSettings`, and the outputs of :mod:`utils.eval.outputs` (COCO JSON,
txt files, plots, confusion matrix). :func:`evaluate` is the short form used by ``val.py`` and the
training engine (on the EMA model, which may be in training mode: it is switched to eval for the pass
and restored afterwards).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn
from tqdm import tqdm

from utils.core.options import settings_or_fields
from utils.eval.inference import BackendLike, Inference, as_inference
from utils.eval.metrics import DetectionStats, fitness
from utils.eval.outputs import (CocoJsonOutput, ConfusionMatrixOutput, EvalBatch, EvalOutput, PlotOutput,
                                TxtOutput)
from utils.ops.boxes import scale_boxes, xywhn2xyxy
from utils.ops.nms import non_max_suppression

LOSS_ITEMS = 3  # box, cls, dfl
SPEED_KEYS = ("preprocess", "inference", "nms")
TABLE_HEADER = ("Class", "Images", "Instances", "P", "R", "mAP50", "mAP50-95")


@dataclass(frozen=True)
class EvalSettings:
    """How to evaluate and what to write.

    ``conf_thres``, ``iou_thres``, ``max_det``, ``multi_label``: the NMS (``multi_label`` keeps every class
    above ``conf_thres`` per anchor, the usual for mAP). ``half``: fp16 inference on CUDA (autocast for an
    fp32 module, which is left unchanged). ``compute_loss``: ``(raw_maps, targets) -> (loss, items[3])``,
    e.g. ``DetectionLoss``, averaged over batches into ``loss`` (a module only). ``progress``: a progress
    bar. ``save_dir``: where the outputs go (needed for any of them). ``plots``: PR/F1/P/R curves, the
    normalised confusion matrix and a few batches with labels and predictions. ``save_json``: COCO
    ``ground_truth.json`` / ``predictions.json`` and the COCO evaluator's numbers under ``coco``.
    ``save_txt`` / ``save_conf``: YOLO txt predictions (normalised to the original image) in
    ``save_dir/labels``.
    """

    conf_thres: float = 0.001
    iou_thres: float = 0.7
    max_det: int = 300
    multi_label: bool = True
    half: bool = False
    compute_loss: Callable | None = None
    progress: bool = True
    save_dir: str | Path | None = None
    plots: bool = False
    save_json: bool = False
    save_txt: bool = False
    save_conf: bool = False

    def outputs(self, names: Sequence[str]) -> list[EvalOutput]:
        """The outputs these settings ask for (ValueError when one needs a ``save_dir`` that is None)."""
        if (self.plots or self.save_json or self.save_txt) and self.save_dir is None:
            raise ValueError("evaluate: plots, save_json and save_txt need a save_dir")
        save_dir = Path(self.save_dir) if self.save_dir is not None else None
        outputs: list[EvalOutput] = []
        if self.plots:
            outputs += [ConfusionMatrixOutput(names, save_dir), PlotOutput(names, save_dir)]
        if self.save_json:
            outputs.append(CocoJsonOutput(names, save_dir))
        if self.save_txt:
            outputs.append(TxtOutput(save_dir / "labels", self.save_conf))
        return outputs


def _sync(device: torch.device) -> float:
    """``time.perf_counter()`` after the device has finished its queued work (honest GPU timings)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _labels_in_original(targets: torch.Tensor, index: int, net_shape: tuple[int, int], shape_info) -> torch.Tensor:
    """Labels of image ``index`` as ``[m, 5]`` (cls, x1, y1, x2, y2) in original-image pixels.

    ``targets [N, 6]`` are (image, cls, cx, cy, w, h) normalised to the network input ``net_shape``.
    """
    rows = targets[targets[:, 0] == index]
    boxes = xywhn2xyxy(rows[:, 2:6].double(), w=net_shape[1], h=net_shape[0])
    (h0, w0), ratio_pad = shape_info
    scale_boxes(net_shape, boxes, (h0, w0), ratio_pad)
    return torch.cat((rows[:, 1:2].double(), boxes), 1)


def _detections_in_original(det: torch.Tensor, net_shape: tuple[int, int], shape_info) -> torch.Tensor:
    """``det [n, 6]`` (x1, y1, x2, y2, conf, cls) from network-input to original-image pixels."""
    out = det.clone()
    (h0, w0), ratio_pad = shape_info
    scale_boxes(net_shape, out[:, :4], (h0, w0), ratio_pad)
    return out


class Evaluator:
    """Runs an :class:`Inference` over a loader and returns the metrics; ``outputs`` (default: those
    ``settings`` ask for) see every batch and the end of the pass."""

    def __init__(self, settings: EvalSettings, names: Sequence[str],
                 outputs: Sequence[EvalOutput] | None = None) -> None:
        self.settings = settings
        self.names = list(names)
        self.outputs = list(outputs) if outputs is not None else settings.outputs(self.names)
        if settings.save_dir is not None:
            Path(settings.save_dir).mkdir(parents=True, exist_ok=True)

    def run(self, inference: Inference, dataloader: Iterable) -> dict:
        """Validate on ``dataloader`` (batches ``(imgs uint8 [B, 3, H, W], targets [N, 6], paths, shapes)``
        as ``utils.data.dataset.create_dataloader`` gives them); the dict of :func:`evaluate`."""
        settings, device = self.settings, inference.device
        with_loss = settings.compute_loss is not None and inference.gives_raw_maps
        stats = DetectionStats(len(self.names))
        loss_sum = torch.zeros(LOSS_ITEMS, device=device)
        times = [0.0] * len(SPEED_KEYS)
        seen, num_batches = 0, 0
        with inference.session():
            bar = tqdm(dataloader, desc="validating", disable=not settings.progress, leave=False)
            for batch_i, (imgs, targets, paths, shapes) in enumerate(bar):
                t0 = _sync(device)
                imgs = imgs.to(device, non_blocking=True)
                is_uint8 = imgs.dtype == torch.uint8
                imgs = imgs.to(inference.input_dtype) / 255 if is_uint8 else imgs.to(inference.input_dtype)
                t1 = _sync(device)
                with inference.forward_context():
                    out = inference(imgs)
                    if with_loss:
                        loss_sum += settings.compute_loss(out.raw_maps, targets)[1].detach().to(device).float()
                t2 = _sync(device)
                dets = non_max_suppression(out.preds, settings.conf_thres, settings.iou_thres,
                                           multi_label=settings.multi_label, max_det=settings.max_det)
                t3 = _sync(device)
                for k, (start, stop) in enumerate(((t0, t1), (t1, t2), (t2, t3))):
                    times[k] += stop - start
                batch = self._in_original(batch_i, imgs, targets, paths, shapes, dets)
                stats.update(batch.dets_orig, batch.labels_orig)
                for output in self.outputs:
                    output.add_batch(batch)
                seen += len(dets)
                num_batches += 1

        result = stats.compute()
        metrics = {"precision": result.mp, "recall": result.mr, "map50": result.map50, "map": result.map,
                   "per_class": result.per_class(self.names),
                   "speed_ms": {key: 1000 * t / max(seen, 1) for key, t in zip(SPEED_KEYS, times)},
                   "loss": (loss_sum / max(num_batches, 1)).tolist() if with_loss else None,
                   "images": seen, "instances": int(result.instances.sum()), "best_conf": result.best_conf}
        metrics["fitness"] = fitness(metrics)
        for output in self.outputs:
            output.finish(result, metrics)
        return metrics

    @staticmethod
    def _in_original(batch_i: int, imgs: torch.Tensor, targets: torch.Tensor, paths: Sequence[str],
                     shapes: Sequence, dets: list[torch.Tensor]) -> EvalBatch:
        """Detections and labels of one batch in original-image pixels (see :class:`EvalBatch`)."""
        net_shape = (imgs.shape[2], imgs.shape[3])
        targets_cpu = targets.cpu()  # the loader's targets (normally on the CPU already)
        dets_orig = [_detections_in_original(det.cpu(), net_shape, shapes[i]) for i, det in enumerate(dets)]
        labels_orig = [_labels_in_original(targets_cpu, i, net_shape, shapes[i]) for i in range(len(dets))]
        return EvalBatch(batch_i, imgs, targets_cpu, paths, shapes, dets, dets_orig, labels_orig)


def evaluate(model_or_backend: nn.Module | BackendLike | Inference, dataloader: Iterable, names: Sequence[str],
             settings: EvalSettings | None = None, **fields: Any) -> dict:
    """Validate ``model_or_backend`` on ``dataloader`` and return the metrics.

    Args:
        model_or_backend: a ``DetectionModel`` (any mode; eval is used and the mode restored), a
            ``utils.export.backends.Backend`` or an :class:`utils.eval.inference.Inference`.
        dataloader: yields ``(imgs uint8 [B, 3, H, W], targets [N, 6], paths, shapes)`` as
            ``utils.data.dataset.create_dataloader`` does (``shapes`` give the letterbox per image).
        names: class names; ``len(names)`` is the number of classes.
        settings: an :class:`EvalSettings`, or its fields as keywords (``half=True, plots=True, ...``).

    Returns:
        ``{'precision', 'recall', 'map50', 'map' (mAP50-95), 'fitness', 'per_class' (list of dicts),
        'speed_ms' {'preprocess', 'inference', 'nms'} per image, 'loss' ([box, cls, dfl] or None),
        'images', 'instances', 'best_conf'}`` plus ``'coco'`` with ``save_json``. Boxes are matched in
        original-image pixels.
    """
    settings = settings_or_fields(EvalSettings, settings, fields)
    evaluator = Evaluator(settings, names)
    return evaluator.run(as_inference(model_or_backend, settings.half), dataloader)


def format_results(metrics: dict, verbose: bool = False) -> str:
    """The YOLO-style table (Class Images Instances P R mAP50 mAP50-95); per class when ``verbose``."""
    head = f"{TABLE_HEADER[0]:>22}" + "".join(f"{h:>11}" for h in TABLE_HEADER[1:])
    row = "{:>22}{:>11}{:>11}{:>11.3g}{:>11.3g}{:>11.3g}{:>11.3g}"
    lines = [head, row.format("all", metrics["images"], metrics["instances"], metrics["precision"],
                              metrics["recall"], metrics["map50"], metrics["map"])]
    if verbose:
        for c in metrics["per_class"]:
            lines.append(row.format(c["name"][:22], c["images"], c["instances"], c["precision"], c["recall"],
                                    c["map50"], c["map"]))
    speed = metrics["speed_ms"]
    lines.append(f"Speed: {speed['preprocess']:.1f} ms pre-process, {speed['inference']:.1f} ms inference, "
                 f"{speed['nms']:.1f} ms NMS per image")
    return "\n".join(lines)
