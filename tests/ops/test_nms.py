"""utils/ops/nms.py: equal to torchvision's NMS, thresholds, multi-label, class filter, max_det."""

import pytest
import torch
from torchvision.ops import batched_nms, nms

from utils.ops.boxes import xywh2xyxy
from utils.ops.nms import non_max_suppression


def random_pred(batch: int = 2, nc: int = 4, anchors: int = 300, size: float = 128.0) -> torch.Tensor:
    """Decoded predictions [B, 4 + nc, A]: clustered boxes (so that NMS has work) and random scores."""
    g = torch.Generator().manual_seed(1)
    centres = torch.rand(batch, 2, anchors, generator=g) * size / 4 + size / 3
    sizes = torch.rand(batch, 2, anchors, generator=g) * size / 3 + 4
    scores = torch.rand(batch, nc, anchors, generator=g) * 0.98 + 0.01
    return torch.cat((centres, sizes, scores), 1)


@pytest.mark.parametrize("iou_thres", [0.3, 0.45, 0.7])
def test_equals_torchvision_batched_nms(iou_thres):
    pred = random_pred()
    out = non_max_suppression(pred, conf_thres=0.0, iou_thres=iou_thres, max_det=10_000)
    for b in range(pred.shape[0]):
        boxes = xywh2xyxy(pred[b, :4].T)
        conf, cls = pred[b, 4:].max(0)
        keep = batched_nms(boxes, conf, cls, iou_thres)
        expected = torch.cat((boxes[keep], conf[keep, None], cls[keep, None].float()), 1)
        assert out[b].shape == expected.shape
        assert torch.equal(out[b], expected)
        assert out[b].shape[0] < pred.shape[2]  # the clustered boxes really overlap


def test_agnostic_equals_torchvision_nms():
    pred = random_pred(batch=1)
    out = non_max_suppression(pred, conf_thres=0.0, iou_thres=0.5, agnostic=True, max_det=10_000)[0]
    boxes = xywh2xyxy(pred[0, :4].T)
    conf, cls = pred[0, 4:].max(0)
    keep = nms(boxes, conf, 0.5)
    assert torch.equal(out[:, :4], boxes[keep])
    assert torch.equal(out[:, 5], cls[keep].float())


def test_conf_threshold_and_sorted_output():
    pred = random_pred()
    out = non_max_suppression(pred, conf_thres=0.6, iou_thres=0.5)
    for det in out:
        assert det.shape[1] == 6 and det.dtype == torch.float32
        assert bool((det[:, 4] > 0.6).all())
        assert bool((det[1:, 4] <= det[:-1, 4]).all())


def test_multi_label_one_box_per_class_above_threshold():
    # one anchor, 3 classes: two above the threshold
    pred = torch.tensor([[[50.0], [50.0], [20.0], [20.0], [0.9], [0.1], [0.7]]])
    single = non_max_suppression(pred, conf_thres=0.5, multi_label=False)[0]
    multi = non_max_suppression(pred, conf_thres=0.5, multi_label=True)[0]
    assert single.shape[0] == 1 and single[0, 5] == 0
    assert multi.shape[0] == 2
    assert sorted(multi[:, 5].tolist()) == [0.0, 2.0]
    assert torch.allclose(multi[:, :4], torch.tensor([[40.0, 40.0, 60.0, 60.0]]).expand(2, 4))
    assert sorted(multi[:, 4].tolist()) == pytest.approx([0.7, 0.9])


def test_class_filter():
    pred = random_pred(nc=5)
    out = non_max_suppression(pred, conf_thres=0.1, classes=[1, 3], multi_label=True)
    assert all(set(det[:, 5].long().tolist()) <= {1, 3} for det in out)
    assert sum(len(det) for det in out) > 0


def test_max_det_keeps_the_best():
    pred = random_pred()
    full = non_max_suppression(pred, conf_thres=0.0, iou_thres=0.9, max_det=10_000)[0]
    capped = non_max_suppression(pred, conf_thres=0.0, iou_thres=0.9, max_det=7)[0]
    assert capped.shape[0] == 7
    assert torch.equal(capped, full[:7])


def test_nothing_above_threshold_gives_empty():
    pred = random_pred()
    pred[:, 4:] = 0.001
    out = non_max_suppression(pred, conf_thres=0.25)
    assert [tuple(d.shape) for d in out] == [(0, 6), (0, 6)]


def test_half_input():
    pred = random_pred(batch=1)
    out = non_max_suppression(pred.half(), conf_thres=0.5)[0]
    assert out.dtype == torch.float32 and len(out) > 0
