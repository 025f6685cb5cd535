"""Detection loss of the anchor-free DFL head: task-aligned assignment, BCE, CIoU and DFL.

One class serves single heads (``DDetect``) and dual PGI heads (``DualDDetect``): each branch gets
its own assignment and normaliser, the auxiliary branch is scaled by ``hyp['aux_weight']``.
All gains come from the hyp dictionary; the defaults below only fill keys that are missing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.anchors import bbox2dist, dist2bbox, make_anchors
from models.heads import branch_maps, flatten_maps
from utils.core.errors import UserError
from utils.distill import DistillationLoss
from utils.ops.assigner import TaskAlignedAssigner
from utils.ops.boxes import bbox_iou, xywh2xyxy

# DistillationLoss (utils/distill/loss.py) is re-exported here: `from utils.loss import DistillationLoss`.
__all__ = ["BranchTargets", "DetectionLoss", "DistillationLoss", "GroundTruth"]

# Values of hyp.scratch-high.yaml, used only for keys a user's hyp file leaves out.
DEFAULT_HYP: dict[str, float] = {
    "box": 7.5,
    "cls": 0.5,
    "dfl": 1.5,
    "aux_weight": 0.25,
    "cls_pw": 1.0,
    "fl_gamma": 0.0,
}
# Task-aligned assigner settings of the YOLOv9 training code.
TAL_TOPK = 10
TAL_ALPHA = 0.5
TAL_BETA = 6.0
# Weight of the positive class in the focal loss (Lin et al., 2017), used only when fl_gamma > 0.
FOCAL_ALPHA = 0.25
# A target_scores_sum below this would blow the normalised losses up (an image with no boxes).
MIN_NORMALISER = 1.0
# Columns of the targets tensor [N, 6].
_IMG, _CLS, _BOX = 0, 1, slice(2, 6)


@dataclass
class BranchTargets:
    """What one head branch was matched to, for losses built on top (distillation).

    Shapes: B images, A anchors (all levels, P3 first, row-major), C classes, R = ``reg_max``.

    Attributes:
        fg_mask: ``Tensor[B, A]`` bool, positive anchors.
        target_scores: ``Tensor[B, A, C]`` soft class targets (0 on background).
        target_bboxes: ``Tensor[B, A, 4]`` matched boxes, xyxy, grid units of each anchor's level.
        pred_distri: ``Tensor[B, A, 4 * R]`` DFL logits (side-major l, t, r, b), with gradient.
        pred_scores: ``Tensor[B, A, C]`` class logits, with gradient.
        anchor_points: ``Tensor[A, 2]`` anchor centres (x, y), grid units.
        stride_tensor: ``Tensor[A, 1]`` stride of each anchor's level, pixels.
        target_scores_sum: scalar ``Tensor``, the normaliser (>= 1).
    """

    fg_mask: torch.Tensor
    target_scores: torch.Tensor
    target_bboxes: torch.Tensor
    pred_distri: torch.Tensor
    pred_scores: torch.Tensor
    anchor_points: torch.Tensor
    stride_tensor: torch.Tensor
    target_scores_sum: torch.Tensor


@dataclass
class GroundTruth:
    """A batch's targets padded per image to M rows.

    labels ``Tensor[B, M, 1]`` (long), bboxes ``Tensor[B, M, 4]`` (xyxy, pixels), mask
    ``Tensor[B, M, 1]`` (bool, False on padding rows).
    """

    labels: torch.Tensor
    bboxes: torch.Tensor
    mask: torch.Tensor


def _hyp_gain(hyp: dict, key: str) -> float:
    value = hyp.get(key, DEFAULT_HYP[key])
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise UserError(f"hyp key '{key}' must be a non-negative number, got {value!r}")
    return float(value)


def _find_head(model: nn.Module) -> nn.Module:
    model = getattr(model, "module", model)  # unwrap DataParallel / DistributedDataParallel
    if hasattr(model, "reg_max") and hasattr(model, "nc"):
        return model  # the head itself
    head = getattr(model, "head", None)
    if head is None:
        head = model.model[-1]
    return head


class DetectionLoss:
    """Task-aligned detection loss (TAL + BCE + CIoU + DFL) for single and dual heads.

    Args:
        model: a ``DetectionModel`` (or anything with ``.head`` or ``.model[-1]``), or the head
            itself; the head provides ``nc``, ``reg_max`` and ``stride``.
        hyp: hyper-parameters; reads ``box``, ``cls``, ``dfl``, ``aux_weight``, ``cls_pw``,
            ``fl_gamma`` (missing keys take the values of ``DEFAULT_HYP``).
    """

    def __init__(self, model: nn.Module, hyp: dict | None = None) -> None:
        hyp = dict(hyp or {})
        head = _find_head(model)
        self.num_classes = int(head.nc)
        self.reg_max = int(head.reg_max)
        # Python floats: reading them in forward costs no device sync.
        self.strides = [float(s) for s in torch.as_tensor(head.stride).flatten().tolist()]
        if not self.strides or min(self.strides) <= 0:
            raise ValueError("the model's head has no strides yet; build the model before the loss")
        self.box_gain = _hyp_gain(hyp, "box")
        self.cls_gain = _hyp_gain(hyp, "cls")
        self.dfl_gain = _hyp_gain(hyp, "dfl")
        self.aux_weight = _hyp_gain(hyp, "aux_weight")
        self.cls_pos_weight = _hyp_gain(hyp, "cls_pw")
        self.focal_gamma = _hyp_gain(hyp, "fl_gamma")
        self.assigner = TaskAlignedAssigner(topk=TAL_TOPK, num_classes=self.num_classes,
                                            alpha=TAL_ALPHA, beta=TAL_BETA)
        self._bins_cache: dict[torch.device, torch.Tensor] = {}

    def __call__(self, preds: Any, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward(preds, targets)

    def forward(self, preds: Any, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Total loss of a batch.

        Args:
            preds: the head output, train (``list[Tensor[B, no, H_i, W_i]]`` or
                ``[aux_maps, main_maps]``) or eval (tuple; element 1 is used).
            targets: ``Tensor[N, 6]`` (image index, class, cx, cy, w, h), box normalised to the input
                size. On the CPU (as the loader yields it) the padding costs no device sync; on the
                device it costs one (the largest box count per image sets a tensor shape).

        Returns:
            ``loss`` scalar (weighted sum times the batch size, for backward) and ``items``
            ``Tensor[3]`` detached (box, cls, dfl), gains and ``aux_weight`` applied.
        """
        branches = branch_maps(preds)
        first = branches[-1][0]
        gt = self.prepare_targets(targets, first.shape[0], self.input_size(first), first.device)
        total = torch.zeros(3, device=first.device)
        for index, maps in enumerate(branches):
            items, _ = self._branch_loss(maps, gt)
            is_aux = len(branches) > 1 and index < len(branches) - 1
            total = total + (items * self.aux_weight if is_aux else items)
        return total.sum() * first.shape[0], total.detach()

    def branch_loss(self, maps: Sequence[torch.Tensor], targets: torch.Tensor,
                    assign_maps: Sequence[torch.Tensor] | None = None) -> tuple[torch.Tensor, BranchTargets]:
        """Loss of one head branch.

        Args:
            maps: ``list[Tensor[B, no, H_i, W_i]]`` raw maps of one branch (P3 first).
            targets: ``Tensor[N, 6]`` as in :meth:`forward`.
            assign_maps: maps of the same shapes whose scores and boxes the assigner ranks anchors by
                instead of ``maps``' own (a teacher's, for label assignment distillation); no gradient.

        Returns:
            ``Tensor[3]`` gains-weighted (box, cls, dfl) with gradient, and the branch's
            :class:`BranchTargets`.
        """
        first = maps[0]
        gt = self.prepare_targets(targets, first.shape[0], self.input_size(first), first.device)
        if assign_maps is not None:
            for own, other in zip(maps, assign_maps, strict=True):
                if own.shape != other.shape:
                    raise ValueError(f"assign map {tuple(other.shape)} does not match {tuple(own.shape)}")
        return self._branch_loss(maps, gt, assign_maps)

    def input_size(self, first_map: torch.Tensor) -> tuple[float, float]:
        """Input image (height, width) in pixels, from the P3 map ``[B, no, H0, W0]`` and its stride."""
        return first_map.shape[-2] * self.strides[0], first_map.shape[-1] * self.strides[0]

    @staticmethod
    def prepare_targets(targets: torch.Tensor, batch_size: int, img_size: tuple[float, float],
                        device: torch.device) -> GroundTruth:
        """Pad ``targets [N, 6]`` (normalised cx, cy, w, h) per image into xyxy pixel boxes.

        ``img_size`` is (height, width) in pixels. Returns a :class:`GroundTruth` on ``device``
        with M = the largest number of boxes in one image (0 when there are none).
        """
        targets = targets.detach().float().reshape(-1, 6)
        image_idx = targets[:, _IMG].long()
        # scatter_add, unlike bincount, needs no data-dependent output size; the max below is
        # the one value that must reach the host.
        counts = torch.zeros(batch_size, dtype=torch.long, device=targets.device)
        counts.scatter_add_(0, image_idx, torch.ones_like(image_idx))
        num_gt = int(counts.max()) if targets.shape[0] else 0
        if num_gt == 0:
            empty = torch.zeros(batch_size, 0, 1, device=device)
            return GroundTruth(empty.long(), torch.zeros(batch_size, 0, 4, device=device), empty.bool())

        # Row of each box inside its image: stable sort by image, then rank within the image.
        order = torch.sort(image_idx, stable=True).indices
        targets, image_idx = targets[order], image_idx[order]
        first_row = torch.cumsum(counts, 0) - counts
        slot = torch.arange(targets.shape[0], device=targets.device) - first_row[image_idx]

        height, width = img_size
        boxes = xywh2xyxy(targets[:, _BOX])
        # Python scalars, not a new tensor: copying a host tensor to the GPU would sync.
        boxes[:, 0::2] *= width
        boxes[:, 1::2] *= height
        padded = torch.zeros(batch_size, num_gt, 6, device=targets.device)
        rows = torch.cat((targets[:, _CLS:_CLS + 1], boxes, torch.ones_like(targets[:, :1])), 1)
        padded[image_idx, slot] = rows
        padded = padded.to(device, non_blocking=True)
        return GroundTruth(padded[..., :1].long(), padded[..., 1:5], padded[..., 5:6].bool())

    def _bins(self, device: torch.device) -> torch.Tensor:
        if device not in self._bins_cache:
            self._bins_cache[device] = torch.arange(self.reg_max, dtype=torch.float32, device=device)
        return self._bins_cache[device]

    def decode(self, anchor_points: torch.Tensor, pred_distri: torch.Tensor) -> torch.Tensor:
        """DFL logits ``[B, A, 4 * reg_max]`` -> xyxy boxes ``[B, A, 4]`` in grid units (expected bin)."""
        batch, num_anchors, _ = pred_distri.shape
        probs = pred_distri.view(batch, num_anchors, 4, self.reg_max).softmax(-1)
        return dist2bbox(probs @ self._bins(pred_distri.device), anchor_points, xywh=False)

    def _branch_loss(self, maps: Sequence[torch.Tensor], gt: GroundTruth,
                     assign_maps: Sequence[torch.Tensor] | None = None) -> tuple[torch.Tensor, BranchTargets]:
        device_type = maps[0].device.type
        # The loss is computed in float32 even inside an autocast region (fp16 logits overflow).
        with torch.autocast(device_type=device_type, enabled=False):
            ranked = None if assign_maps is None else [m.detach().float() for m in assign_maps]
            return self._branch_loss_fp32([m.float() for m in maps], gt, ranked)

    def _flat_predictions(self, maps: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Head maps -> DFL logits ``[B, A, 4 * reg_max]`` and class logits ``[B, A, C]``."""
        return flatten_maps(maps).contiguous().split((4 * self.reg_max, self.num_classes), -1)

    def _branch_loss_fp32(self, maps: list[torch.Tensor], gt: GroundTruth,
                          assign_maps: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, BranchTargets]:
        pred_distri, pred_scores = self._flat_predictions(maps)
        anchor_points, stride_tensor = make_anchors(maps, self.strides[: len(maps)])
        pred_bboxes = self.decode(anchor_points, pred_distri)  # xyxy, grid units
        if assign_maps is None:  # the usual: the assigner ranks anchors by this branch's own predictions
            rank_scores, rank_bboxes = pred_scores.detach(), pred_bboxes.detach()
        else:
            rank_distri, rank_scores = self._flat_predictions(assign_maps)
            rank_bboxes = self.decode(anchor_points, rank_distri)

        _, target_bboxes, target_scores, fg_mask = self.assigner(
            rank_scores.sigmoid(), rank_bboxes * stride_tensor,
            anchor_points * stride_tensor, gt.labels, gt.bboxes, gt.mask)
        target_bboxes = target_bboxes / stride_tensor
        target_scores_sum = target_scores.sum().clamp(min=MIN_NORMALISER)

        cls_loss = self.classification_loss(pred_scores, target_scores).sum() / target_scores_sum
        # Every anchor is computed and background is weighted by 0: boolean indexing would sync.
        weight = target_scores.sum(-1) * fg_mask  # [B, A]
        iou = bbox_iou(pred_bboxes, target_bboxes, ciou=True)
        box_loss = ((1.0 - iou) * weight).sum() / target_scores_sum
        target_dist = bbox2dist(anchor_points, target_bboxes, self.reg_max - 1)
        dfl_loss = (self.distribution_focal_loss(pred_distri, target_dist) * weight).sum() / target_scores_sum

        items = torch.stack((box_loss * self.box_gain, cls_loss * self.cls_gain, dfl_loss * self.dfl_gain))
        branch = BranchTargets(fg_mask, target_scores, target_bboxes, pred_distri, pred_scores,
                               anchor_points, stride_tensor, target_scores_sum)
        return items, branch

    def classification_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Element-wise BCE-with-logits ``[B, A, C]`` against soft targets; focal when ``fl_gamma > 0``."""
        pos_weight = None
        if self.cls_pos_weight != 1.0:
            # full() fills on the device; torch.tensor() would copy from the host and sync.
            pos_weight = torch.full((), self.cls_pos_weight, device=logits.device)
        loss = F.binary_cross_entropy_with_logits(logits, targets, pos_weight=pos_weight, reduction="none")
        if self.focal_gamma > 0:
            prob = logits.sigmoid()
            p_true = targets * prob + (1 - targets) * (1 - prob)
            alpha = targets * FOCAL_ALPHA + (1 - targets) * (1 - FOCAL_ALPHA)
            loss = loss * alpha * (1.0 - p_true).pow(self.focal_gamma)
        return loss

    def distribution_focal_loss(self, pred_distri: torch.Tensor, target_dist: torch.Tensor) -> torch.Tensor:
        """DFL per anchor ``[B, A]``: CE on the two bins around each ltrb target, mean over the 4 sides.

        ``pred_distri [B, A, 4 * reg_max]`` logits; ``target_dist [B, A, 4]`` distances in grid
        units, already within [0, reg_max - 1 - 0.01].
        """
        batch, num_anchors, _ = pred_distri.shape
        log_probs = pred_distri.view(batch, num_anchors, 4, self.reg_max).log_softmax(-1)
        left = target_dist.long()
        right = left + 1
        weight_left = right.float() - target_dist
        weight_right = 1.0 - weight_left
        nll_left = -log_probs.gather(-1, left[..., None]).squeeze(-1)
        nll_right = -log_probs.gather(-1, right[..., None]).squeeze(-1)
        return (nll_left * weight_left + nll_right * weight_right).mean(-1)
