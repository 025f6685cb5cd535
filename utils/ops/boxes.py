"""Box formats, conversions, IoU, clipping and rescaling.

Conventions used across the project:
- ``xyxy``: (x1, y1, x2, y2) corners; ``xywh``: (cx, cy, w, h) centre and size.
- Boxes are in pixels unless a name says ``n`` (normalised to [0, 1] by the image size).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torchvision.ops import box_iou as _tv_box_iou

ArrayLike = torch.Tensor | np.ndarray


def _empty_like(x: ArrayLike) -> ArrayLike:
    return x.clone() if isinstance(x, torch.Tensor) else np.copy(x)


def xywh2xyxy(x: ArrayLike) -> ArrayLike:
    """Convert ``[..., 4]`` boxes from (cx, cy, w, h) to (x1, y1, x2, y2)."""
    y = _empty_like(x)
    half_w, half_h = x[..., 2] / 2, x[..., 3] / 2
    y[..., 0] = x[..., 0] - half_w
    y[..., 1] = x[..., 1] - half_h
    y[..., 2] = x[..., 0] + half_w
    y[..., 3] = x[..., 1] + half_h
    return y


def xyxy2xywh(x: ArrayLike) -> ArrayLike:
    """Convert ``[..., 4]`` boxes from (x1, y1, x2, y2) to (cx, cy, w, h)."""
    y = _empty_like(x)
    y[..., 0] = (x[..., 0] + x[..., 2]) / 2
    y[..., 1] = (x[..., 1] + x[..., 3]) / 2
    y[..., 2] = x[..., 2] - x[..., 0]
    y[..., 3] = x[..., 3] - x[..., 1]
    return y


def xywhn2xyxy(x: ArrayLike, w: float, h: float, pad_w: float = 0.0, pad_h: float = 0.0) -> ArrayLike:
    """Normalised (cx, cy, w, h) ``[..., 4]`` to pixel (x1, y1, x2, y2), plus a letterbox pad."""
    y = xywh2xyxy(x)
    y[..., 0] = y[..., 0] * w + pad_w
    y[..., 1] = y[..., 1] * h + pad_h
    y[..., 2] = y[..., 2] * w + pad_w
    y[..., 3] = y[..., 3] * h + pad_h
    return y


def xyxy2xywhn(x: ArrayLike, w: float, h: float) -> ArrayLike:
    """Pixel (x1, y1, x2, y2) ``[..., 4]`` to normalised (cx, cy, w, h)."""
    y = xyxy2xywh(x)
    y[..., 0] = y[..., 0] / w
    y[..., 1] = y[..., 1] / h
    y[..., 2] = y[..., 2] / w
    y[..., 3] = y[..., 3] / h
    return y


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of ``boxes1 (Tensor[N, 4])`` and ``boxes2 (Tensor[M, 4])`` in xyxy -> ``[N, M]``."""
    return _tv_box_iou(boxes1, boxes2)


def bbox_iou(box1: torch.Tensor, box2: torch.Tensor, xywh: bool = False, ciou: bool = True,
             eps: float = 1e-7) -> torch.Tensor:
    """Element-wise IoU (or Complete-IoU) of two broadcastable ``[..., 4]`` box tensors.

    Returns ``[...]`` (the last dimension removed). CIoU = IoU - rho^2 / c^2 - alpha * v, where rho
    is the centre distance, c the diagonal of the enclosing box and v the aspect-ratio term.
    """
    if xywh:
        box1, box2 = xywh2xyxy(box1), xywh2xyxy(box2)
    b1_x1, b1_y1, b1_x2, b1_y2 = box1.unbind(-1)
    b2_x1, b2_y1, b2_x2, b2_y2 = box2.unbind(-1)
    w1, h1 = b1_x2 - b1_x1, (b1_y2 - b1_y1).clamp(min=eps)
    w2, h2 = b2_x2 - b2_x1, (b2_y2 - b2_y1).clamp(min=eps)

    inter_w = (torch.minimum(b1_x2, b2_x2) - torch.maximum(b1_x1, b2_x1)).clamp(min=0)
    inter_h = (torch.minimum(b1_y2, b2_y2) - torch.maximum(b1_y1, b2_y1)).clamp(min=0)
    inter = inter_w * inter_h
    union = w1 * h1 + w2 * h2 - inter + eps
    iou = inter / union
    if not ciou:
        return iou

    enclose_w = torch.maximum(b1_x2, b2_x2) - torch.minimum(b1_x1, b2_x1)
    enclose_h = torch.maximum(b1_y2, b2_y2) - torch.minimum(b1_y1, b2_y1)
    diag_sq = enclose_w**2 + enclose_h**2 + eps
    centre_sq = ((b2_x1 + b2_x2 - b1_x1 - b1_x2) ** 2 + (b2_y1 + b2_y2 - b1_y1 - b1_y2) ** 2) / 4
    v = (4 / math.pi**2) * (torch.atan(w2 / h2) - torch.atan(w1 / h1)) ** 2
    with torch.no_grad():
        alpha = v / (v - iou + (1 + eps))
    return iou - (centre_sq / diag_sq + v * alpha)


def clip_boxes(boxes: ArrayLike, shape: tuple[int, int]) -> ArrayLike:
    """Clip xyxy ``boxes [..., 4]`` in place to an image of ``shape`` = (height, width)."""
    h, w = shape[:2]
    if isinstance(boxes, torch.Tensor):
        boxes[..., 0].clamp_(0, w)
        boxes[..., 1].clamp_(0, h)
        boxes[..., 2].clamp_(0, w)
        boxes[..., 3].clamp_(0, h)
    else:
        boxes[..., [0, 2]] = boxes[..., [0, 2]].clip(0, w)
        boxes[..., [1, 3]] = boxes[..., [1, 3]].clip(0, h)
    return boxes


def scale_boxes(net_shape: tuple[int, int], boxes: ArrayLike, orig_shape: tuple[int, int],
                ratio_pad: tuple[tuple[float, float], tuple[float, float]] | None = None) -> ArrayLike:
    """Map xyxy ``boxes [N, 4]`` from a letterboxed ``net_shape`` (h, w) back to ``orig_shape`` (h, w).

    ``ratio_pad`` = ((ratio_w, ratio_h), (pad_w, pad_h)) as returned by the letterbox; when None it
    is recomputed assuming a centred letterbox with one common ratio. Works in place and clips.
    """
    if ratio_pad is None:
        gain = min(net_shape[0] / orig_shape[0], net_shape[1] / orig_shape[1])
        ratio = (gain, gain)
        pad = ((net_shape[1] - orig_shape[1] * gain) / 2, (net_shape[0] - orig_shape[0] * gain) / 2)
    else:
        ratio, pad = ratio_pad
    boxes[..., [0, 2]] -= pad[0]
    boxes[..., [1, 3]] -= pad[1]
    boxes[..., [0, 2]] /= ratio[0]
    boxes[..., [1, 3]] /= ratio[1]
    return clip_boxes(boxes, orig_shape)
