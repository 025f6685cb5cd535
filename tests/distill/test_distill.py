"""Distillation: terms, schedules, settings, fit checks and DistillationLoss on a tiny GELAN-t (64 px)."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import yaml

from utils.core.errors import UserError
from utils.distill import ITEM_KEYS, DistillConfig, DistillationLoss, DistillStudent, FeatureAdapter
from utils.distill.loss import flatten_maps
from utils.distill.schedule import (backbone_end, distill_weight_at, resolve_stop_epoch,
                                    set_backbone_trainable)
from utils.distill.terms import (FEATURE_LOSSES, AttentionTransferLoss, CWDLoss, MGDLoss, PKDLoss, binary_kd,
                                 dfl_kd, softmax_kd)

ROOT = Path(__file__).resolve().parents[2]
HYP = ROOT / "hyp" / "hyp.distill.yaml"
HYP_CLASSIC = ROOT / "hyp" / "hyp.distill-classic.yaml"
GELAN_T = ROOT / "models" / "detect" / "gelan-t.yaml"
STUDENT_YAML = ROOT / "models" / "detect" / "yolov9-tiny.yaml"
NC, IMG, BATCH, REG = 3, 64, 2, 16
PKD = {"distill_feat": 4.0}  # the default recipe has feature KD off; tests of all three terms turn PKD on
ATOL = 1e-6


def load_hyp(path: Path = HYP, **overrides) -> dict:
    """A recipe's keys (the default has no warm-up: w = 1 from the first step) with ``overrides``."""
    hyp = yaml.safe_load(path.read_text())
    hyp.update(overrides)
    return hyp


# ------------------------------------------------------------------------------ logit terms
def test_binary_kd_zero_when_equal_and_weighs_false_positives_like_misses():
    teacher = torch.randn(2, 50, NC) * 3
    for beta in (0.0, 1.0, 2.0):
        assert binary_kd(teacher.clone(), teacher, beta).abs().max() < ATOL
        assert binary_kd(torch.randn(2, 50, NC), teacher, beta).sum() > 1e-3
    low, high = torch.tensor([[[-3.0]]]), torch.tensor([[[3.0]]])
    false_positive = binary_kd(high, low)  # teacher says background, the student fires
    miss = binary_kd(low, high)  # teacher fires, the student misses
    assert false_positive > 0 and torch.isclose(false_positive, miss, rtol=1e-5)


def test_softmax_and_dfl_kd_zero_when_equal_positive_otherwise():
    logits = torch.randn(2, 30, NC)
    assert softmax_kd(logits.clone(), logits, 4.0).abs().max() < ATOL
    assert softmax_kd(torch.randn(2, 30, NC), logits, 4.0).mean() > 1e-3
    distri = torch.randn(2, 30, 4 * REG)
    assert dfl_kd(distri.clone(), distri, REG, 10.0).abs().max() < 1e-5
    assert dfl_kd(torch.randn(2, 30, 4 * REG), distri, REG, 10.0).mean() > 1e-3
    assert dfl_kd(distri, distri, REG).shape == (2, 30)


def test_dfl_kd_is_the_ld_papers_mean_over_bins():
    # one anchor, 4 sides of REG bins, by hand: T^2 * sum_j p_t,j * log(p_t,j / p_s,j) / REG, mean of sides
    torch.manual_seed(3)
    student, teacher, t = torch.randn(1, 1, 4 * REG), torch.randn(1, 1, 4 * REG), 10.0
    sides = []
    for side in range(4):
        s_bins, t_bins = student[0, 0, side * REG:(side + 1) * REG], teacher[0, 0, side * REG:(side + 1) * REG]
        p_t, p_s = torch.softmax(t_bins / t, 0), torch.softmax(s_bins / t, 0)
        sides.append(t * t * (p_t * (p_t.log() - p_s.log())).sum() / REG)
    torch.testing.assert_close(dfl_kd(student, teacher, REG, t)[0, 0], torch.stack(sides).mean())


@pytest.mark.parametrize("name", ["binary", "softmax", "dfl"])
def test_each_logit_term_pulls_the_student_towards_the_teacher(name):
    torch.manual_seed(0)
    width = 4 * REG if name == "dfl" else NC
    teacher = torch.randn(1, 20, width) * 2
    student = torch.randn(1, 20, width, requires_grad=True)
    term = {"binary": lambda s, t: binary_kd(s, t).sum(), "softmax": lambda s, t: softmax_kd(s, t, 2.0).sum(),
            "dfl": lambda s, t: dfl_kd(s, t, REG, 2.0).sum()}[name]

    def distance(s: torch.Tensor) -> float:
        if name == "binary":
            return float((s.sigmoid() - teacher.sigmoid()).abs().sum())
        groups = (1, 20, 4, REG) if name == "dfl" else (1, 20, NC)
        return float((s.reshape(groups).softmax(-1) - teacher.reshape(groups).softmax(-1)).abs().sum())

    before = distance(student.detach())
    term(student, teacher).backward()
    with torch.no_grad():
        moved = student - 0.5 * student.grad
    assert distance(moved) < before


@pytest.mark.parametrize("name", sorted(FEATURE_LOSSES))
def test_feature_terms_zero_when_equal_positive_otherwise(name):
    channels = 8
    term = FEATURE_LOSSES[name](channels)
    if isinstance(term, MGDLoss):
        term.eval()
        torch.nn.init.dirac_(term.generation[0].weight)
        torch.nn.init.zeros_(term.generation[0].bias)
        torch.nn.init.dirac_(term.generation[2].weight)
        torch.nn.init.zeros_(term.generation[2].bias)
    teacher = torch.rand(2, channels, 6, 6) + 0.1  # positive: the MGD generator's ReLU keeps it
    assert term(teacher.clone(), teacher) < 1e-5
    assert term(torch.randn(2, channels, 6, 6), teacher) > 1e-3


def test_pkd_standardises_per_channel_over_the_whole_batch():
    term = PKDLoss(4)
    teacher = torch.randn(3, 4, 5, 5)
    scale, shift = torch.rand(1, 4, 1, 1) + 0.5, torch.randn(1, 4, 1, 1)
    assert term(teacher * scale + shift, teacher) < 1e-5  # one scale/shift per channel: no loss
    per_image_shift = torch.randn(3, 1, 1, 1) * 3
    # a per-image shift changes the per-channel statistics over N*H*W (statistics per image would not see it)
    assert term(teacher + per_image_shift, teacher) > 0.05


def test_cwd_temperature_changes_value_and_attention_sees_both_kinds():
    a, b = torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5)
    assert not torch.isclose(CWDLoss(4, tau=1.0)(a, b), CWDLoss(4, tau=4.0)(a, b))
    x = torch.rand(1, 4, 5, 5) + 0.1
    channel_only = x * torch.tensor([1.0, 2.0, 1.0, 1.0]).view(1, 4, 1, 1)
    assert AttentionTransferLoss(4)(channel_only, x) > 1e-4


def test_mgd_masks_only_in_training():
    term = MGDLoss(4, mask_ratio=0.5)
    x, t = torch.rand(1, 4, 8, 8), torch.rand(1, 4, 8, 8)
    term.eval()
    assert torch.equal(term(x, t), term(x, t))
    term.train()
    torch.manual_seed(0)
    first = term(x, t)
    torch.manual_seed(1)
    assert not torch.equal(first, term(x, t))


def test_adapter_identity_only_when_widths_match_and_not_forced():
    assert isinstance(FeatureAdapter(8, 8).proj, torch.nn.Identity)
    assert not isinstance(FeatureAdapter(8, 8, needed=True).proj, torch.nn.Identity)
    assert FeatureAdapter(8, 16)(torch.rand(2, 8, 3, 3)).shape == (2, 16, 3, 3)


# -------------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("schedule, middle", [("constant", 1.0), ("linear", 0.5), ("cosine", 0.5)])
def test_weight_schedule(schedule, middle):
    assert distill_weight_at(0, 11, schedule, end=0.0) == pytest.approx(1.0)
    assert distill_weight_at(5, 11, schedule, end=0.0) == pytest.approx(middle)
    assert distill_weight_at(10, 11, schedule, end=0.2) == pytest.approx(1.0 if schedule == "constant" else 0.2)
    assert distill_weight_at(7, 11, schedule, stop_epoch=7) == 0.0


@pytest.mark.parametrize("schedule", ["constant", "linear"])
def test_warmup_ramps_the_weight_over_nominal_steps_whatever_the_epochs(schedule):
    for epochs in (40, 160):  # the same ramp in steps at every schedule length
        assert distill_weight_at(0, epochs, schedule, warmup_steps=100, step=0) == 0.0
        assert distill_weight_at(0, epochs, schedule, warmup_steps=100, step=50) == pytest.approx(0.5)
        plain = distill_weight_at(3, epochs, schedule)
        assert distill_weight_at(3, epochs, schedule, warmup_steps=100, step=100) == pytest.approx(plain)
        assert distill_weight_at(3, epochs, schedule, warmup_steps=100, step=None) == pytest.approx(plain)
    assert distill_weight_at(0, 40, schedule, warmup_steps=0, step=0) == 1.0  # no warm-up: full weight at step 0
    assert distill_weight_at(35, 40, schedule, stop_epoch=30, warmup_steps=100, step=10_000) == 0.0


def test_stop_at_close_mosaic_resolves_to_the_closing_epoch():
    assert resolve_stop_epoch("close_mosaic", 40, close_mosaic=10) == 30
    assert resolve_stop_epoch("close_mosaic", 40, close_mosaic=0) == -1
    assert resolve_stop_epoch(12, 40, close_mosaic=10) == 12


def test_recipes_parse_and_the_classic_one_is_kept_as_published():
    default = DistillConfig.from_hyp(yaml.safe_load(HYP.read_text()))
    assert default.det_weight == 1.0 and default.cls > 0 and default.box > 0 and default.feat == 0
    assert default.feat_type == "pkd" and default.teacher_dtype == "auto" and default.warmup_steps == 0
    assert default.schedule == "constant" and default.stop_epoch == "close_mosaic"
    classic = DistillConfig.from_hyp(load_hyp(HYP_CLASSIC))
    # 0.65 * detection + 0.35 * (0.6 softmax-KL T=4 + 0.4 MSE)
    assert classic.det_weight == 0.65 and classic.cls_type == "softmax" and classic.temperature == 4.0
    assert classic.cls == pytest.approx(0.35 * 0.6) and classic.feat == pytest.approx(0.35 * 0.4)
    assert classic.feat_type == "mse" and classic.box == 0
    scratch = yaml.safe_load((ROOT / "hyp" / "hyp.scratch-high.yaml").read_text())
    for recipe in (HYP, HYP_CLASSIC):  # self-contained: the training keys are scratch-high's
        hyp = load_hyp(recipe)
        assert {k: hyp[k] for k in scratch} == scratch


@pytest.mark.parametrize("key, value, word", [
    ("distill_alpha", 0.5, "no longer used"), ("distill_temperature_end", 1.0, "no longer used"),
    ("distill_cls_type", "focal", "must be one of"), ("distill_box", -1.0, "must be a number"),
    ("distill_stop_epoch", "soon", "close_mosaic"), ("distill_crosskd", "yes", "true or false"),
    ("distill_assign", "ground_truth", "must be one of"), ("distill_teacher_dtype", "int8", "must be one of"),
    ("distill_warmup_fraction", 0.25, "no longer used.*distill_warmup_steps"),
    ("distill_box_teacher_score", True, "no longer used"), ("distill_warmup_steps", -1, "non-negative integer"),
    ("distill_warmup_steps", 0.5, "non-negative integer"), ("distill_cls_beta", 0.5, "0 or at least 1"),
    ("distill_stop_epoch", 0, "epoch number >= 1"), ("distill_stop_epoch", -3, "epoch number >= 1")])
def test_bad_settings_raise_user_error(key, value, word):
    with pytest.raises(UserError, match=word):
        DistillConfig.from_hyp(load_hyp(**{key: value}))


# ------------------------------------------------------------------ DistillationLoss on a model
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


def _detection_loss(model, hyp):
    from utils.loss import DetectionLoss

    return DetectionLoss(model, hyp)


def _run(loss_fn, student, teacher, images, epoch=0, epochs=10):
    """One distillation loss the way the engine computes it (DistillStudent + the teacher)."""
    layers = loss_fn.student_layers if loss_fn.uses_features else None
    out = DistillStudent(student, loss_fn.modules_, layers)(images)
    with torch.no_grad():
        if loss_fn.uses_features:
            teacher_out, teacher_feats = teacher(images, feature_layers=loss_fn.teacher_layers)
        else:
            teacher_out, teacher_feats = teacher(images), None
    return loss_fn(out.preds, teacher_out, _targets(), out.feats, teacher_feats, out.cross, epoch, epochs)


@pytest.mark.parametrize("beta", [0.0, 1.0, 2.0])
def test_cls_beta_zero_or_at_least_one_is_accepted(beta):
    assert DistillConfig.from_hyp(load_hyp(distill_cls_beta=beta)).cls_beta == beta


@pytest.mark.parametrize("overrides", [{"distill_feat_type": "pkd"}, {"distill_feat_type": "cwd"},
                                       {"distill_feat_type": "at"}], ids=["pkd", "cwd", "at"])
def test_kd_is_zero_when_student_equals_teacher(gelan_pair, overrides):
    student, _ = gelan_pair
    student.train()
    teacher = copy.deepcopy(student)
    hyp = load_hyp(**overrides)
    loss_fn = DistillationLoss(_detection_loss(student, hyp), student, teacher, hyp)
    loss, items = _run(loss_fn, student, teacher.train(), torch.rand(BATCH, 3, IMG, IMG))
    assert set(items) == set(ITEM_KEYS)
    assert all(not v.requires_grad and v.dim() == 0 for v in items.values())
    for key in ("distill/cls", "distill/box", "distill/feat", "distill/total"):
        assert items[key].abs() < 1e-4, key
    detection = (items["box"] + items["cls"] + items["dfl"]) * BATCH  # detection keeps weight 1
    assert torch.isclose(loss.detach(), detection, rtol=1e-4)


def test_detection_keeps_weight_one_and_kd_is_added(gelan_pair):
    student, teacher = gelan_pair
    student.train()
    hyp = load_hyp(**PKD)
    loss_fn = DistillationLoss(_detection_loss(student, hyp), student, teacher.eval(), hyp)
    loss, items = _run(loss_fn, student, teacher, torch.rand(BATCH, 3, IMG, IMG))
    assert all(items[k] > 0 for k in ("distill/cls", "distill/box", "distill/feat"))
    expected = (items["box"] + items["cls"] + items["dfl"] + items["distill/total"]) * BATCH
    assert torch.isclose(loss.detach(), expected, rtol=1e-5)
    weighted = items["distill/cls"] + items["distill/box"] + items["distill/feat"]
    assert torch.isclose(items["distill/total"], weighted)  # w = 1 (constant schedule)


def _maps_from_flat(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Inverse of flatten_maps: ``[B, A, no]`` -> maps shaped like ``like``."""
    maps, start = [], 0
    for ref in like:
        count = ref.shape[2] * ref.shape[3]
        maps.append(flat[:, start:start + count].transpose(1, 2).reshape(ref.shape))
        start += count
    return maps


def _flat_like(student, value_scores: float, value_distri: float = 0.0) -> tuple[list, torch.Tensor]:
    """Head maps of ``student`` on a random batch, and a flat copy ``[B, A, 4R + C]`` filled with constants."""
    maps = [m.detach() for m in student(torch.rand(BATCH, 3, IMG, IMG))]
    flat = torch.full_like(flatten_maps(maps), value_distri)
    flat[..., 4 * REG:] = value_scores
    return maps, flat


def test_class_kd_by_hand_is_normalised_by_the_teachers_mass(gelan_pair):
    """Student logits 0 (p 0.5), teacher p 0.75 everywhere: each element contributes the binary KL
    (BCE(0.5 vs 0.75) - H(0.75)) times |0.5 - 0.75|, and the mass is 0.75 per element, so the term is
    (ln 2 - H(0.75)) * 0.25 / 0.75 whatever the number of images, anchors and classes."""
    student, _ = gelan_pair
    student.train()
    hyp = load_hyp(distill_feat=0.0)
    loss_fn = DistillationLoss(_detection_loss(student, hyp), student, copy.deepcopy(student), hyp)
    maps, student_flat = _flat_like(student, 0.0)
    _, teacher_flat = _flat_like(student, math.log(3.0))  # sigmoid = 0.75
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    expected = (math.log(2.0) - entropy) * 0.25 / 0.75
    terms = loss_fn._logit_terms(_maps_from_flat(student_flat, maps), _maps_from_flat(teacher_flat, maps))
    assert terms["cls"].item() == pytest.approx(expected, rel=1e-5)
    doubled = [torch.cat([m, m]) for m in maps]  # twice the images: the same mean
    terms2 = loss_fn._logit_terms(_maps_from_flat(torch.cat([student_flat] * 2), doubled),
                                  _maps_from_flat(torch.cat([teacher_flat] * 2), doubled))
    assert terms2["cls"].item() == pytest.approx(expected, rel=1e-5)
    # the teacher sure of nothing on half the anchors: those add no mass and (student at 0.5 there, the
    # teacher at ~0) a binary KL of ln 2 times 0.5 each, over the mass of the other half
    teacher_flat[:, ::2, 4 * REG:] = -30.0
    anchors = teacher_flat.shape[1]
    sure, unsure = len(range(1, anchors, 2)), len(range(0, anchors, 2))
    expected_half = ((math.log(2.0) - entropy) * 0.25 * sure + math.log(2.0) * 0.5 * unsure) / (0.75 * sure)
    terms3 = loss_fn._logit_terms(_maps_from_flat(student_flat, maps), _maps_from_flat(teacher_flat, maps))
    assert terms3["cls"].item() == pytest.approx(expected_half, rel=1e-4)


def test_box_kd_is_a_mean_weighted_by_the_teachers_confidence(gelan_pair):
    """LD that differs from 0 on one anchor only: the term is that anchor's LD times its confidence over
    the sum of the confidences (0.75 on one anchor in two, ~0 elsewhere)."""
    student, _ = gelan_pair
    student.train()
    hyp = load_hyp(distill_feat=0.0, distill_cls=0.0)
    loss_fn = DistillationLoss(_detection_loss(student, hyp), student, copy.deepcopy(student), hyp)
    maps, teacher_flat = _flat_like(student, math.log(3.0))
    teacher_flat[:, ::2, 4 * REG:] = -30.0  # even anchors: the teacher sees nothing there
    student_flat = teacher_flat.clone()
    student_flat[0, 1, :REG] = torch.linspace(-2.0, 2.0, REG)  # image 0, anchor 1 (confidence 0.75): one side
    ld = dfl_kd(student_flat[:1, 1:2, :4 * REG], teacher_flat[:1, 1:2, :4 * REG], REG,
                loss_fn.config.box_temperature).item()
    assert ld > 0
    sure = BATCH * len(range(1, teacher_flat.shape[1], 2))
    mass = 0.75 * sure + 2 * BATCH * len(range(0, teacher_flat.shape[1], 2)) * torch.sigmoid(torch.tensor(-30.0)).item()
    terms = loss_fn._logit_terms(_maps_from_flat(student_flat, maps), _maps_from_flat(teacher_flat, maps))
    assert "cls" not in terms
    assert terms["box"].item() == pytest.approx(ld * 0.75 / mass, rel=1e-4)


def test_gradients_reach_student_and_connectors_teacher_stays_fixed(gelan_pair):
    student, teacher = copy.deepcopy(gelan_pair[0]).train(), copy.deepcopy(gelan_pair[1]).eval()
    teacher.requires_grad_(False)
    hyp = load_hyp(distill_teacher_layers=[14, 17, 20], distill_feat_type="mgd", **PKD)  # other widths: connectors
    loss_fn = DistillationLoss(_detection_loss(student, hyp), student, teacher, hyp)
    trainable = list(loss_fn.trainable_modules().parameters())
    assert trainable and all(a.teacher_channels != a.student_channels for a in loss_fn.modules_.adapters)
    before = copy.deepcopy(teacher.state_dict())
    optimizer = torch.optim.SGD(list(student.parameters()) + trainable, lr=0.01, momentum=0.9)
    for step in range(2):
        optimizer.zero_grad()
        loss, items = _run(loss_fn, student, teacher, torch.rand(BATCH, 3, IMG, IMG))
        loss.backward()
        if step == 0:
            assert student.model[0].conv.weight.grad.abs().sum() > 0
            assert all(p.grad is not None for p in trainable)
            assert all(p.grad is None for p in teacher.parameters())
        optimizer.step()
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


def test_crosskd_trains_the_student_through_the_teachers_final_convs(gelan_pair):
    student, teacher = copy.deepcopy(gelan_pair[0]).train(), copy.deepcopy(gelan_pair[1]).eval()
    teacher.requires_grad_(False)
    hyp = load_hyp(distill_crosskd=True, distill_feat=0.0)
    loss_fn = DistillationLoss(_detection_loss(student, hyp), student, teacher, hyp)
    out = DistillStudent(student, loss_fn.modules_, None)(torch.rand(BATCH, 3, IMG, IMG))
    assert [c.shape for c in out.cross] == [m.shape for m in out.preds]
    assert not student.head.cv2[0][1]._forward_hooks  # the capture hooks are gone after the pass
    with torch.no_grad():
        teacher_out = teacher(torch.rand(BATCH, 3, IMG, IMG))
    _, items = loss_fn(out.preds, teacher_out, _targets(), None, None, out.cross)
    kd = loss_fn.config.cls * loss_fn._logit_terms(out.cross, teacher_out)["cls"]
    assert torch.isclose(items["distill/cls"], kd.detach(), rtol=1e-5)
    student.zero_grad()
    kd.backward()
    hidden_conv, final_conv = student.head.cv3[0][1].conv.weight, student.head.cv3[0][2].weight
    assert hidden_conv.grad is not None and hidden_conv.grad.abs().sum() > 0
    assert final_conv.grad is None  # the student's own prediction layer is trained by detection only
    assert all(p.grad is None for p in teacher.parameters())


def test_the_recipe_warmup_reaches_the_loss_weight(gelan_pair):
    student, teacher = gelan_pair
    hyp = load_hyp(distill_warmup_steps=200, distill_stop_epoch=-1)
    loss_fn = DistillationLoss(_detection_loss(student, hyp), student, teacher, hyp)
    assert [loss_fn.weight(0, 40, step) for step in (0, 50, 200, 5000)] == pytest.approx([0.0, 0.25, 1.0, 1.0])
    assert loss_fn.active(0, 40)  # at w = 0 the teacher still runs (and assigns, with LAD)


def test_crosskd_kd_is_zero_through_the_teachers_convs_not_the_students(gelan_pair):
    """Teacher = student, then the STUDENT's final 1x1 convs perturbed: the cross-head maps go through
    the teacher's final convs, so CrossKD stays 0 while plain KD (the student's own maps) does not."""
    student = copy.deepcopy(gelan_pair[0]).train()
    teacher = copy.deepcopy(student).train()  # batch statistics on both sides: the same hidden features
    with torch.no_grad():
        for seq in (*student.head.cv2, *student.head.cv3):
            seq[-1].weight.add_(0.5 * torch.randn_like(seq[-1].weight))
    images = torch.rand(BATCH, 3, IMG, IMG)
    results = {}
    for crosskd in (True, False):
        hyp = load_hyp(distill_crosskd=crosskd, distill_feat=0.0)
        loss_fn = DistillationLoss(_detection_loss(student, hyp), student, teacher, hyp)
        results[crosskd] = _run(loss_fn, student, teacher, images)[1]
    assert results[True]["distill/cls"] < 1e-5 and results[True]["distill/box"] < 1e-5
    assert results[False]["distill/cls"] > 1e-3 and results[False]["distill/box"] > 1e-3


@pytest.fixture(scope="module")
def gelan_s_teacher():
    """A GELAN-s teacher (class branch 128 wide where GELAN-t's is 64: CrossKD needs real connectors)."""
    from models.yolo import DetectionModel

    torch.manual_seed(4)
    return DetectionModel(ROOT / "models" / "detect" / "gelan-s.yaml", nc=NC).eval()


@pytest.mark.parametrize("weights", [{"distill_box": 0.0}, {"distill_cls": 0.0}, {}], ids=["cls-only", "box-only", "both"])
def test_crosskd_builds_only_the_connectors_it_uses(gelan_pair, gelan_s_teacher, weights):
    """Every trainable distillation parameter gets a gradient in every step (DistributedDataParallel
    refuses unused ones): with one KD weight at 0 its connectors are not built. With box KD alone
    against a wider class branch, the class connectors (real convs) would otherwise get no gradient."""
    student = copy.deepcopy(gelan_pair[0]).train()
    hyp = load_hyp(distill_crosskd=True, distill_feat=0.0, **weights)
    loss_fn = DistillationLoss(_detection_loss(student, hyp), student, gelan_s_teacher, hyp)
    cross = loss_fn.modules_.cross
    assert (cross.cls_connectors is None) == ("distill_cls" in weights)
    assert (cross.box_connectors is None) == ("distill_box" in weights)
    params = list(loss_fn.trainable_modules().parameters())
    assert bool(params) == ("distill_cls" not in weights)  # only the class branch differs in width
    loss, _ = _run(loss_fn, student, gelan_s_teacher, torch.rand(BATCH, 3, IMG, IMG))
    loss.backward()
    assert all(p.grad is not None for p in params)


def test_with_all_kd_weights_zero_the_loss_is_detection(gelan_pair):
    student, teacher = gelan_pair
    student.train()
    hyp = load_hyp(distill_cls=0.0, distill_box=0.0, distill_feat=0.0)
    detection = _detection_loss(student, hyp)
    loss_fn = DistillationLoss(detection, student, teacher, hyp)
    assert loss_fn.weight(0, 10) == 0 and not list(loss_fn.trainable_modules().parameters())
    maps = student(torch.rand(BATCH, 3, IMG, IMG))
    loss, items = loss_fn(maps, None, _targets())
    expected, _ = detection(maps, _targets())
    assert torch.equal(loss, expected)


def test_assigner_path_matches_detection_loss_for_dual_output(gelan_pair):
    student, teacher = gelan_pair
    student.train()
    hyp = load_hyp(distill_feat=0.0)
    detection = _detection_loss(student, hyp)
    loss_fn = DistillationLoss(detection, student, teacher, hyp)
    maps = student(torch.rand(BATCH, 3, IMG, IMG))
    dual = [[m * 0.5 for m in maps], maps]  # a dual head's [aux, main] output
    expected, expected_items = detection(dual, _targets())
    got, got_items, main = loss_fn._detection_with_targets(dual, _targets())
    assert torch.allclose(got, expected) and torch.allclose(got_items, expected_items)
    assert main.fg_mask.shape == (BATCH, flatten_maps(maps).shape[1]) and main.fg_mask.any()


def test_teacher_assignment_takes_the_teachers_targets_and_trains_only_the_student(gelan_pair):
    """distill_assign teacher (LAD): positives and soft targets are what the assigner gives for the
    teacher's predictions; the losses are the student's against them; no gradient reaches the teacher."""
    student, teacher = gelan_pair
    student.train()
    hyp = load_hyp(distill_cls=0.0, distill_box=0.0, distill_feat=0.0, distill_assign="teacher")
    detection = _detection_loss(student, hyp)
    loss_fn = DistillationLoss(detection, student, teacher, hyp)
    assert loss_fn.weight(0, 10) == 1.0  # no KD weight, yet the teacher has a job: it assigns
    images = torch.rand(BATCH, 3, IMG, IMG)
    maps = student(images)
    teacher_maps = [m.detach().requires_grad_(True) for m in teacher.train()(images)]
    _, own = detection.branch_loss(maps, _targets())
    items_teacher, by_teacher = detection.branch_loss(teacher_maps, _targets())
    items, assigned = detection.branch_loss(maps, _targets(), assign_maps=teacher_maps)
    assert torch.equal(assigned.fg_mask, by_teacher.fg_mask) and torch.equal(assigned.target_scores,
                                                                              by_teacher.target_scores)
    assert not torch.equal(own.fg_mask, by_teacher.fg_mask)  # two different nets rank anchors differently
    assert not torch.allclose(items, items_teacher)  # the student's predictions are what is scored
    # the same through DistillationLoss, and only the student's maps get a gradient
    loss, out_items = loss_fn(maps, teacher_maps, _targets())
    torch.testing.assert_close(out_items["cls"], items[1].detach())
    torch.testing.assert_close(loss, items.sum() * BATCH)
    student.zero_grad(set_to_none=True)
    loss.backward()
    assert all(m.grad is None for m in teacher_maps)
    assert student.model[0].conv.weight.grad is not None
    with pytest.raises(UserError, match="distill_assign teacher"):  # the teacher's grid must be the student's
        DistillationLoss(detection, student, teacher, hyp, img=64, teacher_img=96)
    # with a KD warm-up, w is 0 at the first step, and the teacher's assignment acts all the same
    warm = DistillationLoss(detection, student, teacher, {**hyp, "distill_cls": 1.0, "distill_warmup_steps": 100})
    assert warm.weight(0, 10, step=0) == 0.0 and warm.active(0, 10)
    _, warm_items = warm(maps, teacher_maps, _targets(), step=0)
    torch.testing.assert_close(warm_items["cls"], items[1].detach())
    assert warm_items["distill/total"] == 0


def test_terms_are_float32_under_autocast(gelan_pair):
    student, teacher = gelan_pair
    student.train()
    hyp = load_hyp()
    loss_fn = DistillationLoss(_detection_loss(student, hyp), student, teacher, hyp)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        loss, items = _run(loss_fn, student, teacher.eval(), torch.rand(BATCH, 3, IMG, IMG))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(items[k].dtype == torch.float32 for k in ("distill/cls", "distill/box", "distill/feat"))


# --------------------------------------------------------------------- the teacher must fit
def test_teacher_that_does_not_fit_is_refused(gelan_pair):
    student, teacher = gelan_pair
    hyp = load_hyp()
    detection = _detection_loss(student, hyp)
    other = copy.deepcopy(teacher)
    other.stride = torch.tensor([16.0, 32.0, 64.0])
    with pytest.raises(UserError, match=r"strides \[16, 32, 64\] differ"):
        DistillationLoss(detection, student, other, hyp)
    other = copy.deepcopy(teacher)
    other.head.reg_max = 8
    with pytest.raises(UserError, match="8 DFL bins"):
        DistillationLoss(detection, student, other, hyp)
    DistillationLoss(detection, student, other, load_hyp(distill_cls=0.0, distill_box=0.0))  # features: fine
    other = copy.deepcopy(teacher)
    other.nc = 5
    with pytest.raises(UserError, match="5 classes"):
        DistillationLoss(detection, student, other, hyp)


def test_teacher_img_is_refused_for_logit_kd_and_allowed_for_features(gelan_pair):
    student, teacher = gelan_pair
    hyp = load_hyp()
    with pytest.raises(UserError, match="--teacher-img 96"):
        DistillationLoss(_detection_loss(student, hyp), student, teacher, hyp, img=64, teacher_img=96)
    features_only = load_hyp(distill_cls=0.0, distill_box=0.0, **PKD)
    loss_fn = DistillationLoss(_detection_loss(student, features_only), student, teacher, features_only,
                               img=64, teacher_img=96)
    out = DistillStudent(student.train(), loss_fn.modules_, loss_fn.student_layers)(torch.rand(BATCH, 3, IMG, IMG))
    with torch.no_grad():
        _, teacher_feats = teacher.eval()(torch.rand(BATCH, 3, 96, 96), feature_layers=loss_fn.teacher_layers)
    loss, items = loss_fn(out.preds, None, _targets(), out.feats, teacher_feats)
    assert torch.isfinite(loss) and items["distill/feat"] > 0


def test_a_student_of_another_family_fits_a_gelan_teacher(gelan_pair):
    from models.yolo import DetectionModel

    student = DetectionModel(STUDENT_YAML, nc=NC)
    hyp = load_hyp(distill_crosskd=True, **PKD)
    loss_fn = DistillationLoss(_detection_loss(student, hyp), student, gelan_pair[1], hyp)
    loss, items = _run(loss_fn, student.train(), gelan_pair[1].eval(), torch.rand(BATCH, 3, IMG, IMG))
    assert torch.isfinite(loss) and all(items[k] > 0 for k in ("distill/cls", "distill/box", "distill/feat"))


# ------------------------------------------------------------------------ two-stage freezing
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


def test_on_epoch_start_freezes_backbone_for_the_first_epochs(gelan_pair):
    student, teacher = copy.deepcopy(gelan_pair[0]), gelan_pair[1]
    hyp = load_hyp(freeze_backbone_epochs=2, distill_feat=0.0)
    loss_fn = DistillationLoss(_detection_loss(student, hyp), student, teacher, hyp)
    first_weight, neck_weight = student.model[0].conv.weight, student.model[-2].cv1.conv.weight
    for epoch, expected in [(0, False), (1, False), (2, True), (3, True)]:
        loss_fn.on_epoch_start(student, epoch, 10)
        assert first_weight.requires_grad is expected and neck_weight.requires_grad
    assert loss_fn.weight(0, 10) == 1.0  # the freeze holds the backbone, not KD: its weight is whole


# ------------------------------------------------------------------------------ teacher precision
# /proc/cpuinfo as Linux writes it (one block per logical CPU; flags lists trimmed, order kept).
CPUINFO_SAPPHIRE_RAPIDS = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu vme de pse tsc msr pae mce avx2 avx512f avx512dq avx512bw avx512vl avx512_bf16 \
avx512_fp16 amx_bf16 amx_tile amx_int8 arch_capabilities
bogomips\t: 5399.99

"""
CPUINFO_EPYC_MILAN = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7763 64-Core Processor
flags\t\t: fpu vme de pse tsc msr pae mce avx2 sha_ni clzero xsaveerptr rdpru wbnoinvd arat npt vaes \
vpclmulqdq rdpid fsrm
bogomips\t: 4890.85

"""
CPUINFO_ARM = """processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid bf16 i8mm
CPU implementer\t: 0x41

"""


@pytest.mark.parametrize("text, native", [(CPUINFO_SAPPHIRE_RAPIDS, True), (CPUINFO_EPYC_MILAN, False),
                                          (CPUINFO_ARM, False)])
def test_bf16_hardware_is_read_from_the_cpu_flags(tmp_path, text, native):
    from utils.engine.setup import cpu_has_native_bf16

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(text)
    assert cpu_has_native_bf16(cpuinfo) is native
    assert cpu_has_native_bf16(tmp_path / "missing") is False  # not Linux: fp32, never an error


def test_teacher_dtype_auto_and_explicit(monkeypatch):
    from utils.engine import setup as train_setup
    from utils.engine.setup import resolve_teacher_dtype

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    for native, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(train_setup, "cpu_has_native_bf16", lambda native=native: native)
        assert resolve_teacher_dtype("auto", cpu) == expected
        assert resolve_teacher_dtype("auto", cuda) == torch.float16  # CUDA: fp16 whatever the CPU
        assert resolve_teacher_dtype("fp32", cpu) == torch.float32 and resolve_teacher_dtype("bf16", cpu) == torch.bfloat16
    assert resolve_teacher_dtype("fp16", cuda) == torch.float16
    with pytest.raises(UserError, match="fp16"):
        resolve_teacher_dtype("fp16", cpu)


def test_loss_takes_a_bf16_teacher(gelan_pair):
    """A bf16 teacher's maps and features are read in float32: the terms are close to the fp32 teacher's."""
    student, teacher = copy.deepcopy(gelan_pair[0]).train(), copy.deepcopy(gelan_pair[1]).eval()
    hyp = load_hyp(**PKD)
    images = torch.rand(BATCH, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))
    loss_fn = DistillationLoss(_detection_loss(student, hyp), student, teacher, hyp)
    _, items = _run(loss_fn, student, teacher, images)
    teacher_bf16 = copy.deepcopy(teacher).to(torch.bfloat16)
    with torch.no_grad():
        out_bf16, feats_bf16 = teacher_bf16(images.to(torch.bfloat16), feature_layers=loss_fn.teacher_layers)
    out = DistillStudent(student, loss_fn.modules_, loss_fn.student_layers)(images)
    _, items_bf16 = loss_fn(out.preds, out_bf16, _targets(), out.feats, feats_bf16)
    for key in ("distill/cls", "distill/box", "distill/feat"):
        assert items_bf16[key].dtype == torch.float32
        assert torch.isclose(items_bf16[key], items[key], rtol=0.05), key
