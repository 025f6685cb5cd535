"""Non-maximum suppression for the decoded output of the anchor-free DFL head."""

from __future__ import annotations

from typing import Sequence

import torch
from torchvision.ops import batched_nms, nms

from utils.ops.boxes import xywh2xyxy

MAX_BOXES_INTO_NMS = 30_000  # beyond this the IoU matrix of torchvision's NMS gets slow and large


def non_max_suppression(pred: torch.Tensor, conf_thres: float = 0.25, iou_thres: float = 0.45,
                        classes: Sequence[int] | None = None, agnostic: bool = False,
                        multi_label: bool = False, max_det: int = 300,
                        max_nms: int = MAX_BOXES_INTO_NMS) -> list[torch.Tensor]:
    """Filter the decoded predictions of a batch by confidence and suppress overlapping boxes.

    Args:
        pred: ``Tensor[B, 4 + nc, A]``; rows 0-3 are (cx, cy, w, h) in input pixels, rows 4.. are
            sigmoid class scores (the eval output of ``DDetect``, see ``models.heads.main_output``).
        conf_thres: a candidate needs a class score strictly above this.
        iou_thres: boxes overlapping a higher-scoring box of the same class (of any class when
            ``agnostic``) by more than this IoU are removed.
        classes: keep only these class indices (None keeps all).
        agnostic: suppress across classes instead of per class.
        multi_label: one candidate per (anchor, class) whose score passes ``conf_thres``; otherwise
            one candidate per anchor with its best class.
        max_det: at most this many boxes per image are returned.
        max_nms: at most this many highest-scoring candidates per image enter the NMS.

    Returns:
        One ``Tensor[n, 6]`` per image: (x1, y1, x2, y2, conf, cls) in input pixels, float32, sorted
        by decreasing confidence, ``n <= max_det``.
    """
    if pred.dim() != 3:
        raise ValueError(f"non_max_suppression expects Tensor[B, 4 + nc, A], got shape {tuple(pred.shape)}")
    # torchvision's NMS kernels do not all support half; the boxes are few after the threshold anyway
    pred = pred.float()
    batch_scores = pred[:, 4:]
    candidates = batch_scores.amax(1) > conf_thres  # [B, A]; cheap pre-filter for the whole batch
    class_filter = None if classes is None else torch.as_tensor(list(classes), device=pred.device)

    output = []
    for image_pred, image_candidates in zip(pred, candidates):
        x = image_pred[:, image_candidates].T  # [a, 4 + nc]
        boxes = xywh2xyxy(x[:, :4])
        scores = x[:, 4:]
        if multi_label:
            anchor_idx, class_idx = (scores > conf_thres).nonzero(as_tuple=True)
            det = torch.cat((boxes[anchor_idx], scores[anchor_idx, class_idx, None],
                             class_idx[:, None].float()), 1)
        else:
            conf, class_idx = scores.max(1, keepdim=True)
            det = torch.cat((boxes, conf, class_idx.float()), 1)
        if class_filter is not None:
            det = det[torch.isin(det[:, 5].long(), class_filter)]
        if det.shape[0] > max_nms:
            det = det[det[:, 4].topk(max_nms).indices]
        if agnostic:
            keep = nms(det[:, :4], det[:, 4], iou_thres)
        else:
            keep = batched_nms(det[:, :4], det[:, 4], det[:, 5].long(), iou_thres)
        output.append(det[keep[:max_det]])
    return output
