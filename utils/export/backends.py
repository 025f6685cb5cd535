"""Inference back-ends for val.py and detect_dual.py: PyTorch ``.pt``, ONNX Runtime, TensorRT.

Every back-end is called on a float ``Tensor[B, 3, H, W]`` (RGB, [0, 1]) and returns the decoded
predictions ``Tensor[B, 4 + nc, A]`` (cx, cy, w, h in input pixels, sigmoid scores) on the same
device, ready for ``utils.ops.nms.non_max_suppression``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from utils.core.errors import UserError
from utils.core.log import LOGGER
from utils.export.ort_session import ort_session
from utils.export.trt_runtime import cuda_object, load_tensorrt
from utils.ops.boxes import xyxy2xywh

DEFAULT_STRIDE = 32
ONNX_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
END2END_LAYOUTS = ("end2end-trt", "end2end-ort")
TRANSPOSED_LAYOUT = "ba-4+nc"
END2END_TRT_OUTPUTS = ("num_dets", "det_boxes", "det_scores", "det_classes")


def _generic_names(nc: int) -> list[str]:
    return [f"class{i}" for i in range(nc)]


def _parse_names(value: str | None) -> list[str] | None:
    """Class names from a metadata string: a JSON list, or a JSON dict keyed by index."""
    if value is None:
        return None
    try:
        names = json.loads(value)
        return [names[k] for k in sorted(names, key=int)] if isinstance(names, dict) else [str(n) for n in names]
    except (json.JSONDecodeError, ValueError, TypeError):
        return None


def _end2end_to_decoded(boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, nc: int) -> torch.Tensor:
    """Turn already-suppressed detections back into the decoded layout.

    ``boxes [B, K, 4]`` xyxy, ``scores [B, K]``, ``classes [B, K]`` -> ``[B, 4 + nc, K]`` with a one-hot
    score, so that our NMS (a no-op on them apart from the thresholds) applies unchanged.
    """
    b, k = scores.shape
    out = torch.zeros(b, 4 + nc, k, device=boxes.device, dtype=torch.float32)
    out[:, :4] = xyxy2xywh(boxes.float()).transpose(1, 2)
    cls = classes.long().clamp(0, max(nc - 1, 0))
    out[:, 4:].scatter_(1, cls[:, None, :], scores.float()[:, None, :])
    return out


class Backend:
    """Common attributes: ``names`` (list[str]), ``stride`` (int), ``img_size`` ((h, w) for static
    exports, else None), ``device``, ``half`` (whether inputs should be fp16), ``kind``."""

    kind = "base"

    def __init__(self, names: Sequence[str], stride: int, img_size: tuple[int, int] | None,
                 device: torch.device, half: bool) -> None:
        self.names = list(names)
        self.stride = int(stride)
        self.img_size = img_size
        self.device = device
        self.half = half

    @property
    def nc(self) -> int:
        return len(self.names)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _in_chunks(self, images: torch.Tensor, fixed_batch: int | None, infer) -> torch.Tensor:
        """Run ``infer(chunk, real) -> [real, 4 + nc, A]`` over batches a static-batch export accepts.

        The last chunk is padded with zero images up to ``fixed_batch``; ``infer`` drops the padding.
        """
        step = fixed_batch or len(images)
        decoded = []
        for start in range(0, len(images), step):
            part = images[start:start + step]
            real = len(part)
            if real < step:
                part = torch.cat((part, part.new_zeros((step - real, *part.shape[1:]))))
            decoded.append(infer(part, real).to(images.device))
        return torch.cat(decoded)

    def warmup(self, img_size: tuple[int, int] | None = None, batch: int = 1) -> None:
        """One forward on zeros so that lazy initialisation is not timed (TensorRT, CUDA)."""
        h, w = img_size or self.img_size or (DEFAULT_STRIDE * 2, DEFAULT_STRIDE * 2)
        dtype = torch.float16 if self.half else torch.float32
        self(torch.zeros(batch, 3, h, w, device=self.device, dtype=dtype))


class TorchBackend(Backend):
    """A ``.pt`` checkpoint (ours or official), fused, eval, the main branch of a dual head."""

    kind = "pt"

    def __init__(self, weights: Path, device: torch.device, half: bool = False) -> None:
        from models.heads import main_output
        from utils.checkpoint.ours import load_model

        model = load_model(weights, device=device, fuse=True)
        half = half and device.type == "cuda"  # fp16 convolutions are not supported well on CPU
        if half:
            model.half()
        self.model = model.eval()
        self._main_output = main_output
        super().__init__(model.names, int(model.stride.max()), None, device, half)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, torch.float16 if self.half else torch.float32)
        return self._main_output(self.model(images))


class OnnxBackend(Backend):
    """An ONNX export run with ONNX Runtime (CUDA provider on a GPU when it is installed)."""

    kind = "onnx"

    def __init__(self, weights: Path, device: torch.device, half: bool = False) -> None:
        try:
            import onnxruntime  # noqa: F401  (only to tell a missing package from a bad file)
        except ImportError:
            raise UserError(f"--weights {weights}: ONNX Runtime is not installed: pip install onnxruntime "
                            "(or onnxruntime-gpu)") from None
        try:
            self.session = ort_session(weights, device)
        except Exception as exc:  # onnxruntime raises its own exception types for corrupt files
            if "EfficientNMS" in str(exc):
                raise UserError(f"--weights {weights} holds TensorRT's EfficientNMS plugin, which ONNX Runtime cannot "
                                "run: use its .engine, or export with --end2end --nms ort") from None
            raise UserError(f"--weights {weights}: not a readable ONNX model ({str(exc).splitlines()[0]})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.input_dtype = ONNX_TYPES.get(inp.type, np.float32)
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.layout = meta.get("layout", "bchw-4+nc")
        dims = inp.shape  # ints for static axes, strings for dynamic ones
        self.fixed_batch = dims[0] if isinstance(dims[0], int) else None
        static_hw = tuple(dims[2:4]) if all(isinstance(d, int) for d in dims[2:4]) else None
        names = self._names(meta, weights)
        stride = int(meta.get("stride", DEFAULT_STRIDE))
        super().__init__(names, stride, static_hw, device, self.input_dtype == np.float16)

    def _names(self, meta: dict, weights: Path) -> list[str]:
        names = _parse_names(meta.get("names"))
        if names:
            return names
        LOGGER.warning(f"{weights}: no readable 'names' metadata; using class0, class1, ...")
        if self.layout in END2END_LAYOUTS:
            nc = int(meta.get("nc", 0))
        else:
            out_shape = self.session.get_outputs()[0].shape
            channels = out_shape[-1] if self.layout == TRANSPOSED_LAYOUT else out_shape[1]
            nc = channels - 4 if isinstance(channels, int) else 0
        return _generic_names(nc)

    def _infer(self, images: torch.Tensor, num_images: int) -> torch.Tensor:
        x = images.detach().cpu().numpy().astype(self.input_dtype, copy=False)
        return self._decode(self.session.run(self.output_names, {self.input_name: x}), num_images)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self._in_chunks(images, self.fixed_batch, self._infer)

    def _decode(self, outputs: list[np.ndarray], num_images: int) -> torch.Tensor:
        """The outputs of one run -> ``[num_images, 4 + nc, A]`` (padding images dropped)."""
        if self.layout == "end2end-trt":
            _, boxes, scores, classes = (torch.from_numpy(np.asarray(o))[:num_images] for o in outputs[:4])
            return _end2end_to_decoded(boxes, scores, classes, self.nc)
        if self.layout == "end2end-ort":
            det = torch.from_numpy(np.asarray(outputs[0])).float()  # [N, 7] batch, x1, y1, x2, y2, score, cls
            per_image = [det[det[:, 0] == b] for b in range(num_images)]
            k = max(1, max(len(p) for p in per_image))
            boxes = torch.zeros(num_images, k, 4)
            scores, classes = torch.zeros(num_images, k), torch.zeros(num_images, k)
            for b, p in enumerate(per_image):
                boxes[b, :len(p)], scores[b, :len(p)], classes[b, :len(p)] = p[:, 1:5], p[:, 5], p[:, 6]
            return _end2end_to_decoded(boxes, scores, classes, self.nc)
        y = torch.from_numpy(np.asarray(outputs[0]))[:num_images].float()
        return y.transpose(1, 2) if self.layout == TRANSPOSED_LAYOUT else y


class TensorRTBackend(Backend):
    """A serialised TensorRT 10 or 11 engine; input and output buffers are torch CUDA tensors.

    Only the tensor-name API that both versions share is used: ``num_io_tensors``,
    ``get_tensor_name/mode/shape/dtype``, ``set_input_shape``, ``set_tensor_address`` and
    ``execute_async_v3`` (the binding-index API left in TensorRT 10). The CUDA stream handling is in
    :meth:`_new_stream` and :meth:`_launch`, the only CUDA-specific parts.
    """

    kind = "engine"
    requires_cuda = True

    def __init__(self, weights: Path, device: torch.device, half: bool = False, trt=None) -> None:
        if trt is None:
            trt = load_tensorrt()
        if self.requires_cuda and device.type != "cuda":
            raise UserError(f"--weights {weights}: a TensorRT engine runs on a CUDA device, not --device {device}")
        self.trt = trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = cuda_object(trt, trt.Runtime, self.logger)  # kept: the runtime must outlive its engine
        self.engine = self.runtime.deserialize_cuda_engine(weights.read_bytes())
        if self.engine is None:
            raise UserError(f"--weights {weights}: TensorRT cannot load this engine (built with another "
                            "TensorRT version or GPU?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        in_shape = tuple(self.engine.get_tensor_shape(self.inputs[0]))  # -1 marks a dynamic axis
        self.fixed_batch = int(in_shape[0]) if in_shape[0] > 0 else None
        in_dtype = torch.float16 if self.engine.get_tensor_dtype(self.inputs[0]) == trt.DataType.HALF else torch.float32
        static_hw = tuple(int(d) for d in in_shape[2:4]) if all(d > 0 for d in in_shape[2:4]) else None
        meta = _sibling_onnx_metadata(weights)
        self.layout = meta.get("layout", "bchw-4+nc")
        class_names = _parse_names(meta.get("names"))
        if not class_names:
            out_shape = tuple(self.engine.get_tensor_shape(self.outputs[0]))
            channels = out_shape[-1] if self.layout == TRANSPOSED_LAYOUT else out_shape[1]
            class_names = _generic_names(max(int(channels) - 4, 0))
            LOGGER.warning(f"{weights}: no {weights.with_suffix('.onnx').name} beside it to read class names from; "
                           "using class0, class1, ...")
        super().__init__(class_names, int(meta.get("stride", DEFAULT_STRIDE)), static_hw, device,
                         in_dtype == torch.float16)
        self.stream = self._new_stream()

    def _new_stream(self):
        return torch.cuda.Stream(device=self.device)

    def _launch(self) -> bool:
        """Run the context on our stream, ordered after the work already queued on the current one."""
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        ok = self.context.execute_async_v3(self.stream.cuda_stream)
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        return ok

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self._in_chunks(images, self.fixed_batch, self._infer)

    def _infer(self, images: torch.Tensor, num_images: int) -> torch.Tensor:
        trt = self.trt
        x = images.to(self.device, torch.float16 if self.half else torch.float32).contiguous()
        self.context.set_input_shape(self.inputs[0], tuple(x.shape))
        self.context.set_tensor_address(self.inputs[0], x.data_ptr())
        buffers = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = {trt.DataType.HALF: torch.float16, trt.DataType.INT32: torch.int32,
                     trt.DataType.INT64: torch.int64}.get(self.engine.get_tensor_dtype(name), torch.float32)
            buf = torch.empty(shape, dtype=dtype, device=self.device)
            self.context.set_tensor_address(name, buf.data_ptr())
            buffers[name] = buf
        if not self._launch():
            raise RuntimeError("TensorRT execution failed")
        if self.layout == "end2end-trt":
            # the EfficientNMS outputs by name when the exporter's names were kept, else in order
            ordered = [buffers.get(n) for n in END2END_TRT_OUTPUTS]
            _, boxes, scores, classes = ordered if all(b is not None for b in ordered) else list(buffers.values())
            return _end2end_to_decoded(boxes[:num_images], scores[:num_images], classes[:num_images], self.nc)
        y = buffers[self.outputs[0]][:num_images].float()
        return y.transpose(1, 2) if self.layout == TRANSPOSED_LAYOUT else y


def _sibling_onnx_metadata(weights: Path) -> dict:
    """Metadata of the ONNX file the engine was built from, when it sits beside it (same stem)."""
    onnx_path = weights.with_suffix(".onnx")
    if not onnx_path.is_file():
        return {}
    try:
        import onnx

        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception:  # a missing package or a damaged file only costs us the class names
        return {}
    return {p.key: p.value for p in model.metadata_props}


BACKENDS = {".pt": TorchBackend, ".pth": TorchBackend, ".onnx": OnnxBackend, ".engine": TensorRTBackend}


def load_backend(weights: str | Path, device: str | torch.device = "cpu", half: bool = False) -> Backend:
    """Open ``weights`` (``.pt``/``.pth``, ``.onnx`` or ``.engine``) for inference on ``device``.

    ``half`` asks for fp16 where the back-end can use it (``.pt`` on CUDA); ONNX and TensorRT take the
    precision they were exported with. Raises :class:`UserError` for a missing file, an unknown
    suffix or a missing runtime package.
    """
    weights = Path(weights)
    if not weights.is_file():
        raise UserError(f"--weights {weights} does not exist")
    backend_cls = BACKENDS.get(weights.suffix.lower())
    if backend_cls is None:
        raise UserError(f"--weights {weights}: unknown format '{weights.suffix}' (use .pt, .onnx or .engine)")
    if not isinstance(device, torch.device):
        from utils.core.device import select_device

        device = select_device(device)
    return backend_cls(weights, device, half)
