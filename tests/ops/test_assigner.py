"""CIoU and the task-aligned assigner on small hand-made cases.

The grid used throughout: one 4x4 level at stride 8 (a 32x32 image), anchor centres at
4, 12, 20, 28 px on each axis, numbered row-major (index = 4 * row + column).
"""

import math

import pytest
import torch

from models.anchors import make_anchors
from utils.ops.assigner import TaskAlignedAssigner
from utils.ops.boxes import bbox_iou

STRIDE = 8
GRID = 4


def anchor_points_px() -> torch.Tensor:
    points, strides = make_anchors([torch.zeros(1, 1, GRID, GRID)], [STRIDE])
    return points * strides


def anchor_index(x: float, y: float) -> int:
    return int(y // STRIDE) * GRID + int(x // STRIDE)


def assign(assigner, scores, pred_boxes, gt_boxes, gt_labels, mask=None):
    gt_boxes = torch.tensor(gt_boxes, dtype=torch.float32)[None]
    labels = torch.tensor(gt_labels, dtype=torch.long).view(1, -1, 1)
    if mask is None:
        mask = torch.ones(1, gt_boxes.shape[1], 1, dtype=torch.bool)
    return assigner(scores[None], pred_boxes[None], anchor_points_px(), labels, gt_boxes, mask)


# ---- CIoU ---------------------------------------------------------------------------------------

def test_ciou_identical_boxes_is_one():
    box = torch.tensor([[3.0, 5.0, 20.0, 11.0]])
    assert bbox_iou(box, box).item() == pytest.approx(1.0, abs=1e-5)


def test_ciou_disjoint_boxes_is_negative():
    # IoU 0, same aspect ratio: CIoU = -rho^2 / c^2 = -(3^2 + 3^2) / (4^2 + 4^2).
    ciou = bbox_iou(torch.tensor([0.0, 0.0, 1.0, 1.0]), torch.tensor([3.0, 3.0, 4.0, 4.0])).item()
    assert ciou < 0
    assert ciou == pytest.approx(-18 / 32, abs=1e-5)


def test_ciou_shifted_square_by_hand():
    # Two 4x4 squares shifted by 2 px: IoU = 8 / 24, centres 2 px apart, enclosing box 6x4.
    ciou = bbox_iou(torch.tensor([0.0, 0.0, 4.0, 4.0]), torch.tensor([2.0, 0.0, 6.0, 4.0])).item()
    assert ciou == pytest.approx(1 / 3 - 4 / 52, abs=1e-5)


def test_ciou_aspect_ratio_term_by_hand():
    # 2x2 inside 4x2 sharing a corner: IoU 0.5, rho^2 = 1, c^2 = 20, plus the aspect-ratio penalty.
    ciou = bbox_iou(torch.tensor([0.0, 0.0, 2.0, 2.0]), torch.tensor([0.0, 0.0, 4.0, 2.0])).item()
    v = 4 / math.pi**2 * (math.atan(2.0) - math.atan(1.0)) ** 2
    alpha = v / (v - 0.5 + 1)
    assert ciou == pytest.approx(0.5 - 1 / 20 - alpha * v, abs=1e-5)


# ---- candidates and top-k -----------------------------------------------------------------------

def test_candidates_are_anchors_strictly_inside():
    # [4, 4, 20, 20] has anchors on its edges at 4 and 20: only (12, 12) is strictly inside.
    scores = torch.full((GRID * GRID, 1), 0.5)
    preds = torch.tensor([4.0, 4.0, 20.0, 20.0]).expand(GRID * GRID, 4)
    _, _, _, fg = assign(TaskAlignedAssigner(topk=10, num_classes=1), scores, preds,
                         [[4.0, 4.0, 20.0, 20.0]], [0])
    assert fg[0].nonzero().flatten().tolist() == [anchor_index(12, 12)]


def test_topk_limits_positives_to_best_aligned():
    gt = [0.0, 0.0, 16.0, 16.0]  # holds anchors 0, 1, 4, 5
    preds = torch.tensor(gt).expand(GRID * GRID, 4)  # CIoU 1 everywhere: the score decides
    scores = torch.full((GRID * GRID, 1), 0.1)
    scores[[0, 1, 4, 5], 0] = torch.tensor([0.2, 0.9, 0.5, 0.7])
    scores[[2, 8], 0] = 0.99  # outside the box: never positive however well they score
    _, _, _, fg_all = assign(TaskAlignedAssigner(topk=10, num_classes=1), scores, preds, [gt], [0])
    _, _, _, fg_two = assign(TaskAlignedAssigner(topk=2, num_classes=1), scores, preds, [gt], [0])
    assert fg_all[0].nonzero().flatten().tolist() == [0, 1, 4, 5]
    assert fg_two[0].nonzero().flatten().tolist() == [1, 5]


def test_candidate_with_zero_metric_still_beats_outside_anchor():
    # Predicted boxes far away give CIoU <= 0, so every metric is 0: all 4 candidates must remain.
    preds = torch.tensor([100.0, 100.0, 110.0, 110.0]).expand(GRID * GRID, 4)
    scores = torch.full((GRID * GRID, 1), 0.5)
    _, _, target_scores, fg = assign(TaskAlignedAssigner(topk=4, num_classes=1), scores, preds,
                                     [[0.0, 0.0, 16.0, 16.0]], [0])
    assert fg[0].nonzero().flatten().tolist() == [0, 1, 4, 5]
    assert torch.all(target_scores == 0)


# ---- conflicts, targets and normalisation -------------------------------------------------------

def two_gt_case():
    gt1, gt2 = [0.0, 0.0, 16.0, 16.0], [8.0, 8.0, 32.0, 32.0]  # both hold anchor 5 = (12, 12)
    preds = torch.tensor(gt2).repeat(GRID * GRID, 1)
    preds[[0, 1, 4]] = torch.tensor(gt1)
    preds[5] = torch.tensor([9.0, 9.0, 31.0, 31.0])  # much closer to gt2 than to gt1
    scores = 0.3 + 0.4 * torch.rand(GRID * GRID, 2)  # distinct, so the top-k has no ties
    return gt1, gt2, preds, scores


def test_overlapped_anchor_goes_to_gt_with_highest_iou():
    gt1, gt2, preds, scores = two_gt_case()
    labels, boxes, target_scores, fg = assign(TaskAlignedAssigner(topk=10, num_classes=2),
                                              scores, preds, [gt1, gt2], [0, 1])
    assert fg[0].sum().item() == 3 + 9
    assert labels[0, 5].item() == 1
    assert boxes[0, 5].tolist() == gt2
    assert labels[0, [0, 1, 4]].tolist() == [0, 0, 0]
    assert torch.all(boxes[0, [0, 1, 4]] == torch.tensor(gt1))
    # One-hot targets: the other class is 0 at every positive.
    assert torch.all(target_scores[0, [0, 1, 4], 1] == 0)
    assert torch.all(target_scores[0, 5, 0] == 0)


def test_target_scores_best_anchor_gets_its_iou():
    gt = torch.tensor([0.0, 0.0, 16.0, 16.0])
    # Different shifts give different CIoUs; equal scores, so alignment follows CIoU.
    preds = gt.repeat(GRID * GRID, 1)
    shifts = {0: 1.0, 1: 2.0, 4: 3.0, 5: 4.0}
    for index, shift in shifts.items():
        preds[index] = gt + shift
    scores = torch.full((GRID * GRID, 1), 0.5)
    _, _, target_scores, fg = assign(TaskAlignedAssigner(topk=10, num_classes=1), scores, preds,
                                     [gt.tolist()], [0])
    ious = bbox_iou(gt, preds[[0, 1, 4, 5]])
    best_iou = ious.max()
    targets = target_scores[0, [0, 1, 4, 5], 0]
    assert targets[0].item() == pytest.approx(best_iou.item(), rel=1e-5)  # the 1-px shift
    # The others scale by their alignment relative to the best: (iou / best_iou)^6 * best_iou.
    expected = (ious / best_iou) ** 6 * best_iou
    torch.testing.assert_close(targets, expected, rtol=1e-5, atol=1e-7)
    assert torch.all(target_scores[0, ~fg[0]] == 0)


def test_padding_gts_are_ignored():
    gt1, gt2, preds, scores = two_gt_case()
    assigner = TaskAlignedAssigner(topk=10, num_classes=2)
    reference = assign(assigner, scores, preds, [gt1, gt2], [0, 1])
    # A padding row covering the whole image, with mask 0, must change nothing.
    padded = assign(assigner, scores, preds, [gt1, [0.0, 0.0, 32.0, 32.0], gt2], [0, 1, 1],
                    mask=torch.tensor([1, 0, 1], dtype=torch.bool).view(1, 3, 1))
    for want, got in zip(reference, padded):
        assert torch.equal(want, got)


def test_batch_equals_images_one_by_one():
    gt1, gt2, preds, scores = two_gt_case()
    assigner = TaskAlignedAssigner(topk=3, num_classes=2)
    first = assign(assigner, scores, preds, [gt1, gt2], [0, 1])
    # Image 2 has only one real box; its second row is padding.
    second = assign(assigner, scores.flip(0), preds, [gt2, [0.0, 0.0, 0.0, 0.0]], [1, 0],
                    mask=torch.tensor([1, 0], dtype=torch.bool).view(1, 2, 1))
    batched = assigner(torch.stack((scores, scores.flip(0))), torch.stack((preds, preds)),
                       anchor_points_px(), torch.tensor([[[0], [1]], [[1], [0]]]),
                       torch.tensor([[gt1, gt2], [gt2, [0.0] * 4]]),
                       torch.tensor([[[1], [1]], [[1], [0]]], dtype=torch.bool))
    for index, got in enumerate(batched):
        assert torch.equal(got[0], first[index][0])
        assert torch.equal(got[1], second[index][0])
    assert batched[3][0].sum().item() == 6  # top-3 per GT, 2 GTs, no shared anchor chosen


def test_no_gts_gives_background():
    assigner = TaskAlignedAssigner(topk=10, num_classes=3)
    scores = torch.rand(2, GRID * GRID, 3)
    preds = torch.tensor([0.0, 0.0, 8.0, 8.0]).expand(2, GRID * GRID, 4)
    labels, boxes, target_scores, fg = assigner(scores, preds, anchor_points_px(),
                                                torch.zeros(2, 0, 1), torch.zeros(2, 0, 4),
                                                torch.zeros(2, 0, 1))
    assert labels.shape == (2, GRID * GRID) and boxes.shape == (2, GRID * GRID, 4)
    assert target_scores.shape == (2, GRID * GRID, 3) and not fg.any()
    assert torch.all(target_scores == 0)
    # Rows that are all padding behave the same.
    _, _, target_scores, fg = assigner(scores, preds, anchor_points_px(), torch.zeros(2, 2, 1),
                                       torch.tensor([0.0, 0.0, 32.0, 32.0]).expand(2, 2, 4),
                                       torch.zeros(2, 2, 1))
    assert not fg.any() and torch.all(target_scores == 0)
