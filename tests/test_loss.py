"""DetectionLoss: target padding, the three terms, gains from hyp, dual heads, gradients, autocast.

Most tests use a tiny stand-in head (pooled image -> 1x1 conv per level) so that they run in
milliseconds; the overfitting test at the end uses a real model yaml.
"""

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from utils.core.errors import UserError
from utils.loss import DEFAULT_HYP, BranchTargets, DetectionLoss

ROOT = Path(__file__).resolve().parents[1]
IMG = 64
STRIDES = (8.0, 16.0, 32.0)
REG_MAX = 16
NUM_CLASSES = 3
NUM_ANCHORS = sum((IMG // int(s)) ** 2 for s in STRIDES)  # 64 + 16 + 4


class TinyHead(nn.Module):
    """Stand-in for DDetect / DualDDetect: one 1x1 conv per level (and per branch) on a pooled image."""

    def __init__(self, branches: int = 1, nc: int = NUM_CLASSES) -> None:
        super().__init__()
        self.nc, self.reg_max, self.nl = nc, REG_MAX, len(STRIDES)
        self.no = nc + 4 * REG_MAX
        self.register_buffer("stride", torch.tensor(STRIDES))
        self.branches = nn.ModuleList(
            nn.ModuleList(nn.Conv2d(3, self.no, 1) for _ in STRIDES) for _ in range(branches))

    def forward(self, x: torch.Tensor):
        pooled = [nn.functional.avg_pool2d(x, int(s)) for s in STRIDES]
        out = [[conv(p) for conv, p in zip(convs, pooled)] for convs in self.branches]
        return out[0] if len(out) == 1 else out


class TinyModel(nn.Module):
    def __init__(self, branches: int = 1) -> None:
        super().__init__()
        self.model = nn.Sequential(TinyHead(branches))

    @property
    def head(self) -> TinyHead:
        return self.model[-1]

    def forward(self, x):
        return self.model(x)


def sample_targets() -> torch.Tensor:
    """Image 0: two boxes, image 1: one box; (image, class, cx, cy, w, h) normalised."""
    return torch.tensor([[0, 1, 0.30, 0.30, 0.40, 0.30],
                         [1, 2, 0.60, 0.50, 0.50, 0.60],
                         [0, 0, 0.70, 0.70, 0.30, 0.40]])


def run_loss(model, imgs, targets, hyp=None):
    loss_fn = DetectionLoss(model, hyp if hyp is not None else dict(DEFAULT_HYP))
    return loss_fn(model(imgs), targets)


# ---- targets ------------------------------------------------------------------------------------

def test_prepare_targets_pads_per_image_and_scales_to_pixels():
    targets = torch.tensor([[2, 1, 0.5, 0.5, 0.5, 0.25],
                            [0, 2, 0.25, 0.5, 0.5, 0.5],
                            [2, 0, 0.75, 0.75, 0.25, 0.5]])
    gt = DetectionLoss.prepare_targets(targets, 3, (64.0, 128.0), torch.device("cpu"))
    assert gt.bboxes.shape == (3, 2, 4) and gt.labels.shape == (3, 2, 1)
    assert gt.mask[..., 0].tolist() == [[True, False], [False, False], [True, True]]
    assert gt.labels[2, :, 0].tolist() == [1, 0]  # order within an image is kept
    assert gt.bboxes[2, 0].tolist() == [32.0, 24.0, 96.0, 40.0]  # width 128, height 64
    assert gt.bboxes[0, 0].tolist() == [0.0, 16.0, 64.0, 48.0]
    empty = DetectionLoss.prepare_targets(torch.zeros(0, 6), 2, (64.0, 64.0), torch.device("cpu"))
    assert empty.bboxes.shape == (2, 0, 4)


def test_target_order_does_not_change_the_loss():
    model = TinyModel()
    imgs = torch.rand(2, 3, IMG, IMG)
    targets = sample_targets()
    loss_a, items_a = run_loss(model, imgs, targets)
    loss_b, items_b = run_loss(model, imgs, targets.flip(0))
    torch.testing.assert_close(loss_a, loss_b)
    torch.testing.assert_close(items_a, items_b)


# ---- the three terms ----------------------------------------------------------------------------

def constant_maps(batch: int, cls_logit: float) -> list[torch.Tensor]:
    maps = []
    for stride in STRIDES:
        side = IMG // int(stride)
        m = torch.zeros(batch, 4 * REG_MAX + NUM_CLASSES, side, side)
        m[:, 4 * REG_MAX:] = cls_logit
        maps.append(m)
    return maps


def test_no_boxes_gives_zero_box_and_dfl_and_hand_computed_cls():
    loss_fn = DetectionLoss(TinyModel(), dict(DEFAULT_HYP))
    logit = -2.0
    loss, items = loss_fn(constant_maps(2, logit), torch.zeros(0, 6))
    # Every target is 0: BCE = softplus(logit) per anchor and class, summed, normaliser 1.
    expected_cls = DEFAULT_HYP["cls"] * 2 * NUM_ANCHORS * NUM_CLASSES * math.log1p(math.exp(logit))
    assert items[0].item() == 0 and items[2].item() == 0
    assert items[1].item() == pytest.approx(expected_cls, rel=1e-5)
    assert loss.item() == pytest.approx(2 * expected_cls, rel=1e-5)  # times the batch size


def test_image_without_boxes_has_no_positives():
    model = TinyModel()
    loss_fn = DetectionLoss(model, dict(DEFAULT_HYP))
    targets = sample_targets()[sample_targets()[:, 0] == 0]  # image 1 of 2 has no boxes
    items, branch = loss_fn.branch_loss(model(torch.rand(2, 3, IMG, IMG)), targets)
    assert isinstance(branch, BranchTargets)
    assert branch.fg_mask[0].any() and not branch.fg_mask[1].any()
    assert torch.all(branch.target_scores[1] == 0)
    assert torch.isfinite(items).all()


def test_batch_without_any_box_gives_finite_loss_and_gradients():
    model = TinyModel()
    loss, items = run_loss(model, torch.rand(2, 3, IMG, IMG), torch.zeros(0, 6))
    loss.backward()
    assert torch.isfinite(loss) and items[0] == 0 and items[2] == 0 and items[1] > 0
    cls_bias_grad = model.head.branches[0][0].bias.grad[4 * REG_MAX:]
    assert torch.isfinite(cls_bias_grad).all() and cls_bias_grad.abs().sum() > 0


def test_dfl_by_hand():
    loss_fn = DetectionLoss(TinyModel(), dict(DEFAULT_HYP))
    targets = torch.tensor([[[2.3, 0.0, 7.5, 14.99]]])
    uniform = torch.zeros(1, 1, 4 * REG_MAX)
    # Uniform logits: the two-bin cross-entropy is log(R) whatever the target.
    assert loss_fn.distribution_focal_loss(uniform, targets).item() == pytest.approx(math.log(REG_MAX))
    peaked = torch.full((1, 1, 4, REG_MAX), -30.0)
    peaked[..., [0, 1, 2, 3], [2, 0, 7, 14]] = 30.0  # all mass on the left bins
    # Side 0: 0.3 * 60 (right bin 3 has ~0 mass); side 2: 0.5 * 60; side 3: 0.99 * 60.
    expected = (0.3 * 60 + 0 + 0.5 * 60 + 0.99 * 60) / 4
    got = loss_fn.distribution_focal_loss(peaked.view(1, 1, -1), targets).item()
    assert got == pytest.approx(expected, rel=1e-4)


def test_positives_have_box_and_dfl_loss():
    model = TinyModel()
    _, items = run_loss(model, torch.rand(2, 3, IMG, IMG), sample_targets())
    assert torch.all(items > 0) and torch.isfinite(items).all()


def test_focal_loss_when_fl_gamma_is_positive():
    model = TinyModel()
    imgs = torch.rand(2, 3, IMG, IMG)
    _, plain = run_loss(model, imgs, sample_targets())
    _, focal = run_loss(model, imgs, sample_targets(), {**DEFAULT_HYP, "fl_gamma": 1.5})
    assert focal[1] < plain[1]
    torch.testing.assert_close(focal[[0, 2]], plain[[0, 2]])


# ---- gains and branches -------------------------------------------------------------------------

def test_gains_come_from_hyp():
    model = TinyModel()
    imgs = torch.rand(2, 3, IMG, IMG)
    _, base = run_loss(model, imgs, sample_targets(), {**DEFAULT_HYP, "box": 2.0, "dfl": 1.0})
    _, doubled = run_loss(model, imgs, sample_targets(), {**DEFAULT_HYP, "box": 4.0, "dfl": 3.0})
    assert doubled[0].item() == pytest.approx(2 * base[0].item(), rel=1e-6)
    assert doubled[1].item() == pytest.approx(base[1].item(), rel=1e-6)
    assert doubled[2].item() == pytest.approx(3 * base[2].item(), rel=1e-6)
    # A missing key takes the default.
    _, defaults = run_loss(model, imgs, sample_targets(), {})
    _, explicit = run_loss(model, imgs, sample_targets(), dict(DEFAULT_HYP))
    torch.testing.assert_close(defaults, explicit)


@pytest.mark.parametrize("bad", [-1.0, "high", None])
def test_bad_gain_raises_user_error(bad):
    with pytest.raises(UserError, match="box"):
        DetectionLoss(TinyModel(), {"box": bad})


def test_dual_loss_is_aux_weight_times_aux_plus_main():
    model = TinyModel(branches=2)
    hyp = {**DEFAULT_HYP, "aux_weight": 0.3}
    loss_fn = DetectionLoss(model, hyp)
    imgs, targets = torch.rand(2, 3, IMG, IMG), sample_targets()
    aux_maps, main_maps = model(imgs)
    loss, items = loss_fn([aux_maps, main_maps], targets)
    aux_items, _ = loss_fn.branch_loss(aux_maps, targets)
    main_items, _ = loss_fn.branch_loss(main_maps, targets)
    expected = 0.3 * aux_items + main_items
    torch.testing.assert_close(items, expected.detach())
    torch.testing.assert_close(loss, expected.sum() * 2)
    assert not items.requires_grad and loss.requires_grad


def test_eval_tuple_output_equals_train_output():
    model = TinyModel(branches=2)
    loss_fn = DetectionLoss(model, dict(DEFAULT_HYP))
    maps = model(torch.rand(2, 3, IMG, IMG))
    decoded = [torch.zeros(2, 4 + NUM_CLASSES, NUM_ANCHORS)] * 2  # ignored by the loss
    _, train_items = loss_fn(maps, sample_targets())
    _, eval_items = loss_fn((decoded, maps), sample_targets())
    torch.testing.assert_close(train_items, eval_items)


def test_gradient_reaches_every_head_parameter():
    model = TinyModel(branches=2)
    loss, _ = run_loss(model, torch.rand(2, 3, IMG, IMG), sample_targets())
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_gradient_reaches_every_parameter_of_a_real_dual_head():
    heads = pytest.importorskip("models.heads")
    channels = 16
    head = heads.DualDDetect(nc=NUM_CLASSES, ch=[channels] * 2 * len(STRIDES))
    head.stride = torch.tensor(STRIDES)
    head.bias_init()
    feats = [torch.randn(2, channels, IMG // int(s), IMG // int(s)) for s in STRIDES] * 2
    out = head(feats)
    assert len(out) == 2  # [aux_maps, main_maps]
    loss_fn = DetectionLoss(head, dict(DEFAULT_HYP))
    loss_fn.assigner.topk = NUM_ANCHORS  # positives on every level, so every box conv is used
    loss, _ = loss_fn(out, sample_targets())
    loss.backward()
    trainable = [(name, p) for name, p in head.named_parameters() if p.requires_grad]
    assert trainable
    for name, param in trainable:
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_loss_is_float32_under_autocast():
    model = TinyModel()
    imgs = torch.rand(2, 3, IMG, IMG)
    reference, _ = run_loss(model, imgs, sample_targets())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        maps = model(imgs)
        loss, items = DetectionLoss(model, dict(DEFAULT_HYP))(maps, sample_targets())
    assert maps[0].dtype == torch.bfloat16
    assert loss.dtype == torch.float32 and items.dtype == torch.float32
    assert loss.item() == pytest.approx(reference.item(), rel=0.05)


# ---- a real model learns from the loss ----------------------------------------------------------

OVERFIT_SIZE = 128
OVERFIT_STEPS = 40
OVERFIT_LR = 2e-3
# image -> (class, x1, y1, x2, y2) filled rectangles in pixels; one colour per class
OVERFIT_BOXES = {0: [(0, 16, 20, 60, 70), (1, 70, 60, 120, 100)], 1: [(1, 30, 30, 90, 110)]}
CLASS_COLOURS = {0: (1.0, 0.3, 0.1), 1: (0.1, 0.5, 1.0)}
BACKGROUND = 0.2


def rectangles_batch() -> tuple[torch.Tensor, torch.Tensor]:
    imgs = torch.full((len(OVERFIT_BOXES), 3, OVERFIT_SIZE, OVERFIT_SIZE), BACKGROUND)
    rows = []
    for index, boxes in OVERFIT_BOXES.items():
        for cls, x1, y1, x2, y2 in boxes:
            imgs[index, :, y1:y2, x1:x2] = torch.tensor(CLASS_COLOURS[cls])[:, None, None]
            rows.append([index, cls, (x1 + x2) / 2 / OVERFIT_SIZE, (y1 + y2) / 2 / OVERFIT_SIZE,
                         (x2 - x1) / OVERFIT_SIZE, (y2 - y1) / OVERFIT_SIZE])
    return imgs, torch.tensor(rows)


def recalibrate_batchnorm(model: nn.Module, imgs: torch.Tensor) -> None:
    """Running BN statistics from the training images: a few dozen steps are too few for the EMA."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the passes below
    model.train()
    with torch.no_grad():
        model(imgs)
    model.eval()


def test_overfitting_two_images_finds_the_boxes():
    yolo = pytest.importorskip("models.yolo")
    heads = pytest.importorskip("models.heads")
    from utils.ops.boxes import box_iou, xywh2xyxy

    model = yolo.DetectionModel(ROOT / "models/detect/yolov9-tiny.yaml", nc=len(CLASS_COLOURS))
    imgs, targets = rectangles_batch()
    loss_fn = DetectionLoss(model, dict(DEFAULT_HYP))
    optimizer = torch.optim.Adam(model.parameters(), lr=OVERFIT_LR)
    losses = []
    for _ in range(OVERFIT_STEPS):
        loss, items = loss_fn(model(imgs), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]
    assert torch.all(items < 2.0), items

    recalibrate_batchnorm(model, imgs)
    with torch.no_grad():
        pred = heads.main_output(model(imgs))  # [B, 4 + nc, A], cx cy w h pixels, scores
    for index, boxes in OVERFIT_BOXES.items():
        scores, classes = pred[index, 4:].max(0)
        best = scores.argmax()
        best_box = xywh2xyxy(pred[index, :4, best][None])
        truth = torch.tensor([box[1:] for box in boxes], dtype=torch.float32)
        ious = box_iou(best_box, truth)[0]
        assert scores[best] > 0.5
        assert ious.max() > 0.5
        assert classes[best].item() == boxes[int(ious.argmax())][0]
