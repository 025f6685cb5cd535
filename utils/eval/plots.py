"""Drawing and plotting: boxes on images (OpenCV), curves, confusion matrix, results and label plots.

Figures are built as ``matplotlib.figure.Figure`` objects and saved with the Agg canvas, so no
pyplot global state or GUI backend is touched and nothing happens at import. Text on images uses
OpenCV's built-in Hershey font: no font file is needed or downloaded.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch

from utils.core.log import LOGGER
from utils.ops.boxes import xywh2xyxy

# a hand-picked palette of well separated colours (RGB hex), cycled by class index
PALETTE_HEX = ("E6194B", "3CB44B", "4363D8", "F58231", "911EB4", "42D4F4", "F032E6", "BFEF45",
               "FABED4", "469990", "DCBEFF", "9A6324", "FFE119", "800000", "AAFFC3", "808000",
               "FFD8B1", "000075", "A9A9A9", "00A5A5")
FONT = cv2.FONT_HERSHEY_SIMPLEX
TEXT_PAD = 3  # pixels between the label text and its background box
MOSAIC_MAX_SIZE = 1920  # longest side of a batch mosaic
MOSAIC_MAX_IMAGES = 16
MOSAIC_CONF_THRES = 0.25  # predictions below this are not drawn on mosaics
MAX_CLASSES_ANNOTATED = 30  # confusion-matrix cells get numbers only below this many classes
DPI = 150
MAX_SCATTER_POINTS = 20_000


def colors(index: int, bgr: bool = True) -> tuple[int, int, int]:
    """The palette colour of class ``index`` as a BGR (OpenCV) or RGB tuple of ints."""
    hex_code = PALETTE_HEX[int(index) % len(PALETTE_HEX)]
    rgb = tuple(int(hex_code[i:i + 2], 16) for i in (0, 2, 4))
    return rgb[::-1] if bgr else rgb


def default_line_width(shape: Sequence[int]) -> int:
    """A box line width that stays visible on small and large images of ``shape`` (h, w, ...)."""
    return max(round(sum(shape[:2]) / 2 * 0.003), 2)


def draw_box(img: np.ndarray, xyxy: Sequence[float], label: str = "",
             color: tuple[int, int, int] = (128, 128, 128), line_width: int | None = None,
             text_color: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
    """Draw one (x1, y1, x2, y2) pixel box with an optional label on ``img`` (HxWx3 uint8, in place)."""
    lw = line_width or default_line_width(img.shape)
    p1 = (int(round(float(xyxy[0]))), int(round(float(xyxy[1]))))
    p2 = (int(round(float(xyxy[2]))), int(round(float(xyxy[3]))))
    cv2.rectangle(img, p1, p2, color, thickness=lw, lineType=cv2.LINE_AA)
    if label:
        thickness = max(lw - 1, 1)
        scale = lw / 3
        (tw, th), baseline = cv2.getTextSize(label, FONT, scale, thickness)
        # put the label above the box unless it would leave the image
        above = p1[1] - th - 2 * TEXT_PAD >= 0
        top = p1[1] - th - 2 * TEXT_PAD if above else p1[1]
        cv2.rectangle(img, (p1[0], top), (p1[0] + tw + 2 * TEXT_PAD, top + th + 2 * TEXT_PAD), color,
                      -1, cv2.LINE_AA)
        cv2.putText(img, label, (p1[0] + TEXT_PAD, top + th + TEXT_PAD), FONT, scale, text_color,
                    thickness, cv2.LINE_AA)
    return img


def draw_detections(img: np.ndarray, detections: torch.Tensor | np.ndarray, names: Sequence[str],
                    line_width: int | None = None, hide_labels: bool = False,
                    hide_conf: bool = False) -> np.ndarray:
    """Draw ``detections [n, 6]`` (x1, y1, x2, y2, conf, cls; pixels of ``img``) on a BGR image in place."""
    det = detections.detach().cpu().numpy() if isinstance(detections, torch.Tensor) else np.asarray(detections)
    for x1, y1, x2, y2, conf, cls in det[::-1]:  # lowest confidence first, so the best is on top
        c = int(cls)
        name = names[c] if c < len(names) else str(c)
        label = "" if hide_labels else (name if hide_conf else f"{name} {conf:.2f}")
        draw_box(img, (x1, y1, x2, y2), label, colors(c), line_width)
    return img


def _to_uint8_hwc(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """``[B, 3, H, W]`` uint8, or float in [0, 1] (or in [0, 255]) -> ``[B, H, W, 3]`` uint8 (same channels)."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().float().numpy() if images.dtype != torch.uint8 else images.cpu().numpy()
    if images.dtype != np.uint8:
        # a float batch cast from uint8 without the division still holds 0..255
        scale = 1.0 if images.size and images.max() > 1.0 else 255.0
        images = np.clip(images * scale, 0, 255).round().astype(np.uint8)
    return np.ascontiguousarray(images.transpose(0, 2, 3, 1))


def plot_images(images: torch.Tensor | np.ndarray, targets: torch.Tensor | np.ndarray,
                paths: Sequence[str] | None = None, fname: str | Path = "images.jpg",
                names: Sequence[str] | None = None, max_size: int = MOSAIC_MAX_SIZE,
                max_subplots: int = MOSAIC_MAX_IMAGES, conf_thres: float = MOSAIC_CONF_THRES) -> np.ndarray:
    """Save a grid of up to ``max_subplots`` images of a batch with their boxes.

    Args:
        images: ``[B, 3, H, W]`` RGB, uint8 or float in [0, 1].
        targets: ``[N, 6]`` (image index, cls, cx, cy, w, h) normalised to (W, H), or ``[N, 7]`` with a
            confidence last (predictions: drawn with their score when above ``conf_thres``).
        paths: file names written above each tile.
    Returns the mosaic (RGB ``[h, w, 3]`` uint8); it is saved to ``fname`` as JPEG/PNG.
    """
    imgs = _to_uint8_hwc(images)
    tg = targets.detach().cpu().numpy() if isinstance(targets, torch.Tensor) else np.asarray(targets)
    tg = tg.reshape(-1, tg.shape[-1] if tg.size else 6)
    names = list(names) if names is not None else []
    count = min(len(imgs), max_subplots)
    cols = math.ceil(math.sqrt(max(count, 1)))
    rows = math.ceil(max(count, 1) / cols)
    h, w = imgs.shape[1:3] if len(imgs) else (64, 64)
    scale = min(1.0, max_size / max(rows * h, cols * w))
    th, tw = max(int(h * scale), 1), max(int(w * scale), 1)
    mosaic = np.full((rows * th, cols * tw, 3), 255, dtype=np.uint8)
    lw = max(1, round(default_line_width((th, tw)) / 2))
    for i in range(count):
        y0, x0 = (i // cols) * th, (i % cols) * tw
        tile = cv2.resize(imgs[i], (tw, th), interpolation=cv2.INTER_AREA) if scale < 1 else imgs[i].copy()
        tile = np.ascontiguousarray(tile[..., ::-1])  # draw in BGR with the BGR palette
        rows_i = tg[tg[:, 0] == i] if len(tg) else tg
        if len(rows_i):
            boxes = xywh2xyxy(rows_i[:, 2:6].astype(np.float64)) * np.array([tw, th, tw, th])
            for k, row in enumerate(rows_i):
                c = int(row[1])
                name = names[c] if c < len(names) else str(c)
                if row.shape[0] > 6:
                    if row[6] < conf_thres:
                        continue
                    name = f"{name} {row[6]:.1f}"
                draw_box(tile, boxes[k], name, colors(c), lw)
        if paths is not None and i < len(paths):
            cv2.putText(tile, Path(paths[i]).name[:40], (TEXT_PAD, th - TEXT_PAD), FONT, lw / 3,
                        (220, 220, 220), max(lw - 1, 1), cv2.LINE_AA)
        cv2.rectangle(tile, (0, 0), (tw - 1, th - 1), (255, 255, 255), 1)
        mosaic[y0:y0 + th, x0:x0 + tw] = tile[..., ::-1]
    fname = Path(fname)
    fname.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(fname), mosaic[..., ::-1])
    return mosaic


def _figure(figsize: tuple[float, float], nrows: int = 1, ncols: int = 1):
    """A pyplot-free figure and its axes (the Agg canvas is used when saving)."""
    from matplotlib.figure import Figure  # matplotlib is slow to import; only when plotting

    fig = Figure(figsize=figsize, tight_layout=True)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _save(fig, save_path: str | Path) -> None:
    save_path = Path(save_path)
    save_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(save_path, dpi=DPI)


def _class_name(names: Sequence[str], c: int) -> str:
    return names[c] if 0 <= c < len(names) else str(c)


def plot_pr_curve(px: np.ndarray, pr_curve: np.ndarray, ap50: np.ndarray, save_path: str | Path,
                  names: Sequence[str], classes: Sequence[int] | None = None) -> None:
    """Precision (y) over recall ``px`` (x) per class ``pr_curve [K, P]`` with AP50 in the legend."""
    fig, axes = _figure((9, 6))
    ax = axes[0, 0]
    classes = list(range(len(pr_curve))) if classes is None else list(classes)
    show_legend = len(pr_curve) < MAX_CLASSES_ANNOTATED
    for k, curve in enumerate(pr_curve):
        label = f"{_class_name(names, int(classes[k]))} {ap50[k]:.3f}" if show_legend else None
        ax.plot(px, curve, linewidth=1, label=label)
    if len(pr_curve):
        ax.plot(px, pr_curve.mean(0), linewidth=3, color="blue", label=f"all classes {np.mean(ap50):.3f} mAP@0.5")
    ax.set(xlabel="Recall", ylabel="Precision", xlim=(0, 1), ylim=(0, 1.01), title="Precision-Recall")
    ax.legend(loc="lower left", fontsize="small")
    _save(fig, save_path)


def plot_metric_curve(px: np.ndarray, curves: np.ndarray, save_path: str | Path, names: Sequence[str],
                      ylabel: str, classes: Sequence[int] | None = None) -> None:
    """A metric ``curves [K, P]`` (F1, precision or recall) over confidence ``px`` per class."""
    fig, axes = _figure((9, 6))
    ax = axes[0, 0]
    classes = list(range(len(curves))) if classes is None else list(classes)
    show_legend = len(curves) < MAX_CLASSES_ANNOTATED
    for k, curve in enumerate(curves):
        ax.plot(px, curve, linewidth=1, label=_class_name(names, int(classes[k])) if show_legend else None)
    if len(curves):
        mean = curves.mean(0)
        best = int(mean.argmax())
        ax.plot(px, mean, linewidth=3, color="blue", label=f"all classes {mean[best]:.2f} at {px[best]:.3f}")
    ax.set(xlabel="Confidence", ylabel=ylabel, xlim=(0, 1), ylim=(0, 1.01), title=f"{ylabel}-Confidence")
    ax.legend(loc="lower left", fontsize="small")
    _save(fig, save_path)


def plot_confusion_matrix(matrix: np.ndarray, names: Sequence[str], save_path: str | Path,
                          normalize: bool = True) -> None:
    """Plot ``matrix [nc + 1, nc + 1]`` (rows predicted, columns true, last = background)."""
    values = matrix.astype(np.float64)
    if normalize:
        values = values / np.maximum(values.sum(0, keepdims=True), 1)  # each true class sums to 1
    nc = len(matrix) - 1
    labels = [_class_name(names, c) for c in range(nc)] + ["background"]
    fig, axes = _figure((max(6, nc * 0.4 + 4), max(5, nc * 0.35 + 3.5)))
    ax = axes[0, 0]
    image = ax.imshow(values, cmap="Blues", vmin=0)
    fig.colorbar(image, ax=ax, fraction=0.046)
    if nc < MAX_CLASSES_ANNOTATED:
        ax.set_xticks(range(nc + 1), labels, rotation=90)
        ax.set_yticks(range(nc + 1), labels)
        for (r, c), v in np.ndenumerate(values):
            if v > 0:
                ax.text(c, r, f"{v:.2f}" if normalize else str(int(v)), ha="center", va="center",
                        fontsize=8, color="white" if v > values.max() / 2 else "black")
    ax.set(xlabel="True", ylabel="Predicted", title="Confusion matrix" + (" (normalised)" if normalize else ""))
    _save(fig, save_path)


def _read_numeric_csv(csv_file: Path) -> dict[str, np.ndarray]:
    """Columns of a CSV file that parse as numbers, keyed by their stripped header."""
    with csv_file.open(newline="") as f:
        rows = [row for row in csv.reader(f) if row]
    if not rows:
        return {}
    header = [h.strip() for h in rows[0]]
    columns: dict[str, np.ndarray] = {}
    for j, name in enumerate(header):
        try:
            columns[name] = np.array([float(r[j]) for r in rows[1:] if j < len(r)])
        except ValueError:
            continue  # a text column (e.g. a date) is not plotted
    return columns


def plot_results(csv_file: str | Path, save_path: str | Path | None = None) -> Path | None:
    """Plot every numeric column of a training ``results.csv`` against the epoch as small subplots.

    The x axis is the ``epoch`` column when there is one, else the row number. Saved next to the CSV
    as ``results.png`` unless ``save_path`` is given; returns the path, or None when nothing to plot.
    """
    csv_file = Path(csv_file)
    columns = _read_numeric_csv(csv_file)
    x = columns.pop("epoch", None)
    if not columns or not any(len(v) for v in columns.values()):
        LOGGER.warning(f"plot_results: no numeric data in {csv_file}")
        return None
    n = len(columns)
    ncols = min(5, n)
    nrows = math.ceil(n / ncols)
    fig, axes = _figure((3 * ncols, 2.5 * nrows), nrows, ncols)
    for ax, (name, y) in zip(axes.flat, columns.items()):
        xs = x[:len(y)] if x is not None else np.arange(len(y))
        ax.plot(xs, y, marker=".", linewidth=1.5, markersize=4)
        ax.set_title(name, fontsize=9)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    save_path = Path(save_path) if save_path is not None else csv_file.with_name("results.png")
    _save(fig, save_path)
    return save_path


def plot_labels(labels: np.ndarray | Sequence[np.ndarray], names: Sequence[str],
                save_path: str | Path) -> None:
    """Label statistics: instances per class, box centres (x, y) and box sizes (w, h).

    ``labels`` is ``[N, 5]`` (cls, cx, cy, w, h) normalised, or a list of such arrays (one per image,
    as ``dataset.labels``). A folder as ``save_path`` gets ``labels.jpg`` inside it.
    """
    save_path = Path(save_path)
    if save_path.is_dir() or not save_path.suffix:
        save_path = save_path / "labels.jpg"
    if not isinstance(labels, np.ndarray):
        parts = [np.asarray(a).reshape(-1, 5) for a in labels]
        labels = np.concatenate(parts) if parts else np.zeros((0, 5))
    nc = max(len(names), int(labels[:, 0].max()) + 1 if len(labels) else 0)
    fig, axes = _figure((12, 4), 1, 3)
    counts = np.bincount(labels[:, 0].astype(np.int64), minlength=nc) if len(labels) else np.zeros(nc)
    ax = axes[0, 0]
    ax.bar(range(nc), counts, color=[np.array(colors(c, bgr=False)) / 255 for c in range(nc)])
    ax.set(ylabel="instances", title=f"{len(labels)} boxes")
    if nc < MAX_CLASSES_ANNOTATED:
        ax.set_xticks(range(nc), [_class_name(names, c) for c in range(nc)], rotation=90)
    # an even subsample keeps the scatter fast and readable on large data sets
    shown = labels[::max(1, len(labels) // MAX_SCATTER_POINTS)]
    point_colors = [np.array(colors(int(c), bgr=False)) / 255 for c in shown[:, 0]]
    for ax, (i, j), (xl, yl) in zip(axes[0, 1:], ((1, 2), (3, 4)), (("x", "y"), ("width", "height"))):
        ax.scatter(shown[:, i], shown[:, j], s=2, c=point_colors, alpha=0.4, linewidths=0)
        ax.set(xlabel=xl, ylabel=yl, xlim=(0, 1), ylim=(0, 1))
    axes[0, 1].invert_yaxis()  # image coordinates: y grows downwards
    _save(fig, save_path)
