"""TensorRT 10 and 11: the builder, the trtexec lines and the .engine back-end, against stand-in
``tensorrt`` modules with exactly the 10.x or the 11.x API surface (tests/fixtures/trt_standins.py).

There is no TensorRT and no GPU here: these tests check which API our code calls and what it asks
for (network flags, builder flags, profiling verbosity), how it reads the engine inspector's JSON of
either version, and that the .engine back-end's name-based I/O gives the same predictions as ONNX
Runtime on the same graph. They do not check TensorRT's own kernels or numerics. The failures of a
TensorRT that cannot run (its libraries missing: the real bindings wheel; CUDA that cannot start: a
stand-in raising pybind11's error) must each end in one line.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import export
from models.yolo import DetectionModel
from tests.fixtures.trt_standins import make_tensorrt
from utils.core.errors import UserError, cli_main
from utils.export import trt as export_trt
from utils.export.backends import OnnxBackend, TensorRTBackend
from utils.export.onnx import export_onnx
from utils.export.trt import (build_engine, check_engine_precision, conv_layer_precisions, layer_info_path,
                              trtexec_command)
from utils.export.trt_runtime import cuda_object, load_tensorrt

NAMES = ["RBC", "WBC", "Platelets"]
REMOVED_TRTEXEC_FLAGS_11 = ("--fp16", "--int8", "--bf16", "--fp8", "--int4", "--best", "--calib")
CHANNELS, SIZE = 8, 16


def _conv_graph(path: Path, precision: str, n_convs: int = 4) -> Path:
    """A chain of 3x3 convs typed like our exports: FP32, FP16 weights between Casts, or INT8 Q/DQ
    on every conv input (symmetric, zero-point 0); ``precision`` is written in the metadata."""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "images"
    if precision == "fp16":
        nodes.append(helper.make_node("Cast", [x], ["x16"], to=TensorProto.FLOAT16))
        x = "x16"
    for i in range(n_convs):
        weight = rng.standard_normal((CHANNELS, CHANNELS if i else 3, 3, 3)).astype(np.float32)
        if precision == "int8":
            scale = np.full(CHANNELS, 0.01, np.float32)
            q = np.clip(np.round(weight / scale[:, None, None, None]), -127, 127).astype(np.int8)
            inits += [numpy_helper.from_array(q, f"w{i}_q"), numpy_helper.from_array(scale, f"w{i}_s"),
                      numpy_helper.from_array(np.zeros(CHANNELS, np.int8), f"w{i}_z"),
                      numpy_helper.from_array(np.array(0.05, np.float32), f"a{i}_s"),
                      numpy_helper.from_array(np.array(0, np.int8), f"a{i}_z")]
            nodes += [helper.make_node("DequantizeLinear", [f"w{i}_q", f"w{i}_s", f"w{i}_z"], [f"w{i}"], axis=0),
                      helper.make_node("QuantizeLinear", [x, f"a{i}_s", f"a{i}_z"], [f"q{i}"]),
                      helper.make_node("DequantizeLinear", [f"q{i}", f"a{i}_s", f"a{i}_z"], [f"dq{i}"])]
            x = f"dq{i}"
        else:
            dtype = np.float16 if precision == "fp16" else np.float32
            inits.append(numpy_helper.from_array(weight.astype(dtype), f"w{i}"))
        nodes.append(helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1], name=f"/model/conv{i}"))
        x = f"c{i}"
    if precision == "fp16":
        nodes.append(helper.make_node("Cast", [x], ["output0"], to=TensorProto.FLOAT))
    else:
        nodes.append(helper.make_node("Identity", [x], ["output0"]))
    graph = helper.make_graph(nodes, "convs", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, SIZE, SIZE])],
                              [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, CHANNELS, SIZE, SIZE])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.metadata_props.add(key="precision", value=precision)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(params=[10, 11], ids=["trt10", "trt11"])
def trt(request):
    return make_tensorrt(request.param)


def test_standins_have_the_documented_api_surface():
    """The fixtures themselves: what 11.x removed is absent there and present in 10.x."""
    trt10, trt11 = make_tensorrt(10), make_tensorrt(11)
    for flag in ("FP16", "INT8", "BF16", "OBEY_PRECISION_CONSTRAINTS"):
        assert hasattr(trt10.BuilderFlag, flag) and not hasattr(trt11.BuilderFlag, flag)
    assert int(trt10.NetworkDefinitionCreationFlag.STRONGLY_TYPED) == 1
    assert int(trt11.NetworkDefinitionCreationFlag.STRONGLY_TYPED) == 0
    assert not hasattr(trt11.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH")
    assert hasattr(trt10, "IInt8EntropyCalibrator2") and not hasattr(trt11, "IInt8EntropyCalibrator2")
    config11 = trt11.Builder(trt11.Logger()).create_builder_config()
    with pytest.raises(AttributeError):
        config11.int8_calibrator = object()
    assert not hasattr(config11, "set_calibration_profile") and hasattr(trt10.IBuilderConfig, "set_calibration_profile")
    assert not hasattr(trt11.Builder, "platform_has_fast_fp16")
    for module in (trt10, trt11):  # the binding-index API was removed in 10.0
        assert not hasattr(module.ICudaEngine, "get_binding_index")
        assert not hasattr(module.IExecutionContext, "execute_async_v2")


@pytest.mark.parametrize("precision,expected", [("fp16", "fp16"), ("int8", "int8")])
def test_typed_onnx_builds_strongly_typed_without_precision_flags(trt, tmp_path, precision, expected):
    onnx_path = _conv_graph(tmp_path / f"{precision}.onnx", precision)
    engine = build_engine(onnx_path, tmp_path / f"{precision}.engine", trt=trt)
    builder = trt._builders[-1]
    assert builder._last_network._flags == 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    assert builder._last_config._flags == set()  # no weak-typing flag, on either version
    assert builder._last_config.profiling_verbosity == trt.ProfilingVerbosity.DETAILED
    info = json.loads(layer_info_path(engine).read_text())
    assert set(conv_layer_precisions(info).values()) == {expected}


def test_fp32_onnx_weak_fp16_only_where_the_flag_exists(tmp_path, caplog):
    """TensorRT 10: a weakly typed network with BuilderFlag.FP16 (FP16 convs); TensorRT 11: no flag
    exists, the network is strongly typed and the engine is FP32, with a warning that says so."""
    onnx_path = _conv_graph(tmp_path / "fp32.onnx", "fp32")
    trt10, trt11 = make_tensorrt(10), make_tensorrt(11)
    engine10 = build_engine(onnx_path, tmp_path / "e10.engine", trt=trt10)
    builder = trt10._builders[-1]
    assert builder._last_network._flags == 0 and builder._last_config._flags == {trt10.BuilderFlag.FP16}
    assert set(conv_layer_precisions(json.loads(layer_info_path(engine10).read_text())).values()) == {"fp16"}
    engine11 = build_engine(onnx_path, tmp_path / "e11.engine", trt=trt11)
    assert trt11._builders[-1]._last_config._flags == set()
    assert set(conv_layer_precisions(json.loads(layer_info_path(engine11).read_text())).values()) == {"fp32"}
    assert "will be FP32" in caplog.text
    build_engine(onnx_path, tmp_path / "e10-fp32.engine", trt=trt10, weak_fp16=False)  # asked for FP32
    assert trt10._builders[-1]._last_network._flags == 1 << int(trt10.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def test_fp32_fallback_of_a_typed_onnx_is_an_error(trt, tmp_path):
    """An ONNX that says fp16 but whose convs are FP32 (a failed conversion) gives an FP32 engine in a
    strongly typed build: the inspector check must refuse it, on both versions."""
    onnx_path = _conv_graph(tmp_path / "liar.onnx", "fp32")
    model = onnx.load(str(onnx_path))
    model.metadata_props[0].value = "fp16"
    onnx.save(model, str(onnx_path))
    with pytest.raises(UserError, match="fell back"):
        build_engine(onnx_path, tmp_path / "liar.engine", trt=trt)


def test_inspector_json_of_both_versions():
    """Layer precisions from the 10.x schema (one 'Format/Datatype' string, as TensorRT writes it) and
    the 11.x schema ('Format' + 'DataType'); non-conv layers are ignored."""
    v10 = {"Layers": [
        {"Name": "conv0 + act", "LayerType": "CaskConvolution",
         "Inputs": [{"Name": "x", "Format/Datatype": "Thirty-two wide channel vectorized row major Int8 format"}]},
        {"Name": "conv1", "LayerType": "CaskConvolution", "Inputs": [{"Format/Datatype": "Row major linear FP16 format"}]},
        {"Name": "dfl", "LayerType": "CaskConvolution", "Inputs": [{"Format/Datatype": "Row major linear FP32"}]},
        {"Name": "reformat", "LayerType": "Reformat", "Inputs": [{"Format/Datatype": "Row major linear FP32"}]}],
        "Bindings": ["images", "output0"]}
    v11 = {"Layers": [
        {"Name": "conv0", "LayerType": "CaskConvolution", "Inputs": [{"Format": "kLINEAR", "DataType": "Int8"}]},
        {"Name": "conv1", "LayerType": "CaskGemmConvolution", "Inputs": [{"Format": "kCHW8", "DataType": "Half"}]},
        {"Name": "dfl", "LayerType": "CaskConvolution", "Inputs": [{"Format": "kLINEAR", "DataType": "Float"}]}],
        "I/O Tensors": [{"Name": "images", "IOMode": "Input", "DataType": "Float"}]}
    for info in (v10, v11):
        assert list(conv_layer_precisions(info).values()) == ["int8", "fp16", "fp32"]
    assert check_engine_precision(v11, "fp32")["fp32"] == 1  # fp32 checks nothing
    with pytest.raises(UserError):
        check_engine_precision(v11, "fp16")  # 1 of 3 convs in FP16


def test_trtexec_lines_per_version(tmp_path):
    onnx_path, engine = tmp_path / "m.onnx", tmp_path / "m.engine"
    typed10 = trtexec_command(onnx_path, engine, 10, "fp16").split()
    typed11 = trtexec_command(onnx_path, engine, 11, "int8").split()
    assert "--stronglyTyped" in typed10 and not set(typed10) & {"--fp16", "--int8"}
    assert "--stronglyTyped" not in typed11
    for line in (typed11, trtexec_command(onnx_path, engine, 11, "fp32").split()):
        assert not [part for part in line if part.split("=")[0] in REMOVED_TRTEXEC_FLAGS_11]
        assert "--profilingVerbosity=detailed" in line and f"--exportLayerInfo={tmp_path / 'm.layers.json'}" in line
    assert "--fp16" in trtexec_command(onnx_path, engine, 10, "fp32").split()
    assert "--fp16" not in trtexec_command(onnx_path, engine, 10, "fp32", weak_fp16=False).split()
    with pytest.raises(UserError):
        trtexec_command(onnx_path, engine, 9, "fp16")


class StandInEngineBackend(TensorRTBackend):
    """TensorRTBackend on CPU tensors with a stand-in module: only the CUDA stream glue is replaced."""

    requires_cuda = False

    def _new_stream(self):
        return None

    def _launch(self) -> bool:
        return self.context.execute_async_v3(0)


@pytest.fixture(scope="module")
def plain_onnx(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = DetectionModel("yolov9-tiny", nc=len(NAMES)).eval()
    model.fuse().head.export = True
    for param in model.parameters():
        param.requires_grad_(False)
    return export_onnx(model, tmp_path_factory.mktemp("onnx") / "tiny.onnx", 64, names=NAMES)


def test_engine_backend_name_based_io_matches_onnx(trt, plain_onnx, tmp_path):
    """val/detect's .engine back-end with TensorRT 10 and 11 runtime APIs: a batch of 3 on a static
    batch-1 engine (chunked and padded), same predictions as ONNX Runtime on the same graph; class
    names from the ONNX beside the engine."""
    onnx_path = tmp_path / "tiny.onnx"
    onnx_path.write_bytes(plain_onnx.read_bytes())
    engine = build_engine(onnx_path, tmp_path / "tiny.engine", trt=trt, weak_fp16=False)
    backend = StandInEngineBackend(engine, torch.device("cpu"), trt=trt)
    assert backend.names == NAMES and backend.img_size == (64, 64) and backend.fixed_batch == 1
    images = torch.rand(3, 3, 64, 64)
    expected = OnnxBackend(onnx_path, torch.device("cpu"))(images)
    np.testing.assert_allclose(backend(images).numpy(), expected.numpy(), rtol=1e-5, atol=1e-5)


def test_engine_backend_needs_cuda(plain_onnx, tmp_path):
    engine = tmp_path / "x.engine"
    engine.write_bytes(b"{}")
    with pytest.raises(UserError, match="CUDA"):
        TensorRTBackend(engine, torch.device("cpu"), trt=make_tensorrt(11))


def test_export_prints_typed_trtexec_lines(plain_onnx, tmp_path, monkeypatch, capsys):
    """export.py --half --include engine without TensorRT: the TensorRT 10 and 11 lines of a typed ONNX,
    or the one asked for with --trt-version."""
    monkeypatch.setattr(export_trt, "tensorrt_available", lambda: False)
    model = DetectionModel("yolov9-tiny", nc=len(NAMES))
    model.names = list(NAMES)
    from utils.checkpoint.ours import make_checkpoint, save_checkpoint

    weights = tmp_path / "w.pt"
    save_checkpoint(make_checkpoint(model, half=False), weights)
    common = ["--weights", str(weights), "--img", "64", "--half", "--include", "onnx", "engine", "--device", "cpu"]
    export.main(common)
    out = capsys.readouterr().out
    line10 = next(x for x in out.splitlines() if "TensorRT 10:" in x)
    line11 = next(x for x in out.splitlines() if "TensorRT 11:" in x)
    assert "--stronglyTyped" in line10 and "--fp16" not in line10
    assert "--stronglyTyped" not in line11 and "--fp16" not in line11
    export.main(common + ["--trt-version", "11"])
    out = capsys.readouterr().out
    assert "TensorRT 11:" in out and "TensorRT 10:" not in out


# ------------------------------------------------------------------- a TensorRT that cannot run here
# NVIDIA's `tensorrt-cu12` package is this one file over the bindings and libraries wheels it depends on.
NVIDIA_TENSORRT_INIT = "from tensorrt_bindings import *\nfrom tensorrt_bindings import __version__\n"


@pytest.fixture
def bindings_without_libraries(tmp_path, monkeypatch):
    """The real ``tensorrt-cu12-bindings`` wheel (pinned in requirements.txt) under NVIDIA's ``tensorrt``
    package, without ``tensorrt-cu12-libs``: what a half-finished ``pip install tensorrt`` leaves.
    Importing it fails in the bindings' native module, which cannot find libnvinfer / libnvonnxparser."""
    if importlib.util.find_spec("tensorrt_bindings") is None:
        pytest.skip("tensorrt-cu12-bindings is not installed (pip install -r requirements.txt)")
    try:
        import tensorrt_bindings  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("TensorRT's libraries load on this machine")
    package = tmp_path / "site" / "tensorrt"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(NVIDIA_TENSORRT_INIT)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    assert export_trt.tensorrt_available()  # the package is there: only loading it fails


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    from utils.checkpoint.ours import make_checkpoint, save_checkpoint

    model = DetectionModel("yolov9-tiny", nc=len(NAMES))
    model.names = list(NAMES)
    weights = tmp_path_factory.mktemp("weights") / "w.pt"
    save_checkpoint(make_checkpoint(model, half=False), weights)
    return weights


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err
    return errors[0]


def test_tensorrt_without_its_libraries_is_one_line(bindings_without_libraries, plain_onnx, tmp_path):
    """The build, the auto-version trtexec line and the .engine back-end each name the missing library."""
    with pytest.raises(UserError) as info:
        load_tensorrt()
    message = str(info.value)
    assert "cannot load its libraries" in message and re.search(r"libnv\w+\.so", message) and "\n" not in message
    onnx_path = tmp_path / "tiny.onnx"
    onnx_path.write_bytes(plain_onnx.read_bytes())
    for device in (torch.device("cuda"), torch.device("cpu")):
        with pytest.raises(UserError, match="cannot load its libraries"):
            export_trt.engine_or_command(onnx_path, device, (64, 64), 32, 1, False, None)
    # with the version given, the line for the device is printed without importing TensorRT
    assert export_trt.engine_or_command(onnx_path, torch.device("cpu"), (64, 64), 32, 1, False, None, "10") is None
    engine = tmp_path / "tiny.engine"
    engine.write_bytes(b"\0")
    with pytest.raises(UserError, match="cannot load its libraries"):
        TensorRTBackend(engine, torch.device("cuda"))


def test_entry_points_without_tensorrt_libraries_exit_2(bindings_without_libraries, tiny_weights, tmp_path, capsys):
    """export.py --include engine and detect_dual.py on a .engine (default --source): one line, exit code 2."""
    import detect_dual

    weights = tmp_path / "w.pt"
    weights.write_bytes(tiny_weights.read_bytes())
    with pytest.raises(SystemExit) as exit_info:
        export.main(["--weights", str(weights), "--img", "64", "--include", "onnx", "engine", "--device", "cpu"])
    assert exit_info.value.code == 2
    line = _one_error_line(capsys)
    assert "cannot load its libraries" in line and "--trt-version" in line
    engine = tmp_path / "w.engine"
    engine.write_bytes(b"\0")
    with pytest.raises(SystemExit) as exit_info:
        detect_dual.main(["--weights", str(engine), "--device", "cpu", "--project", str(tmp_path / "runs")])
    assert exit_info.value.code == 2 and "cannot load its libraries" in _one_error_line(capsys)


def test_tensorrt_that_cannot_start_cuda_is_one_line(trt, plain_onnx, tmp_path, monkeypatch, capsys):
    """trt.Builder / trt.Runtime returning nullptr (pybind11's TypeError): the build, export.py's engine
    step and the .engine back-end say that TensorRT cannot start CUDA; other TypeErrors still pass."""
    no_cuda = make_tensorrt(int(trt.__version__.split(".")[0]), cuda=False)
    onnx_path = tmp_path / "tiny.onnx"
    onnx_path.write_bytes(plain_onnx.read_bytes())
    with pytest.raises(SystemExit) as exit_info:
        cli_main(build_engine)(onnx_path, tmp_path / "tiny.engine", trt=no_cuda)
    line = _one_error_line(capsys)
    assert exit_info.value.code == 2 and "cannot start CUDA" in line and "trt.Builder" in line
    assert "nullptr" in line and no_cuda.__version__ in line
    monkeypatch.setitem(sys.modules, "tensorrt", no_cuda)
    monkeypatch.setattr(export_trt, "tensorrt_available", lambda: True)
    with pytest.raises(UserError, match="cannot start CUDA"):
        export_trt.engine_or_command(onnx_path, torch.device("cuda"), (64, 64), 32, 1, False, None)
    engine = tmp_path / "tiny.engine"
    engine.write_bytes(b"{}")
    with pytest.raises(UserError, match=r"cannot start CUDA \(trt\.Runtime"):
        TensorRTBackend(engine, torch.device("cuda"))

    def wrong_call(logger):
        raise TypeError("__init__(): incompatible constructor arguments")

    with pytest.raises(TypeError, match="incompatible"):
        cuda_object(no_cuda, wrong_call, None)
