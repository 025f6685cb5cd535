"""Export: ONNX Runtime equals PyTorch, end-to-end NMS graphs, the CLI and the ONNX back-end.

Models are untrained (built from yaml, nc=3) with randomised BatchNorm statistics and head outputs,
so that fusing is not a no-op and the scores differ between anchors.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
import torch
from torch import nn

import export
from models.heads import main_output
from models.yolo import DetectionModel
from utils.checkpoint.ours import load_model, make_checkpoint, save_checkpoint
from utils.data.augment import letterbox
from utils.export import trt as export_trt
from utils.export.backends import load_backend
from utils.export.onnx import TRT_OUTPUTS, EndToEnd, export_onnx, read_metadata
from utils.ops.nms import non_max_suppression

ort = pytest.importorskip("onnxruntime")

MODELS = ("gelan-t", "yolov9-t", "yolov9-tiny", "yolov9-tiny-1.0x", "mobilenetv3-small")
NAMES = ["RBC", "WBC", "Platelets"]
REL_TOL = 1e-4  # boxes: max |diff| <= REL_TOL * max |value|
SCORE_ATOL = 1e-5
HALF_TOL = 1e-2  # fp16 graphs: boxes relative to their magnitude, scores absolute
REAL_SIZE = 160
CONF, IOU, MAX_DET = 0.5, 0.45, 30


def _randomise(model: DetectionModel, seed: int) -> DetectionModel:
    """Random BN statistics/affine (fusion does real work) and random head output convs (scores vary)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
        for m in model.head.modules():
            if isinstance(m, nn.Conv2d) and m.bias is not None:  # the 1x1 output convs (DFL has no bias)
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen))
    return model


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("weights")
    paths = {}
    for i, name in enumerate(MODELS):
        model = _randomise(DetectionModel(name, nc=len(NAMES)), seed=i)
        model.names = list(NAMES)
        paths[name] = folder / f"{name}.pt"
        save_checkpoint(make_checkpoint(model, half=False), paths[name])
    return paths


def _session(path: Path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _real_image(root: Path, size: int = REAL_SIZE) -> torch.Tensor:
    """One BCCD JPEG letterboxed to ``size``: float ``[1, 3, size, size]`` RGB in [0, 1]."""
    path = sorted((root / "JPEGImages").glob("*.jpg"))[0]
    boxed = letterbox(cv2.imread(str(path)), size)[0]
    return torch.from_numpy(np.ascontiguousarray(boxed[:, :, ::-1].transpose(2, 0, 1))).float()[None] / 255


def _assert_close(actual: np.ndarray, expected: torch.Tensor) -> None:
    """``[B, 4 + nc, A]``: boxes relative to their largest magnitude, scores with a small atol."""
    expected = expected.numpy()
    assert actual.shape == expected.shape
    assert np.isfinite(actual).all()
    box_err = np.abs(actual[:, :4] - expected[:, :4]).max()
    assert box_err <= REL_TOL * np.abs(expected[:, :4]).max(), box_err
    np.testing.assert_allclose(actual[:, 4:], expected[:, 4:], rtol=REL_TOL, atol=SCORE_ATOL)


@pytest.mark.parametrize("name", MODELS)
def test_onnx_matches_pytorch(weights, bccd_root, tmp_path, name):
    """Reparameterized + fused + exported (dynamic) == the unfused model's main branch, on random
    input (batch 2) and on a real image (batch 1, another size)."""
    reference = load_model(weights[name])  # eval, unfused, dual heads kept
    path = export_onnx(export.prepare_model(weights[name], torch.device("cpu")), tmp_path / f"{name}.onnx",
                       (64, 96), dynamic=True, names=NAMES)
    session = _session(path)
    for images in (torch.rand(2, 3, 64, 96), _real_image(bccd_root)):
        with torch.no_grad():
            expected = main_output(reference(images))
        _assert_close(session.run(None, {"images": images.numpy()})[0], expected)


def _random_predictions(batch: int, anchors: int, size: float = 160.0) -> torch.Tensor:
    """Decoded-head-like ``[B, 4 + nc, A]``: random boxes (cx, cy, w, h px) that overlap often, and
    random scores (no ties, unlike an untrained model on a flat image)."""
    gen = torch.Generator().manual_seed(0)
    centres = torch.rand(batch, 2, anchors, generator=gen) * size
    sides = torch.rand(batch, 2, anchors, generator=gen) * size / 4 + 4
    scores = torch.rand(batch, len(NAMES), anchors, generator=gen)
    return torch.cat((centres, sides, scores), 1)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning", "ignore::torch.jit.TracerWarning")
def test_end2end_ort_nms_matches_our_nms(tmp_path):
    """The NMS part of the 'ort' graph alone (an identity model, so both NMS see the same
    predictions): same boxes, scores, classes and order as utils.ops.nms, at most MAX_DET per image."""
    wrapper = EndToEnd(nn.Identity(), "ort", MAX_DET, IOU, CONF).eval()
    preds = _random_predictions(2, 400)
    path = tmp_path / "nms.onnx"
    torch.onnx.export(wrapper, (preds,), str(path), opset_version=17, input_names=["preds"],
                      output_names=["detections"], dynamic_axes={"preds": {0: "batch", 2: "anchors"}}, dynamo=False)
    session = _session(path)
    for batch in (preds, preds[:1, :, :50]):  # another batch size and anchor count than traced
        detections = session.run(None, {"preds": batch.numpy()})[0]  # [N, 7]
        expected = non_max_suppression(batch, CONF, IOU, max_det=MAX_DET)
        assert len(expected[0]) == MAX_DET or batch.shape[2] < MAX_DET * 2  # the per-image cap is exercised
        assert np.all(np.diff(detections[:, 0]) >= 0), "rows are grouped by image"
        for b, exp in enumerate(expected):
            np.testing.assert_allclose(detections[detections[:, 0] == b][:, 1:], exp.numpy(), rtol=1e-6, atol=1e-4)
    with torch.no_grad():  # nothing above the threshold: an empty [0, 7], not an error
        assert EndToEnd(nn.Identity(), "ort", MAX_DET, IOU, conf_thres=1.0)(preds).shape == (0, 7)


def test_end2end_ort_model_runs(weights, bccd_root, tmp_path):
    """A whole model with the 'ort' NMS through export_onnx: ONNX Runtime runs it; rows are
    (image, x1, y1, x2, y2, score, class), grouped by image, best first, above the threshold."""
    model = export.prepare_model(weights["yolov9-tiny"], torch.device("cpu"))
    path = export_onnx(model, tmp_path / "e2e.onnx", REAL_SIZE, dynamic=True, end2end="ort", max_det=MAX_DET,
                       iou_thres=IOU, conf_thres=CONF, names=NAMES)
    assert read_metadata(path)["layout"] == "end2end-ort"
    images = torch.cat((_real_image(bccd_root), torch.rand(1, 3, REAL_SIZE, REAL_SIZE)))
    detections = _session(path).run(None, {"images": images.numpy()})[0]
    with torch.no_grad():
        expected = non_max_suppression(model(images), CONF, IOU, max_det=MAX_DET)
    assert detections.shape[1] == 7 and len(detections) > 0
    assert np.all(np.diff(detections[:, 0]) >= 0)
    for b, exp in enumerate(expected):
        rows = detections[detections[:, 0] == b]
        assert 0 < len(rows) <= MAX_DET and np.all(rows[:, 5] > CONF) and np.all(np.diff(rows[:, 5]) <= 0)
        assert set(rows[:, 6].tolist()) <= set(range(len(NAMES)))
        # near-tied scores (flat image regions) may be ordered differently in the last bits, so the
        # greedy NMS can keep other boxes; the best score is stable
        assert rows[0, 5] == pytest.approx(float(exp[0, 4]), abs=SCORE_ATOL)


def test_half_export_runs_in_ort(weights, tmp_path):
    """FP16 graph (converted after an FP32 trace): FP32 input and output by default, FP16 with
    fp16_io; close to the FP32 model at FP16 precision; the decode stays FP32 (boxes much closer)."""
    model = export.prepare_model(weights["yolov9-tiny"], torch.device("cpu"))
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(images)
    for fp16_io in (False, True):
        path = export_onnx(model, tmp_path / f"half-{fp16_io}.onnx", 64, precision="fp16", fp16_io=fp16_io, names=NAMES)
        dtype = np.float16 if fp16_io else np.float32
        y = _session(path).run(None, {"images": images.numpy().astype(dtype)})[0]
        assert y.dtype == dtype and y.shape == tuple(expected.shape)
        assert read_metadata(path)["precision"] == "fp16"
        box_err = np.abs(y[:, :4].astype(np.float32) - expected[:, :4].numpy()).max()
        assert box_err <= HALF_TOL * expected[:, :4].abs().max()
        assert np.abs(y[:, 4:].astype(np.float32) - expected[:, 4:].numpy()).max() <= HALF_TOL


def test_end2end_trt_graph_has_plugin(weights, tmp_path):
    model = export.prepare_model(weights["yolov9-tiny"], torch.device("cpu"))
    path = export_onnx(model, tmp_path / "trt.onnx", 64, batch=2, end2end="trt", max_det=MAX_DET, iou_thres=IOU,
                       conf_thres=CONF, names=NAMES)
    graph = onnx.load(str(path)).graph
    nodes = [n for n in graph.node if n.op_type == "EfficientNMS_TRT"]
    assert len(nodes) == 1 and len(nodes[0].output) == len(TRT_OUTPUTS)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert attrs["max_output_boxes"] == MAX_DET and attrs["plugin_version"] == b"1"
    assert attrs["background_class"] == -1 and attrs["box_coding"] == 0 and attrs["score_activation"] == 0
    assert attrs["iou_threshold"] == pytest.approx(IOU) and attrs["score_threshold"] == pytest.approx(CONF)
    shapes = {o.name: ([d.dim_value for d in o.type.tensor_type.shape.dim], o.type.tensor_type.elem_type)
              for o in graph.output}
    int32, float32 = onnx.TensorProto.INT32, onnx.TensorProto.FLOAT
    assert shapes == {"num_dets": ([2, 1], int32), "det_boxes": ([2, MAX_DET, 4], float32),
                      "det_scores": ([2, MAX_DET], float32), "det_classes": ([2, MAX_DET], int32)}


def test_cli_onnx_and_missing_tensorrt(weights, tmp_path, monkeypatch, capsys):
    """Static transposed export with onnxslim through the CLI; without TensorRT the trtexec line is
    printed and main returns normally (exit code 0)."""
    monkeypatch.setattr(export_trt, "tensorrt_available", lambda: False)
    src = tmp_path / "student.pt"
    src.write_bytes(weights["mobilenetv3-small"].read_bytes())
    written = export.main(["--weights", str(src), "--include", "onnx", "engine", "--img", "64", "--batch", "2",
                           "--simplify", "--transpose", "--device", "cpu"])
    onnx_path = tmp_path / "student.onnx"
    assert written == [onnx_path]
    out = capsys.readouterr().out
    engine = tmp_path / "student.engine"
    layers = tmp_path / "student.layers.json"
    # an FP32 ONNX: TensorRT 10's deprecated weak --fp16, nothing on 11 (FP32 engine), and the advice
    assert (f"TensorRT 10: trtexec --onnx={onnx_path} --saveEngine={engine} --fp16 --memPoolSize=workspace:2048M "
            f"--profilingVerbosity=detailed --exportLayerInfo={layers}") in out
    assert (f"TensorRT 11: trtexec --onnx={onnx_path} --saveEngine={engine} --memPoolSize=workspace:2048M "
            f"--profilingVerbosity=detailed --exportLayerInfo={layers}") in out
    assert "Export with --half" in out
    meta = read_metadata(onnx_path)
    assert json.loads(meta["names"]) == NAMES and meta["stride"] == "32" and json.loads(meta["imgsz"]) == [64, 64]
    assert meta["layout"] == "ba-4+nc"
    images = torch.rand(2, 3, 64, 64)
    y = _session(onnx_path).run(None, {"images": images.numpy()})[0]
    with torch.no_grad():
        expected = main_output(load_model(weights["mobilenetv3-small"])(images))
    _assert_close(y.transpose(0, 2, 1), expected)


def test_cli_errors_exit_2(weights, tmp_path, capsys):
    text_file = tmp_path / "notes.pt"
    text_file.write_text("not a checkpoint")
    plain_dict = tmp_path / "dict.pt"
    torch.save({"epoch": 3}, plain_dict)
    good = str(weights["yolov9-tiny"])
    cases = {"format": ["--weights", good, "--include", "tflite"],
             "int8 without data": ["--weights", good, "--include", "engine", "--int8"],
             "text file": ["--weights", str(text_file)],
             "not a model": ["--weights", str(plain_dict)],
             "missing": ["--weights", str(tmp_path / "absent.pt")],
             "int8 dynamic": ["--weights", good, "--int8", "--data", "data.yaml", "--dynamic"],
             "too few calibration images": ["--weights", good, "--int8", "--data", "data.yaml", "--calib-images", "8"],
             "fp16 io without half": ["--weights", good, "--fp16-io"],
             "trt version": ["--weights", good, "--trt-version", "9"]}
    for case, argv in cases.items():
        with pytest.raises(SystemExit) as info:
            export.main(argv + ["--device", "cpu"])
        assert info.value.code == 2, case
        err = capsys.readouterr().err.strip().splitlines()
        assert err and err[-1].startswith("error: "), case
    assert not (tmp_path / "notes.onnx").exists()


def test_static_onnx_backend_matches_pt(weights, tmp_path):
    """utils.export.backends on a static batch-1 export: a batch of 3 is split (and padded) by the back-end
    and gives the .pt back-end's predictions."""
    pt = weights["yolov9-tiny-1.0x"]
    onnx_path = export_onnx(export.prepare_model(pt, torch.device("cpu")), tmp_path / "static.onnx", 64, names=NAMES)
    backends = [load_backend(pt, "cpu"), load_backend(onnx_path, "cpu")]
    assert backends[1].names == NAMES and backends[1].img_size == (64, 64) and backends[1].stride == 32
    images = torch.rand(3, 3, 64, 64)
    _assert_close(backends[1](images).numpy(), backends[0](images))


def _labels(folder: Path) -> dict[str, np.ndarray]:
    """detect_dual.py --save-txt --save-conf files: stem -> rows (cls, cx, cy, w, h, conf)."""
    return {f.stem: np.loadtxt(f, ndmin=2) for f in sorted((folder / "labels").glob("*.txt"))}


def test_val_and_detect_give_the_same_results_for_onnx_and_pt(weights, tmp_path):
    """val.py and detect_dual.py with x.onnx (dynamic export, so both take the same letterbox path)
    equal x.pt: mAP within 0.001 and the same detections on a tiny synthetic set."""
    import detect_dual
    import val
    from utils.data.synthetic import CLASS_NAMES, generate

    size = 128
    data = generate(tmp_path / "synthetic", n_train=0, n_val=4, img_size=size)
    model = _randomise(DetectionModel("yolov9-tiny-1.0x", nc=len(CLASS_NAMES)), seed=len(MODELS))
    model.names = list(CLASS_NAMES)
    pt = tmp_path / "synthetic-student.pt"
    save_checkpoint(make_checkpoint(model, half=False), pt)
    onnx_path = export_onnx(export.prepare_model(pt, torch.device("cpu")), tmp_path / "m.onnx", size, dynamic=True,
                            names=list(CLASS_NAMES))
    common = {"imgsz": size, "device": "cpu", "project": str(tmp_path / "runs"), "exist_ok": True}
    metrics = [val.run(val.ValOptions(str(w), data=str(data), batch_size=2, workers=0, noplots=True,
                                      name=f"val-{w.suffix[1:]}", **common)) for w in (pt, onnx_path)]
    assert metrics[0]["images"] == metrics[1]["images"] == 4
    for key in ("precision", "recall", "map50", "map"):
        assert metrics[1][key] == pytest.approx(metrics[0][key], abs=1e-3), key
    folders = [detect_dual.run(detect_dual.DetectOptions(str(w), source=str(data.parent / "images" / "val"),
                                                         save_txt=True, save_conf=True, nosave=True,
                                                         name=f"detect-{w.suffix[1:]}", **common))
               for w in (pt, onnx_path)]
    labels = [_labels(f) for f in folders]
    assert labels[0].keys() == labels[1].keys() and sum(len(v) for v in labels[0].values()) > 0
    for stem, rows in labels[0].items():
        assert rows.shape == labels[1][stem].shape, stem
        np.testing.assert_array_equal(rows[:, 0], labels[1][stem][:, 0])
        np.testing.assert_allclose(rows[:, 1:], labels[1][stem][:, 1:], atol=1e-4)
