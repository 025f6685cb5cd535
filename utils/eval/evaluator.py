"""Validation: run a model or back-end over a loader, suppress, match in original pixels, report.

Used by ``val.py`` and by the training engine (on the EMA model, which may be in training mode: it is
switched to eval for the pass and restored afterwards).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from torch import nn
from tqdm import tqdm

from utils.core.log import LOGGER
from utils.eval.metrics import ConfusionMatrix, DetectionStats, fitness
from utils.ops.boxes import scale_boxes, xywhn2xyxy, xyxy2xywhn
from utils.ops.nms import non_max_suppression

PLOT_BATCHES = 3  # val_batch{0,1,2}_labels.jpg / _pred.jpg
COCO_EVAL_MAX_DET = 100
LOSS_ITEMS = 3  # box, cls, dfl
TABLE_HEADER = ("Class", "Images", "Instances", "P", "R", "mAP50", "mAP50-95")


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


def _write_txt(path: Path, det: torch.Tensor, shape: tuple[int, int], save_conf: bool) -> None:
    """YOLO label lines ``cls cx cy w h [conf]`` normalised to the original image ``shape`` (h, w)."""
    lines = []
    xywhn = xyxy2xywhn(det[:, :4].double(), w=shape[1], h=shape[0])
    for box, conf, cls in zip(xywhn.tolist(), det[:, 4].tolist(), det[:, 5].tolist()):
        values = [int(cls), *box] + ([conf] if save_conf else [])
        lines.append(" ".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in values))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + ("\n" if lines else ""))


def _predictions_as_targets(dets: Sequence[torch.Tensor], net_shape: tuple[int, int]) -> torch.Tensor:
    """Per-image detections (input pixels) -> ``[N, 7]`` (image, cls, cx, cy, w, h normalised, conf)."""
    rows = []
    for i, det in enumerate(dets):
        xywh = xyxy2xywhn(det[:, :4].float().cpu(), w=net_shape[1], h=net_shape[0])
        image = torch.full((len(det), 1), float(i))
        rows.append(torch.cat((image, det[:, 5:6].cpu(), xywh, det[:, 4:5].cpu()), 1))
    return torch.cat(rows) if rows else torch.zeros(0, 7)


def _plot_curves(result, names: Sequence[str], cm: ConfusionMatrix, save_dir: Path) -> None:
    from utils.eval.plots import plot_metric_curve, plot_pr_curve

    plot_pr_curve(result.px, result.pr_curve, result.ap[:, 0], save_dir / "PR_curve.png", names, result.classes)
    for fname, curve, ylabel in (("F1_curve.png", result.f1_curve, "F1"), ("P_curve.png", result.p_curve, "Precision"),
                                 ("R_curve.png", result.r_curve, "Recall")):
        plot_metric_curve(result.px, curve, save_dir / fname, names, ylabel, result.classes)
    cm.plot(save_dir / "confusion_matrix.png", names, normalize=True)


def _record(dets: list[torch.Tensor], labels: list[torch.Tensor], paths: Sequence[str], shapes: Sequence,
            confusion: ConfusionMatrix | None, coco_writer, txt_dir: Path | None, save_conf: bool) -> None:
    """Feed one batch (original pixels) to the confusion matrix, the COCO writer and the txt files."""
    for det, lab, path, shape_info in zip(dets, labels, paths, shapes):
        if confusion is not None:
            confusion.update(det, lab)
        if coco_writer is not None:
            coco_writer.add(path, shape_info[0], lab, det)
        if txt_dir is not None:
            _write_txt(txt_dir / f"{Path(path).stem}.txt", det, shape_info[0], save_conf)


def _plot_batch(imgs: torch.Tensor, targets: torch.Tensor, dets: Sequence[torch.Tensor], paths: Sequence[str],
                names: Sequence[str], save_dir: Path, batch_i: int) -> None:
    """``val_batch{i}_labels.jpg`` and ``val_batch{i}_pred.jpg`` (network-input pixels)."""
    from utils.eval.plots import plot_images

    net_shape = (imgs.shape[2], imgs.shape[3])
    images = imgs.float().cpu()
    _safe_plot(plot_images, images, targets, paths, save_dir / f"val_batch{batch_i}_labels.jpg", names)
    _safe_plot(plot_images, images, _predictions_as_targets(dets, net_shape), paths,
               save_dir / f"val_batch{batch_i}_pred.jpg", names)


def _safe_plot(fn: Callable, *args, **kwargs) -> None:
    try:
        fn(*args, **kwargs)
    except Exception as exc:  # a plot must never fail a validation
        LOGGER.warning(f"plot skipped: {exc}")


def evaluate(model_or_backend, dataloader: Iterable, names: Sequence[str], conf_thres: float = 0.001,
             iou_thres: float = 0.7, max_det: int = 300, half: bool = False, save_dir: str | Path | None = None,
             plots: bool = False, save_json: bool = False, compute_loss: Callable | None = None, *,
             multi_label: bool = True, save_txt: bool = False, save_conf: bool = False,
             progress: bool = True) -> dict:
    """Validate ``model_or_backend`` on ``dataloader`` and return the metrics.

    Args:
        model_or_backend: a ``DetectionModel`` (any mode; eval is used and the mode restored) or a
            ``utils.export.backends.Backend``.
        dataloader: yields ``(imgs uint8 [B, 3, H, W], targets [N, 6], paths, shapes)`` as
            ``utils.data.dataset.create_dataloader`` does (``shapes`` give the letterbox per image).
        names: class names; ``len(names)`` is the number of classes.
        half: fp16 inference on CUDA (autocast for an fp32 model, which is left unchanged).
        save_dir: where plots, JSON and txt files go (needed for any of them).
        plots: PR/F1/P/R curves, the normalised confusion matrix and a few batches with labels and
            predictions.
        save_json: write COCO ``ground_truth.json`` / ``predictions.json`` and add the COCO evaluator's
            numbers under ``coco`` (at max 100 detections per image and class).
        compute_loss: ``(raw_maps, targets) -> (loss, items[3])``, e.g. ``DetectionLoss``; averaged
            over batches into ``loss`` (a module only).
        multi_label: NMS keeps every class above ``conf_thres`` per anchor (the usual for mAP).
        save_txt / save_conf: YOLO txt predictions (normalised to the original image) in ``save_dir/labels``.

    Returns:
        ``{'precision', 'recall', 'map50', 'map' (mAP50-95), 'fitness', 'per_class' (list of dicts),
        'speed_ms' {'preprocess', 'inference', 'nms'} per image, 'loss' ([box, cls, dfl] or None),
        'images', 'instances', 'best_conf'}`` plus ``'coco'`` with ``save_json``. Boxes are matched in
        original-image pixels.
    """
    is_module = isinstance(model_or_backend, nn.Module)
    save_dir = Path(save_dir) if save_dir is not None else None
    if (plots or save_json or save_txt) and save_dir is None:
        raise ValueError("evaluate: plots, save_json and save_txt need a save_dir")
    if save_dir is not None:
        save_dir.mkdir(parents=True, exist_ok=True)

    if is_module:
        from models.heads import main_output

        first = next(model_or_backend.parameters())
        device, in_dtype = first.device, first.dtype
    else:
        device = model_or_backend.device
        in_dtype = torch.float16 if model_or_backend.half else torch.float32
    use_autocast = half and is_module and device.type == "cuda" and in_dtype == torch.float32
    if half and device.type != "cuda":
        LOGGER.debug("evaluate: half precision is used on CUDA only; running fp32")
    autocast = (torch.autocast("cuda", dtype=torch.float16) if use_autocast else contextlib.nullcontext())

    nc = len(names)
    stats = DetectionStats(nc)
    confusion = ConfusionMatrix(nc)
    coco_writer = None
    if save_json:
        from utils.eval.coco import CocoJsonWriter

        coco_writer = CocoJsonWriter(names)
    loss_sum = torch.zeros(LOSS_ITEMS, device=device)
    times = [0.0, 0.0, 0.0]
    seen, num_batches = 0, 0

    was_training = is_module and model_or_backend.training
    if is_module:
        model_or_backend.eval()
    try:
        bar = tqdm(dataloader, desc="validating", disable=not progress, leave=False)
        for batch_i, (imgs, targets, paths, shapes) in enumerate(bar):
            t0 = _sync(device)
            imgs = imgs.to(device, non_blocking=True)
            imgs = imgs.to(in_dtype) / 255 if imgs.dtype == torch.uint8 else imgs.to(in_dtype)
            net_shape = (imgs.shape[2], imgs.shape[3])
            t1 = _sync(device)
            with torch.no_grad(), autocast:
                out = model_or_backend(imgs)
                preds = main_output(out) if is_module else out
                if compute_loss is not None and is_module:
                    loss_sum += compute_loss(out[1], targets)[1].detach().to(device).float()
            t2 = _sync(device)
            dets = non_max_suppression(preds, conf_thres, iou_thres, multi_label=multi_label, max_det=max_det)
            t3 = _sync(device)
            times[0], times[1], times[2] = times[0] + t1 - t0, times[1] + t2 - t1, times[2] + t3 - t2

            targets_cpu = targets.cpu()  # the loader's targets (normally on the CPU already)
            dets_orig, labels_orig = [], []
            for i, det in enumerate(dets):
                dets_orig.append(_detections_in_original(det.cpu(), net_shape, shapes[i]))
                labels_orig.append(_labels_in_original(targets_cpu, i, net_shape, shapes[i]))
            stats.update(dets_orig, labels_orig)
            _record(dets_orig, labels_orig, paths, shapes, confusion if plots else None, coco_writer,
                    save_dir / "labels" if save_txt else None, save_conf)
            seen += len(dets)
            num_batches += 1
            if plots and batch_i < PLOT_BATCHES:
                _plot_batch(imgs, targets_cpu, dets, paths, names, save_dir, batch_i)
    finally:
        if was_training:
            model_or_backend.train()

    result = stats.compute()
    if plots:
        _safe_plot(_plot_curves, result, names, confusion, save_dir)
    metrics = {"precision": result.mp, "recall": result.mr, "map50": result.map50, "map": result.map,
               "per_class": result.per_class(names),
               "speed_ms": {k: 1000 * t / max(seen, 1) for k, t in zip(("preprocess", "inference", "nms"), times)},
               "loss": (loss_sum / max(num_batches, 1)).tolist() if compute_loss is not None and is_module else None,
               "images": seen, "instances": int(result.instances.sum()), "best_conf": result.best_conf}
    metrics["fitness"] = fitness(metrics)
    if coco_writer is not None:
        from utils.eval.coco import coco_evaluate

        gt_path, pred_path = coco_writer.save(save_dir)
        metrics["coco"] = coco_evaluate(gt_path, pred_path, max_det=COCO_EVAL_MAX_DET)
    return metrics


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
