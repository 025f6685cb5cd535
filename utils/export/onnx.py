"""ONNX export of a detection model: plain output or with NMS inside the graph.

Plain graphs output ``output0 Tensor[B, 4 + nc, A]`` (cx, cy, w, h in input pixels, sigmoid
scores), or ``Tensor[B, A, 4 + nc]`` with ``transpose=True``. End-to-end graphs add NMS in one of
two forms, both with the semantics of ``utils.ops.nms.non_max_suppression(multi_label=False)``: each
anchor keeps its best class only, boxes are suppressed per class (IoU > ``iou_thres``), a score must
be strictly above ``conf_thres``, at most ``max_det`` boxes per image, highest score first.

- ``trt``: the TensorRT ``EfficientNMS_TRT`` plugin node with outputs ``num_dets int32 [B, 1]``,
  ``det_boxes float [B, K, 4]`` (x1, y1, x2, y2 pixels), ``det_scores float [B, K]``,
  ``det_classes int32 [B, K]`` (K = ``max_det``), the layout deployment tools expect. ONNX Runtime
  cannot run the plugin; TensorRT can.
- ``ort``: the standard ONNX ``NonMaxSuppression`` operator, output
  ``detections float [N, 7]`` = (image index, x1, y1, x2, y2, score, class), grouped by image and
  sorted by decreasing score. ONNX Runtime (and TensorRT) run it.

Metadata (``onnx.ModelProto.metadata_props``): ``names`` (JSON list), ``stride``, ``imgsz`` (JSON
[h, w]), ``nc``, ``layout`` (one of ``LAYOUTS``), ``precision`` (one of ``PRECISIONS``), ``io_dtype``
(``float32``/``float16``), ``producer``; ``utils.export.backends`` and ``utils.export.trt`` read them.

Reduced precision lives in the graph (TensorRT 11 builds only strongly typed networks): ``fp16``
through :mod:`utils.export.precision`, ``int8`` (explicit Q/DQ) through :mod:`utils.export.quantize`; the
head's decode and the NMS stay FP32.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.heads import main_output
from utils.core.options import settings_or_fields
from utils.ops.boxes import xywh2xyxy

DEFAULT_OPSET = 17
MIN_OPSET = 13  # NonMaxSuppression and the split/squeeze forms the exporter emits need 11-13
TRT_PLUGIN_NAME = "EfficientNMS_TRT"
TRT_PLUGIN_VERSION = "1"
TRT_BACKGROUND_NONE = -1  # no class index is background
TRT_BOX_CODING_CORNERS = 0  # boxes are given as (x1, y1, x2, y2)
TRT_OUTPUTS = ("num_dets", "det_boxes", "det_scores", "det_classes")
ORT_OUTPUT = "detections"
PLAIN_OUTPUT = "output0"
INPUT_NAME = "images"
PAD_SCORE = -1.0  # below every real score (scores are sigmoids in [0, 1])
LAYOUTS = {"plain": "bchw-4+nc", "transpose": "ba-4+nc", "trt": "end2end-trt", "ort": "end2end-ort"}
PRODUCER = "yolo-distill"
PRECISIONS = ("fp32", "fp16", "int8", "int8-fp16")
TYPED_PRECISIONS = PRECISIONS[1:]  # what a strongly typed TensorRT build takes from the graph
FP16_QDQ_OPSET = 19  # QuantizeLinear/DequantizeLinear take FP16 inputs and scales from opset 19 on
FLOAT16_TYPE = 10  # onnx.TensorProto.FLOAT16
NMS_INPUT = "preds"
NMS_EXAMPLE_ANCHORS = 64  # anchors of the example input when the NMS is traced alone (the axis is dynamic)


@dataclass(frozen=True)
class OnnxSettings:
    """How :func:`export_onnx` writes a graph.

    ``batch``: batch size of the example input (the fixed batch of a static export). ``opset``: ONNX opset
    (at least ``MIN_OPSET``). ``dynamic``: symbolic batch, height and width axes (not with ``int8``).
    ``simplify``: run onnxslim over the graph (after the precision conversion). ``precision``: ``'fp32'``;
    ``'fp16'`` (FP16 convs, FP32 decode, see :mod:`utils.export.precision`); ``'int8'`` (INT8 Q/DQ on every
    conv input, the rest FP32, see :mod:`utils.export.quantize`); ``'int8-fp16'`` (both: Q/DQ and FP16 in
    between, opset >= ``FP16_QDQ_OPSET``). ``fp16_io``: FP16 input (and plain output) instead of FP32, for
    ``fp16``/``int8-fp16``. ``calibration``: ``utils.export.quantize.CalibrationSettings`` for the INT8
    precisions. ``transpose``: plain output ``[B, A, 4 + nc]`` instead of ``[B, 4 + nc, A]``. ``end2end``:
    None, ``'trt'`` or ``'ort'``: NMS inside the graph (see the module docstring); with a reduced precision
    it is appended after the conversion and stays FP32. ``max_det`` / ``iou_thres`` / ``conf_thres``: the
    end-to-end NMS settings. ``names`` / ``stride``: stored in the metadata.
    """

    batch: int = 1
    opset: int = DEFAULT_OPSET
    dynamic: bool = False
    simplify: bool = False
    precision: str = "fp32"
    fp16_io: bool = False
    calibration: Any = None
    transpose: bool = False
    end2end: str | None = None
    max_det: int = 100
    iou_thres: float = 0.45
    conf_thres: float = 0.25
    names: list[str] | None = None
    stride: int = 32

    def check(self) -> None:
        """ValueError for settings that cannot work together."""
        if self.opset < MIN_OPSET:
            raise ValueError(f"opset {self.opset} is too old; use {MIN_OPSET} or newer")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.precision.startswith("int8") and self.dynamic:
            raise ValueError("INT8 calibration needs fixed shapes (not dynamic)")
        if self.precision == "int8-fp16" and self.opset < FP16_QDQ_OPSET:
            raise ValueError(f"FP16 Q/DQ scales need opset {FP16_QDQ_OPSET} or newer, not {self.opset}")


class ExportHead(nn.Module):
    """Runs the model (eval mode) and returns only the main-branch decode.

    ``images float [B, 3, H, W]`` in [0, 1] -> ``[B, 4 + nc, A]`` (``[B, A, 4 + nc]`` with ``transpose``).
    """

    def __init__(self, model: nn.Module, transpose: bool = False) -> None:
        super().__init__()
        self.model, self.transpose = model, transpose

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pred = main_output(self.model(images))
        return pred.transpose(1, 2) if self.transpose else pred


def best_class_only(scores: torch.Tensor) -> torch.Tensor:
    """Zero every score but each anchor's best class: ``scores [B, A, C]`` -> ``[B, A, C]``.

    Per-class NMS on the result equals our NMS with ``multi_label=False`` (one label per anchor).
    """
    best = scores.amax(2, keepdim=True)
    return torch.where(scores >= best, scores, torch.zeros_like(scores))


class _EfficientNMSPlugin(torch.autograd.Function):
    """Stand-in whose ONNX symbolic is the ``EfficientNMS_TRT`` plugin node.

    The eager forward returns zeros of the plugin's output shapes and types so that tracing works;
    only TensorRT computes the real values.
    """

    @staticmethod
    def forward(ctx, boxes, scores, iou_threshold: float, score_threshold: float, max_output_boxes: int):
        batch = boxes.shape[0]
        num_dets = torch.zeros(batch, 1, dtype=torch.int32, device=boxes.device)
        det_boxes = torch.zeros(batch, max_output_boxes, 4, dtype=boxes.dtype, device=boxes.device)
        det_scores = torch.zeros(batch, max_output_boxes, dtype=scores.dtype, device=boxes.device)
        det_classes = torch.zeros(batch, max_output_boxes, dtype=torch.int32, device=boxes.device)
        return num_dets, det_boxes, det_scores, det_classes

    @staticmethod
    def symbolic(g, boxes, scores, iou_threshold, score_threshold, max_output_boxes):
        outputs = g.op(f"TRT::{TRT_PLUGIN_NAME}", boxes, scores, background_class_i=TRT_BACKGROUND_NONE,
                       box_coding_i=TRT_BOX_CODING_CORNERS, iou_threshold_f=iou_threshold,
                       max_output_boxes_i=max_output_boxes, plugin_version_s=TRT_PLUGIN_VERSION,
                       score_activation_i=0, score_threshold_f=score_threshold, outputs=len(TRT_OUTPUTS))
        # the exporter cannot infer a plugin's outputs: declare their types and shapes
        batch = (boxes.type().varyingSizes() or [None])[0]
        shapes = ([batch, 1], [batch, max_output_boxes, 4], [batch, max_output_boxes], [batch, max_output_boxes])
        int_type = boxes.type().with_dtype(torch.int32)
        for value, base, shape in zip(outputs, (int_type, boxes.type(), scores.type(), int_type), shapes):
            value.setType(base.with_sizes(shape))
        return outputs


class _OnnxNMS(torch.autograd.Function):
    """Stand-in whose ONNX symbolic is the standard ``NonMaxSuppression`` operator.

    ``boxes float [B, A, 4]`` xyxy, ``scores float [B, C, A]`` -> selected ``int64 [N, 3]``
    (image, class, anchor), per class, ``score > score_threshold``, at most ``max_per_class`` per
    class and image. The eager forward does the same with torchvision so that tracing sees real shapes.
    """

    @staticmethod
    def forward(ctx, boxes, scores, max_per_class: int, iou_threshold: float, score_threshold: float):
        from torchvision.ops import batched_nms

        selected = [torch.zeros(0, 3, dtype=torch.long, device=boxes.device)]
        for b in range(boxes.shape[0]):
            cls, idx = (scores[b] > score_threshold).nonzero(as_tuple=True)
            keep = batched_nms(boxes[b, idx], scores[b, cls, idx], cls, iou_threshold)
            cls, idx = cls[keep], idx[keep]  # by decreasing score
            for c in cls.unique():  # ordered by image, class, decreasing score, as ONNX Runtime does
                picked = idx[cls == c][:max_per_class]
                selected.append(torch.stack((torch.full_like(picked, b), torch.full_like(picked, c), picked), 1))
        return torch.cat(selected)

    @staticmethod
    def symbolic(g, boxes, scores, max_per_class, iou_threshold, score_threshold):
        max_t = g.op("Constant", value_t=torch.tensor([max_per_class], dtype=torch.long))
        iou_t = g.op("Constant", value_t=torch.tensor([iou_threshold], dtype=torch.float))
        score_t = g.op("Constant", value_t=torch.tensor([score_threshold], dtype=torch.float))
        return g.op("NonMaxSuppression", boxes, scores, max_t, iou_t, score_t, center_point_box_i=0)


class EndToEnd(nn.Module):
    """Model + NMS in one graph; ``kind`` is ``'trt'`` (plugin) or ``'ort'`` (standard ONNX).

    ``images float [B, 3, H, W]`` -> the outputs named in the module docstring.
    """

    def __init__(self, model: nn.Module, kind: str = "trt", max_det: int = 100, iou_thres: float = 0.45,
                 conf_thres: float = 0.25) -> None:
        super().__init__()
        if kind not in ("trt", "ort"):
            raise ValueError(f"end-to-end kind must be 'trt' or 'ort', not {kind!r}")
        self.head = ExportHead(model, transpose=True)
        self.kind, self.max_det, self.iou_thres, self.conf_thres = kind, max_det, iou_thres, conf_thres

    def forward(self, images: torch.Tensor):
        pred = self.head(images)  # [B, A, 4 + nc]
        boxes, scores = xywh2xyxy(pred[..., :4]), best_class_only(pred[..., 4:])
        if self.kind == "trt":
            return _EfficientNMSPlugin.apply(boxes, scores, self.iou_thres, self.conf_thres, self.max_det)
        # ONNX NonMaxSuppression takes float32 only (an fp16 export casts here)
        boxes, scores = boxes.float(), scores.float()
        selected = _OnnxNMS.apply(boxes, scores.transpose(1, 2).contiguous(), self.max_det, self.iou_thres,
                                  self.conf_thres)
        return self._top_per_image(boxes, scores, selected)

    def _top_per_image(self, boxes: torch.Tensor, scores: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
        """Keep the ``max_det`` best of the selected boxes per image, as ``[N, 7]`` rows.

        A dense ``[B, N + max_det]`` score matrix (other images' rows and padding at ``PAD_SCORE``)
        lets one TopK pick the best per image without data-dependent Python control flow.
        """
        image_idx, class_idx, anchor_idx = selected[:, 0], selected[:, 1], selected[:, 2]
        picked_scores = scores[image_idx, anchor_idx, class_idx]  # [N]
        images = torch.arange(boxes.shape[0], device=boxes.device)
        dense = torch.where(image_idx.unsqueeze(0) == images.unsqueeze(1), picked_scores.unsqueeze(0),
                            torch.full_like(picked_scores, PAD_SCORE).unsqueeze(0))  # [B, N]
        padding = torch.full_like(boxes[:, :1, 0], PAD_SCORE).expand(-1, self.max_det)  # [B, K], also when N = 0
        top_scores, top_rows = torch.cat((dense, padding), 1).topk(self.max_det, 1)  # [B, K]
        valid_image, valid_slot = (top_scores > PAD_SCORE).nonzero(as_tuple=True)
        rows = top_rows[valid_image, valid_slot]  # indices into ``selected``, padding never chosen
        return torch.cat((image_idx[rows].unsqueeze(1).float(), boxes[image_idx[rows], anchor_idx[rows]],
                          picked_scores[rows].unsqueeze(1), class_idx[rows].unsqueeze(1).float()), 1)


def _dynamic_axes(end2end: str | None, transpose: bool) -> dict[str, dict[int, str]]:
    axes = {INPUT_NAME: {0: "batch", 2: "height", 3: "width"}}
    if end2end == "trt":
        axes.update({name: {0: "batch"} for name in TRT_OUTPUTS})
    elif end2end == "ort":
        axes[ORT_OUTPUT] = {0: "detections"}
    else:
        axes[PLAIN_OUTPUT] = {0: "batch", (1 if transpose else 2): "anchors"}
    return axes


def _trace(wrapper: nn.Module, images: torch.Tensor, path: Path, opset: int, outputs: list[str],
           dynamic_axes: dict[str, dict[int, str]] | None, input_name: str = INPUT_NAME) -> None:
    """``torch.onnx.export`` (TorchScript exporter) with the expected warnings silenced."""
    with torch.no_grad(), warnings.catch_warnings():
        # expected here: tracing notes about Python values fixed in the graph (strides, NMS settings),
        # the plugin's unknown shape inference, the TorchScript exporter's own deprecation note, and
        # the advanced-indexing note (our gather indices are never negative)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*shape inference of TRT::")
        warnings.filterwarnings("ignore", message=".*torch.jit.script.* is deprecated", category=FutureWarning)
        warnings.filterwarnings("ignore", message="Exporting aten::index operator of advanced indexing")
        torch.onnx.export(wrapper, (images,), str(path), opset_version=opset, input_names=[input_name],
                          output_names=outputs, dynamic_axes=dynamic_axes, do_constant_folding=True, dynamo=False)


def _trace_to_proto(wrapper: nn.Module, images: torch.Tensor, opset: int, outputs: list[str],
                    dynamic_axes: dict[str, dict[int, str]] | None, input_name: str = INPUT_NAME):
    """Trace ``wrapper`` to an in-memory ``onnx.ModelProto`` (through a temporary file)."""
    import tempfile

    import onnx

    with tempfile.TemporaryDirectory(prefix="onnx-") as folder:
        path = Path(folder) / "graph.onnx"
        _trace(wrapper, images, path, opset, outputs, dynamic_axes, input_name)
        return onnx.load(str(path))


def _nms_graph(nc: int, settings: OnnxSettings):
    """The end-to-end NMS of ``settings.end2end`` alone (input ``preds [batch, 4 + nc, A]`` FP32), to be
    appended to a typed graph."""
    kind = settings.end2end
    wrapper = EndToEnd(nn.Identity(), kind, settings.max_det, settings.iou_thres, settings.conf_thres).eval()
    preds = torch.rand(settings.batch, 4 + nc, NMS_EXAMPLE_ANCHORS)
    outputs = list(TRT_OUTPUTS) if kind == "trt" else [ORT_OUTPUT]
    dynamic = settings.dynamic
    axes = {name: dims for name, dims in _dynamic_axes(kind, False).items() if name != INPUT_NAME} if dynamic else {}
    axes[NMS_INPUT] = {0: "batch", 2: "anchors"} if dynamic else {2: "anchors"}
    return _trace_to_proto(wrapper, preds, settings.opset, outputs, axes, input_name=NMS_INPUT)


def _append_nms(graph, nms):
    """``graph`` (output ``output0``) followed by the NMS graph ``nms`` (input ``preds``)."""
    import onnx

    nms = onnx.compose.add_prefix(nms, "nms/", rename_inputs=False, rename_outputs=False)
    nms.ir_version = graph.ir_version
    return onnx.compose.merge_models(graph, nms, io_map=[(PLAIN_OUTPUT, NMS_INPUT)])


def _fp32_graph(model: nn.Module, images: torch.Tensor, settings: OnnxSettings):
    """Trace the FP32 graph: the plain output, or with the end-to-end NMS inside."""
    end2end = settings.end2end
    if end2end:
        wrapper: nn.Module = EndToEnd(model, end2end, settings.max_det, settings.iou_thres, settings.conf_thres)
        outputs = list(TRT_OUTPUTS) if end2end == "trt" else [ORT_OUTPUT]
    else:
        wrapper, outputs = ExportHead(model, transpose=settings.transpose), [PLAIN_OUTPUT]
    graph = _trace_to_proto(wrapper.eval(), images, settings.opset, outputs,
                            _dynamic_axes(end2end, settings.transpose) if settings.dynamic else None)
    if settings.simplify:
        import onnxslim

        graph = onnxslim.slim(graph)
    return graph


def _typed_graph(model: nn.Module, images: torch.Tensor, settings: OnnxSettings):
    """Trace the FP32 plain graph, give it its precision (FP16 / INT8 Q/DQ), then append the NMS."""
    from utils.export import precision as onnx_precision
    from utils.export.quantize import quantize_int8

    precision, end2end = settings.precision, settings.end2end
    head_index = int(model.head.i)
    transpose = settings.transpose and not end2end
    axes = _dynamic_axes(None, transpose) if settings.dynamic else None
    graph = _trace_to_proto(ExportHead(model, transpose=transpose), images, settings.opset, [PLAIN_OUTPUT], axes)
    if precision.startswith("int8"):
        if settings.calibration is None:
            raise ValueError("an INT8 export needs calibration settings")
        graph = quantize_int8(graph, head_index, settings.calibration, stride=int(model.stride.max()))
    if precision in ("fp16", "int8-fp16"):
        graph = onnx_precision.to_fp16(graph, onnx_precision.keep_fp32_nodes(graph.graph, head_index))
        if settings.fp16_io:
            onnx_precision.fp16_input(graph)
            if not end2end:  # the NMS outputs are FP32 by the plugin's / operator's contract
                onnx_precision.fp16_output(graph)
    if settings.simplify:  # after the conversion: onnxconverter-common cannot convert some of onnxslim's rewrites
        import onnxslim

        graph = onnxslim.slim(graph)
    if end2end:
        graph = _append_nms(graph, _nms_graph(model.head.nc, settings))
    return graph


def export_onnx(model: nn.Module, path: str | Path, img_size: int | tuple[int, int],
                settings: OnnxSettings | None = None, **fields: Any) -> Path:
    """Write ``model`` to ``path`` as ONNX and check the result.

    Args:
        model: a DetectionModel already fused, in eval mode, ``head.export = True`` (see
            ``utils.export.model.prepare_model``), FP32.
        path: output ``.onnx`` file.
        img_size: input ``(height, width)`` or one side; multiples of ``settings.stride``.
        settings: an :class:`OnnxSettings`, or its fields as keywords (``names=..., dynamic=True``).

    Returns:
        ``path``. The model is checked with ``onnx.checker`` (the plugin graph only structurally:
        the checker does not know the ``TRT`` domain). Raises ValueError for settings that cannot work
        together.
    """
    import onnx

    settings = settings_or_fields(OnnxSettings, settings, fields)
    settings.check()
    path = Path(path)
    height, width = (img_size, img_size) if isinstance(img_size, int) else img_size
    device = next(model.parameters()).device
    images = torch.zeros(settings.batch, 3, height, width, device=device)
    end2end, names = settings.end2end, list(settings.names or [])
    layout = LAYOUTS[end2end] if end2end else LAYOUTS["transpose" if settings.transpose else "plain"]
    graph = (_fp32_graph(model, images, settings) if settings.precision == "fp32"
             else _typed_graph(model, images, settings))
    io_dtype = "float16" if graph.graph.input[0].type.tensor_type.elem_type == FLOAT16_TYPE else "float32"
    metadata = {"names": json.dumps(names), "stride": str(int(settings.stride)),
                "imgsz": json.dumps([height, width]), "nc": str(len(names)), "layout": layout,
                "precision": settings.precision, "io_dtype": io_dtype, "producer": PRODUCER}
    del graph.metadata_props[:]
    for key, value in metadata.items():
        graph.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(graph, full_check=end2end != "trt")
    onnx.save(graph, str(path))
    return path


def read_metadata(path: str | Path) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file as a dict (without loading external weights)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {prop.key: prop.value for prop in model.metadata_props}
