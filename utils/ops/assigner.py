"""Task-aligned label assignment (TAL) for the anchor-free DFL detection head.

Every anchor point is matched to at most one ground-truth box. A ground truth picks its positives
among the anchors whose centre lies strictly inside it, ranked by an alignment metric that rewards
anchors which both classify the object well and already predict a box that overlaps it:

    align = score(GT class) ** alpha * max(CIoU(GT, predicted box), 0) ** beta

Everything is dense over (batch, GT, anchor), so there is no Python loop and no host-device sync.
"""

from __future__ import annotations

import torch
from torch import nn

from utils.ops.boxes import bbox_iou

# Ranks non-candidate anchors below every candidate in the top-k, whose metric is >= 0.
_NOT_A_CANDIDATE = -1.0


class TaskAlignedAssigner(nn.Module):
    """Assign ground-truth boxes to anchors by the task-aligned metric.

    Args:
        topk: positives kept per ground truth (fewer when fewer anchors lie inside it).
        num_classes: number of classes C of the score tensors.
        alpha: exponent of the classification score in the metric.
        beta: exponent of the CIoU in the metric.
        eps: guards the "strictly inside" test and the normalising divisions.
    """

    def __init__(self, topk: int = 10, num_classes: int = 80, alpha: float = 0.5, beta: float = 6.0,
                 eps: float = 1e-9) -> None:
        super().__init__()
        self.topk = topk
        self.num_classes = num_classes
        self.alpha = alpha
        self.beta = beta
        self.eps = eps

    @torch.no_grad()
    def forward(self, pd_scores: torch.Tensor, pd_bboxes: torch.Tensor, anc_points: torch.Tensor,
                gt_labels: torch.Tensor, gt_bboxes: torch.Tensor, mask_gt: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Match anchors to ground truths.

        Args:
            pd_scores: ``Tensor[B, A, C]`` predicted class probabilities (after the sigmoid).
            pd_bboxes: ``Tensor[B, A, 4]`` predicted boxes, xyxy, pixels.
            anc_points: ``Tensor[A, 2]`` anchor centres (x, y), pixels.
            gt_labels: ``Tensor[B, M, 1]`` class ids (any valid id on padding rows).
            gt_bboxes: ``Tensor[B, M, 4]`` ground-truth boxes, xyxy, pixels.
            mask_gt: ``Tensor[B, M, 1]`` 1 for real boxes, 0 for padding.

        Returns:
            target_labels ``Tensor[B, A]`` (long), target_bboxes ``Tensor[B, A, 4]`` (xyxy, pixels),
            target_scores ``Tensor[B, A, C]`` (soft one-hot, 0 on background) and
            fg_mask ``Tensor[B, A]`` (bool, True for positives).
        """
        batch, num_anchors, _ = pd_scores.shape
        num_gt = gt_bboxes.shape[1]
        device, dtype = pd_scores.device, pd_scores.dtype
        if num_gt == 0:
            return (torch.zeros(batch, num_anchors, dtype=torch.long, device=device),
                    torch.zeros(batch, num_anchors, 4, dtype=gt_bboxes.dtype, device=device),
                    torch.zeros(batch, num_anchors, self.num_classes, dtype=dtype, device=device),
                    torch.zeros(batch, num_anchors, dtype=torch.bool, device=device))

        labels = gt_labels.long().squeeze(-1)  # [B, M]
        valid_gt = mask_gt.squeeze(-1).bool()  # [B, M]
        candidates = self.anchors_inside(anc_points, gt_bboxes) & valid_gt[..., None]  # [B, M, A]
        align, overlaps = self.alignment_metric(pd_scores, pd_bboxes, labels, gt_bboxes, candidates)

        mask_pos = self.select_topk(align, candidates)
        mask_pos, target_gt_idx, fg_mask = self.resolve_multiple_gts(mask_pos, overlaps)

        target_labels = labels.gather(1, target_gt_idx)  # [B, A]
        target_bboxes = gt_bboxes.gather(1, target_gt_idx[..., None].expand(-1, -1, 4))  # [B, A, 4]
        one_hot = torch.zeros(batch, num_anchors, self.num_classes, dtype=dtype, device=device)
        one_hot.scatter_(-1, target_labels[..., None], 1.0)

        # Soft targets: each GT's best-aligned positive gets that GT's best IoU, the others scale
        # down with their alignment, so the classifier learns to predict localisation quality.
        align = align * mask_pos
        overlaps = overlaps * mask_pos
        best_align = align.amax(dim=-1, keepdim=True)  # [B, M, 1]
        best_overlap = overlaps.amax(dim=-1, keepdim=True)  # [B, M, 1]
        norm_align = (align * best_overlap / (best_align + self.eps)).amax(dim=1)  # [B, A]
        target_scores = one_hot * (norm_align * fg_mask)[..., None]
        return target_labels, target_bboxes, target_scores, fg_mask

    def anchors_inside(self, anc_points: torch.Tensor, gt_bboxes: torch.Tensor) -> torch.Tensor:
        """``Tensor[B, M, A]`` bool: anchor centre ``[A, 2]`` strictly inside xyxy ``gt_bboxes [B, M, 4]``."""
        x, y = anc_points[:, 0], anc_points[:, 1]  # [A]
        x1, y1, x2, y2 = (side[..., None] for side in gt_bboxes.unbind(-1))  # [B, M, 1] each
        # Pairwise minima keep the peak memory at a few [B, M, A] tensors (no [B, M, A, 4]).
        margin_x = torch.minimum(x - x1, x2 - x)
        margin_y = torch.minimum(y - y1, y2 - y)
        return torch.minimum(margin_x, margin_y) > self.eps

    def alignment_metric(self, pd_scores: torch.Tensor, pd_bboxes: torch.Tensor, labels: torch.Tensor,
                         gt_bboxes: torch.Tensor, candidates: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """Alignment metric and CIoU (clamped at 0), both ``Tensor[B, M, A]``, zero off ``candidates``.

        ``labels`` is ``Tensor[B, M]`` (long); the other shapes are those of :meth:`forward`.
        """
        num_anchors = pd_scores.shape[1]
        # Score of each GT's own class at every anchor: [B, C, A] gathered along C -> [B, M, A].
        gt_class_scores = pd_scores.transpose(1, 2).gather(1, labels[..., None].expand(-1, -1, num_anchors))
        overlaps = bbox_iou(gt_bboxes[:, :, None], pd_bboxes[:, None], ciou=True).clamp_(min=0)
        overlaps = overlaps.to(pd_scores.dtype) * candidates
        align = gt_class_scores.pow(self.alpha) * overlaps.pow(self.beta) * candidates
        return align, overlaps

    def select_topk(self, align: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """``Tensor[B, M, A]`` bool: the ``topk`` best-aligned candidates of each GT.

        Non-candidates rank below every candidate, so a candidate whose metric is still 0 (early in
        training) is preferred to an anchor outside the box and the mask stays a subset of candidates.
        """
        k = min(self.topk, align.shape[-1])
        ranked = align.masked_fill(~candidates, _NOT_A_CANDIDATE)
        top_idx = ranked.topk(k, dim=-1).indices  # [B, M, k]
        chosen = torch.zeros_like(candidates).scatter_(-1, top_idx, True)
        return chosen & candidates

    @staticmethod
    def resolve_multiple_gts(mask_pos: torch.Tensor, overlaps: torch.Tensor
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Give an anchor chosen by several GTs to the one it overlaps most (CIoU).

        Args:
            mask_pos: ``Tensor[B, M, A]`` bool, positives per GT.
            overlaps: ``Tensor[B, M, A]`` CIoU of each GT with each anchor's predicted box.

        Returns:
            mask_pos ``Tensor[B, M, A]`` (bool, at most one GT per anchor), target_gt_idx
            ``Tensor[B, A]`` (long; 0 for background) and fg_mask ``Tensor[B, A]`` (bool).
        """
        # Only the GTs that chose the anchor compete; -1 keeps the others out of the argmax.
        best_gt = overlaps.masked_fill(~mask_pos, _NOT_A_CANDIDATE).argmax(dim=1)  # [B, A]
        fg_mask = mask_pos.any(dim=1)
        single = torch.zeros_like(mask_pos).scatter_(1, best_gt[:, None], True)
        mask_pos = single & fg_mask[:, None]
        return mask_pos, best_gt * fg_mask, fg_mask
