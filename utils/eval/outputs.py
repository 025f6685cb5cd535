"""What an evaluation writes besides its metrics: each output sees every batch and the end of the pass.

An :class:`EvalOutput` gets each :class:`EvalBatch` (:meth:`EvalOutput.add_batch`) and, after the
metrics are computed, :meth:`EvalOutput.finish` (which may add keys to the metrics, as COCO JSON does).
The evaluator builds them from ``EvalSettings`` (``save_json``, ``save_txt``, ``plots``); a caller may
pass its own list.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from utils.core.log import LOGGER
from utils.eval.metrics import ConfusionMatrix, DetectionMetrics
from utils.ops.boxes import xyxy2xywhn

PLOT_BATCHES = 3  # val_batch{0,1,2}_labels.jpg / _pred.jpg
COCO_EVAL_MAX_DET = 100


@dataclass
class EvalBatch:
    """One batch after suppression.

    ``index``: batch number. ``images``: the network input ``Tensor[B, 3, H, W]`` in [0, 1].
    ``targets``: ``Tensor[N, 6]`` on the CPU (image, cls, cx, cy, w, h normalised to H, W).
    ``paths``, ``shapes``: as the loader gives them. ``dets``: per image ``Tensor[n, 6]`` (x1, y1, x2, y2,
    conf, cls) in network-input pixels. ``dets_orig`` / ``labels_orig``: per image the detections and the
    labels ``[m, 5]`` (cls, x1, y1, x2, y2) in original-image pixels.
    """

    index: int
    images: torch.Tensor
    targets: torch.Tensor
    paths: Sequence[str]
    shapes: Sequence
    dets: list[torch.Tensor]
    dets_orig: list[torch.Tensor]
    labels_orig: list[torch.Tensor]


class EvalOutput:
    """Base of the outputs: both hooks do nothing."""

    def add_batch(self, batch: EvalBatch) -> None:
        """See one batch."""

    def finish(self, result: DetectionMetrics, metrics: dict) -> None:
        """Write what was collected; may add entries to ``metrics``."""


def safe_plot(fn: Callable, *args, **kwargs) -> None:
    """Call a plotting function; a failure is a warning, never a failed validation."""
    try:
        fn(*args, **kwargs)
    except Exception as exc:  # a plot must never fail a validation
        LOGGER.warning(f"plot skipped: {exc}")


def write_txt(path: Path, det: torch.Tensor, shape: tuple[int, int], save_conf: bool) -> None:
    """YOLO label lines ``cls cx cy w h [conf]`` normalised to the original image ``shape`` (h, w).

    ``det [n, 6]`` (x1, y1, x2, y2, conf, cls) in original-image pixels.
    """
    lines = []
    xywhn = xyxy2xywhn(det[:, :4].double(), w=shape[1], h=shape[0])
    for box, conf, cls in zip(xywhn.tolist(), det[:, 4].tolist(), det[:, 5].tolist()):
        values = [int(cls), *box] + ([conf] if save_conf else [])
        lines.append(" ".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in values))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + ("\n" if lines else ""))


def predictions_as_targets(dets: Sequence[torch.Tensor], net_shape: tuple[int, int]) -> torch.Tensor:
    """Per-image detections (input pixels) -> ``[N, 7]`` (image, cls, cx, cy, w, h normalised, conf)."""
    rows = []
    for i, det in enumerate(dets):
        xywh = xyxy2xywhn(det[:, :4].float().cpu(), w=net_shape[1], h=net_shape[0])
        image = torch.full((len(det), 1), float(i))
        rows.append(torch.cat((image, det[:, 5:6].cpu(), xywh, det[:, 4:5].cpu()), 1))
    return torch.cat(rows) if rows else torch.zeros(0, 7)


class TxtOutput(EvalOutput):
    """YOLO txt predictions, normalised to the original image, one file per image in ``folder``."""

    def __init__(self, folder: Path, save_conf: bool = False) -> None:
        self.folder, self.save_conf = folder, save_conf

    def add_batch(self, batch: EvalBatch) -> None:
        for det, path, shape_info in zip(batch.dets_orig, batch.paths, batch.shapes):
            write_txt(self.folder / f"{Path(path).stem}.txt", det, shape_info[0], self.save_conf)


class CocoJsonOutput(EvalOutput):
    """``ground_truth.json`` / ``predictions.json`` in ``save_dir`` and the COCO evaluator's numbers
    under ``metrics['coco']`` (at most 100 detections per image and class)."""

    def __init__(self, names: Sequence[str], save_dir: Path) -> None:
        from utils.eval.coco import CocoJsonWriter

        self.writer, self.save_dir = CocoJsonWriter(names), save_dir

    def add_batch(self, batch: EvalBatch) -> None:
        for det, lab, path, shape_info in zip(batch.dets_orig, batch.labels_orig, batch.paths, batch.shapes):
            self.writer.add(path, shape_info[0], lab, det)

    def finish(self, result: DetectionMetrics, metrics: dict) -> None:
        from utils.eval.coco import coco_evaluate

        gt_path, pred_path = self.writer.save(self.save_dir)
        metrics["coco"] = coco_evaluate(gt_path, pred_path, max_det=COCO_EVAL_MAX_DET)


class ConfusionMatrixOutput(EvalOutput):
    """``confusion_matrix.png`` (normalised) in ``save_dir``; the matrix is in ``self.matrix``."""

    def __init__(self, names: Sequence[str], save_dir: Path) -> None:
        self.names, self.save_dir = list(names), save_dir
        self.matrix = ConfusionMatrix(len(self.names))

    def add_batch(self, batch: EvalBatch) -> None:
        for det, lab in zip(batch.dets_orig, batch.labels_orig):
            self.matrix.update(det, lab)

    def finish(self, result: DetectionMetrics, metrics: dict) -> None:
        safe_plot(self.matrix.plot, self.save_dir / "confusion_matrix.png", self.names, normalize=True)


class PlotOutput(EvalOutput):
    """PR, F1, P and R curves and the first ``PLOT_BATCHES`` batches with labels and predictions
    (``val_batch{i}_labels.jpg`` / ``_pred.jpg``, network-input pixels) in ``save_dir``."""

    def __init__(self, names: Sequence[str], save_dir: Path) -> None:
        self.names, self.save_dir = list(names), save_dir

    def add_batch(self, batch: EvalBatch) -> None:
        if batch.index >= PLOT_BATCHES:
            return
        from utils.eval.plots import plot_images

        net_shape = (batch.images.shape[2], batch.images.shape[3])
        images = batch.images.float().cpu()
        stem = self.save_dir / f"val_batch{batch.index}"
        safe_plot(plot_images, images, batch.targets, batch.paths, stem.with_name(stem.name + "_labels.jpg"),
                  self.names)
        safe_plot(plot_images, images, predictions_as_targets(batch.dets, net_shape), batch.paths,
                  stem.with_name(stem.name + "_pred.jpg"), self.names)

    def finish(self, result: DetectionMetrics, metrics: dict) -> None:
        safe_plot(self._curves, result)

    def _curves(self, result: DetectionMetrics) -> None:
        from utils.eval.plots import plot_metric_curve, plot_pr_curve

        plot_pr_curve(result.px, result.pr_curve, result.ap[:, 0], self.save_dir / "PR_curve.png", self.names,
                      result.classes)
        for fname, curve, ylabel in (("F1_curve.png", result.f1_curve, "F1"),
                                     ("P_curve.png", result.p_curve, "Precision"),
                                     ("R_curve.png", result.r_curve, "Recall")):
            plot_metric_curve(result.px, curve, self.save_dir / fname, self.names, ylabel, result.classes)
