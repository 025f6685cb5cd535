"""Precision in the ONNX: the FP16 graph (decode kept FP32) and the INT8 Q/DQ graph (TensorRT's
explicit-quantization rules), through export.py, checked on the graph and with ONNX Runtime."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import export
from models.yolo import DetectionModel
from utils.checkpoint.ours import make_checkpoint, save_checkpoint
from utils.data.augment import letterbox
from utils.export.onnx import export_onnx, read_metadata
from utils.export.precision import head_output_convs, keep_fp32_nodes, precision_summary, remove_fp16_round_trips

ort = pytest.importorskip("onnxruntime")

NAMES = ["RBC", "WBC", "Platelets"]
SIZE = 64
CALIB_IMAGES = 32
FP16_BOX_TOL = 1e-3  # boxes in pixels, relative to the largest: the decode itself is FP32
FP16_SCORE_TOL = 2e-3
INT8_SCORE_TOL = 0.05  # an untrained model: only a sanity bound on the quantization error


def _model(seed: int = 0) -> DetectionModel:
    torch.manual_seed(seed)
    model = DetectionModel("yolov9-tiny", nc=len(NAMES))
    model.names = list(NAMES)
    return model


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("w") / "tiny.pt"
    save_checkpoint(make_checkpoint(_model(), half=False), path)
    return path


@pytest.fixture(scope="module")
def calib_yaml(tmp_path_factory) -> Path:
    """A data.yaml whose train split is CALIB_IMAGES BCCD images (and a 5-image one for the error)."""
    root = Path(__file__).resolve().parents[2] / "data" / "bccd" / "JPEGImages"
    images = sorted(root.glob("*.jpg"))
    folder = tmp_path_factory.mktemp("calib")
    for name, count in (("enough", CALIB_IMAGES), ("few", 5)):
        (folder / name / "images").mkdir(parents=True)
        for image in images[:count]:
            (folder / name / "images" / image.name).symlink_to(image)
        (folder / f"{name}.yaml").write_text(json.dumps({"path": str(folder / name), "train": "images",
                                                         "val": "images", "nc": 3, "names": NAMES}))
    return folder / "enough.yaml"


def _real_images(count: int = 2) -> np.ndarray:
    root = Path(__file__).resolve().parents[2] / "data" / "bccd" / "JPEGImages"
    out = [letterbox(cv2.imread(str(p)), SIZE)[0][:, :, ::-1].transpose(2, 0, 1) / 255.0
           for p in sorted(root.glob("*.jpg"))[-count:]]
    return np.ascontiguousarray(np.stack(out)).astype(np.float32)


def _session(path: Path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _fp32_reference(weights: Path, images: np.ndarray) -> np.ndarray:
    model = export.prepare_model(weights, torch.device("cpu"))
    with torch.no_grad():
        return model(torch.from_numpy(images)).numpy()


def test_fp16_graph_keeps_the_decode_fp32(weights, tmp_path):
    """export.py --half: every conv FP16 but the DFL's, the decode's nodes FP32, FP32 input/output,
    no FP16 round trip between two decode nodes, predictions close to the FP32 model."""
    src = tmp_path / "m.pt"
    src.write_bytes(weights.read_bytes())
    path = export.main(["--weights", str(src), "--img", str(SIZE), "--half", "--device", "cpu"])[0]
    assert path == tmp_path / "m-fp16.onnx"
    model = onnx.load(str(path))
    assert read_metadata(path)["precision"] == "fp16" and read_metadata(path)["io_dtype"] == "float32"
    summary = precision_summary(model)
    assert summary["conv_fp32"] == 1 and summary["conv_fp16"] > 50 and summary["quantize"] == 0
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    by_output = {out: n for n in model.graph.node for out in n.output}
    for node in model.graph.node:  # a Cast to FP32 never reads a Cast to FP16 of an FP32 tensor
        if node.op_type == "Cast" and node.attribute[0].i == TensorProto.FLOAT:
            producer = by_output.get(node.input[0])
            assert not (producer is not None and producer.op_type == "Cast"), node.name
    types = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    head = f"/model/model.{_model().head.i}/"
    decode = [n for n in model.graph.node if n.op_type in ("Softmax", "Sigmoid") and n.name.startswith(head)
              and "/cv" not in n.name]
    assert decode and all(types[n.input[0]] == TensorProto.FLOAT for n in decode)  # DFL softmax, class sigmoid
    images = _real_images()
    y = np.concatenate([_session(path).run(None, {"images": images[i:i + 1]})[0] for i in range(len(images))])
    expected = _fp32_reference(weights, images)
    assert np.abs(y[:, :4] - expected[:, :4]).max() <= FP16_BOX_TOL * np.abs(expected[:, :4]).max()
    assert np.abs(y[:, 4:] - expected[:, 4:]).max() <= FP16_SCORE_TOL


def test_keep_fp32_nodes_is_the_decode(weights, tmp_path):
    """On a traced graph: the kept nodes hold the DFL softmax, the class sigmoid of the decode and the
    anchor constants, and none of the head's branch convs; the head has one last conv per branch and level."""
    model = export.prepare_model(weights, torch.device("cpu"))
    graph = onnx.load(str(export_onnx(model, tmp_path / "p.onnx", SIZE, names=NAMES))).graph
    head = int(model.head.i)
    keep = keep_fp32_nodes(graph, head)
    nodes = {n.name: n for n in graph.node}
    kept_ops = {nodes[name].op_type for name in keep}
    assert {"Softmax", "Sigmoid", "Constant", "Conv"} <= kept_ops
    assert [nodes[n].op_type for n in keep].count("Conv") == 1  # the DFL conv
    assert not [n for n in keep if f"/model/model.{head}/cv" in n]
    last = head_output_convs(graph, head)
    assert len(last) == 2 * model.head.nl and all(nodes[n].op_type == "Conv" for n in last)
    with pytest.raises(ValueError):
        keep_fp32_nodes(graph, head + 1)


def test_round_trip_casts_are_removed():
    """A(fp32) -> Cast16 -> Cast32 -> B becomes A -> B; an output written through a Cast16 is FP32 again."""
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="A"),
             helper.make_node("Cast", ["a"], ["a16"], to=TensorProto.FLOAT16, name="c16"),
             helper.make_node("Cast", ["a16"], ["a32"], to=TensorProto.FLOAT, name="c32"),
             helper.make_node("Relu", ["a32"], ["b"], name="B"),
             helper.make_node("Cast", ["b"], ["y"], to=TensorProto.FLOAT16, name="out16")]
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2]) for n in ("a", "a32", "b")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [2])], value_info=vi)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert remove_fp16_round_trips(model, keep_fp32_outputs=True) == 3
    assert [n.op_type for n in model.graph.node] == ["Relu", "Relu", "Identity"]
    assert model.graph.node[1].input[0] == "a" and model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    x = np.array([-1.0, 1.0 / 3.0], np.float32)
    assert _session_from(model).run(None, {"x": x})[0].tolist() == [0.0, x[1]]  # exact: no FP16 rounding


def _session_from(model):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _initializer(model, name):
    return next((numpy_helper.to_array(i) for i in model.graph.initializer if i.name == name), None)


def test_int8_qdq_follows_tensorrt_rules(weights, calib_yaml, tmp_path):
    """export.py --int8 --data: symmetric INT8 (zero-points 0), per-channel weight scales (one per output
    channel, axis 0), per-tensor activation scales, Q/DQ only in front of convs, the decode (DFL conv,
    sigmoid) and the conv biases unquantized; ONNX Runtime runs it close to FP32 on real images."""
    src = tmp_path / "m.pt"
    src.write_bytes(weights.read_bytes())
    path = export.main(["--weights", str(src), "--img", str(SIZE), "--int8", "--data", str(calib_yaml),
                        "--calib-images", str(CALIB_IMAGES), "--device", "cpu"])[0]
    assert path == tmp_path / "m-int8.onnx"
    model = onnx.load(str(path))
    assert read_metadata(path)["precision"] == "int8"
    summary = precision_summary(model)
    assert summary["conv_fp32"] == 1 and summary["conv_int8"] > 50
    producers = {out: n for n in model.graph.node for out in n.output}
    consumers = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zero_point = _initializer(model, node.input[2])
            assert zero_point is not None and zero_point.dtype == np.int8 and not zero_point.any(), node.name
        if node.op_type == "QuantizeLinear":
            assert _initializer(model, node.input[1]).ndim == 0  # per-tensor activations
            assert all(c.op_type == "DequantizeLinear" for c in consumers[node.output[0]])
        if node.op_type == "Conv" and producers.get(node.input[1]) is not None:
            dq = producers[node.input[1]]
            scale, weight = _initializer(model, dq.input[1]), _initializer(model, dq.input[0])
            assert weight.dtype == np.int8 and scale.shape == (weight.shape[0],)
            assert {a.name: a.i for a in dq.attribute}.get("axis", 1) == 0
            assert producers[node.input[0]].op_type == "DequantizeLinear"
            if len(node.input) > 2:
                assert node.input[2] not in producers  # bias: an FP32 initializer
    keep = keep_fp32_nodes(model.graph, int(export.prepare_model(weights, torch.device("cpu")).head.i))
    for name in keep:  # nothing of the decode reads a dequantized tensor
        node = next(n for n in model.graph.node if n.name == name)
        assert all(getattr(producers.get(i), "op_type", "") != "DequantizeLinear" for i in node.input), name
    images = _real_images()
    y = np.concatenate([_session(path).run(None, {"images": images[i:i + 1]})[0] for i in range(len(images))])
    assert np.abs(y[:, 4:] - _fp32_reference(weights, images)[:, 4:]).max() <= INT8_SCORE_TOL


def test_int8_mends_and_nms_after_quantization(weights, calib_yaml, tmp_path):
    """--int8-exclude-head leaves the head's last convs in float; --end2end --nms ort is appended after
    the quantization (FP32 NMS fed by the FP32 decode) and ONNX Runtime runs the whole graph."""
    src = tmp_path / "e2e.pt"
    src.write_bytes(weights.read_bytes())
    path = export.main(["--weights", str(src), "--img", str(SIZE), "--int8", "--data", str(calib_yaml),
                        "--int8-exclude-head", "--end2end", "--nms", "ort", "--conf-thres", "0.01",
                        "--device", "cpu"])[0]
    model = onnx.load(str(path))
    meta = read_metadata(path)
    assert meta["precision"] == "int8" and meta["layout"] == "end2end-ort"
    assert [o.name for o in model.graph.output] == ["detections"]
    assert precision_summary(model)["conv_fp32"] == 1 + 2 * 3  # the DFL conv and the head's 6 last convs
    nms = [n for n in model.graph.node if n.op_type == "NonMaxSuppression"]
    assert len(nms) == 1 and nms[0].name.startswith("nms/")
    detections = _session(path).run(None, {"images": _real_images(1)})[0]
    assert detections.ndim == 2 and detections.shape[1] == 7 and detections.dtype == np.float32


def test_int8_bad_input_exit_2(weights, calib_yaml, capsys):
    """Too few calibration images in the train split, no --data: one line, exit code 2."""
    few = calib_yaml.parent / "few.yaml"
    for argv, words in ((["--int8", "--data", str(few)], "calibration images"), (["--int8"], "--data")):
        with pytest.raises(SystemExit) as info:
            export.main(["--weights", str(weights), "--img", str(SIZE), "--device", "cpu", *argv])
        assert info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and words in err[0]


def test_quant_benchmark_table_judges_the_goals():
    """benchmarks/quant_bccd.py's table: deltas in mAP50-95 points against FP32, the 0.1 (FP16) and
    1.0 (INT8) goals, latency ratios."""
    from benchmarks.quant_bccd import report

    run = {"weights": "t.pt", "params": 1_910_000, "variants": {
        "fp32": {"mb": 7.0, "map50": 0.5, "map": 0.300, "latency_ms": 100.0},
        "fp16": {"mb": 3.5, "map50": 0.5, "map": 0.2985, "latency_ms": 90.0},
        "int8": {"mb": 2.0, "map50": 0.5, "map": 0.295, "latency_ms": 150.0},
        "int8 percentile": {"mb": 2.0, "map50": 0.5, "map": 0.284, "latency_ms": 150.0}}}
    info = {"gpu": "none", "cpu": "x", "cpus": 2, "torch": "2", "python": "3", "date": "today"}
    rows = {line.split("|")[2].strip(): line for line in report([run], info, "cmd", 256).splitlines()
            if line.startswith("| t.pt")}
    assert "-0.15 misses the 0.1-point goal" in rows["fp16"] and "90.0 (0.90x)" in rows["fp16"]
    assert "-0.50 within goal" in rows["int8"] and "-1.60 misses the 1-point goal" in rows["int8 percentile"]
    assert "30.00" in rows["fp32"] and "1.91 M" in rows["fp32"]
