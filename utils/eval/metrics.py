"""Detection metrics: COCO-style matching, AP, P/R/F1, the confusion matrix and fitness.

The rules follow the COCO evaluator for boxes (area range "all", no crowd boxes): predictions of an
image are taken in order of decreasing confidence; each takes the unmatched ground-truth box of the
same class with the highest IoU, if that IoU is at least the threshold; a ground-truth box is matched
at most once per threshold. AP is the mean over 101 recall points of the precision envelope (the
highest precision at any recall at least as large). mAP averages over the classes that have at
least one ground-truth box.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from utils.ops.boxes import box_iou

# the same float values as COCO's np.linspace(.5, .95, 10), so boundary IoUs fall the same way
IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_POINTS = np.linspace(0.0, 1.0, 101)
CURVE_POINTS = 1000  # confidence / recall grid for the curves and the best-F1 search
F1_SMOOTH_FRACTION = 0.1  # moving-average width (fraction of the grid) before picking the best F1
MATCH_CHUNK_IMAGES = 64  # images matched together; bounds the padded [I, D, G] arrays
FITNESS_WEIGHTS = {"map50": 0.1, "map": 0.9}
EPS = 1e-16


def fitness(metrics: Mapping[str, float] | Sequence[float]) -> float:
    """Model selection score ``0.1 * mAP50 + 0.9 * mAP50-95``.

    Accepts the dict returned by ``utils.eval.evaluator.evaluate`` (keys ``map50``, ``map``) or a sequence
    ``(precision, recall, map50, map)``.
    """
    if isinstance(metrics, Mapping):
        map50, map5095 = metrics["map50"], metrics["map"]
    else:
        map50, map5095 = metrics[2], metrics[3]
    return FITNESS_WEIGHTS["map50"] * float(map50) + FITNESS_WEIGHTS["map"] * float(map5095)


def _greedy_match(ious: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """COCO greedy matching for a padded stack of images, all thresholds at once.

    ``ious [I, D, G]`` holds the IoU of each prediction (rows sorted by decreasing confidence) with
    each ground-truth box, 0 where the classes differ or for padding. Returns ``[I, D, T]`` bool.
    The loop runs over prediction ranks only; images and thresholds are vectorised.
    """
    num_images, num_dets, num_gt = ious.shape
    num_thr = len(thresholds)
    free = np.ones((num_images, num_thr, num_gt), dtype=bool)
    correct = np.zeros((num_images, num_dets, num_thr), dtype=bool)
    image_idx = np.arange(num_images)[:, None]
    thr_idx = np.arange(num_thr)[None, :]
    for rank in range(num_dets):
        available = np.where(free, ious[:, rank, None, :], -1.0)  # [I, T, G]
        best = available.argmax(-1)  # [I, T]
        hit = available[image_idx, thr_idx, best] >= thresholds
        correct[:, rank] = hit
        free[image_idx, thr_idx, best] &= ~hit
    return correct


def match_predictions(detections: Sequence[torch.Tensor], labels: Sequence[torch.Tensor],
                      iou_thresholds: np.ndarray = IOU_THRESHOLDS) -> list[np.ndarray]:
    """Mark each prediction true/false positive at every IoU threshold, image by image.

    Args:
        detections: per image ``Tensor[n, 6]`` (x1, y1, x2, y2, conf, cls), any order.
        labels: per image ``Tensor[m, 5]`` (cls, x1, y1, x2, y2) in the same pixel space.
        iou_thresholds: ``[T]`` thresholds (COCO's ten by default).

    Returns:
        per image ``np.ndarray[n, T]`` bool, rows in the order of ``detections``.
    """
    thresholds = np.asarray(iou_thresholds, dtype=np.float64)
    results: list[np.ndarray] = [np.zeros((len(d), len(thresholds)), dtype=bool) for d in detections]
    pending = []  # (image index, candidate row indices in the original order, class-masked IoU rows)
    for i, (det, lab) in enumerate(zip(detections, labels)):
        if len(det) == 0 or len(lab) == 0:
            continue
        det64, lab64 = det.detach().double().cpu(), lab.detach().double().cpu()
        order = torch.sort(-det64[:, 4], stable=True).indices
        iou = box_iou(det64[order, :4], lab64[:, 1:])
        iou *= det64[order, 5, None] == lab64[None, :, 0]
        iou = iou.numpy()
        # a prediction below the lowest threshold against every box is a false positive everywhere
        # and cannot take a box from anyone, so only the others go through the sequential loop
        keep = iou.max(1) >= thresholds.min()
        if keep.any():
            pending.append((i, order.numpy()[keep], iou[keep]))

    for start in range(0, len(pending), MATCH_CHUNK_IMAGES):
        chunk = pending[start:start + MATCH_CHUNK_IMAGES]
        max_d = max(len(rows) for _, rows, _ in chunk)
        max_g = max(iou.shape[1] for _, _, iou in chunk)
        padded = np.zeros((len(chunk), max_d, max_g))
        for k, (_, _, iou) in enumerate(chunk):
            padded[k, :iou.shape[0], :iou.shape[1]] = iou
        correct = _greedy_match(padded, thresholds)
        for k, (i, rows, _) in enumerate(chunk):
            results[i][rows] = correct[k, :len(rows)]
    return results


def _smooth(y: np.ndarray, fraction: float) -> np.ndarray:
    """Centred moving average over ``fraction`` of the points, edges padded with the end values."""
    width = max(1, int(round(len(y) * fraction / 2)) * 2 + 1)
    padded = np.concatenate((np.full(width // 2, y[0]), y, np.full(width // 2, y[-1])))
    return np.convolve(padded, np.ones(width) / width, mode="valid")


@dataclass
class DetectionMetrics:
    """Results of :meth:`DetectionStats.compute`; arrays are over the classes in ``classes``.

    ``ap [K, T]`` is AP per class and IoU threshold; ``precision``, ``recall``, ``f1`` ``[K]`` are
    taken at ``best_conf`` (the confidence with the highest mean F1 at IoU 0.5). Curves ``[K, 1000]``
    are over the grid ``px`` (confidence for P/R/F1, recall for ``pr_curve``), at IoU 0.5.
    """

    classes: np.ndarray
    ap: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    best_conf: float
    instances: np.ndarray
    images: np.ndarray
    num_images: int
    px: np.ndarray = field(repr=False)
    p_curve: np.ndarray = field(repr=False)
    r_curve: np.ndarray = field(repr=False)
    f1_curve: np.ndarray = field(repr=False)
    pr_curve: np.ndarray = field(repr=False)

    @property
    def map50(self) -> float:
        return float(self.ap[:, 0].mean()) if len(self.classes) else 0.0

    @property
    def map(self) -> float:
        """mAP over the IoU thresholds 0.50:0.05:0.95."""
        return float(self.ap.mean()) if len(self.classes) else 0.0

    @property
    def mp(self) -> float:
        return float(self.precision.mean()) if len(self.classes) else 0.0

    @property
    def mr(self) -> float:
        return float(self.recall.mean()) if len(self.classes) else 0.0

    def per_class(self, names: Sequence[str]) -> list[dict]:
        """One dict per class with labels: class, name, images, instances, precision, recall, map50, map."""
        rows = []
        for k, c in enumerate(self.classes):
            rows.append({"class": int(c), "name": names[c] if c < len(names) else str(c),
                         "images": int(self.images[k]), "instances": int(self.instances[k]),
                         "precision": float(self.precision[k]), "recall": float(self.recall[k]),
                         "map50": float(self.ap[k, 0]), "map": float(self.ap[k].mean())})
        return rows


def average_precision(tp: np.ndarray, conf: np.ndarray,
                      num_gt: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """AP of one class at every threshold with the COCO 101-point rule.

    ``tp [n, T]`` bool and ``conf [n]`` for the class's predictions in evaluation order (images in
    order, each image's predictions by decreasing confidence); the stable sort then orders ties as
    COCO does. Returns ``(ap [T], conf [n], recall [n, T], precision [n, T], envelope [n, T])``,
    all sorted by decreasing confidence.
    """
    order = np.argsort(-conf, kind="stable")
    tp = tp[order]
    tpc = np.cumsum(tp, 0, dtype=np.float64)
    fpc = np.cumsum(~tp, 0, dtype=np.float64)
    recall = tpc / max(num_gt, 1)
    precision = tpc / (tpc + fpc + np.spacing(1))
    envelope = np.flip(np.maximum.accumulate(np.flip(precision, 0), 0), 0)
    ap = np.zeros(tp.shape[1])
    for t in range(tp.shape[1]):
        # the precision at the first rank that reaches each recall point (0 beyond the last recall)
        idx = np.searchsorted(recall[:, t], RECALL_POINTS, side="left")
        valid = idx < len(recall)
        ap[t] = envelope[idx[valid], t].sum() / len(RECALL_POINTS)
    return ap, conf[order], recall, precision, envelope


class DetectionStats:
    """Collects matched predictions image by image and computes :class:`DetectionMetrics`."""

    def __init__(self, nc: int, iou_thresholds: np.ndarray = IOU_THRESHOLDS) -> None:
        self.nc = nc
        self.iou_thresholds = np.asarray(iou_thresholds, dtype=np.float64)
        self._correct: list[np.ndarray] = []
        self._conf: list[np.ndarray] = []
        self._pred_cls: list[np.ndarray] = []
        self._target_cls: list[np.ndarray] = []
        self._image_classes = np.zeros(nc, dtype=np.int64)
        self.num_images = 0

    def update(self, detections: Sequence[torch.Tensor], labels: Sequence[torch.Tensor]) -> None:
        """Add images: ``detections`` per image ``Tensor[n, 6]`` (x1, y1, x2, y2, conf, cls) and
        ``labels`` per image ``Tensor[m, 5]`` (cls, x1, y1, x2, y2), both in the same pixel space."""
        correct = match_predictions(detections, labels, self.iou_thresholds)
        for det, lab, cor in zip(detections, labels, correct):
            det_np = det.detach().cpu().numpy()
            self._correct.append(cor)
            self._conf.append(det_np[:, 4].astype(np.float64))
            self._pred_cls.append(det_np[:, 5].astype(np.int64))
            target_cls = lab[:, 0].detach().cpu().numpy().astype(np.int64)
            self._target_cls.append(target_cls)
            present = np.unique(target_cls)
            self._image_classes[present[(present >= 0) & (present < self.nc)]] += 1
            self.num_images += 1

    def compute(self) -> DetectionMetrics:
        """AP per class and threshold, P/R/F1 at the best mean-F1 confidence, and the curves."""
        num_thr = len(self.iou_thresholds)
        correct = np.concatenate(self._correct) if self._correct else np.zeros((0, num_thr), bool)
        conf = np.concatenate(self._conf) if self._conf else np.zeros(0)
        pred_cls = np.concatenate(self._pred_cls) if self._pred_cls else np.zeros(0, np.int64)
        target_cls = np.concatenate(self._target_cls) if self._target_cls else np.zeros(0, np.int64)

        classes, instances = np.unique(target_cls, return_counts=True)
        num_cls = len(classes)
        px = np.linspace(0.0, 1.0, CURVE_POINTS)
        ap = np.zeros((num_cls, num_thr))
        p_curve, r_curve, pr_curve = (np.zeros((num_cls, CURVE_POINTS)) for _ in range(3))
        for k, c in enumerate(classes):
            mask = pred_cls == c
            if not mask.any():
                continue
            ap[k], sorted_conf, recall, precision, envelope = average_precision(
                correct[mask], conf[mask], int(instances[k]))
            # np.interp needs increasing x: use -conf; above the top score nothing is predicted
            r_curve[k] = np.interp(-px, -sorted_conf, recall[:, 0], left=0.0)
            p_curve[k] = np.interp(-px, -sorted_conf, precision[:, 0], left=1.0)
            idx = np.searchsorted(recall[:, 0], px, side="left")
            valid = idx < len(recall)
            pr_curve[k, valid] = envelope[idx[valid], 0]

        f1_curve = 2 * p_curve * r_curve / (p_curve + r_curve + EPS)
        best = int(_smooth(f1_curve.mean(0), F1_SMOOTH_FRACTION).argmax()) if num_cls else 0
        images = self._image_classes[np.clip(classes, 0, max(self.nc - 1, 0))]
        return DetectionMetrics(classes=classes, ap=ap, precision=p_curve[:, best], recall=r_curve[:, best],
                                f1=f1_curve[:, best], best_conf=float(px[best]), instances=instances,
                                images=images, num_images=self.num_images, px=px, p_curve=p_curve,
                                r_curve=r_curve, f1_curve=f1_curve, pr_curve=pr_curve)


class ConfusionMatrix:
    """Counts of (predicted class, true class) with a background row and column.

    ``matrix [nc + 1, nc + 1]``: rows are predicted classes, columns true classes; index ``nc`` is
    background (row ``nc``: missed ground truth, column ``nc``: predictions on background).
    """

    def __init__(self, nc: int, conf_thres: float = 0.25, iou_thres: float = 0.45) -> None:
        self.nc = nc
        self.conf_thres = conf_thres
        self.iou_thres = iou_thres
        self.matrix = np.zeros((nc + 1, nc + 1), dtype=np.int64)

    def update(self, detections: torch.Tensor, labels: torch.Tensor) -> None:
        """Add one image: ``detections [n, 6]`` (x1, y1, x2, y2, conf, cls), ``labels [m, 5]``
        (cls, x1, y1, x2, y2). Pairs are formed greedily by IoU, class-agnostic, one to one."""
        det = detections[detections[:, 4] > self.conf_thres].detach().cpu()
        lab = labels.detach().cpu()
        det_cls = det[:, 5].long().tolist()
        gt_cls = lab[:, 0].long().tolist()
        det_used, gt_used = set(), set()
        if len(det) and len(lab):
            iou = box_iou(lab[:, 1:].float(), det[:, :4].float())
            gt_idx, det_idx = torch.nonzero(iou > self.iou_thres, as_tuple=True)
            order = torch.argsort(-iou[gt_idx, det_idx], stable=True)
            for g, d in zip(gt_idx[order].tolist(), det_idx[order].tolist()):
                if g in gt_used or d in det_used:
                    continue
                gt_used.add(g)
                det_used.add(d)
                self.matrix[det_cls[d], gt_cls[g]] += 1
        for g, c in enumerate(gt_cls):
            if g not in gt_used:
                self.matrix[self.nc, c] += 1
        for d, c in enumerate(det_cls):
            if d not in det_used:
                self.matrix[c, self.nc] += 1

    def plot(self, save_path: str | Path, names: Sequence[str], normalize: bool = True) -> None:
        """Save the matrix as an image (columns normalised to sum to 1 when ``normalize``)."""
        from utils.eval.plots import plot_confusion_matrix  # plots pulls in matplotlib; only when plotting

        plot_confusion_matrix(self.matrix, names, save_path, normalize=normalize)
