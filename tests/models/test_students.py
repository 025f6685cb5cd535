"""Student models: ShuffleNetV2 / MobileNetV3 blocks and the student yaml files."""

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from models.backbones import (
    BLOCKS,
    ConvBNAct,
    MobileV3Block,
    ShuffleV2Block,
    ShuffleV2Stage,
    ShuffleV2Stem,
    channel_shuffle,
)
from utils.core.errors import UserError
from tests.helpers import randomize_bn

DETECT_DIR = Path(__file__).resolve().parents[2] / "models" / "detect"
STUDENTS = ["yolov9-tiny.yaml", "yolov9-tiny-1.0x.yaml", "mobilenetv3-small.yaml"]
ALL_YAMLS = STUDENTS + ["yolov5s-af.yaml"]
STUDENT_PARAM_LIMIT = 3_500_000  # at nc=80; these students must stay fast on a Jetson
STRIDES = [8.0, 16.0, 32.0]
REG_MAX = 16
FUSE_RTOL = 1e-4


def _build(name: str, nc: int):
    from models.yolo import DetectionModel

    return DetectionModel(DETECT_DIR / name, nc=nc)


# ---------------------------------------------------------------- blocks on their own


def test_channel_shuffle_hand_made():
    x = torch.arange(8.0).reshape(1, 8, 1, 1)
    out = channel_shuffle(x, 2).flatten().tolist()
    assert out == [0.0, 4.0, 1.0, 5.0, 2.0, 6.0, 3.0, 7.0]
    # 3 groups of 2: [a0 a1 | b0 b1 | c0 c1] -> [a0 b0 c0 a1 b1 c1]; spatial values stay together
    y = torch.arange(6.0).reshape(1, 6, 1, 1).expand(2, 6, 2, 3).contiguous()
    shuffled = channel_shuffle(y, 3)
    assert shuffled[:, :, 0, 0].tolist() == [[0.0, 2.0, 4.0, 1.0, 3.0, 5.0]] * 2
    assert torch.equal(shuffled[:, :, 1, 2], shuffled[:, :, 0, 0])


def test_shuffle_blocks_shapes_and_reference_params():
    x = torch.randn(2, 3, 64, 64)
    stem = ShuffleV2Stem(3, 24)
    p2 = stem(x)
    assert p2.shape == (2, 24, 16, 16)
    stage = ShuffleV2Stage(24, 48, 4)
    assert stage(p2).shape == (2, 48, 8, 8)
    assert [u.stride for u in stage.m] == [2, 1, 1, 1]
    # ShuffleNetV2 0.5x stem + stages has 143,136 parameters (torchvision, without conv5 and fc)
    backbone = nn.Sequential(stem, stage, ShuffleV2Stage(48, 96, 8), ShuffleV2Stage(96, 192, 4))
    assert sum(p.numel() for p in backbone.parameters()) == 143_136
    unit = ShuffleV2Block(48, 48, 1)
    assert unit(torch.randn(1, 48, 8, 8)).shape == (1, 48, 8, 8)


def test_shuffle_stride1_keeps_half_of_the_input():
    unit = ShuffleV2Block(8, 8, 1).eval()
    x = torch.randn(1, 8, 4, 4)
    out = unit(x)
    # after the shuffle the untouched half sits in the even channels
    assert torch.equal(out[:, 0::2], x[:, :4])


def test_mobilenetv3_block_shapes_residual_and_reference_params():
    blk = MobileV3Block(40, 40, 5, 240, True, "hswish", 1)
    assert blk.add and isinstance(blk.se, nn.Module)
    assert blk(torch.randn(1, 40, 8, 8)).shape == (1, 40, 8, 8)
    down = MobileV3Block(16, 24, 3, 72, False, "relu", 2)
    assert not down.add and down(torch.randn(1, 16, 8, 8)).shape == (1, 24, 4, 4)
    no_expand = MobileV3Block(16, 16, 3, 16, True, "relu", 2)
    assert isinstance(no_expand.expand, nn.Identity)
    # the "small" table up to the last bneck has 870,560 parameters (torchvision features[:12])
    rows = [(16, 3, 16, True, "relu", 2), (24, 3, 72, False, "relu", 2), (24, 3, 88, False, "relu", 1),
            (40, 5, 96, True, "hswish", 2), (40, 5, 240, True, "hswish", 1), (40, 5, 240, True, "hswish", 1),
            (48, 5, 120, True, "hswish", 1), (48, 5, 144, True, "hswish", 1), (96, 5, 288, True, "hswish", 2),
            (96, 5, 576, True, "hswish", 1), (96, 5, 576, True, "hswish", 1)]
    layers, c = [ConvBNAct(3, 16, 3, 2, "hswish")], 16
    for row in rows:
        layers.append(MobileV3Block(c, *row))
        c = row[0]
    assert sum(p.numel() for p in nn.Sequential(*layers).parameters()) == 870_560


def test_yaml_args_round_widths():
    args, c2 = ShuffleV2Stage.yaml_args([24], [116], 4, 0.25)
    assert c2 == 28 and args == [24, 28, 4]  # 29 rounds to a multiple of 4 (a multiple of 8 is 32)
    args, c2 = ShuffleV2Block.yaml_args([48], [48, 1], 1, 1.0)
    assert args == [48, 48, 1] and c2 == 48
    args, c2 = MobileV3Block.yaml_args([16], [24, 3, 72, False, "relu", 2], 1, 0.5)
    assert c2 == 16 and args == [16, 16, 3, 40, False, "relu", 2]
    assert set(BLOCKS) >= {"ShuffleV2Stem", "ShuffleV2Stage", "ShuffleV2Block", "MobileV3Block", "ConvBNAct"}


def test_bad_block_arguments_raise_user_error():
    with pytest.raises(UserError, match="stride-1"):
        ShuffleV2Block(24, 48, 1)
    with pytest.raises(UserError, match="stride"):
        MobileV3Block(16, 16, 3, 16, False, "relu", 3)
    with pytest.raises(UserError, match="activation"):
        ConvBNAct(3, 16, 3, 2, "gelu-ish")


def test_conv_bn_act_fuse_matches():
    blk = ConvBNAct(8, 16, 3, 2, "hswish", g=2)
    randomize_bn(blk)
    blk.eval()
    x = torch.randn(2, 8, 16, 16)
    ref = blk(x)
    blk.fuse()
    assert blk.bn is None and blk.conv.bias is not None
    torch.testing.assert_close(blk(x), ref, rtol=FUSE_RTOL, atol=1e-5)


# ---------------------------------------------------------------- whole models from yaml


@pytest.mark.parametrize("name", ALL_YAMLS)
def test_yaml_builds_and_runs(name):
    nc = 3
    model = _build(name, nc)
    assert model.stride.tolist() == STRIDES
    assert len(model.distill_layers) == 3
    assert model.distill_layers == list(model.head.f)
    no = nc + 4 * REG_MAX
    size = 128
    model.train()
    maps, feats = model(torch.zeros(2, 3, size, size), feature_layers=model.distill_layers)
    assert [tuple(m.shape) for m in maps] == [(2, no, size // int(s), size // int(s)) for s in STRIDES]
    assert [f.shape[-1] for f in feats] == [size // int(s) for s in STRIDES]
    model.eval()
    h, w = 160, 224  # a non-square eval input: all strides must divide it
    with torch.no_grad():
        y, eval_maps = model(torch.rand(1, 3, h, w))
    anchors = sum((h // int(s)) * (w // int(s)) for s in STRIDES)
    assert tuple(y.shape) == (1, 4 + nc, anchors)
    assert len(eval_maps) == 3 and torch.isfinite(y).all()
    assert (y[:, 4:] >= 0).all() and (y[:, 4:] <= 1).all()


@pytest.mark.parametrize("name", STUDENTS)
def test_student_param_bound(name):
    model = _build(name, 80)
    params = sum(p.numel() for p in model.parameters())
    assert 0 < params < STUDENT_PARAM_LIMIT, f"{name}: {params:,} parameters"


@pytest.mark.parametrize("name", ALL_YAMLS)
def test_fused_equals_unfused(name):
    model = _build(name, 3)
    randomize_bn(model)
    model.eval()
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        ref = model(x)[0]
        fused = copy.deepcopy(model).fuse()
        out = fused(x)[0]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    scale = ref.abs().max()
    assert ((out - ref).abs().max() / scale).item() < FUSE_RTOL


@pytest.mark.parametrize("name", STUDENTS)
def test_every_parameter_gets_a_gradient(name):
    model = _build(name, 3)
    model.train()
    maps = model(torch.rand(2, 3, 128, 128))
    # a non-linear loss, so that BatchNorm's invariance to shifts cannot cancel a gradient
    loss = sum(m.float().pow(2).mean() for m in maps)
    loss.backward()
    missing = [n for n, p in model.named_parameters()
               if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not missing, missing
