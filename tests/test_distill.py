"""Distillation terms, schedules, settings and DistillationLoss on a tiny GELAN-t at 64 px."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml

from utils.distill import (
    ITEM_KEYS,
    DistillConfig,
    DistillationLoss,
    backbone_end,
    distill_weight_at,
    flatten_maps,
    resize_to,
    set_backbone_trainable,
    temperature_at,
)
from utils.distill_terms import (
    FEATURE_LOSSES,
    AttentionTransferLoss,
    CWDLoss,
    FeatureAdapter,
    LocalizationDistillation,
    MGDLoss,
    MSEFeatureLoss,
    PKDLoss,
    SigmoidKD,
    SoftmaxKD,
    anchor_confidence_weights,
)
from utils.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
HYP = ROOT / "hyp" / "hyp.distill.yaml"
HYP_CLASSIC = ROOT / "hyp" / "hyp.distill-classic.yaml"
NC = 3
IMG = 64
BATCH = 2
REG = 16
ATOL = 1e-6


def load_hyp(path: Path = HYP, **overrides) -> dict:
    with open(path) as f:
        hyp = yaml.safe_load(f)
    hyp.update(overrides)
    return hyp


# ------------------------------------------------------------------------------ logit terms


@pytest.mark.parametrize("term", [SigmoidKD(), SoftmaxKD()], ids=["sigmoid", "softmax"])
@pytest.mark.parametrize("weighting", ["none", "confidence", "threshold"])
def test_logit_kd_zero_when_equal_positive_otherwise(term, weighting):
    teacher = torch.randn(2, 50, NC) * 3
    teacher[:, :10, 0] = 5.0  # some confident anchors so the threshold mask is not empty
    weights = anchor_confidence_weights(teacher, weighting, gamma=1.0, threshold=0.5)
    for temperature in (1.0, 4.0):
        assert term(teacher.clone(), teacher, temperature, weights).abs() < ATOL
        assert term(torch.randn(2, 50, NC), teacher, temperature, weights) > 1e-3


@pytest.mark.parametrize("term", [SigmoidKD(), SoftmaxKD()], ids=["sigmoid", "softmax"])
def test_logit_kd_does_not_scale_with_anchor_count(term):
    student, teacher = torch.randn(2, 40, NC), torch.randn(2, 40, NC)
    weights = anchor_confidence_weights(teacher, "confidence")
    small = term(student, teacher, 2.0, weights)
    large = term(student.repeat(1, 5, 1), teacher.repeat(1, 5, 1), 2.0, weights.repeat(1, 5))
    assert torch.allclose(small, large, rtol=1e-5)


def test_threshold_weighting_with_no_confident_anchor_gives_zero():
    teacher = torch.full((1, 20, NC), -8.0)
    weights = anchor_confidence_weights(teacher, "threshold", threshold=0.5)
    loss = SigmoidKD()(torch.randn(1, 20, NC), teacher, 1.0, weights)
    assert torch.isfinite(loss) and loss == 0


# ---------------------------------------------------------------------------------- LD


def test_ld_zero_when_equal_positive_otherwise():
    teacher = torch.randn(2, 30, 4 * REG)
    mask = torch.zeros(2, 30, dtype=torch.bool)
    mask[:, ::3] = True
    ld = LocalizationDistillation(REG)
    assert ld(teacher.clone(), teacher, mask, 2.0).abs() < ATOL
    assert ld(torch.randn(2, 30, 4 * REG), teacher, mask, 2.0) > 1e-3


def test_ld_without_foreground_is_zero_not_nan_and_keeps_graph():
    student = torch.randn(2, 30, 4 * REG, requires_grad=True)
    loss = LocalizationDistillation(REG)(student, torch.randn(2, 30, 4 * REG),
                                         torch.zeros(2, 30, dtype=torch.bool), 1.0)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() == 0


# ----------------------------------------------------------------------------- feature terms


@pytest.mark.parametrize("name", ["mse", "cwd", "pkd", "at"])
def test_feature_terms_zero_when_equal_positive_otherwise(name):
    term = FEATURE_LOSSES[name](8)
    teacher = torch.randn(2, 8, 6, 6)
    assert term(teacher.clone(), teacher).abs() < 1e-5
    assert term(torch.randn(2, 8, 6, 6), teacher) > 1e-3


def test_pkd_ignores_per_channel_scale_and_shift():
    teacher = torch.randn(2, 4, 5, 5)
    scale = torch.rand(1, 4, 1, 1) + 0.5
    assert PKDLoss(4)(teacher * scale + 3.0, teacher) < 1e-5
    assert MSEFeatureLoss(4)(teacher * scale + 3.0, teacher) > 1.0


def test_cwd_temperature_changes_value():
    student, teacher = torch.randn(1, 4, 5, 5), torch.randn(1, 4, 5, 5)
    assert not torch.isclose(CWDLoss(4, tau=1.0)(student, teacher), CWDLoss(4, tau=4.0)(student, teacher))


def test_mgd_zero_with_identity_generator_and_no_mask():
    channels = 4
    term = MGDLoss(channels, alpha_mgd=1.0, mask_ratio=0.0)
    with torch.no_grad():
        for conv in (term.generation[0], term.generation[2]):
            conv.weight.zero_()
            conv.bias.zero_()
            conv.weight[range(channels), range(channels), 1, 1] = 1.0  # centre tap: identity
    teacher = torch.rand(2, channels, 6, 6)  # non-negative, so the ReLU passes it unchanged
    assert term(teacher.clone(), teacher) < 1e-10
    assert term(torch.rand(2, channels, 6, 6), teacher) > 1e-3


def test_mgd_masks_only_in_training():
    term = MGDLoss(4, mask_ratio=0.5)
    student, teacher = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    term.eval()
    assert term(student, teacher) == term(student, teacher)
    term.train()
    assert term(student, teacher) != term(student, teacher)


def test_attention_transfer_sees_spatial_and_channel_differences():
    teacher = torch.rand(1, 4, 6, 6) + 0.1
    moved = torch.roll(teacher, shifts=2, dims=-1)  # same channel energy, other places
    reweighted = teacher * torch.tensor([1.0, 2.0, 1.0, 0.5]).view(1, 4, 1, 1)
    assert AttentionTransferLoss(4)(moved, teacher) > 1e-4
    assert AttentionTransferLoss(4)(reweighted, teacher) > 1e-4


def test_adapter_identity_when_channels_match_and_projects_otherwise():
    x = torch.randn(2, 8, 4, 4)
    assert torch.equal(FeatureAdapter(8, 8)(x), x)
    assert FeatureAdapter(8, 16)(x).shape == (2, 16, 4, 4)
    assert sum(p.numel() for p in FeatureAdapter(8, 8).parameters()) == 0


def test_gradients_reach_student_and_adapter_not_teacher():
    adapter = FeatureAdapter(6, 8)
    student = torch.randn(2, 6, 5, 5, requires_grad=True)
    teacher = torch.randn(2, 8, 5, 5, requires_grad=True)
    loss = sum(FEATURE_LOSSES[name](8)(adapter(student), teacher) for name in FEATURE_LOSSES)
    loss = loss + SigmoidKD()(student.flatten(2), teacher[:, :6].flatten(2), 2.0)
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.parameters())
    assert teacher.grad is None


# -------------------------------------------------------------------------------- schedules


def test_temperature_schedule():
    assert temperature_at(0, 11, 4.0, 1.0) == 4.0
    assert temperature_at(5, 11, 4.0, 1.0) == pytest.approx(2.5)
    assert temperature_at(10, 11, 4.0, 1.0) == 1.0
    assert temperature_at(50, 11, 4.0, 1.0) == 1.0


@pytest.mark.parametrize("schedule, middle", [("constant", 1.0), ("linear", 0.6), ("cosine", 0.6)])
def test_weight_schedule(schedule, middle):
    end = 1.0 if schedule == "constant" else 0.2
    assert distill_weight_at(0, 11, schedule, 0.2) == 1.0
    assert distill_weight_at(5, 11, schedule, 0.2) == pytest.approx(middle)
    assert distill_weight_at(10, 11, schedule, 0.2) == pytest.approx(end)
    assert distill_weight_at(7, 11, schedule, 0.2, stop_epoch=8) > 0
    assert distill_weight_at(8, 11, schedule, 0.2, stop_epoch=8) == 0.0
    assert distill_weight_at(9.5, 11, schedule, 0.2, stop_epoch=8) == 0.0


def test_cosine_decays_slower_than_linear_early():
    assert distill_weight_at(2, 11, "cosine", 0.0) > distill_weight_at(2, 11, "linear", 0.0)


# ---------------------------------------------------------------------------- settings


def test_recipes_hold_scratch_high_values_and_parse():
    base = load_hyp(ROOT / "hyp" / "hyp.scratch-high.yaml")
    for path in (HYP, HYP_CLASSIC):
        hyp = load_hyp(path)
        assert {k: hyp[k] for k in base} == base
        DistillConfig.from_hyp(hyp)
    classic = DistillConfig.from_hyp(load_hyp(HYP_CLASSIC))
    assert (classic.alpha, classic.temperature, classic.cls, classic.cls_type) == (0.65, 4.0, 0.6, "softmax")
    assert (classic.feat, classic.feat_type, classic.box) == (0.4, "mse", 0.0)


@pytest.mark.parametrize("key, value, word", [
    ("distill_alpha", None, "missing"),
    ("distill_alpha", 1.5, "distill_alpha"),
    ("distill_feat_type", "l1", "distill_feat_type"),
    ("distill_schedule", "step", "distill_schedule"),
    ("distill_box_mask", "gt", "distill_box_mask"),
    ("distill_student_layers", "15", "distill_student_layers"),
    ("freeze_backbone_epochs", 1.5, "freeze_backbone_epochs"),
])
def test_bad_settings_raise_user_error(key, value, word):
    hyp = load_hyp()
    hyp[key] = value
    with pytest.raises(UserError, match=word):
        DistillConfig.from_hyp(hyp)


def test_resize_to_student_grid():
    teacher = [torch.randn(1, 5, 12, 12), torch.randn(1, 5, 6, 6)]
    student = [torch.randn(1, 5, 8, 8), torch.randn(1, 5, 6, 6)]
    resized = resize_to(teacher, student)
    assert [tuple(m.shape) for m in resized] == [(1, 5, 8, 8), (1, 5, 6, 6)]
    assert resized[1] is teacher[1]
    assert flatten_maps(resized).shape == (1, 64 + 36, 5)


# ------------------------------------------------------------------ DistillationLoss on a model

GELAN_T = ROOT / "models" / "detect" / "gelan-t.yaml"
# Concat outputs of gelan-t at P3/P4/P5: other channel counts than the neck outputs, so adapters project.
TEACHER_CONCAT_LAYERS = [14, 17, 20]


@pytest.fixture(scope="module")
def gelan_pair():
    """A GELAN-t student and an independently initialised GELAN-t teacher (nc=3), built once."""
    from models.yolo import DetectionModel

    torch.manual_seed(1)
    student = DetectionModel(GELAN_T, nc=NC)
    torch.manual_seed(2)
    teacher = DetectionModel(GELAN_T, nc=NC)
    return student, teacher


def _targets() -> torch.Tensor:
    return torch.tensor([[0, 0, 0.30, 0.35, 0.30, 0.40],
                         [0, 2, 0.70, 0.60, 0.40, 0.30],
                         [1, 1, 0.50, 0.50, 0.60, 0.60]])


def _run(loss_fn, student, teacher, images, teacher_images=None, epoch=0, epochs=10):
    student_out, student_feats = student(images, feature_layers=loss_fn.student_layers)
    with torch.no_grad():
        teacher_out, teacher_feats = teacher(
            images if teacher_images is None else teacher_images, feature_layers=loss_fn.teacher_layers)
    return loss_fn(student_out, teacher_out, _targets(), student_feats, teacher_feats, epoch, epochs)


def _detection_loss(model, hyp):
    from utils.loss import DetectionLoss

    return DetectionLoss(model, hyp)


@pytest.mark.parametrize("feat_type, box_mask", [("pkd", "assigner"), ("cwd", "teacher"), ("at", "assigner")])
def test_distillation_loss_zero_terms_when_student_equals_teacher(gelan_pair, feat_type, box_mask):
    student, _ = gelan_pair
    student.train()
    teacher = copy.deepcopy(student)
    hyp = load_hyp(distill_feat_type=feat_type, distill_box_mask=box_mask, distill_score_threshold=0.0)
    loss_fn = DistillationLoss(_detection_loss(student, hyp), student, teacher, hyp)
    images = torch.rand(BATCH, 3, IMG, IMG)
    loss, items = _run(loss_fn, student, teacher, images)
    assert set(items) == set(ITEM_KEYS)
    assert all(not v.requires_grad and v.dim() == 0 for v in items.values())
    for key in ("distill/cls", "distill/box", "distill/feat", "distill/total"):
        assert items[key].abs() < 1e-4, key
    share = (1 - hyp["distill_alpha"])
    detection = (items["box"] + items["cls"] + items["dfl"]) * BATCH
    assert torch.isclose(loss.detach(), (1 - share) * detection, rtol=1e-4)


def test_gradients_reach_student_and_adapters_teacher_stays_fixed(gelan_pair):
    student, teacher = gelan_pair
    student, teacher = copy.deepcopy(student).train(), copy.deepcopy(teacher).eval()
    teacher.requires_grad_(False)
    hyp = load_hyp(distill_teacher_layers=TEACHER_CONCAT_LAYERS, distill_feat_type="mgd")
    loss_fn = DistillationLoss(_detection_loss(student, hyp), student, teacher, hyp)
    assert len(list(loss_fn.trainable_modules().parameters())) > 0
    assert [a.teacher_channels != a.student_channels for a in loss_fn.adapters] == [True] * 3
    before = copy.deepcopy(teacher.state_dict())
    params = list(student.parameters()) + list(loss_fn.trainable_modules().parameters())
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    images = torch.rand(BATCH, 3, IMG, IMG)
    for step in range(2):
        optimizer.zero_grad()
        loss, items = _run(loss_fn, student, teacher, images)
        loss.backward()
        if step == 0:
            assert all(items[k] > 0 for k in ("distill/cls", "distill/box", "distill/feat"))
            assert student.model[0].conv.weight.grad.abs().sum() > 0
            assert all(p.grad is not None for p in loss_fn.trainable_modules().parameters())
            assert all(p.grad is None for p in teacher.parameters())
        optimizer.step()
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_teacher_at_other_input_size_is_resized(gelan_pair):
    student, teacher = gelan_pair
    student, teacher = student.train(), teacher.eval()
    hyp = load_hyp(distill_box_mask="teacher", distill_score_threshold=0.0)
    loss_fn = DistillationLoss(_detection_loss(student, hyp), student, teacher, hyp)
    images = torch.rand(BATCH, 3, IMG, IMG)
    big = torch.nn.functional.interpolate(images, scale_factor=1.5, mode="bilinear")  # 96 px
    loss, items = _run(loss_fn, student, teacher, images, teacher_images=big)
    assert torch.isfinite(loss) and items["distill/box"] > 0 and items["distill/feat"] > 0


def test_schedule_stop_epoch_leaves_plain_detection(gelan_pair):
    student, teacher = gelan_pair
    student.train()
    hyp = load_hyp(distill_stop_epoch=3)
    loss_fn = DistillationLoss(_detection_loss(student, hyp), student, teacher, hyp)
    assert loss_fn.schedule(2, 10)[0] > 0 and loss_fn.schedule(3, 10)[0] == 0
    student_out = student(torch.rand(BATCH, 3, IMG, IMG))
    # after the stop epoch the engine may skip the teacher: no teacher output is needed
    loss, items = loss_fn(student_out, None, _targets(), None, None, epoch=3, epochs=10)
    assert items["distill/total"] == 0
    detection = (items["box"] + items["cls"] + items["dfl"]) * BATCH
    assert torch.isclose(loss.detach(), detection, rtol=1e-5)


def test_assigner_path_matches_detection_loss_for_dual_output(gelan_pair):
    student, teacher = gelan_pair
    student.train()
    hyp = load_hyp(distill_feat=0.0)
    detection = _detection_loss(student, hyp)
    loss_fn = DistillationLoss(detection, student, teacher, hyp)
    assert len(loss_fn.adapters) == 0 and not loss_fn.uses_features
    maps = student(torch.rand(BATCH, 3, IMG, IMG))
    dual = [[m * 0.5 for m in maps], maps]  # a dual head's [aux, main] output
    expected, expected_items = detection(dual, _targets())
    got, got_items, fg_mask = loss_fn._detection(dual, _targets(), need_assigner=True)
    assert torch.allclose(got, expected) and torch.allclose(got_items, expected_items)
    assert fg_mask.shape == (BATCH, flatten_maps(maps).shape[1]) and fg_mask.any()


def test_freeze_backbone_stops_backbone_gradients(gelan_pair):
    student = copy.deepcopy(gelan_pair[0]).train()
    first_neck = backbone_end(student)
    assert first_neck == len(student.yaml["backbone"])
    assert set_backbone_trainable(student, first_neck, trainable=False) > 0
    sum(o.sum() for o in student(torch.rand(1, 3, IMG, IMG))).backward()
    backbone = [p.grad for layer in student.model[:first_neck] for p in layer.parameters()]
    neck = [p.grad for layer in student.model[first_neck:] for p in layer.parameters() if p.requires_grad]
    assert backbone and all(g is None for g in backbone)
    assert neck and all(g is not None for g in neck)
    set_backbone_trainable(student, first_neck, trainable=True)
    assert all(p.requires_grad for p in student.model[0].parameters())


def test_terms_are_float32_under_autocast(gelan_pair):
    student, teacher = gelan_pair
    student.train()
    hyp = load_hyp(distill_box_mask="teacher", distill_score_threshold=0.0)
    loss_fn = DistillationLoss(_detection_loss(student, hyp), student, teacher, hyp)
    images = torch.rand(BATCH, 3, IMG, IMG)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        loss, items = _run(loss_fn, student, teacher.eval(), images)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(items[k].dtype == torch.float32 for k in ("distill/cls", "distill/box", "distill/feat"))


def test_on_epoch_start_freezes_backbone_for_the_first_epochs(gelan_pair):
    student, teacher = copy.deepcopy(gelan_pair[0]), gelan_pair[1]
    hyp = load_hyp(freeze_backbone_epochs=2, distill_feat=0.0)
    loss_fn = DistillationLoss(_detection_loss(student, hyp), student, teacher, hyp)
    first_weight, neck_weight = student.model[0].conv.weight, student.model[-2].cv1.conv.weight
    for epoch, expected in [(0, False), (1, False), (2, True), (3, True)]:
        loss_fn.on_epoch_start(student, epoch, 10)
        assert first_weight.requires_grad is expected and neck_weight.requires_grad
