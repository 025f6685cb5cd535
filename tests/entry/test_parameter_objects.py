"""Parameter objects: each entry script's options object has one field per flag with the flag's default,
the settings-or-keywords rule refuses mixed and unknown input, the evaluator feeds custom outputs, and
the ONNX Runtime session factory picks providers by device."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import detect_dual
import val
from utils.core.options import settings_or_fields
from utils.eval.evaluator import EvalSettings, Evaluator
from utils.eval.inference import Inference, InferenceOutput
from utils.eval.outputs import EvalBatch, EvalOutput

NC = 2
IMG = 32


@pytest.mark.parametrize(("module", "options"), [(val, val.ValOptions), (detect_dual, detect_dual.DetectOptions)])
def test_options_mirror_the_flags(module, options):
    """Same names and defaults as parse_args, so ``from_args`` and a direct call agree."""
    args = module.parse_args(["--weights", "w.pt"])
    assert options.from_args(args) == options(weights="w.pt")
    assert {field.name for field in dataclasses.fields(options)} == set(vars(args))


def test_settings_or_fields():
    assert settings_or_fields(EvalSettings, None, {"max_det": 5}).max_det == 5
    given = EvalSettings(iou_thres=0.5)
    assert settings_or_fields(EvalSettings, given, {}) is given
    with pytest.raises(TypeError, match="not both"):
        settings_or_fields(EvalSettings, given, {"max_det": 5})
    with pytest.raises(TypeError):
        settings_or_fields(EvalSettings, None, {"no_such_field": 1})
    with pytest.raises(TypeError, match="expected a EvalSettings"):
        settings_or_fields(EvalSettings, object(), {})


class _FixedInference(Inference):
    """One box per image at the label's place, score 0.9 for class 0: a perfect detector."""

    device, input_dtype = torch.device("cpu"), torch.float32

    def __call__(self, images: torch.Tensor) -> InferenceOutput:
        preds = torch.zeros(len(images), 4 + NC, 1)
        preds[:, :4, 0] = torch.tensor([16.0, 16.0, 8.0, 8.0])  # cx, cy, w, h px
        preds[:, 4, 0] = 0.9
        return InferenceOutput(preds)


class _Counting(EvalOutput):
    def __init__(self) -> None:
        self.batches, self.finished = [], False

    def add_batch(self, batch: EvalBatch) -> None:
        self.batches.append(batch.index)

    def finish(self, result, metrics: dict) -> None:
        self.finished = True
        metrics["counted"] = len(self.batches)


def test_evaluator_feeds_custom_outputs():
    images = torch.zeros(2, 3, IMG, IMG, dtype=torch.uint8)
    targets = torch.tensor([[0, 0, 0.5, 0.5, 0.25, 0.25], [1, 0, 0.5, 0.5, 0.25, 0.25]])
    shapes = [((IMG, IMG), ((1.0, 1.0), (0.0, 0.0)))] * 2
    batches = [(images, targets, ["a.jpg", "b.jpg"], shapes)] * 3
    output = _Counting()
    metrics = Evaluator(EvalSettings(progress=False), ["a", "b"], [output]).run(_FixedInference(), batches)
    assert output.batches == [0, 1, 2] and output.finished and metrics["counted"] == 3
    assert metrics["images"] == 6 and metrics["map50"] == pytest.approx(1.0) and metrics["loss"] is None


def test_outputs_need_a_save_dir():
    with pytest.raises(ValueError, match="save_dir"):
        EvalSettings(save_json=True).outputs(["a"])


def test_ort_session_providers(monkeypatch):
    ort = pytest.importorskip("onnxruntime")
    from utils.export.ort_session import CPU_PROVIDER, CUDA_PROVIDER, providers_for

    assert providers_for("cpu") == [CPU_PROVIDER]
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA_PROVIDER, CPU_PROVIDER])
    assert providers_for("cuda:1") == [(CUDA_PROVIDER, {"device_id": 1}), CPU_PROVIDER]
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CPU_PROVIDER])
    assert providers_for("cuda") == [CPU_PROVIDER]
