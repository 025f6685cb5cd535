"""Stand-in ``tensorrt`` modules with the Python API surface of TensorRT 10.x and of TensorRT 11.x.

There is no TensorRT and no GPU on the machines that run the tests, so the builder and the
``.engine`` back-end are tested against these. What they reproduce, from NVIDIA's API reference and
the 10.x -> 11.x migration guide ("Removed Python APIs and Replacements", the trtexec and
IEngineInspector migration pages):

- 11.x has no ``BuilderFlag.FP16/BF16/INT8/FP8/INT4/FP4/OBEY_PRECISION_CONSTRAINTS/
  PREFER_PRECISION_CONSTRAINTS/DIRECT_IO``, no ``IBuilderConfig.int8_calibrator``,
  ``set/get_calibration_profile``, ``set/get/clear_quantization_flag``, ``quantization_flags``, no
  ``ICudaEngine.device_memory_size``, no INT8 calibrator classes, no ``Builder.platform_has_fast_fp16/
  platform_has_fast_int8/platform_has_tf32``; ``NetworkDefinitionCreationFlag`` has only
  ``STRONGLY_TYPED`` (value 0, ignored: every network is strongly typed). 10.x has all of these,
  with ``EXPLICIT_BATCH = 0`` and ``STRONGLY_TYPED = 1``.
- Objects reject unknown attributes, as the pybind11 objects do, so that setting a removed
  attribute (``config.int8_calibrator = ...`` on 11) fails instead of passing silently.
- Typing: a strongly typed network takes each convolution's precision from the ONNX (weights
  behind a DequantizeLinear -> INT8, FP16 weights -> FP16, else FP32); a weakly typed 10.x network
  with ``BuilderFlag.FP16`` runs the convolutions in FP16.
- The engine inspector's JSON: 10.x writes ``"Bindings"`` (names) and one ``"Format/Datatype"``
  string per tensor; 11.x writes ``"I/O Tensors"`` (objects) and separate ``"Format"`` and
  ``"DataType"`` fields.
- Runtime: only the tensor-name API (``num_io_tensors``, ``get_tensor_name/mode/shape/dtype``,
  ``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``); the binding-index API is absent in
  both (removed in 10.0). ``execute_async_v3`` runs the ONNX the engine was built from with ONNX
  Runtime on the CPU buffers whose addresses were set, so a back-end's results can be compared.
- A TensorRT that cannot start CUDA (``make_tensorrt(major, cuda=False)``): ``Builder(logger)`` and
  ``Runtime(logger)`` raise ``TypeError: pybind11::init(): factory function returned nullptr``, which
  is what the real bindings raise when ``createInferBuilder`` / ``createInferRuntime`` return a null
  pointer (pybind11's ``py::init`` factory check), after TensorRT has logged its CUDA error.
"""

from __future__ import annotations

import ctypes
import json
import types
from pathlib import Path

import numpy as np

WEAK_TYPING_FLAGS = ("FP16", "BF16", "INT8", "FP8", "INT4", "FP4", "OBEY_PRECISION_CONSTRAINTS",
                     "PREFER_PRECISION_CONSTRAINTS", "DIRECT_IO")
KEPT_FLAGS = ("TF32", "REFIT", "SPARSE_WEIGHTS", "GPU_FALLBACK", "DEBUG")
CONFIG_REMOVED_IN_11 = ("int8_calibrator", "set_calibration_profile", "get_calibration_profile",
                        "set_quantization_flag", "get_quantization_flag", "clear_quantization_flag",
                        "quantization_flags")
VERSIONS = {10: "10.3.0", 11: "11.4.0"}
ONNX_TO_TRT = {1: "FLOAT", 10: "HALF", 3: "INT8", 6: "INT32", 7: "INT64", 9: "BOOL"}
FORMAT_10 = {"fp32": "Row major linear FP32 format", "fp16": "Channel major FP16 format where channel % 8 == 0",
             "int8": "Thirty-two wide channel vectorized row major Int8 format"}
DATATYPE_11 = {"fp32": "Float", "fp16": "Half", "int8": "Int8"}
NULLPTR_ERROR = "pybind11::init(): factory function returned nullptr"


class _Strict:
    """Attribute writes limited to ``_fields`` (plus private names), like a pybind11 object."""

    _fields: tuple[str, ...] = ()

    def __setattr__(self, name: str, value) -> None:
        if not name.startswith("_") and name not in self._fields:
            raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")
        object.__setattr__(self, name, value)


def _enum(name: str, members: dict[str, int]) -> type:
    """A class with int-valued members (``int(Flag.X)`` works, unknown members raise AttributeError)."""
    return type(name, (), {key: value for key, value in members.items()})


def make_tensorrt(major: int, cuda: bool = True) -> types.ModuleType:
    """A fresh stand-in ``tensorrt`` module of major version 10 or 11; ``cuda=False``: one whose
    Builder and Runtime cannot start CUDA (see the module docstring)."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = VERSIONS[major]
    trt._builders = []
    flags = [*KEPT_FLAGS, *(WEAK_TYPING_FLAGS if major == 10 else ())]
    trt.BuilderFlag = _enum("BuilderFlag", {name: i for i, name in enumerate(flags)})
    trt.NetworkDefinitionCreationFlag = _enum(
        "NetworkDefinitionCreationFlag", {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1} if major == 10 else {"STRONGLY_TYPED": 0})
    trt.DataType = _enum("DataType", {name: i for i, name in enumerate(("FLOAT", "HALF", "INT8", "INT32", "INT64",
                                                                          "BOOL"))})
    trt.TensorIOMode = _enum("TensorIOMode", {"NONE": 0, "INPUT": 1, "OUTPUT": 2})
    trt.MemoryPoolType = _enum("MemoryPoolType", {"WORKSPACE": 0})
    trt.ProfilingVerbosity = _enum("ProfilingVerbosity", {"LAYER_NAMES_ONLY": 0, "NONE": 1, "DETAILED": 2})
    trt.LayerInformationFormat = _enum("LayerInformationFormat", {"ONELINE": 0, "JSON": 1})

    class Logger:
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        def __init__(self, min_severity: int = 2) -> None:
            self.min_severity = min_severity
            self.messages: list[str] = []

    class Network(_Strict):
        def __init__(self, flags: int) -> None:
            self._flags = flags
            self._onnx_path: Path | None = None

        @property
        def strongly_typed(self) -> bool:
            return major >= 11 or bool(self._flags & (1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)))

        @property
        def num_inputs(self) -> int:
            return 1

        def get_input(self, index: int):
            return types.SimpleNamespace(name=_load_onnx(self._onnx_path).graph.input[index].name)

    class OnnxParser(_Strict):
        def __init__(self, network: Network, logger: Logger) -> None:
            self._network, self._errors = network, []

        def parse_from_file(self, path: str) -> bool:
            if not Path(path).is_file():
                self._errors.append(f"cannot open {path}")
                return False
            self._network._onnx_path = Path(path)
            return True

        @property
        def num_errors(self) -> int:
            return len(self._errors)

        def get_error(self, index: int) -> str:
            return self._errors[index]

    config_fields = ("profiling_verbosity", "builder_optimization_level") + (("int8_calibrator",) if major == 10 else ())

    class BuilderConfig(_Strict):
        _fields = config_fields

        def __init__(self) -> None:
            self._flags: set[int] = set()
            self._pools: dict[int, int] = {}
            self._profiles: list = []
            self.profiling_verbosity = trt.ProfilingVerbosity.LAYER_NAMES_ONLY

        def set_flag(self, flag: int) -> None:
            self._flags.add(flag)

        def get_flag(self, flag: int) -> bool:
            return flag in self._flags

        def set_memory_pool_limit(self, pool: int, size: int) -> None:
            self._pools[pool] = size

        def add_optimization_profile(self, profile) -> int:
            self._profiles.append(profile)
            return len(self._profiles) - 1

    if major == 10:
        def set_calibration_profile(self, profile) -> None:
            self._calibration_profile = profile

        def get_calibration_profile(self):
            return getattr(self, "_calibration_profile", None)

        def set_quantization_flag(self, flag) -> None:
            pass

        def get_quantization_flag(self, flag) -> bool:
            return False

        def clear_quantization_flag(self, flag) -> None:
            pass

        for fn in (set_calibration_profile, get_calibration_profile, set_quantization_flag, get_quantization_flag,
                   clear_quantization_flag):
            setattr(BuilderConfig, fn.__name__, fn)
        BuilderConfig.quantization_flags = 0

    class OptimizationProfile(_Strict):
        def __init__(self) -> None:
            self._shapes: dict[str, tuple] = {}

        def set_shape(self, name: str, low, opt, high) -> None:
            self._shapes[name] = (tuple(low), tuple(opt), tuple(high))

    class Builder(_Strict):
        _fields = ("max_threads",)

        def __init__(self, logger: Logger) -> None:
            if not cuda:
                raise TypeError(NULLPTR_ERROR)
            self._logger = logger
            self._last_config: BuilderConfig | None = None
            self._last_network: Network | None = None
            trt._builders.append(self)  # the tests read what our code asked for

        def create_network(self, flags: int = 0) -> Network:
            return Network(flags)

        def create_builder_config(self) -> BuilderConfig:
            return BuilderConfig()

        def create_optimization_profile(self) -> OptimizationProfile:
            return OptimizationProfile()

        def build_serialized_network(self, network: Network, config: BuilderConfig) -> bytes | None:
            self._last_config, self._last_network = config, network
            weak_fp16 = major == 10 and not network.strongly_typed and trt.BuilderFlag.FP16 in config._flags
            plan = {"onnx": str(network._onnx_path), "strongly_typed": network.strongly_typed, "weak_fp16": weak_fp16,
                    "detailed": config.profiling_verbosity == trt.ProfilingVerbosity.DETAILED}
            return json.dumps(plan).encode()

    if major == 10:
        Builder.platform_has_fast_fp16 = True
        Builder.platform_has_fast_int8 = True
        Builder.platform_has_tf32 = True

    class Engine(_Strict):
        def __init__(self, plan: dict) -> None:
            self._plan = plan
            self._model = _load_onnx(Path(plan["onnx"]))
            graph = self._model.graph
            self._io = [(i.name, trt.TensorIOMode.INPUT, i) for i in graph.input] + \
                [(o.name, trt.TensorIOMode.OUTPUT, o) for o in graph.output]

        @property
        def num_io_tensors(self) -> int:
            return len(self._io)

        def get_tensor_name(self, index: int) -> str:
            return self._io[index][0]

        def _info(self, name: str):
            return next(info for n, _, info in self._io if n == name)

        def get_tensor_mode(self, name: str) -> int:
            return next(mode for n, mode, _ in self._io if n == name)

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            dims = self._info(name).type.tensor_type.shape.dim
            return tuple(d.dim_value if d.dim_value > 0 else -1 for d in dims)

        def get_tensor_dtype(self, name: str) -> int:
            return getattr(trt.DataType, ONNX_TO_TRT[self._info(name).type.tensor_type.elem_type])

        def create_execution_context(self) -> "ExecutionContext":
            return ExecutionContext(self)

        def create_engine_inspector(self) -> "EngineInspector":
            return EngineInspector(self)

    if major == 10:
        Engine.device_memory_size = 0

    class EngineInspector(_Strict):
        _fields = ("execution_context", "error_recorder")

        def __init__(self, engine: Engine) -> None:
            self._engine = engine

        def get_engine_information(self, fmt: int) -> str:
            if fmt != trt.LayerInformationFormat.JSON:
                raise ValueError("the stand-in writes JSON only")
            return json.dumps(_inspector_json(self._engine, major))

    class ExecutionContext(_Strict):
        def __init__(self, engine: Engine) -> None:
            self._engine = engine
            self._addresses: dict[str, int] = {}
            self._input_shape: tuple[int, ...] | None = None
            self._output_shapes: dict[str, tuple[int, ...]] = {}

        def set_input_shape(self, name: str, shape) -> bool:
            self._input_shape = tuple(shape)
            return True

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            if self._engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                return self._input_shape or self._engine.get_tensor_shape(name)
            if name not in self._output_shapes:  # shapes for this input shape, from one run on zeros
                inp = self._engine._model.graph.input[0]
                dtype = np.float16 if inp.type.tensor_type.elem_type == 10 else np.float32
                outputs = _session(self._engine).run(None, {inp.name: np.zeros(self._input_shape, dtype)})
                for out, value in zip(self._engine._model.graph.output, outputs):
                    self._output_shapes[out.name] = value.shape
            return self._output_shapes[name]

        def set_tensor_address(self, name: str, address: int) -> bool:
            self._addresses[name] = int(address)
            return True

        def execute_async_v3(self, stream_handle: int) -> bool:
            graph = self._engine._model.graph
            inp = graph.input[0]
            dtype = np.float16 if inp.type.tensor_type.elem_type == 10 else np.float32
            count = int(np.prod(self._input_shape))
            raw = (ctypes.c_char * (count * np.dtype(dtype).itemsize)).from_address(self._addresses[inp.name])
            x = np.frombuffer(raw, dtype=dtype).reshape(self._input_shape).copy()
            for out, value in zip(graph.output, _session(self._engine).run(None, {inp.name: x})):
                value = np.ascontiguousarray(value)
                ctypes.memmove(self._addresses[out.name], value.ctypes.data, value.nbytes)
            return True

    class Runtime(_Strict):
        def __init__(self, logger: Logger) -> None:
            if not cuda:
                raise TypeError(NULLPTR_ERROR)
            self._logger = logger

        def deserialize_cuda_engine(self, data: bytes) -> Engine | None:
            try:
                return Engine(json.loads(bytes(data).decode()))
            except (ValueError, KeyError, UnicodeDecodeError):
                return None

    trt.Logger, trt.Builder, trt.OnnxParser, trt.Runtime = Logger, Builder, OnnxParser, Runtime
    trt.IBuilderConfig, trt.INetworkDefinition, trt.ICudaEngine = BuilderConfig, Network, Engine
    trt.IExecutionContext, trt.EngineInspector = ExecutionContext, EngineInspector
    if major == 10:
        for name in ("IInt8Calibrator", "IInt8EntropyCalibrator2", "IInt8MinMaxCalibrator"):
            setattr(trt, name, type(name, (), {}))
        trt.CalibrationAlgoType = _enum("CalibrationAlgoType", {"ENTROPY_CALIBRATION_2": 2, "MINMAX_CALIBRATION": 3})
    return trt


def _load_onnx(path: Path | None):
    import onnx

    return onnx.load(str(path))


def _session(engine):
    import onnxruntime as ort

    if "session" not in engine.__dict__:
        object.__setattr__(engine, "session", ort.InferenceSession(engine._model.SerializeToString(),
                                                                   providers=["CPUExecutionProvider"]))
    return engine.__dict__["session"]


def conv_precisions(model, strongly_typed: bool, weak_fp16: bool) -> list[tuple[str, str]]:
    """(name, precision) of every Conv as the stand-in builder types it (see the module docstring)."""
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    init_types = {init.name: init.data_type for init in graph.initializer}
    out = []
    for node in graph.node:
        if node.op_type != "Conv":
            continue
        weight = node.input[1]
        if strongly_typed:
            producer = producers.get(weight)
            if producer is not None and producer.op_type == "DequantizeLinear":
                precision = "int8"
            else:
                precision = "fp16" if init_types.get(weight) == 10 else "fp32"
        else:
            precision = "fp16" if weak_fp16 else "fp32"
        out.append((node.name, precision))
    return out


def _inspector_json(engine, major: int) -> dict:
    """The inspector JSON of a stand-in engine in the schema of TensorRT ``major``."""
    plan = engine._plan
    layers = []
    if plan["detailed"]:
        for name, precision in conv_precisions(engine._model, plan["strongly_typed"], plan["weak_fp16"]):
            tensor = {"Name": f"{name}_in", "Location": "Device", "Dimensions": [1, 8, 8, 8]}
            if major == 10:
                tensor["Format/Datatype"] = FORMAT_10[precision]
            else:
                tensor.update({"Format": "Row major linear (kLINEAR)", "DataType": DATATYPE_11[precision]})
            layers.append({"Name": name, "LayerType": "CaskConvolution", "Inputs": [tensor], "Outputs": [tensor]})
    else:
        layers = [f"layer {i}" for i in range(3)]  # LAYER_NAMES_ONLY: names, no tensors
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    if major == 10:
        return {"Layers": layers, "Bindings": names}
    return {"Layers": layers, "I/O Tensors": [{"Name": n, "IOMode": "Input" if i == 0 else "Output"}
                                              for i, n in enumerate(names)]}
