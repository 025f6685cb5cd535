"""TensorRT engines from our ONNX files, for TensorRT 10 and 11, or the ``trtexec`` line when it is absent.

TensorRT 11 builds only strongly typed networks: the precision of every layer is the one written in
the ONNX (FP16 convs from ``export.py --half``, INT8 Q/DQ from ``--int8``), and the weak-typing API
(``BuilderFlag.FP16``/``INT8``, calibrators, ``trtexec --fp16/--int8/--calib``) is gone. TensorRT 10
has both: ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` (``trtexec --stronglyTyped``) and the
deprecated weak typing. So:

- a typed ONNX (metadata ``precision`` fp16 / int8 / int8-fp16) is built strongly typed on every
  version, with no precision flag;
- an FP32 ONNX is built FP32, except on a TensorRT that still has ``BuilderFlag.FP16`` where
  ``weak_fp16`` lets TensorRT pick FP16 kernels (the TensorRT 10 ``--fp16`` behaviour);
- after the build the engine's layer precisions are read with the engine inspector, so that an
  engine whose convolutions fell back to FP32 is reported instead of passing silently.

The engine is normally built on the device that runs it (engines are tied to the GPU and the TensorRT
version): :func:`trtexec_command` prints the line for that device's TensorRT version.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from utils.core.errors import UserError
from utils.core.log import LOGGER
from utils.export.onnx import TYPED_PRECISIONS, read_metadata
from utils.export.trt_runtime import cuda_object, load_tensorrt

GIB = 1 << 30
ORIN_NANO_WORKSPACE_MIB = 2048  # the Orin Nano shares 8 GB between CPU and GPU; 2 GB leaves room for the rest
DYNAMIC_MAX_BATCH = 16  # largest batch of the optimisation profile of a --dynamic export
INPUT_NAME = "images"
TRT_VERSIONS = (10, 11)
# the precision a typed ONNX promises for its convolutions (int8-fp16: the convs are INT8)
EXPECTED_CONV_PRECISION = {"fp16": "fp16", "int8": "int8", "int8-fp16": "int8"}
# at least this share of the engine's convolution layers must run in the promised precision; the
# rest is the decode's DFL 1x1 conv, which the export keeps in FP32 on purpose
MIN_TYPED_CONV_SHARE = 0.9


@dataclass(frozen=True)
class ShapeProfile:
    """Input shapes ``(batch, 3, height, width)`` of a TensorRT optimisation profile."""

    min: tuple[int, int, int, int]
    opt: tuple[int, int, int, int]
    max: tuple[int, int, int, int]


def shape_profile(img_size: tuple[int, int], batch: int = 1, stride: int = 32,
                  max_batch: int = DYNAMIC_MAX_BATCH, dynamic_size: bool = True) -> ShapeProfile:
    """Profile for a ``--dynamic`` export: batch 1..``max_batch`` (optimised for ``batch``), and with
    ``dynamic_size`` any multiple of ``stride`` from ``stride`` up to ``img_size`` (optimised for it)."""
    height, width = img_size
    low = (stride, stride) if dynamic_size else (height, width)
    return ShapeProfile(min=(1, 3, *low), opt=(batch, 3, height, width),
                        max=(max(batch, max_batch), 3, height, width))


def tensorrt_available() -> bool:
    """True when a ``tensorrt`` Python package is installed; whether its libraries load is only known when
    :func:`utils.export.trt_runtime.load_tensorrt` imports it (one line naming the cause when they do not)."""
    return importlib.util.find_spec("tensorrt") is not None


def trt_major(trt) -> int:
    """Major version of an imported ``tensorrt`` module (``'10.3.0'`` -> 10)."""
    match = re.match(r"(\d+)", str(getattr(trt, "__version__", "")))
    if not match:
        raise UserError("cannot read the TensorRT version (tensorrt.__version__)")
    return int(match.group(1))


def onnx_precision(onnx_path: str | Path) -> str:
    """The ``precision`` metadata of an ONNX file written by export.py (``fp32`` when absent)."""
    return read_metadata(onnx_path).get("precision", "fp32")


def _dims(shape: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in shape)


def trtexec_command(onnx_path: str | Path, engine_path: str | Path, trt_version: int, precision: str = "fp32",
                    weak_fp16: bool = True, workspace_mib: int = ORIN_NANO_WORKSPACE_MIB,
                    profile: ShapeProfile | None = None) -> str:
    """The ``trtexec`` line that builds the engine on a device with TensorRT ``trt_version`` (10 or 11).

    A typed ONNX (``precision`` fp16 / int8 / int8-fp16) gets ``--stronglyTyped`` on 10 and no
    precision flag on 11 (strong typing is the only mode there). An FP32 ONNX gets ``--fp16`` on 10
    when ``weak_fp16`` (weakly typed, deprecated since 10.12) and nothing on 11 (an FP32 engine).
    The layer information is saved next to the engine (``<engine>.layers.json``) so that the precision
    can be checked. ``profile`` is needed for an ONNX file with dynamic axes.
    """
    if trt_version not in TRT_VERSIONS:
        raise UserError(f"--trt-version {trt_version}: choose from {', '.join(map(str, TRT_VERSIONS))} or auto")
    engine_path = Path(engine_path)
    parts = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine_path}"]
    if precision in TYPED_PRECISIONS:
        if trt_version == 10:
            parts.append("--stronglyTyped")
    elif weak_fp16 and trt_version == 10:
        parts.append("--fp16")
    if profile is not None:
        parts += [f"--minShapes={INPUT_NAME}:{_dims(profile.min)}", f"--optShapes={INPUT_NAME}:{_dims(profile.opt)}",
                  f"--maxShapes={INPUT_NAME}:{_dims(profile.max)}"]
    parts += [f"--memPoolSize=workspace:{int(workspace_mib)}M", "--profilingVerbosity=detailed",
              f"--exportLayerInfo={layer_info_path(engine_path)}"]
    return " ".join(shlex.quote(str(p)) for p in parts)


def layer_info_path(engine_path: str | Path) -> Path:
    """Where the engine's layer information (engine inspector JSON) is written: ``<engine>.layers.json``."""
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.stem + ".layers.json")


# ------------------------------------------------------------------------------------ inspection
_PRECISION_WORDS = (("int8", "int8"), ("half", "fp16"), ("fp16", "fp16"), ("bf16", "bf16"), ("float", "fp32"),
                    ("fp32", "fp32"), ("int32", "int32"), ("int64", "int64"), ("bool", "bool"))


def _tensor_precision(tensor: dict) -> str:
    """Precision of one tensor entry of the inspector JSON.

    TensorRT 10 writes one ``"Format/Datatype"`` string (e.g. ``"Row major linear FP16 format"``,
    ``"Thirty-two wide channel vectorized row major Int8 format"``); TensorRT 11 splits it into
    ``"Format"`` and ``"DataType"`` (e.g. ``"Half"``).
    """
    text = str(tensor.get("DataType") or tensor.get("Format/Datatype") or tensor.get("Format") or "").lower()
    for word, name in _PRECISION_WORDS:
        if word in text:
            return name
    return "unknown"


def conv_layer_precisions(info: dict) -> dict[str, str]:
    """``{layer name: precision of its first input}`` for the convolution layers of an engine's
    inspector JSON (``get_engine_information(LayerInformationFormat.JSON)``, built with
    ``ProfilingVerbosity.DETAILED``)."""
    out = {}
    for layer in info.get("Layers", []):
        if not isinstance(layer, dict) or "conv" not in str(layer.get("LayerType", "")).lower():
            continue
        inputs = layer.get("Inputs") or [{}]
        out[str(layer.get("Name", f"layer{len(out)}"))] = _tensor_precision(inputs[0])
    return out


def check_engine_precision(info: dict, precision: str) -> Counter:
    """Count the convolution layers per precision; UserError when a typed ONNX's promise is broken.

    ``precision`` is the ONNX's (``fp32`` checks nothing). For fp16 / int8 at least
    ``MIN_TYPED_CONV_SHARE`` of the convolutions must run in that precision.
    """
    convs = conv_layer_precisions(info)
    counts = Counter(convs.values())
    expected = EXPECTED_CONV_PRECISION.get(precision)
    if expected is None:
        return counts
    if not convs:
        raise UserError("the engine inspector lists no convolution layer: cannot check the engine's precision "
                        "(was it built with ProfilingVerbosity.DETAILED?)")
    share = counts[expected] / len(convs)
    if share < MIN_TYPED_CONV_SHARE:
        others = [name for name, p in convs.items() if p != expected][:3]
        raise UserError(f"the {precision} ONNX gave an engine with {counts[expected]} of {len(convs)} convolutions in "
                        f"{expected} ({dict(counts)}); e.g. {others}: the TensorRT build fell back, check its log")
    return counts


# ------------------------------------------------------------------------------------------ build
def build_engine(onnx_path: str | Path, engine_path: str | Path, workspace_gib: float = 4.0,
                 profile: ShapeProfile | None = None, weak_fp16: bool = True, trt=None) -> Path:
    """Build and serialise an engine with ``build_serialized_network`` (TensorRT 10 or 11, CUDA GPU).

    Args:
        onnx_path / engine_path: input ONNX (ours: its metadata says its precision), output ``.engine``.
        workspace_gib: builder workspace limit.
        profile: optimisation profile, required for ONNX files with dynamic axes.
        weak_fp16: for an FP32 ONNX only: allow FP16 kernels through ``BuilderFlag.FP16`` where this
            TensorRT still has it (10.x); ignored for typed ONNX files and on TensorRT 11.
        trt: the ``tensorrt`` module (tests pass a stand-in); imported when None.
    Writes ``<engine>.layers.json`` (engine inspector) beside the engine.
    Raises:
        UserError: TensorRT cannot load its libraries or start CUDA, the ONNX cannot be parsed, the build
            fails, or the engine's convolutions are not in the precision the ONNX promises.
    """
    if trt is None:
        trt = load_tensorrt()
    precision = onnx_precision(onnx_path)
    typed = precision in TYPED_PRECISIONS
    weak = not typed and weak_fp16 and hasattr(trt.BuilderFlag, "FP16")
    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = cuda_object(trt, trt.Builder, trt_logger)
    # the flag by name: its bit changed between 10.x and 11.x (ignored there, strong typing is the only mode)
    flags = 0 if weak else 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * GIB))
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # layer precisions for the inspector
    if weak:
        LOGGER.warning(f"{onnx_path} is FP32: building weakly typed with BuilderFlag.FP16 (deprecated since "
                       "TensorRT 10.12, removed in 11); export with --half for a strongly typed FP16 engine")
        config.set_flag(trt.BuilderFlag.FP16)
    elif not typed:
        LOGGER.warning(f"{onnx_path} is FP32 and this TensorRT builds strongly typed: the engine will be FP32 "
                       "(export with --half or --int8 for a reduced-precision engine)")
    if profile is not None:
        optimisation_profile = builder.create_optimization_profile()
        optimisation_profile.set_shape(network.get_input(0).name, profile.min, profile.opt, profile.max)
        config.add_optimization_profile(optimisation_profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise UserError(f"TensorRT failed to build an engine from {onnx_path} (see the TensorRT messages above)")
    engine_path = Path(engine_path)
    engine_path.write_bytes(bytes(serialized))
    info = inspect_engine(trt, trt_logger, bytes(serialized))
    layer_info_path(engine_path).write_text(json.dumps(info, indent=1))
    counts = check_engine_precision(info, precision)
    LOGGER.info(f"TensorRT {trt.__version__} engine {engine_path} ({'weakly' if weak else 'strongly'} typed, "
                f"ONNX {precision}): convolutions by precision {dict(counts)}")
    return engine_path


def inspect_engine(trt, trt_logger, serialized: bytes) -> dict:
    """The engine inspector's JSON of a serialised engine, as a dict."""
    runtime = cuda_object(trt, trt.Runtime, trt_logger)
    engine = runtime.deserialize_cuda_engine(serialized)
    if engine is None:
        raise UserError("TensorRT cannot load the engine it has just built")
    inspector = engine.create_engine_inspector()
    return json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))


# ------------------------------------------------------------------------------- export.py step
DEFAULT_WORKSPACE_GIB = 4.0  # for a build on this machine; the printed device line uses the Orin Nano value


def engine_or_command(onnx_path: Path, device, img: tuple[int, int], stride: int, batch: int, dynamic: bool,
                      workspace_gib: float | None, trt_version: str = "auto") -> Path | None:
    """Build the engine here when TensorRT and a CUDA device are present, else print the ``trtexec``
    line(s) for the device: for ``trt_version`` 10 or 11, or with ``auto`` for the installed TensorRT
    (both lines when there is none). Returns the engine path, or None when only printed.

    A TensorRT that is installed but cannot load its libraries is a UserError both for the build and for
    ``auto`` (its version is unknown then); ``trt_version`` 10 or 11 prints the line without it."""
    engine_path = onnx_path.with_suffix(".engine")
    profile = shape_profile(img, batch, stride) if dynamic else None
    if tensorrt_available() and device.type == "cuda":
        build_engine(onnx_path, engine_path, workspace_gib=workspace_gib or DEFAULT_WORKSPACE_GIB, profile=profile)
        return engine_path
    if trt_version == "auto" and tensorrt_available():
        try:
            versions = [trt_major(load_tensorrt())]
        except UserError as exc:
            raise UserError(f"{exc}; or print the trtexec line for the device with --trt-version "
                            f"{' or '.join(map(str, TRT_VERSIONS))}") from None
    else:
        versions = list(TRT_VERSIONS) if trt_version == "auto" else [int(trt_version)]
    reason = "TensorRT is not installed" if not tensorrt_available() else "no CUDA device selected"
    workspace_mib = int(workspace_gib * 1024) if workspace_gib else ORIN_NANO_WORKSPACE_MIB
    precision = onnx_precision(onnx_path)
    lines = [f"  TensorRT {v}: " + trtexec_command(onnx_path, engine_path, v, precision, workspace_mib=workspace_mib,
                                                   profile=profile) for v in versions]
    note = ""
    if precision == "fp32":
        note = ("\nThis ONNX is FP32: TensorRT 11 builds it FP32 (10 uses the deprecated --fp16). "
                "Export with --half (or --int8 --data) for a reduced-precision engine on every version.")
    print(f"{reason}: build the engine on the device with\n" + "\n".join(lines) + note)
    return None
