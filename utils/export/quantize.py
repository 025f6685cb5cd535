"""Explicit INT8 quantization of an exported ONNX graph (Q/DQ nodes), calibrated on real images.

TensorRT 11 has no implicit INT8 (no calibrator, no ``BuilderFlag.INT8``, no ``trtexec --int8
--calib``): the scales must be in the graph as QuantizeLinear/DequantizeLinear pairs. They are
written here with ONNX Runtime's ``quantize_static`` in QDQ format, with the settings TensorRT
expects for explicit quantization:

- INT8 activations and weights, symmetric, zero-point 0 (``ActivationSymmetric``/``WeightSymmetric``);
- per-channel weight scales (axis 0 of a Conv weight), per-tensor activation scales;
- Q/DQ on the inputs of every convolution only (``op_types_to_quantize=['Conv']``, conv outputs
  not quantized): TensorRT fuses DQ -> Conv (+ bias, + SiLU) -> the next layer's Q itself;
- the head's decode (DFL softmax and its 1x1 conv, anchors, strides, sigmoid, box maths) left in
  FP32 (:func:`utils.export.precision.keep_fp32_nodes`); optionally also the head's last 1x1 convs.

Calibration images come from the data set's train split and are letterboxed exactly as val.py
letterboxes them (the same :class:`utils.data.dataset.DetectionDataset` with ``augment=False``).
ModelOpt's ONNX quantizer (``modelopt.onnx.quantization``) would do the same job, but its ``onnx``
extra pins onnxruntime-gpu and an older onnx, which would replace the CPU ONNX Runtime used here.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from utils.core.errors import UserError
from utils.core.log import LOGGER

CALIB_METHODS = ("minmax", "entropy", "percentile")
DEFAULT_CALIB_IMAGES = 512  # more than BCCD's 205 train images: every image of a small set is used
MIN_CALIB_IMAGES = 32  # with fewer, a handful of images sets every activation range
DEFAULT_PERCENTILE = 99.99
# ONNX Runtime's histogram calibrators keep every calibrated activation of a collect call in memory
# (a few GB for a whole data set at 320 px): calibration is fed in chunks of at most this many
# batches ("CalibStridedMinMax", which despite its name chunks every method)
CALIB_BATCHES_IN_MEMORY = 16
ORT_ERRORS_ONLY, ORT_DEFAULT_SEVERITY = 3, 2  # onnxruntime logger severities


@dataclass(frozen=True)
class CalibrationSettings:
    """How to calibrate: ``images`` (paths, the train split), ``method`` (one of ``CALIB_METHODS``),
    ``max_images`` (an evenly spaced subset when the split is larger), ``exclude_head_convs`` (keep the
    head's last 1x1 convs in float), ``percentile`` (for ``method='percentile'``)."""

    images: tuple[str, ...]
    method: str = "minmax"
    max_images: int = DEFAULT_CALIB_IMAGES
    exclude_head_convs: bool = False
    percentile: float = DEFAULT_PERCENTILE


def pick_images(images: list[str] | tuple[str, ...], max_images: int) -> list[str]:
    """At most ``max_images`` of ``images``, evenly spaced over the sorted list (all when fewer)."""
    images = sorted(images)
    if len(images) <= max_images:
        return images
    step = len(images) / max_images
    return [images[int(i * step)] for i in range(max_images)]


class LetterboxReader:
    """ONNX Runtime calibration data reader: ``{input_name: float32 [batch, 3, S, S]}`` per call.

    Images are loaded and letterboxed by :class:`utils.data.dataset.DetectionDataset` as for val.py
    (long side ``img_size``, grey padding to a square, no augmentation), RGB in [0, 1]. An
    incomplete last batch is dropped (a static export takes exactly ``batch`` images).
    """

    def __init__(self, images: list[str], img_size: int, batch: int, input_name: str, stride: int = 32) -> None:
        from utils.data.dataset import LoaderOptions, create_dataloader

        _, self.dataset = create_dataloader(list(images), LoaderOptions(img_size, batch, stride=stride, workers=0,
                                                                        prefix="calibration: "))
        self.batch, self.input_name = batch, input_name
        self.count = (len(self.dataset) // batch) * batch
        self.position, self.end = 0, self.count // batch  # in batches

    def __len__(self) -> int:
        """Number of whole batches."""
        return self.count // self.batch

    def set_range(self, start_index: int, end_index: int) -> None:
        """Read batches ``start_index`` .. ``end_index - 1`` next (ONNX Runtime's chunked calibration)."""
        self.position, self.end = start_index, min(end_index, len(self))

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= self.end:
            return None
        first = self.position * self.batch
        images = [self.dataset[first + k][0].numpy() for k in range(self.batch)]
        self.position += 1
        return {self.input_name: np.stack(images).astype(np.float32) / 255.0}


def chunk_batches(total: int, cap: int = CALIB_BATCHES_IN_MEMORY) -> int:
    """The largest chunk size <= ``cap`` that divides ``total`` batches (ONNX Runtime requires it)."""
    return max(size for size in range(1, min(cap, total) + 1) if total % size == 0)


def check_calibration(images: list[str] | tuple[str, ...], source: str) -> None:
    """Raise UserError when there are fewer than ``MIN_CALIB_IMAGES`` calibration images."""
    if len(images) < MIN_CALIB_IMAGES:
        raise UserError(f"--data {source}: {len(images)} calibration images in its train split; INT8 needs "
                        f"at least {MIN_CALIB_IMAGES} (more gives steadier scales)")


def static_input(model) -> tuple[str, tuple[int, int, int, int]]:
    """Name and shape of the single image input; UserError for a dynamic-shape model."""
    inp = model.graph.input[0]
    dims = inp.type.tensor_type.shape.dim
    shape = tuple(d.dim_value for d in dims)
    if len(shape) != 4 or any(d.dim_param or d.dim_value <= 0 for d in dims):
        raise UserError("INT8 calibration needs fixed input shapes: export without --dynamic")
    return inp.name, shape  # type: ignore[return-value]


def quantize_int8(model, head_index: int, settings: CalibrationSettings, stride: int = 32):
    """INT8 Q/DQ copy of the FP32 ``onnx.ModelProto`` ``model`` (plain output, fixed shapes).

    Returns the quantized ``onnx.ModelProto``. Raises UserError for a dynamic-shape model, a
    non-square input or too few calibration images.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from utils.export.precision import head_output_convs, inline_initializer_identities, keep_fp32_nodes

    input_name, (batch, _, height, width) = static_input(model)
    if height != width:
        raise UserError(f"--img {height} {width}: INT8 calibration letterboxes to a square like val.py; "
                        "export a square size")
    images = pick_images(settings.images, settings.max_images)
    if settings.method not in CALIB_METHODS:
        raise UserError(f"--calib-method {settings.method}: choose from {', '.join(CALIB_METHODS)}")
    excluded = keep_fp32_nodes(model.graph, head_index)
    if settings.exclude_head_convs:
        excluded |= set(head_output_convs(model.graph, head_index))
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[settings.method]
    extra = {"ActivationSymmetric": True, "WeightSymmetric": True, "OpTypesToExcludeOutputQuantization": ["Conv"],
             "CalibPercentile": settings.percentile,
             "QuantizeBias": False}  # TensorRT takes the conv bias in float
    reader = LetterboxReader(images, height, batch, input_name, stride)
    if reader.count < MIN_CALIB_IMAGES:
        raise UserError(f"{reader.count} calibration images in whole batches of {batch}; INT8 needs at least "
                        f"{MIN_CALIB_IMAGES}: pass a data set with more train images or a smaller --batch")
    extra["CalibStridedMinMax"] = chunk_batches(len(reader))
    LOGGER.info(f"INT8: calibrating on {reader.count} images ({settings.method}), "
                f"{len(excluded)} nodes of the head decode{' and last convs' if settings.exclude_head_convs else ''} "
                "left in float")
    inline_initializer_identities(model)
    with tempfile.TemporaryDirectory(prefix="int8-") as folder, _quiet_onnxruntime():
        source, target = Path(folder) / "fp32.onnx", Path(folder) / "int8.onnx"
        onnx.save(model, str(source))
        try:
            quantize_static(str(source), str(target), reader, quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=["Conv"], per_channel=True, reduce_range=False,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                            nodes_to_exclude=sorted(excluded), calibrate_method=method, extra_options=extra)
        except ValueError as exc:
            if settings.method == "minmax" or "bins" not in str(exc):
                raise
            # numpy cannot split a float32 tensor whose values hardly vary into 2048 histogram bins
            raise UserError(f"--calib-method {settings.method}: ONNX Runtime's histogram failed on an almost "
                            f"constant activation ({exc}); use --calib-method minmax") from None
        return onnx.load(str(target))


@contextlib.contextmanager
def _quiet_onnxruntime():
    """Silence ONNX Runtime's calibration-session notes (constant folding of Q/DQ scales) and the
    quantizer's advice to pre-process, which does not apply to our exporter's graphs."""
    import onnxruntime

    root = logging.getLogger()
    level = root.level
    onnxruntime.set_default_logger_severity(ORT_ERRORS_ONLY)
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)
        onnxruntime.set_default_logger_severity(ORT_DEFAULT_SEVERITY)
