"""Pretrained student backbones: torchvision ShuffleNetV2 / MobileNetV3 state_dict files in our blocks.

The weight files are written by torchvision's own model classes (random weights, no download):
``torch.save(torchvision.models.<builder>(weights=None).state_dict(), file)`` is the layout of
torchvision's ImageNet files. The network is never used: offline is simulated by making every
name lookup and connection fail.
"""

from __future__ import annotations

import argparse
import errno
import re
import socket
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import train
from models.yolo import DetectionModel
from utils.checkpoint.backbone import (
    IMAGENET,
    VARIANTS,
    backbone_key_map,
    cached_weights_path,
    load_backbone_weights,
)
from utils.core.errors import UserError
from utils.data.synthetic import generate
from utils.engine.args import build_parser, option_defaults
from utils.engine.setup import build_model

from tests.helpers import randomize_bn

ROOT = Path(__file__).resolve().parents[2]
DETECT_DIR = ROOT / "models" / "detect"
HYP_LOW = str(ROOT / "hyp" / "hyp.scratch-low.yaml")
NC = 3
IMAGE_SHAPE = (2, 3, 128, 160)  # non-square, every stride divides it

# shipped student yaml -> the torchvision builder of its backbone
SHIPPED = {
    "yolov9-tiny.yaml": "shufflenet_v2_x0_5",
    "yolov9-tiny-1.0x.yaml": "shufflenet_v2_x1_0",
    "mobilenetv3-small.yaml": "mobilenet_v3_small",
}

# No shipped student has a MobileNetV3-large backbone: this one is written here from the "large" table of the
# MobileNetV3 paper (torchvision's mobilenet_v3_large features 0-15). MobileV3Block args: [out, k, exp, SE, act, s]
LARGE_ROWS = [[16, 3, 16, False, "relu", 1], [24, 3, 64, False, "relu", 2], [24, 3, 72, False, "relu", 1],
              [40, 5, 72, True, "relu", 2], [40, 5, 120, True, "relu", 1], [40, 5, 120, True, "relu", 1],
              [80, 3, 240, False, "hswish", 2], [80, 3, 200, False, "hswish", 1], [80, 3, 184, False, "hswish", 1],
              [80, 3, 184, False, "hswish", 1], [112, 3, 480, True, "hswish", 1], [112, 3, 672, True, "hswish", 1],
              [160, 5, 672, True, "hswish", 2], [160, 5, 960, True, "hswish", 1], [160, 5, 960, True, "hswish", 1]]
LARGE_YAML = {
    "nc": NC,
    "backbone": [[-1, 1, "ConvBNAct", [16, 3, 2, "hswish"]]] + [[-1, 1, "MobileV3Block", row] for row in LARGE_ROWS],
    "head": [[[6, 12, 15], 1, "DDetect", ["nc"]]],  # P3 (row 6), P4 (row 12), P5 (row 15)
}


def torchvision_file(builder: str, folder: Path) -> tuple[nn.Module, Path]:
    """A torchvision model with random weights (BatchNorm statistics and biases too, so that every
    tensor's mapping matters) in eval mode, and its state_dict saved as torchvision saves one."""
    model = getattr(torchvision.models, builder)(weights=None)
    randomize_bn(model)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d) and m.bias is not None:  # the SE convs; torchvision starts them at 0
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
    path = folder / f"{builder}.pth"
    torch.save(model.state_dict(), path)
    return model.eval(), path


def torchvision_maps(model: nn.Module, x: torch.Tensor, count: int) -> list[torch.Tensor]:
    """torchvision's forward of the layers our backbone rows hold: ShuffleNetV2 conv1 + maxpool
    (our stem), stage2, stage3, stage4; MobileNetV3 features[0], ..., features[count - 1]."""
    if isinstance(model, torchvision.models.ShuffleNetV2):
        maps = [model.maxpool(model.conv1(x))]
        for stage in (model.stage2, model.stage3, model.stage4):
            maps.append(stage(maps[-1]))
        return maps[:count]
    maps, y = [], x
    for layer in model.features[:count]:
        y = layer(y)
        maps.append(y)
    return maps


def backbone_maps(model: DetectionModel, x: torch.Tensor) -> list[torch.Tensor]:
    """The outputs of our backbone rows (eval mode)."""
    model.eval()
    with torch.no_grad():
        _, maps = model(x, feature_layers=list(range(len(model.yaml["backbone"]))))
    return maps


def assert_same_maps(model: DetectionModel, reference: nn.Module) -> None:
    x = torch.rand(IMAGE_SHAPE)
    ours = backbone_maps(model, x)
    with torch.no_grad():
        theirs = torchvision_maps(reference, x, len(ours))
    assert len(ours) == len(theirs) == len(model.yaml["backbone"])
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert a.shape == b.shape, f"layer {i}"
        torch.testing.assert_close(a, b, msg=lambda m, i=i: f"backbone layer {i}: {m}")


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network at all (name lookups and connections fail as they do without one) and an empty
    torch hub cache under tmp_path."""

    def no_lookup(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    def no_route(*args, **kwargs):
        raise OSError(errno.ENETUNREACH, "Network is unreachable")

    monkeypatch.setattr(socket, "getaddrinfo", no_lookup)
    monkeypatch.setattr(socket, "create_connection", no_route)
    monkeypatch.setattr(socket.socket, "connect", no_route)
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    return tmp_path / "hub"


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> str:
    return str(generate(tmp_path_factory.mktemp("syn"), n_train=4, n_val=2, img_size=64, seed=0))


def train_argv(data: str, project: Path, cfg: str, extra: tuple[str, ...]) -> list[str]:
    return ["--cfg", cfg, "--data", data, "--img", "64", "--batch", "2", "--epochs", "1", "--workers", "0",
            "--device", "cpu", "--project", str(project), "--name", "bw", "--noplots", "--hyp", HYP_LOW,
            "--max-batches", "1", *extra]


# ---------------------------------------------------------------------- feature maps equal torchvision's


@pytest.mark.parametrize("yaml_name, builder", sorted(SHIPPED.items()))
def test_shipped_student_backbone_equals_torchvision(yaml_name, builder, tmp_path, log_lines):
    reference, path = torchvision_file(builder, tmp_path)
    model = DetectionModel(DETECT_DIR / yaml_name, nc=NC)
    report = load_backbone_weights(model, path)

    assert_same_maps(model, reference)
    _, key_map = backbone_key_map(model)
    n_rows = len(model.yaml["backbone"])
    backbone_keys = [k for k in model.state_dict() if int(k.split(".")[1]) < n_rows]
    assert sorted(report.loaded) == sorted(backbone_keys) == sorted(key_map)
    assert report.missing == []
    # only torchvision's last 1x1 conv and classifier have no place in the detector
    tail = ("conv5.", "fc.") if builder.startswith("shufflenet") else (f"features.{n_rows}.", "classifier.")
    assert report.unexpected and all(k.startswith(tail) for k in report.unexpected)
    assert sorted(report.unexpected) == sorted(k for k in reference.state_dict() if k.startswith(tail))
    assert [line for line in log_lines if line.startswith("backbone weights")] == [report.line()]
    assert f"loaded {len(backbone_keys)}, missing 0, unexpected {len(report.unexpected)}" in report.line()


def test_mobilenet_v3_large_backbone_equals_torchvision(tmp_path):
    reference, path = torchvision_file("mobilenet_v3_large", tmp_path)
    model = DetectionModel(LARGE_YAML)
    report = load_backbone_weights(model, path)
    assert_same_maps(model, reference)
    assert report.variant == "mobilenet_v3_large" and not report.missing


def test_shufflenet_batchnorm_eps_is_kept_through_a_checkpoint(tmp_path):
    """torchvision's ShuffleNetV2 uses BN eps 1e-5, ours 1e-3: the loaded running_var carries the
    difference, so a model rebuilt from its yaml (as a checkpoint is) still computes torchvision's maps."""
    reference, path = torchvision_file("shufflenet_v2_x0_5", tmp_path)
    model = DetectionModel(DETECT_DIR / "yolov9-tiny.yaml", nc=NC)
    load_backbone_weights(model, path)
    stem_bn = model.model[0].conv.bn
    assert stem_bn.eps == pytest.approx(1e-3)
    torch.testing.assert_close(stem_bn.running_var + stem_bn.eps, reference.conv1[1].running_var + 1e-5)
    rebuilt = DetectionModel(model.yaml, nc=NC)
    rebuilt.load_state_dict(model.state_dict())
    assert_same_maps(rebuilt, reference)


def test_a_longer_stage_reports_the_units_the_file_lacks(tmp_path):
    _, path = torchvision_file("shufflenet_v2_x0_5", tmp_path)
    cfg = DetectionModel(DETECT_DIR / "yolov9-tiny.yaml").yaml
    cfg["backbone"][1][1] = 5  # stage2 with 5 units; torchvision's has 4
    model = DetectionModel(cfg, nc=NC)
    report = load_backbone_weights(model, path)
    assert report.missing and all(k.startswith("model.1.m.4.") for k in report.missing)
    # a stride-1 unit: branch2's three convs, each a weight and five BatchNorm tensors
    assert "missing 18 (model.1.m.4: left at random init)" in report.line()


# ---------------------------------------------------------------------- flag, yaml key, build_model


def options(**changes) -> argparse.Namespace:
    """train.py's options with their defaults (the engine reads every field) and ``changes``."""
    return argparse.Namespace(**{**option_defaults(), **changes})


@pytest.mark.parametrize("distill", [False, True])
def test_flag_reaches_build_model(distill, tmp_path):
    reference, path = torchvision_file("shufflenet_v2_x1_0", tmp_path)
    extra = ["--teacher", "t.pt"] if distill else []
    opt = build_parser(distill).parse_args(["--data", "synthetic", "--cfg", str(DETECT_DIR / "yolov9-tiny-1.0x.yaml"),
                                            "--backbone-weights", str(path), *extra])
    model = build_model(opt, NC, ["a", "b", "c"])
    assert model.training
    assert_same_maps(model, reference)


def test_yaml_key_is_read_next_to_the_yaml_and_none_overrides_it(tmp_path, monkeypatch):
    reference, _ = torchvision_file("mobilenet_v3_small", tmp_path)
    text = (DETECT_DIR / "mobilenetv3-small.yaml").read_text()
    cfg = tmp_path / "student.yaml"
    cfg.write_text(f"backbone_weights: mobilenet_v3_small.pth\n{text}")  # relative to the yaml's folder
    monkeypatch.chdir(ROOT)
    parser = build_parser()
    model = build_model(parser.parse_args(["--data", "synthetic", "--cfg", str(cfg)]), NC, list("abc"))
    assert_same_maps(model, reference)

    stem = "features.0.0.weight"
    fresh = build_model(parser.parse_args(["--data", "synthetic", "--cfg", str(cfg), "--backbone-weights", "none"]),
                        NC, list("abc"))
    assert not torch.equal(fresh.state_dict()["model.0.conv.weight"], reference.state_dict()[stem])
    resumed = build_model(options(cfg=str(cfg), resume="last.pt"), NC, list("abc"))
    assert not torch.equal(resumed.state_dict()["model.0.conv.weight"], reference.state_dict()[stem])


def test_flag_without_cfg_is_refused():
    opt = options(weights="best.pt", backbone_weights="x.pth")
    with pytest.raises(UserError, match="--backbone-weights needs --cfg"):
        build_model(opt, NC, list("abc"))


# ---------------------------------------------------------------------- imagenet: cache, offline


def test_imagenet_reads_the_file_where_the_offline_message_says(offline, tmp_path):
    model = DetectionModel(DETECT_DIR / "yolov9-tiny.yaml", nc=NC)
    timeout = socket.getdefaulttimeout()
    with pytest.raises(UserError) as info:
        load_backbone_weights(model, IMAGENET)
    message = str(info.value)
    url = torchvision.models.ShuffleNet_V2_X0_5_Weights.DEFAULT.url
    assert "\n" not in message and "offline" in message and url in message
    assert socket.getdefaulttimeout() == timeout
    where = Path(re.search(r"put it at (\S+)", message).group(1))
    assert where == cached_weights_path(url) and where.is_relative_to(offline)

    reference, path = torchvision_file("shufflenet_v2_x0_5", tmp_path)
    where.parent.mkdir(parents=True)
    path.rename(where)
    report = load_backbone_weights(model, IMAGENET)
    assert report.source == str(where)
    assert_same_maps(model, reference)


def test_imagenet_download_failure_after_the_name_lookup(offline, monkeypatch):
    """The name resolves but no connection can be made (a firewall): urllib's error, one line."""
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: [(socket.AF_INET, socket.SOCK_STREAM, 6, "",
                                                                 ("192.0.2.1", 443))])
    model = DetectionModel(DETECT_DIR / "mobilenetv3-small.yaml", nc=NC)
    with pytest.raises(UserError) as info:
        load_backbone_weights(model, IMAGENET)
    message = str(info.value)
    assert "\n" not in message and "URLError" in message and "unreachable" in message
    assert torchvision.models.MobileNet_V3_Small_Weights.DEFAULT.url in message
    assert not list(offline.rglob("*.pth"))  # no partial file left in the cache


def test_offline_imagenet_is_one_line_exit_2(offline, tiny_data, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        train.main(train_argv(tiny_data, tmp_path, str(DETECT_DIR / "yolov9-tiny-1.0x.yaml"),
                              ("--backbone-weights", "imagenet")))
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "shufflenetv2_x1-5666bf0f80.pth" in err[0] and "put it at" in err[0]


# ---------------------------------------------------------------------- files that do not fit


@pytest.mark.parametrize("yaml_name, builder, needles", [
    ("yolov9-tiny.yaml", "mobilenet_v3_small", ("torchvision mobilenet_v3_small", "shufflenet_v2_x0_5", "none of")),
    ("yolov9-tiny.yaml", "shufflenet_v2_x1_0", ("torchvision shufflenet_v2_x1_0", "shufflenet_v2_x0_5", "[58, 24")),
    ("mobilenetv3-small.yaml", "mobilenet_v3_large", ("torchvision mobilenet_v3_large", "mobilenet_v3_small")),
    ("mobilenetv3-small.yaml", "shufflenet_v2_x0_5", ("torchvision shufflenet_v2_x0_5", "mobilenet_v3_small")),
])
def test_a_file_of_another_architecture_or_width_is_refused(yaml_name, builder, needles, tmp_path):
    _, path = torchvision_file(builder, tmp_path)
    model = DetectionModel(DETECT_DIR / yaml_name, nc=NC)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError, match="does not fit the backbone") as info:
        load_backbone_weights(model, path)
    assert all(needle in str(info.value) for needle in needles), str(info.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing half-loaded


def test_misfit_through_train_is_one_line_exit_2(tiny_data, tmp_path, capsys):
    _, path = torchvision_file("mobilenet_v3_small", tmp_path)
    with pytest.raises(SystemExit) as info:
        train.main(train_argv(tiny_data, tmp_path, str(DETECT_DIR / "yolov9-tiny.yaml"),
                              ("--backbone-weights", str(path))))
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not fit" in err[0] and "mobilenet_v3_small" in err[0]


def test_other_backbones_and_other_files_are_refused(tmp_path):
    _, path = torchvision_file("shufflenet_v2_x0_5", tmp_path)
    with pytest.raises(UserError, match="neither ShuffleNetV2 nor MobileNetV3"):
        load_backbone_weights(DetectionModel(DETECT_DIR / "gelan-t.yaml", nc=NC), path)
    student = DetectionModel(DETECT_DIR / "yolov9-tiny.yaml", nc=NC)
    whole = tmp_path / "whole.pt"
    torch.save(torchvision.models.shufflenet_v2_x0_5(weights=None), whole)  # a pickled module, not a state_dict
    with pytest.raises(UserError, match="pickled objects"):
        load_backbone_weights(student, whole)
    listing = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], listing)
    with pytest.raises(UserError, match="not a state_dict"):
        load_backbone_weights(student, listing)
    with pytest.raises(UserError, match="no such file"):
        build_model(build_parser().parse_args(["--data", "synthetic", "--cfg", str(DETECT_DIR / "yolov9-tiny.yaml"),
                                               "--backbone-weights", str(tmp_path / "absent.pth")]), NC, list("abc"))


def test_every_variant_has_torchvision_weights():
    for variant in VARIANTS:
        weights = getattr(torchvision.models, variant.weights_enum).DEFAULT
        assert weights.url.startswith("https://") and weights.url.endswith(".pth")
        assert getattr(torchvision.models, variant.builder)
