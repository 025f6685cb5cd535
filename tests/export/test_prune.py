"""Structured pruning (utils/export/prune.py, prune.py): shapes, ratio, protected head, exactness of the
removed channels, checkpoint round trip, ONNX, errors, and the teacher-guided fine-tune entry."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import prune as prune_cli
from models.heads import branch_maps, main_output
from models.info import count_params
from models.yolo import DetectionModel
from utils.checkpoint.ours import load_checkpoint, load_model, make_checkpoint, save_checkpoint
from utils.core.errors import UserError
from utils.export.prune import (TraceBoundary, build_pruner, check_ratio, protected_layers, prune_model, prune_weights,
                                pruned_checkpoint)

NC = 3
IMG = 64
RATIO = 0.3
# Channels drop by RATIO in every prunable group; a conv whose inputs and outputs both shrink keeps
# (1 - RATIO)^2 of its weights, layers next to kept channels (shuffles, head outputs) keep more.
PARAMS_DROP_RANGE = (0.30, 0.60)
CHANNEL_TOLERANCE = 0.03  # rounding of (1 - RATIO) * channels per group
MODELS = ("yolov9-tiny", "gelan-t")


def _randomize_bn(model: nn.Module, seed: int = 0) -> None:
    """Trained-like BatchNorms (not identity), so that removing a wrong channel shows in the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
                m.running_mean.copy_((torch.rand(m.num_features, generator=gen) - 0.5) * 0.4)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)


def _model(name: str) -> DetectionModel:
    model = DetectionModel(name, nc=NC)
    _randomize_bn(model)
    return model.eval()


@pytest.fixture(scope="module", params=MODELS)
def pruned(request):
    """(original, pruned copy, summary) of an untrained model at ratio 0.3, l1, uniform."""
    original = _model(request.param)
    model = copy.deepcopy(original)
    summary = prune_model(model, RATIO, "l1", "uniform", img_size=IMG)
    return original, model, summary


def test_pruned_model_keeps_outputs_and_shapes(pruned):
    original, model, _ = pruned
    x = torch.rand(2, 3, 2 * IMG, IMG)
    with torch.no_grad():
        y_ref, y = main_output(original(x)), main_output(model(x))
        try:
            maps_ref, maps = branch_maps(original.train()(x)), branch_maps(model.train()(x))
        finally:
            original.eval()
            model.eval()
    assert y.shape == y_ref.shape and y.shape[:2] == (2, 4 + NC) and torch.isfinite(y).all()
    assert [[m.shape for m in b] for b in maps] == [[m.shape for m in b] for b in maps_ref]
    assert not any(isinstance(m, TraceBoundary) for m in model.modules())  # tracing leaves nothing behind
    assert not any(m._forward_hooks for m in model.modules())
    assert set(model.state_dict()) == set(original.state_dict())


def test_params_and_channels_drop_by_about_the_ratio(pruned):
    original, model, summary = pruned
    assert summary.params_before == count_params(original) and summary.params_after == count_params(model)
    assert PARAMS_DROP_RANGE[0] <= summary.params_drop <= PARAMS_DROP_RANGE[1], summary
    assert abs(summary.channels_after / summary.channels_before - (1 - RATIO)) < CHANNEL_TOLERANCE
    assert summary.gflops_after < summary.gflops_before and summary.groups > 10


def test_head_outputs_and_dfl_stay(pruned):
    original, model, _ = pruned
    kept, before = protected_layers(model), protected_layers(original)
    assert len(kept) == 2 * 3 + 1
    for new, old in zip(kept, before):
        if isinstance(new, nn.Conv2d):  # box (4 * 16) and class (nc) outputs: same outputs, fewer inputs
            assert new.out_channels == old.out_channels in (4 * 16, NC)
            assert torch.equal(new.bias, old.bias) and new.in_channels < old.in_channels
        else:
            assert torch.equal(new.conv.weight, old.conv.weight) and not new.conv.weight.requires_grad
    assert any(c.in_channels < 4 * 16 for c in kept[:3])  # the grouped box convs were pruned per group


@pytest.mark.parametrize("name", MODELS)
def test_removed_channels_are_exactly_the_ones_cut_off(name):
    """Zero a group's chosen channels first: the output must not change when they are removed.
    A wrong index mapping (concat offsets, a shuffle, a split) would remove other channels."""
    model = _model(name)
    pruner, _, _ = build_pruner(model, RATIO)
    x = torch.rand(1, 3, IMG, IMG)
    checked = 0
    for group in pruner.step(interactive=True):
        with torch.no_grad():
            for dep, idxs in group:
                layer = dep.target.module
                if not pruner.DG.is_out_channel_pruning_fn(dep.handler):
                    continue
                if isinstance(layer, nn.BatchNorm2d):
                    layer.weight[idxs], layer.bias[idxs], layer.running_mean[idxs] = 0.0, 0.0, 0.0
                elif isinstance(layer, nn.Conv2d):
                    layer.weight[idxs] = 0.0
                    if layer.bias is not None:
                        layer.bias[idxs] = 0.0
            before = main_output(model(x))
            group.prune()
            after = main_output(model(x))
        torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-4)
        checked += 1
    assert checked > 10


def test_pruned_checkpoint_round_trips(pruned, tmp_path):
    original, model, summary = pruned
    path = save_checkpoint(pruned_checkpoint(model, summary, "src.pt"), tmp_path / "pruned.pt")
    loaded = load_model(path)
    assert count_params(loaded) == summary.params_after
    x = torch.rand(1, 3, IMG, IMG)
    with torch.no_grad():
        torch.testing.assert_close(main_output(loaded(x)), main_output(model(x)))
    extra = load_checkpoint(path)["extra"]["pruned"]
    assert extra["ratio"] == RATIO and extra["source"] == "src.pt" and extra["params_after"] == summary.params_after


def test_prune_weights_then_onnx_matches_pytorch(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    from utils.export.model import prepare_model
    from utils.export.onnx import export_onnx

    source = save_checkpoint(make_checkpoint(_model("yolov9-tiny"), half=False), tmp_path / "best.pt")
    path, summary = prune_weights(source, ratio=RATIO, img_size=IMG)
    assert path == tmp_path / "best-pruned30.pt" and summary.params_drop > PARAMS_DROP_RANGE[0]
    model = prepare_model(path, torch.device("cpu"))
    onnx_path = export_onnx(model, tmp_path / "pruned.onnx", IMG, names=[str(i) for i in range(NC)])
    x = torch.rand(1, 3, IMG, IMG)
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(onnx_out, model(x).numpy(), rtol=1e-3, atol=1e-3)


def test_bn_scale_removes_the_smallest_scales():
    model = _model("yolov9-tiny")
    bn = model.model[4].bn  # neck conv: its group holds this one BatchNorm
    channels = bn.num_features
    removed = channels - int(channels * (1 - RATIO))
    with torch.no_grad():
        bn.weight.fill_(1.0)
        bn.weight[::3][:removed] = 1e-3
    prune_model(model, RATIO, "bn-scale", "uniform", img_size=IMG)
    assert model.model[4].bn.num_features == channels - removed
    assert torch.all(model.model[4].bn.weight == 1.0)


def test_global_scope_prunes_and_runs():
    model = _model("yolov9-tiny")
    summary = prune_model(model, RATIO, "l1", "global", img_size=IMG)
    assert abs(summary.channels_after / summary.channels_before - (1 - RATIO)) < CHANNEL_TOLERANCE
    with torch.no_grad():
        assert main_output(model(torch.rand(1, 3, IMG, IMG))).shape[1] == 4 + NC


@pytest.mark.parametrize("ratio", [0.0, -0.1, 0.95, 1.0, float("nan")])
def test_bad_ratio_is_a_user_error(ratio):
    with pytest.raises(UserError, match="--ratio"):
        check_ratio(ratio)


def test_cli_errors_are_one_line(tmp_path, capsys):
    source = save_checkpoint(make_checkpoint(DetectionModel("yolov9-tiny", nc=NC)), tmp_path / "w.pt")
    for argv, words in ((["--weights", str(source), "--ratio", "1.5"], "--ratio"),
                        (["--weights", str(tmp_path / "missing.pt")], "does not exist"),
                        (["--weights", str(source), "--method", "l3"], "--method")):
        with pytest.raises(SystemExit) as exit_info:
            prune_cli.main(argv)
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and err.startswith("error:") and words in err and "\n" not in err
    assert not list(tmp_path.glob("*pruned*"))


def test_model_without_prunable_layers_is_refused():
    model = DetectionModel("yolov9-tiny", nc=NC)
    with pytest.raises(UserError, match="no prunable layers"):
        prune_model(model, RATIO, ignored_layers=[model], img_size=IMG)
    with pytest.raises(UserError, match="fused"):
        prune_model(DetectionModel("yolov9-tiny", nc=NC).fuse(), RATIO, img_size=IMG)


def test_teacher_guided_fine_tune_of_a_pruned_student(tmp_path):
    import train_distill
    from utils.data.synthetic import CLASS_NAMES, generate

    data = generate(tmp_path / "syn", n_train=4, n_val=2, img_size=IMG, seed=0)
    teacher = DetectionModel("gelan-t", nc=len(CLASS_NAMES))
    teacher.names = list(CLASS_NAMES)
    teacher_path = save_checkpoint(make_checkpoint(teacher), tmp_path / "teacher.pt")
    student = save_checkpoint(make_checkpoint(DetectionModel("yolov9-tiny", nc=len(CLASS_NAMES))), tmp_path / "s.pt")
    pruned_path, summary = prune_weights(student, tmp_path / "pruned.pt", ratio=RATIO, img_size=IMG)
    train_distill.main(["--weights", str(pruned_path), "--teacher", str(teacher_path), "--data", str(data),
                        "--epochs", "1", "--img", str(IMG), "--batch", "2", "--workers", "0", "--device", "cpu",
                        "--max-batches", "2", "--project", str(tmp_path / "runs"), "--name", "ft", "--noplots"])
    last = tmp_path / "runs" / "ft" / "weights" / "last.pt"
    assert count_params(load_model(last)) == summary.params_after  # fine-tuned in its pruned shape
    assert load_checkpoint(last)["extra"]["teacher"]["path"] == str(teacher_path)
    assert Path(tmp_path / "runs" / "ft" / "results.csv").is_file()

    # a new architecture on top of pruned weights would silently undo the pruning: refused
    with pytest.raises(SystemExit) as exit_info:
        train_distill.main(["--weights", str(pruned_path), "--cfg", "models/detect/yolov9-tiny.yaml",
                            "--teacher", str(teacher_path), "--data", str(data), "--epochs", "1", "--img", str(IMG),
                            "--device", "cpu", "--project", str(tmp_path / "runs"), "--name", "cfg"])
    assert exit_info.value.code == 2
