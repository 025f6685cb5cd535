"""Anchor points of the anchor-free head and its box encoding: distances (left, top, right, bottom)
from an anchor point to the box sides.

Anchor points are cell centres in *grid units* (offset 0.5); multiply by the stride for pixels.
Boxes are ``xyxy`` (corners) or ``xywh`` (centre and size), as everywhere in the project.
The head decodes with these functions and the loss encodes its targets with them, so they live
with the head: ``models`` imports nothing from ``utils`` but ``utils.core``.
"""

from __future__ import annotations

from typing import Sequence

import torch


def make_anchors(feats: Sequence[torch.Tensor], strides: Sequence[float] | torch.Tensor,
                 offset: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchor points for a list of feature maps ``[B, C, H_i, W_i]``.

    Returns ``anchor_points (Tensor[A, 2])`` as (x, y) cell centres in grid units, row-major per
    level, levels in order, and ``stride_tensor (Tensor[A, 1])``; A = sum(H_i * W_i).
    """
    points, stride_list = [], []
    dtype, device = feats[0].dtype, feats[0].device
    for feat, stride in zip(feats, strides):
        h, w = feat.shape[-2:]
        # the grid is built in float32 and cast, so that fp16 graphs export with dynamic sizes
        xs = (torch.arange(w, device=device, dtype=torch.float32) + offset).to(dtype)
        ys = (torch.arange(h, device=device, dtype=torch.float32) + offset).to(dtype)
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack((grid_x, grid_y), -1).view(-1, 2))
        stride_list.append(torch.full((h * w, 1), float(stride), dtype=dtype, device=device))
    return torch.cat(points), torch.cat(stride_list)


def dist2bbox(distance: torch.Tensor, anchor_points: torch.Tensor, xywh: bool = True,
              dim: int = -1) -> torch.Tensor:
    """Turn (left, top, right, bottom) distances from anchor points into boxes.

    ``distance`` holds the 4 sides along ``dim``; ``anchor_points`` broadcasts against one side.
    Returns xywh (default) or xyxy boxes in the same units as the inputs.
    """
    left_top, right_bottom = distance.chunk(2, dim)
    x1y1 = anchor_points - left_top
    x2y2 = anchor_points + right_bottom
    if xywh:
        return torch.cat(((x1y1 + x2y2) / 2, x2y2 - x1y1), dim)
    return torch.cat((x1y1, x2y2), dim)


def bbox2dist(anchor_points: torch.Tensor, bbox: torch.Tensor, reg_max: int) -> torch.Tensor:
    """Inverse of :func:`dist2bbox` for xyxy ``bbox [..., 4]``: ltrb distances in [0, reg_max - 0.01]."""
    x1y1, x2y2 = bbox.chunk(2, -1)
    return torch.cat((anchor_points - x1y1, x2y2 - anchor_points), -1).clamp(0, reg_max - 0.01)
