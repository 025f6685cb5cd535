"""utils/eval/metrics.py and utils/eval/coco.py: AP on known cases, COCO agreement, confusion matrix, plots."""

import numpy as np
import pytest
import torch

from utils.eval.coco import CocoJsonWriter, coco80_to_coco91, coco_evaluate
from utils.eval.metrics import ConfusionMatrix, DetectionStats, fitness, match_predictions

GT = torch.tensor([[0, 10.0, 10.0, 110.0, 110.0], [1, 200.0, 50.0, 260.0, 150.0]])  # cls, xyxy


def det(rows):
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 6)


def metrics_for(dets, labels, nc=2):
    stats = DetectionStats(nc)
    stats.update(dets, labels)
    return stats.compute()


def shift_for_iou(iou: float, side: float = 100.0) -> float:
    """x-shift of a side x side box that gives ``iou`` with the unshifted box: (s - d) / (s + d)."""
    return side * (1 - iou) / (1 + iou)


def test_perfect_detections():
    dets = [torch.cat((GT[:, 1:], torch.tensor([[0.9], [0.8]]), GT[:, :1]), 1)]
    r = metrics_for(dets, [GT])
    assert r.map50 == pytest.approx(1.0) and r.map == pytest.approx(1.0)
    assert r.mp == pytest.approx(1.0) and r.mr == pytest.approx(1.0)
    assert r.instances.tolist() == [1, 1] and r.images.tolist() == [1, 1]


def test_no_detections():
    r = metrics_for([det([])], [GT])
    assert r.map50 == 0.0 and r.map == 0.0 and r.mr == 0.0


@pytest.mark.parametrize("iou, matched_thresholds", [(0.72, 5), (0.52, 1), (0.97, 10), (0.45, 0)])
def test_shifted_box_at_known_iou(iou, matched_thresholds):
    d = shift_for_iou(iou)
    dets = [det([[10 + d, 10, 110 + d, 110, 0.9, 0]])]
    r = metrics_for(dets, [GT[:1]], nc=1)
    assert r.map50 == pytest.approx(1.0 if matched_thresholds else 0.0)
    assert r.map == pytest.approx(matched_thresholds / 10)


def test_duplicate_is_false_positive():
    # two predictions on one box: the lower-confidence one is a false positive at every threshold
    dets = [det([[10, 10, 110, 110, 0.9, 0], [11, 10, 111, 110, 0.8, 0]])]
    correct = match_predictions(dets, [GT[:1]])[0]
    assert correct[0].all() and not correct[1].any()
    # a false positive ranked above the true positive halves the precision at full recall
    dets = [det([[300, 300, 350, 350, 0.95, 0], [10, 10, 110, 110, 0.5, 0]])]
    r = metrics_for(dets, [GT[:1]], nc=1)
    assert r.map50 == pytest.approx(0.5) and r.map == pytest.approx(0.5)


def test_greedy_by_confidence_like_coco():
    # A (higher conf) overlaps the box at IoU 0.6, B at 0.97: A takes the box where it can (<= 0.6),
    # B takes it at the stricter thresholds where A cannot
    a = shift_for_iou(0.6)
    dets = [det([[10 + a, 10, 110 + a, 110, 0.9, 0], [11, 10, 111, 110, 0.8, 0]])]
    correct = match_predictions(dets, [GT[:1]])[0]
    assert correct[0].tolist() == [True] * 3 + [False] * 7
    assert correct[1].tolist() == [False] * 3 + [True] * 7


def test_wrong_class_does_not_match_and_order_is_kept():
    dets = [det([[200, 50, 260, 150, 0.3, 0], [10, 10, 110, 110, 0.9, 0]])]  # first row: box of class 1
    correct = match_predictions(dets, [GT])[0]
    assert not correct[0].any() and correct[1].all()
    r = metrics_for(dets, [GT])
    assert r.ap[:, 0].tolist() == pytest.approx([1.0, 0.0])  # class 1 missed: mAP averages to 0.5
    assert r.map50 == pytest.approx(0.5)


def random_set(seed: int, images: int = 20, nc: int = 3, size: float = 320.0):
    """Jittered ground truth, class flips, duplicates and random false positives, <= 100 per image."""
    g = torch.Generator().manual_seed(seed)
    dets, labels = [], []
    for _ in range(images):
        m = int(torch.randint(1, 10, (1,), generator=g))
        xy = torch.rand(m, 2, generator=g) * (size - 80)
        lab = torch.cat((torch.randint(0, nc, (m, 1), generator=g).float(), xy,
                         xy + torch.rand(m, 2, generator=g) * 60 + 15), 1)
        boxes = torch.cat((lab[:, 1:] + torch.randn(m, 4, generator=g) * 2,
                           lab[:, 1:] + torch.randn(m, 4, generator=g) * 6))
        cls = lab[:, 0].repeat(2)
        flip = torch.rand(2 * m, generator=g) < 0.1
        cls[flip] = (cls[flip] + 1) % nc
        k = int(torch.randint(0, 20, (1,), generator=g))
        fp_xy = torch.rand(k, 2, generator=g) * (size - 80)
        boxes = torch.cat((boxes, torch.cat((fp_xy, fp_xy + 40), 1)))
        cls = torch.cat((cls, torch.randint(0, nc, (k,), generator=g).float()))
        conf = torch.rand(len(boxes), generator=g)
        d = torch.cat((boxes, conf[:, None], cls[:, None]), 1)
        dets.append(d[d[:, 4].argsort(descending=True)][:100])
        labels.append(lab)
    return dets, labels


@pytest.mark.parametrize("seed", [0, 1])
def test_agrees_with_faster_coco_eval(seed):
    dets, labels = random_set(seed)
    ours = metrics_for(dets, labels, nc=3)
    writer = CocoJsonWriter(["a", "b", "c"])
    for i, (d, lab) in enumerate(zip(dets, labels)):
        writer.add(f"image_{i}.jpg", (320, 320), lab, d)
    coco = coco_evaluate(writer.ground_truth(), writer.predictions, max_det=100, evaluator="faster-coco-eval")
    assert 0.1 < coco["map"] < 0.9  # a non-trivial case
    assert ours.map == pytest.approx(coco["map"], abs=0.005)
    assert ours.map50 == pytest.approx(coco["map50"], abs=0.005)


def test_coco_json_fields():
    writer = CocoJsonWriter(["a", "b"])
    image_id = writer.add("000000000139.jpg", (480, 640), GT, det([[10, 20, 50, 80, 0.5, 1]]))
    gt = writer.ground_truth()
    assert image_id == 139 and gt["images"][0] == {"id": 139, "file_name": "000000000139.jpg",
                                                   "height": 480, "width": 640}
    assert gt["annotations"][0]["bbox"] == [10.0, 10.0, 100.0, 100.0]
    assert gt["annotations"][0]["area"] == 10000.0 and gt["annotations"][0]["iscrowd"] == 0
    assert writer.predictions == [{"image_id": 139, "category_id": 1, "bbox": [10.0, 20.0, 40.0, 60.0],
                                   "score": 0.5}]
    ids = coco80_to_coco91()
    assert len(ids) == 80 and ids[:3] == [1, 2, 3] and ids[-1] == 90 and 12 not in ids


def test_confusion_matrix():
    cm = ConfusionMatrix(nc=2, conf_thres=0.25, iou_thres=0.45)
    dets = det([[10, 10, 110, 110, 0.9, 0],      # correct, class 0
                [200, 50, 260, 150, 0.8, 0],     # on the class-1 box but says class 0
                [400, 400, 450, 450, 0.7, 1],    # background
                [10, 10, 110, 110, 0.1, 1]])     # below conf_thres: ignored
    labels = torch.cat((GT, torch.tensor([[1, 500.0, 10.0, 540.0, 60.0]])))  # last box is missed
    cm.update(dets, labels)
    expected = np.array([[1, 1, 0],
                         [0, 0, 1],
                         [0, 1, 0]])
    assert cm.matrix.tolist() == expected.tolist()


def test_fitness():
    assert fitness({"map50": 0.8, "map": 0.5}) == pytest.approx(0.53)
    assert fitness([0.0, 0.0, 0.8, 0.5]) == pytest.approx(0.53)


def test_plots_write_files(tmp_path):
    from utils.eval.plots import plot_images, plot_labels, plot_results

    dets, labels = random_set(2, images=4)
    stats = DetectionStats(3)
    stats.update(dets, labels)
    r = stats.compute()
    cm = ConfusionMatrix(3)
    for d, lab in zip(dets, labels):
        cm.update(d, lab)
    cm.plot(tmp_path / "cm.png", ["a", "b", "c"])
    (tmp_path / "results.csv").write_text("epoch,train/box_loss,metrics/mAP_0.5,note\n0,1.5,0.1,x\n1,1.2,0.3,y\n")
    assert plot_results(tmp_path / "results.csv") == tmp_path / "results.png"
    plot_labels([np.array([[0, 0.5, 0.5, 0.2, 0.3]]), np.array([[2, 0.1, 0.2, 0.05, 0.05]])], ["a", "b", "c"],
                tmp_path)
    imgs = torch.randint(0, 255, (3, 3, 64, 96), dtype=torch.uint8)
    targets = torch.tensor([[0, 1, 0.5, 0.5, 0.4, 0.4], [2, 0, 0.3, 0.3, 0.2, 0.2]])
    mosaic = plot_images(imgs, targets, ["a.jpg", "b.jpg", "c.jpg"], tmp_path / "batch.jpg", ["a", "b"])
    assert mosaic.shape == (128, 192, 3)
    for name in ("cm.png", "results.png", "labels.jpg", "batch.jpg"):
        assert (tmp_path / name).stat().st_size > 1000
    assert r.pr_curve.shape == (len(r.classes), 1000) and 0 <= r.best_conf <= 1
