"""TensorRT engines from ONNX with the TensorRT 10 Python API, or the ``trtexec`` line when it is absent.

The engine is normally built on the device that runs it (a Jetson Orin Nano): engines are tied to
the GPU and the TensorRT version. :func:`trtexec_command` prints the line for that; :func:`build_engine`
builds one here when TensorRT and a CUDA GPU are present.
"""

from __future__ import annotations

import importlib.util
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from utils.errors import UserError
from utils.log import LOGGER

MIB = 1 << 20
GIB = 1 << 30
ORIN_NANO_WORKSPACE_MIB = 2048  # the Orin Nano shares 8 GB between CPU and GPU; 2 GB leaves room for the rest
DYNAMIC_MAX_BATCH = 16  # largest batch of the optimisation profile of a --dynamic export
CALIB_MAX_IMAGES = 512  # entropy calibration converges well before this; more only costs build time
CALIB_BATCH = 8
INPUT_NAME = "images"


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
    """True when the ``tensorrt`` Python package can be imported."""
    return importlib.util.find_spec("tensorrt") is not None


def _dims(shape: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in shape)


def trtexec_command(onnx_path: str | Path, engine_path: str | Path, half: bool = True, int8: bool = False,
                    workspace_mib: int = ORIN_NANO_WORKSPACE_MIB, calib_cache: str | Path | None = None,
                    profile: ShapeProfile | None = None) -> str:
    """The ``trtexec`` line that builds the engine on the target device (e.g. a Jetson Orin Nano).

    ``profile`` is needed for an ONNX file with dynamic axes (``--minShapes/--optShapes/--maxShapes``);
    ``calib_cache`` is an INT8 calibration cache written by :func:`build_engine` (``--calib``).
    """
    parts = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine_path}"]
    if half:
        parts.append("--fp16")
    if int8:
        parts.append("--int8")
        if calib_cache:
            parts.append(f"--calib={calib_cache}")
    if profile is not None:
        parts += [f"--minShapes={INPUT_NAME}:{_dims(profile.min)}", f"--optShapes={INPUT_NAME}:{_dims(profile.opt)}",
                  f"--maxShapes={INPUT_NAME}:{_dims(profile.max)}"]
    parts.append(f"--memPoolSize=workspace:{int(workspace_mib)}M")
    return " ".join(shlex.quote(str(p)) for p in parts)


def calibration_batches(images: list[str], img_size: tuple[int, int], batch: int,
                        limit: int = CALIB_MAX_IMAGES) -> Iterator[np.ndarray]:
    """Letterboxed RGB float32 batches ``[batch, 3, H, W]`` in [0, 1] (as at inference) for INT8
    calibration; unreadable images are skipped with a warning, an incomplete last batch is dropped."""
    import cv2

    from utils.augment import letterbox

    chunk: list[np.ndarray] = []
    for path in images[:limit]:
        image = cv2.imread(str(path))
        if image is None:
            LOGGER.warning(f"calibration: cannot read {path}, skipped")
            continue
        boxed = letterbox(image, img_size, auto=False)[0]
        chunk.append(boxed[:, :, ::-1].transpose(2, 0, 1).astype(np.float32) / 255.0)
        if len(chunk) == batch:
            yield np.ascontiguousarray(np.stack(chunk))
            chunk = []


def build_engine(onnx_path: str | Path, engine_path: str | Path, half: bool = True, int8: bool = False,
                 workspace_gib: float = 4.0, calib_images: list[str] | None = None,
                 img_size: tuple[int, int] = (640, 640), profile: ShapeProfile | None = None,
                 calib_batch: int = CALIB_BATCH) -> Path:
    """Build and serialise an engine with ``build_serialized_network`` (TensorRT 10, CUDA GPU).

    Args:
        onnx_path / engine_path: input ONNX, output ``.engine``.
        half: allow FP16 kernels. int8: allow INT8 kernels, calibrated on ``calib_images``
            (letterboxed to ``img_size``); the cache is written to ``engine_path`` with ``.calib``.
        workspace_gib: builder workspace limit.
        profile: optimisation profile, required for ONNX files with dynamic axes.
    Raises:
        UserError: the ONNX cannot be parsed, INT8 without images, or the build fails.
    """
    import tensorrt as trt

    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * GIB))
    if half or int8:  # INT8 builds keep FP16 for the layers that do not quantise well
        config.set_flag(trt.BuilderFlag.FP16)
    optimisation_profile = None
    if profile is not None:
        optimisation_profile = builder.create_optimization_profile()
        optimisation_profile.set_shape(network.get_input(0).name, profile.min, profile.opt, profile.max)
        config.add_optimization_profile(optimisation_profile)
    if int8:
        if not calib_images:
            raise UserError("--int8 needs calibration images: pass --data data.yaml")
        config.set_flag(trt.BuilderFlag.INT8)
        cache = Path(engine_path).with_suffix(".calib")
        config.int8_calibrator = _make_calibrator(trt, calib_images, img_size, calib_batch, cache)
        if optimisation_profile is not None:
            config.set_calibration_profile(optimisation_profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise UserError(f"TensorRT failed to build an engine from {onnx_path} (see the TensorRT messages above)")
    Path(engine_path).write_bytes(bytes(serialized))
    return Path(engine_path)


def _make_calibrator(trt, images: list[str], img_size: tuple[int, int], batch: int, cache: Path):
    """An entropy calibrator over letterboxed images; the cache is read from / written to ``cache``."""
    import torch

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            super().__init__()
            self.batches = calibration_batches(images, img_size, batch)
            self.device_buffer: torch.Tensor | None = None  # kept alive while TensorRT reads it

        def get_batch_size(self) -> int:
            return batch

        def get_batch(self, names):
            host = next(self.batches, None)
            if host is None:
                return None
            self.device_buffer = torch.from_numpy(host).cuda()
            return [int(self.device_buffer.data_ptr())]

        def read_calibration_cache(self):
            return cache.read_bytes() if cache.exists() else None

        def write_calibration_cache(self, data) -> None:
            cache.write_bytes(bytes(data))
            LOGGER.info(f"INT8 calibration cache: {cache}")

    return EntropyCalibrator()
