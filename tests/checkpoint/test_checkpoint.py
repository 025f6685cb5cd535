"""Checkpoints in our format: round trip, atomic saves, pruned shapes, bad files refused.

Official YOLOv9 files are tested in test_official_ckpt.py."""

from __future__ import annotations

import argparse
import copy
import io
import os
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from models.yolo import DetectionModel
from utils.checkpoint.ours import (CHECKPOINT_FORMAT, load_checkpoint, load_model, make_checkpoint, save_checkpoint,
                                   strip_checkpoint)
from utils.core.errors import UserError

NC = 3
NAMES = ["cell", "platelet", "rbc"]
IMG = 64
PRUNED_CHANNELS = 24
PERTURB = 0.05


def _fp16_exact(model: DetectionModel) -> DetectionModel:
    """Round the weights to fp16 values so that an fp16 checkpoint reproduces them exactly."""
    model = model.half().float()
    model.names = list(NAMES)
    return model.eval()


def _perturbed(model: DetectionModel) -> DetectionModel:
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * PERTURB)
    return _fp16_exact(other)


def _flat(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for item in out for t in _flat(item)]


def _same_output(a: DetectionModel, b: DetectionModel) -> bool:
    x = torch.rand(1, 3, IMG, IMG)
    with torch.no_grad():
        ya, yb = _flat(a.eval()(x)), _flat(b.eval()(x))
    return len(ya) == len(yb) and all(torch.equal(u, v) for u, v in zip(ya, yb))


@pytest.fixture(scope="module")
def gelan() -> DetectionModel:
    torch.manual_seed(1)
    return _fp16_exact(DetectionModel("gelan-s.yaml", nc=NC))


# ------------------------------------------------------------------------------ our format
@pytest.mark.parametrize("half", [True, False])
def test_our_checkpoint_round_trips(gelan, tmp_path, half):
    model = copy.deepcopy(gelan)
    if not half:  # fp32 must keep weights that fp16 cannot represent
        with torch.no_grad():
            model.model[0].conv.weight.add_(1e-6)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    optimizer.param_groups[0]["momentum"] = np.float64(0.8)  # what np.interp warmup leaves there
    opt = argparse.Namespace(epochs=5, save_dir=Path("runs/x"), device=torch.device("cpu"))
    ckpt = make_checkpoint(model, ema=model, ema_updates=7, optimizer=optimizer, epoch=2,
                           best_fitness=np.array([0.5]), opt=opt, hyp={"lr0": np.float64(0.01)}, half=half,
                           extra={"rng": (3, (1, 2), None)})
    path = save_checkpoint(ckpt, tmp_path / "weights" / "last.pt")

    raw = torch.load(path, map_location="cpu", weights_only=True)  # the contract: plain data only
    assert raw["format"] == CHECKPOINT_FORMAT and raw["names"] == NAMES and raw["nc"] == NC
    dtype = torch.float16 if half else torch.float32
    assert raw["state_dict"]["model.0.conv.weight"].dtype == dtype
    assert raw["state_dict"]["model.0.bn.num_batches_tracked"].dtype == torch.int64
    assert type(raw["best_fitness"]) is float and type(raw["hyp"]["lr0"]) is float
    assert type(raw["optimizer"]["param_groups"][0]["momentum"]) is float
    assert raw["opt"]["save_dir"] == "runs/x" and raw["extra"]["rng"] == (3, (1, 2), None)

    ours = load_checkpoint(path)
    assert ours["epoch"] == 2 and ours["ema_updates"] == 7
    torch.optim.SGD(DetectionModel(ours["model_yaml"]).parameters(), lr=0.1).load_state_dict(ours["optimizer"])
    loaded = load_model(path)
    assert not loaded.training and loaded.names == NAMES and loaded.nc == NC
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    assert _same_output(model, loaded)


def test_prefer_ema_and_strip(gelan, tmp_path):
    raw_model = _perturbed(gelan)
    path = save_checkpoint(make_checkpoint(raw_model, ema=gelan, optimizer=torch.optim.SGD(
        raw_model.parameters(), lr=0.1), epoch=4, half=False), tmp_path / "last.pt")
    assert _same_output(gelan, load_model(path))
    assert _same_output(raw_model, load_model(path, prefer_ema=False))

    released = strip_checkpoint(path, out=tmp_path / "best.pt")
    ckpt = load_checkpoint(released)
    assert ckpt["optimizer"] is None and ckpt["ema"] is None and ckpt["epoch"] == -1
    assert ckpt["state_dict"]["model.0.conv.weight"].dtype == torch.float16
    assert _same_output(gelan, load_model(released, prefer_ema=False))
    assert load_checkpoint(path)["epoch"] == 4  # the source file is untouched


@pytest.mark.parametrize("failure", [OSError("disk full"), KeyboardInterrupt()])
def test_interrupted_save_leaves_previous_file(gelan, tmp_path, monkeypatch, failure):
    path = save_checkpoint(make_checkpoint(gelan, epoch=1), tmp_path / "last.pt")
    real_save = torch.save

    def save_half_then_fail(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer)
        f.write(buffer.getvalue()[: buffer.tell() // 2])
        raise failure

    monkeypatch.setattr(torch, "save", save_half_then_fail)
    with pytest.raises(type(failure)):
        save_checkpoint(make_checkpoint(gelan, epoch=2), path)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temporary file left


def test_pruned_model_loads_with_its_own_shapes(gelan, tmp_path):
    model = copy.deepcopy(gelan)
    first, second = model.model[0], model.model[1]
    with torch.no_grad():  # drop output channels of layer 0 and the matching inputs of layer 1
        first.conv.weight = torch.nn.Parameter(first.conv.weight[:PRUNED_CHANNELS].clone())
        first.conv.out_channels = first.bn.num_features = PRUNED_CHANNELS
        for name in ("weight", "bias"):
            setattr(first.bn, name, torch.nn.Parameter(getattr(first.bn, name)[:PRUNED_CHANNELS].clone()))
        for name in ("running_mean", "running_var"):
            setattr(first.bn, name, getattr(first.bn, name)[:PRUNED_CHANNELS].clone())
        second.conv.weight = torch.nn.Parameter(second.conv.weight[:, :PRUNED_CHANNELS].clone())
        second.conv.in_channels = PRUNED_CHANNELS
    path = save_checkpoint(make_checkpoint(model, half=False), tmp_path / "pruned.pt")
    loaded = load_model(path)
    assert loaded.model[0].conv.out_channels == PRUNED_CHANNELS
    assert _same_output(model, loaded)


def test_load_model_leaves_rng_and_fuses(gelan, tmp_path):
    path = save_checkpoint(make_checkpoint(gelan), tmp_path / "m.pt")
    state = torch.get_rng_state()
    fused = load_model(path, fuse=True)
    assert torch.equal(state, torch.get_rng_state())
    assert fused.is_fused
    x = torch.rand(1, 3, IMG, IMG)
    with torch.no_grad():
        assert torch.allclose(fused(x)[0], gelan(x)[0], atol=1e-4)


def test_weights_that_do_not_fit_are_refused(gelan, tmp_path):
    ckpt = make_checkpoint(gelan)
    del ckpt["state_dict"]["model.0.conv.weight"]
    path = save_checkpoint(ckpt, tmp_path / "broken.pt")
    with pytest.raises(UserError, match="do not fit"):
        load_model(path)


# ------------------------------------------------------------------------------ bad files
class _Payload:
    """Pickles as a call of ``func(*args)``: what a malicious checkpoint does."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("make_payload, global_name", [
    (lambda marker: _Payload(os.system, f"touch {marker}"), "system"),
    (lambda marker: _Payload(eval, f"open({str(marker)!r}, 'w')"), "eval"),
    (lambda marker: _Payload(subprocess.Popen, ["touch", str(marker)]), "subprocess.Popen"),
])
def test_malicious_pickle_is_refused_without_running(gelan, tmp_path, make_payload, global_name):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": {"note": "looks harmless"}, "payload": make_payload(marker)}, path)
    for loader in (load_model, load_checkpoint):
        with pytest.raises(UserError, match=global_name):
            loader(path)
    assert not marker.exists()


def _write_text(path: Path) -> None:
    path.write_text("this is not a checkpoint\n")


def _write_random(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())


def _write_zip_without_pickle(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/readme.txt", "hello")


@pytest.mark.parametrize("write", [
    _write_text,
    _write_random,
    lambda p: p.write_bytes(b""),
    _write_zip_without_pickle,
    lambda p: torch.save(torch.zeros(3), p),
    lambda p: torch.save({"epoch": 3, "weights": torch.zeros(3)}, p),
    lambda p: torch.save({"model": {"w": torch.zeros(3)}}, p),
    lambda p: None,  # no file at all
], ids=["text", "random", "empty", "zip", "tensor", "dict", "state-dict-model", "missing"])
def test_not_a_checkpoint_is_a_user_error(tmp_path, write):
    path = tmp_path / "bad.pt"
    write(path)
    for loader in (load_model, load_checkpoint):
        with pytest.raises(UserError, match="bad.pt"):
            loader(path)
