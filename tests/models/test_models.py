"""YOLOv9 / GELAN models: official sizes, key names, forward contracts, fuse and reparameterize."""

import copy
import logging
import math
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from torch import nn

from models.common import RepConvN, RepNCSPELAN4, autopad, make_divisible
from models.heads import DFL, REG_MAX, DDetect, DualDDetect, branch_maps, main_output
from models.info import count_params, gflops
from models.yolo import DetectionModel, load_model_yaml, parse_model, reparameterize, single_branch_yaml
from utils.core.errors import UserError
from utils.core.log import LOGGER
from tests.helpers import randomize_bn

ROOT = Path(__file__).resolve().parents[2]
DETECT_DIR = ROOT / "models" / "detect"
REFERENCE = ROOT / "tests" / "fixtures" / "yolov9-keys"  # measured key lists, copied from shared/reference/yolov9
SIZES = "tsmce"
NAMES = [f"{family}-{size}" for family in ("gelan", "yolov9") for size in SIZES]
STRIDES = [8.0, 16.0, 32.0]
FUSE_RTOL = 1e-4
SMALL_NC = 3
IMG_H, IMG_W = 64, 96  # non-square on purpose: catches height/width mix-ups


class Sizes(NamedTuple):
    params: int
    keys: int
    gflops: str
    fused_params: int
    fused_keys: int
    fused_gflops: str


# FACTS.md section 1: measured on the official code (params, state_dict keys, GFLOPs at 640).
OFFICIAL: dict[tuple[str, int], Sizes] = {
    ("yolov9-t", 80): Sizes(3_717_680, 1772, "16.53", 3_674_576, 500, "16.17"),
    ("yolov9-s", 80): Sizes(9_804_512, 1772, "39.95", 9_659_168, 500, "39.06"),
    ("yolov9-m", 80): Sizes(32_878_432, 1412, "133.02", 32_667_400, 444, "131.33"),
    ("yolov9-c", 80): Sizes(51_182_080, 1460, "239.88", 50_880_768, 460, "237.64"),
    ("yolov9-e", 80): Sizes(69_529_664, 2172, "245.53", 68_669_632, 636, "241.36"),
    ("gelan-t", 80): Sizes(2_442_640, 1339, "10.08", 2_407_632, 371, "9.82"),
    ("gelan-s", 80): Sizes(7_226_208, 1339, "27.04", 7_105_888, 371, "26.38"),
    ("gelan-m", 80): Sizes(20_124_000, 907, "77.35", 19_978_672, 279, "76.32"),
    ("gelan-c", 80): Sizes(25_498_752, 937, "103.51", 25_288_768, 289, "102.15"),
    ("gelan-e", 80): Sizes(58_114_432, 1811, "192.50", 57_345_920, 523, "188.95"),
    ("yolov9-t", 3): Sizes(2_660_066, 1772, "11.04", 2_617_730, 500, "10.70"),
    ("yolov9-s", 3): Sizes(9_744_914, 1772, "39.62", 9_599_570, 500, "38.72"),
    ("yolov9-m", 3): Sizes(32_767_090, 1412, "132.40", 32_556_058, 444, "130.71"),
    ("yolov9-c", 3): Sizes(51_004_210, 1460, "238.88", 50_702_898, 460, "236.65"),
    ("yolov9-e", 3): Sizes(69_410_930, 2172, "244.86", 68_550_898, 636, "240.70"),
    ("gelan-t", 3): Sizes(1_913_833, 1339, "7.33", 1_879_209, 371, "7.08"),
    ("gelan-s", 3): Sizes(7_196_409, 1339, "26.87", 7_076_089, 371, "26.22"),
    ("gelan-m", 3): Sizes(20_068_329, 907, "77.04", 19_923_001, 279, "76.01"),
    ("gelan-c", 3): Sizes(25_439_385, 937, "103.18", 25_229_401, 289, "101.81"),
    ("gelan-e", 3): Sizes(58_055_065, 1811, "192.17", 57_286_553, 523, "188.62"),
}
# FACTS.md section 2: gelan-e layer <- yolov9-e layer
GELAN_E_SOURCE = {**{i: i for i in range(29)}, **{i: i + 7 for i in range(29, 42)}, 42: 49}


def _build(name: str, nc: int) -> DetectionModel:
    return DetectionModel(DETECT_DIR / f"{name}.yaml", nc=nc)


def _reference_keys(name: str) -> list[tuple[str, list[int], str]]:
    path = REFERENCE / f"{name}-keys.txt"
    if not path.is_file():
        pytest.skip(f"{path} is not available")
    rows = []
    for line in path.read_text().splitlines():
        key, shape, dtype = line.split("\t")
        rows.append((key, [int(s) for s in shape.strip("[]").split(",") if s.strip()], dtype))
    return rows


def _our_keys(model: nn.Module) -> list[tuple[str, list[int], str]]:
    return [(k, list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()]


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / a.abs().max().clamp(min=1e-12)).item()


def _expected_maps(nc: int, h: int, w: int) -> list[list[int]]:
    return [[1, nc + 4 * REG_MAX, h // int(s), w // int(s)] for s in STRIDES]


# ---------------------------------------------------------------- every official yaml


@pytest.mark.parametrize("name", NAMES)
def test_official_yaml_sizes_forward_and_fuse(name):
    dual = name.startswith("yolov9")
    for nc in (80, SMALL_NC):
        model = _build(name, nc)
        want = OFFICIAL[(name, nc)]
        assert count_params(model) == want.params
        assert len(model.state_dict()) == want.keys
        assert f"{gflops(model):.2f}" == want.gflops
        assert model.stride.tolist() == STRIDES
        assert isinstance(model.head, DualDDetect if dual else DDetect)
        assert model.names == [str(i) for i in range(nc)] and model.nc == nc
        if nc == SMALL_NC:
            _check_forward(model, nc, dual)
        model.fuse()
        assert count_params(model) == want.fused_params
        assert len(model.state_dict()) == want.fused_keys
        assert f"{gflops(model):.2f}" == want.fused_gflops


def _check_forward(model: DetectionModel, nc: int, dual: bool) -> None:
    x = torch.rand(1, 3, IMG_H, IMG_W)
    maps_shape = _expected_maps(nc, IMG_H, IMG_W)
    anchors = sum(h * w for _, _, h, w in maps_shape)
    model.train()
    with torch.no_grad():
        out = model(x)
    branches = out if dual else [out]
    assert [[list(m.shape) for m in maps] for maps in branches] == [maps_shape] * len(branches)
    model.eval()
    with torch.no_grad():
        y, maps = model(x)
    preds = y if dual else [y]
    assert [list(p.shape) for p in preds] == [[1, 4 + nc, anchors]] * (2 if dual else 1)
    assert len(branch_maps((y, maps))) == (2 if dual else 1)
    scores = main_output((y, maps))[:, 4:]
    assert scores.min() >= 0 and scores.max() <= 1


@pytest.mark.parametrize("name", ["yolov9-s", "gelan-s"])
def test_state_dict_keys_match_official(name):
    reference = _reference_keys(name)
    ours = _our_keys(_build(name, 80))
    assert ours == reference


def test_width_rounding_only_on_first_arg():
    assert make_divisible(180, 8) == 184 and make_divisible(64, 8) == 64
    gelan_m, _ = load_model_yaml("gelan-m")
    assert gelan_m["head"][7][2:] == ["AConv", [180]]  # built with 184 channels (FACTS.md)
    cfg = {"nc": 2, "width_multiple": 0.5, "backbone": [[-1, 1, "Conv", [64, 3, 2]]],
           "head": [[-1, 1, "RepNCSPELAN4", [64, 60, 30, 1]], [[-2, -1], 1, "Concat", [1]]]}
    layers, save = parse_model(cfg, [3])
    assert layers[0].conv.out_channels == 32  # 64 * 0.5
    block = layers[1]
    assert isinstance(block, RepNCSPELAN4)
    assert block.cv4.conv.out_channels == 32 and block.cv1.conv.out_channels == 60  # c3 as written
    assert save == [0]  # -2 must be kept for the Concat, -1 is the running input


# ---------------------------------------------------------------- head


def test_head_widths_follow_official_rule():
    head = DualDDetect(nc=80, ch=[512, 512, 512, 256, 512, 512])  # yolov9-c inputs (aux, main)
    assert head.nl == 3 and head.no == 144
    assert head.cv2[0][0].conv.out_channels == 128 and head.cv3[0][0].conv.out_channels == 512
    assert head.cv4[0][0].conv.out_channels == 64 and head.cv5[0][0].conv.out_channels == 256
    assert head.cv2[0][1].conv.groups == 4 and head.cv2[0][2].groups == 4
    assert head.cv3[0][1].conv.groups == 1
    small = DDetect(nc=3, ch=[64, 96, 128])
    assert small.cv3[0][0].conv.out_channels == 64  # max(ch0, min(2 nc, 128))


def test_dfl_is_a_frozen_expectation():
    dfl = DFL(REG_MAX)
    assert torch.equal(dfl.conv.weight.flatten(), torch.arange(REG_MAX, dtype=torch.float))
    assert not dfl.conv.weight.requires_grad
    uniform = dfl(torch.zeros(2, 4 * REG_MAX, 5))
    assert torch.allclose(uniform, torch.full((2, 4, 5), (REG_MAX - 1) / 2))
    peaked = torch.full((1, 4 * REG_MAX, 1), -50.0)
    for side, bin_ in enumerate((0, 3, 7, 15)):
        peaked[0, side * REG_MAX + bin_] = 50.0
    assert torch.allclose(dfl(peaked).flatten(), torch.tensor([0.0, 3.0, 7.0, 15.0]), atol=1e-4)


def test_decode_hand_computed_box():
    head = DDetect(nc=2, ch=[8, 8, 8]).eval()
    head.stride = torch.tensor(STRIDES)
    sizes = [(4, 6), (2, 3), (1, 2)]
    maps = [torch.zeros(1, head.no, h, w) for h, w in sizes]
    maps[1][0, :4 * REG_MAX] = -50.0
    for side in range(4):  # P4 cell (row 1, col 2): distances l=1, t=2, r=3, b=4 grid units
        maps[1][0, side * REG_MAX + side + 1, 1, 2] = 50.0
    maps[1][0, 4 * REG_MAX + 1, 1, 2] = 2.0  # class 1 logit
    y = head.decode(maps)
    assert list(y.shape) == [1, 4 + 2, 24 + 6 + 2]
    index = 24 + 1 * 3 + 2  # P3 anchors first, then P4 row-major
    cx, cy = (2.5 + (3 - 1) / 2) * 16, (1.5 + (4 - 2) / 2) * 16
    assert torch.allclose(y[0, :4, index], torch.tensor([cx, cy, 4 * 16.0, 6 * 16.0]), atol=1e-3)
    assert torch.allclose(y[0, 4:, index], torch.tensor([0.5, torch.sigmoid(torch.tensor(2.0)).item()]))
    # an all-zero P3 cell: uniform bins -> 7.5 per side, centred on the cell
    assert torch.allclose(y[0, :4, 0], torch.tensor([4.0, 4.0, 15 * 8.0, 15 * 8.0]))


def test_bias_and_batchnorm_init():
    model = _build("yolov9-t", SMALL_NC)
    for box_name, cls_name in (("cv2", "cv3"), ("cv4", "cv5")):
        box, cls = getattr(model.head, box_name), getattr(model.head, cls_name)
        for seq_box, seq_cls, stride in zip(box, cls, STRIDES):
            assert torch.all(seq_box[-1].bias == 1.0)
            prior = math.log(5 / SMALL_NC / (640 / stride) ** 2)
            assert torch.allclose(seq_cls[-1].bias, torch.full((SMALL_NC,), prior))
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(bn.eps == 1e-3 and bn.momentum == 0.03 for bn in bns)
    # the stride probe ran in train mode on zeros: one BN update towards variance 0
    assert all(int(bn.num_batches_tracked) == 1 for bn in bns)
    assert all(torch.allclose(bn.running_var, torch.full_like(bn.running_var, 0.9)) for bn in bns)


def test_export_flag_and_main_output():
    model = _build("yolov9-t", SMALL_NC).eval()
    x = torch.rand(1, 3, IMG_H, IMG_W)
    with torch.no_grad():
        (y_aux, y_main), (aux_maps, main_maps) = model(x)
        assert torch.equal(main_output(((y_aux, y_main), (aux_maps, main_maps))), y_main)
        assert torch.equal(model.head.decode(main_maps, -1), y_main)
        assert not torch.equal(y_aux, y_main)
        model.head.export = True
        exported = model(x)
    assert torch.equal(exported, y_main) and torch.equal(main_output(exported), y_main)


def test_anchor_cache_follows_input_shape():
    model = _build("gelan-t", SMALL_NC).eval()
    with torch.no_grad():
        model(torch.rand(1, 3, 64, 64))
        first = model.head.anchors
        model(torch.rand(2, 3, 64, 64))
        assert model.head.anchors is first  # same spatial shape: cached
        y, _ = model(torch.rand(1, 3, 96, 64))
    assert model.head.anchors.shape[1] == y.shape[2] == 12 * 8 + 6 * 4 + 3 * 2


# ---------------------------------------------------------------- model features


def test_feature_layers_from_the_same_pass():
    model = _build("gelan-t", SMALL_NC).eval()
    assert model.distill_layers == [15, 18, 21]
    captured, calls = {}, []
    model.model[0].register_forward_hook(lambda *_: calls.append(1))
    for i in (4, 15, 21):
        model.model[i].register_forward_hook(lambda mod, _inp, out, i=i: captured.setdefault(i, out))
    x = torch.rand(1, 3, IMG_H, IMG_W)
    with torch.no_grad():
        (y, maps), feats = model(x, feature_layers=[21, 4, 15])
    assert len(calls) == 1
    assert [f is captured[i] for f, i in zip(feats, (21, 4, 15))] == [True] * 3
    assert list(feats[0].shape) == [1, 128, IMG_H // 32, IMG_W // 32]
    with torch.no_grad():
        plain, _ = model(x)
    assert torch.equal(plain, y)


def test_dual_distill_layers_are_the_main_branch():
    model = _build("yolov9-t", SMALL_NC)
    assert model.distill_layers == [15, 18, 21]
    maps = branch_maps(model(torch.rand(1, 3, 64, 64)))
    assert len(maps) == 2 and [len(m) for m in maps] == [3, 3]


def test_fused_equals_unfused():
    model = _build("yolov9-t", SMALL_NC)
    randomize_bn(model)
    model.eval()
    x = torch.rand(1, 3, IMG_H, IMG_W)
    fused = copy.deepcopy(model).fuse()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert all(m.conv1 is None and m.conv is not None for m in fused.modules() if isinstance(m, RepConvN))
    with torch.no_grad():
        (ys, maps), (ys_f, maps_f) = model(x), fused(x)
    for a, b in zip(ys + [m for ms in maps for m in ms], ys_f + [m for ms in maps_f for m in ms]):
        assert _max_rel(a, b) < FUSE_RTOL


MINI_YAML = {
    "nc": 2,
    "depth_multiple": 0.33,
    "width_multiple": 0.25,
    "names": ["cat", "dog"],
    "backbone": [
        [-1, 1, "Silence", []],  # 0
        [-1, 1, "Conv", [64, 3, 2]],  # 1  /2
        [-1, 3, "C3", [64]],  # 2  repeats -> 1
        [-1, 1, "ADown", [128]],  # 3  /4
        [-1, 1, "ELAN1", [128, 64, 32]],  # 4
        [-1, 1, "AConv", [128]],  # 5  /8
        [-1, 2, "RepNCSP", [128]],  # 6
        [-1, 1, "Conv", [256, 3, 2]],  # 7  /16
        [-1, 1, "SPPF", [256, 5]],  # 8
        [-1, 1, "Conv", [256, 3, 2]],  # 9  /32
        [-1, 1, "SPPELAN", [256, 64]],  # 10
    ],
    "head": [
        [6, 1, "CBLinear", [[32, 64]]],  # 11
        [0, 1, "Conv", [32, 3, 2]],  # 12
        [-1, 1, "Conv", [64, 3, 2]],  # 13 /4
        [-1, 1, "Conv", [64, 3, 2]],  # 14 /8
        [[11, -1], 1, "CBFuse", [[1]]],  # 15
        [-1, 6, "Bottleneck", [64]],  # 16 depth 0.33: two copies in a Sequential
        [[-1, 6], 1, "Concat", [1]],  # 17
        [-1, 1, "RepConvN", [64]],  # 18
        [[18, 8, 10], 1, "DDetect", ["nc"]],  # 19
    ],
}


def test_mini_yaml_with_every_block_builds_and_fuses():
    model = DetectionModel(MINI_YAML)
    assert model.names == ["cat", "dog"] and model.stride.tolist() == STRIDES
    assert len(model.model[2].m) == 1  # depth 0.33 * 3 = 1 bottleneck inside C3
    assert len(model.model[6].m) == 1 and isinstance(model.model[16], nn.Sequential)
    assert model.model[1].conv.out_channels == 16  # 64 * 0.25
    assert model.model[11].c2s == [8, 16]
    assert model.save == sorted({0, 6, 8, 10, 11, 18})
    randomize_bn(model)
    model.eval()
    x = torch.rand(1, 3, IMG_H, IMG_W)
    with torch.no_grad():
        y, _ = model(x)
        y_fused, _ = copy.deepcopy(model).fuse()(x)
    assert list(y.shape) == [1, 6, 8 * 12 + 4 * 6 + 2 * 3]
    assert _max_rel(y, y_fused) < FUSE_RTOL


@pytest.mark.parametrize("bad", [
    {"head": [[-1, 1, "NoSuchBlock", []]]},
    {"head": [[5, 1, "Conv", [8]]]},
    {"nc": 0},
    {"head": [[-1, 1, "Conv", [8]]]},  # last layer is no head
    {"backbone": [[-1, 1, "Conv", "8"]]},
])
def test_bad_yaml_raises_user_error(bad):
    cfg = {"nc": 2, "backbone": [[-1, 1, "Conv", [8, 3, 2]]],
           "head": [[[0, 0, 0], 1, "DDetect", ["nc"]]], **bad}
    with pytest.raises(UserError):
        DetectionModel(cfg)


def test_missing_yaml_raises_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        DetectionModel(tmp_path / "nope.yaml")


def test_gflops_and_info_leave_the_model_alone():
    model = _build("gelan-t", SMALL_NC)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    LOGGER.addHandler(handler)
    old_level = LOGGER.level
    LOGGER.setLevel(logging.INFO)
    try:
        model.info(verbose=True)
    finally:
        LOGGER.removeHandler(handler)
        LOGGER.setLevel(old_level)
    lines = [r.getMessage() for r in records]
    assert len(lines) == 1 + len(model.model) + 1
    assert "RepNCSPELAN4" in lines[5] and "1,913,833 parameters" in lines[-1] and "7.3 GFLOPs" in lines[-1]
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert gflops(model, (320, 640)) == pytest.approx(gflops(model, 640) / 2)


def test_autopad():
    assert autopad(3) == 1 and autopad(5) == 2 and autopad(3, d=2) == 2 and autopad(3, 0) == 0
    assert autopad([3, 5]) == [1, 2]


# ---------------------------------------------------------------- reparameterize


@pytest.mark.parametrize("size", SIZES)
def test_single_branch_layout_is_the_gelan_yaml(size):
    dual, _ = load_model_yaml(f"yolov9-{size}")
    gelan, _ = load_model_yaml(f"gelan-{size}")
    derived, mapping = single_branch_yaml(dual)
    assert derived["backbone"] + derived["head"] == gelan["backbone"] + gelan["head"]
    if size == "e":
        assert mapping == GELAN_E_SOURCE
    elif size in "mc":  # FACTS.md: gelan i <- yolov9 i + 1 (skips Silence), head 22 <- 38
        assert mapping == {**{i: i + 1 for i in range(22)}, 22: 38}
    else:
        assert mapping == {**{i: i for i in range(22)}, 22: 29}


def test_reparameterized_yolov9_s_is_gelan_s():
    model = _build("yolov9-s", 80)
    randomize_bn(model)
    model.eval()
    gelan = reparameterize(model)
    assert count_params(gelan) == OFFICIAL[("gelan-s", 80)].params
    assert not gelan.training and gelan.names == model.names
    x = torch.rand(1, 3, IMG_H, IMG_W)
    with torch.no_grad():
        (_, y_main), (_, main_maps) = model(x)
        y, maps = gelan(x)
    assert torch.equal(y, y_main)
    assert all(torch.equal(a, b) for a, b in zip(maps, main_maps))
    assert _our_keys(gelan) == _reference_keys("gelan-s")


def test_reparameterized_yolov9_c_drops_the_aux_branch():
    model = _build("yolov9-c", SMALL_NC)
    randomize_bn(model)
    model.eval()
    gelan = reparameterize(model)
    assert count_params(gelan) == OFFICIAL[("gelan-c", SMALL_NC)].params
    assert isinstance(gelan.head, DDetect) and not isinstance(gelan.head, DualDDetect)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        (_, y_main), _ = model(x)
        y, _ = gelan(x)
    assert torch.equal(y, y_main)
    assert reparameterize(gelan) is gelan  # single-head models are returned as they are
