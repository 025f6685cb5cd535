"""One inference interface for the evaluator, over a ``DetectionModel`` or an exported back-end.

The evaluator only sees :class:`Inference`: where inputs go (``device``, ``input_dtype``), a context
for the whole pass (:meth:`Inference.session`), one for each forward and the loss on its output
(:meth:`Inference.forward_context`: no gradients, autocast where asked) and a call that returns the
decoded predictions and, for a module, the raw head maps a loss needs (``gives_raw_maps``). A back-end
is anything shaped like ``utils.export.backends.Backend`` (``device``, ``half``, called on images); it
is not imported here, as ``utils.eval`` may not import ``utils.export``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Protocol

import torch
from torch import nn

from utils.core.log import LOGGER


class BackendLike(Protocol):
    """What the evaluator needs of ``utils.export.backends.Backend``."""

    device: torch.device
    half: bool

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        ...


@dataclass
class InferenceOutput:
    """``preds``: ``Tensor[B, 4 + nc, A]`` (cx, cy, w, h in input pixels, sigmoid scores);
    ``raw_maps``: the head's training-layout maps for a loss (a module only, else None)."""

    preds: torch.Tensor
    raw_maps: Any = None


class Inference:
    """Base: ``device`` and ``input_dtype`` say where and in which dtype images go; call it inside
    :meth:`session` and :meth:`forward_context` on ``Tensor[B, 3, H, W]`` in [0, 1]."""

    device: torch.device
    input_dtype: torch.dtype
    gives_raw_maps = False

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """Whatever the whole pass needs around it (the default: nothing)."""
        yield

    def forward_context(self) -> contextlib.AbstractContextManager:
        """Around one forward and the loss on its maps: no gradients."""
        return torch.no_grad()

    def __call__(self, images: torch.Tensor) -> InferenceOutput:
        raise NotImplementedError


class ModuleInference(Inference):
    """A ``DetectionModel`` in any mode: eval for the pass, its mode restored afterwards; with ``half`` on
    CUDA an fp32 model runs under fp16 autocast (the model itself is left unchanged)."""

    gives_raw_maps = True

    def __init__(self, model: nn.Module, half: bool = False) -> None:
        from models.heads import main_output

        first = next(model.parameters())
        self.model = model
        self.device, self.input_dtype = first.device, first.dtype
        self.autocast = half and self.device.type == "cuda" and self.input_dtype == torch.float32
        self._main_output = main_output

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        was_training = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            if was_training:
                self.model.train()

    @contextlib.contextmanager
    def forward_context(self) -> Iterator[None]:
        autocast = torch.autocast("cuda", dtype=torch.float16) if self.autocast else contextlib.nullcontext()
        with torch.no_grad(), autocast:
            yield

    def __call__(self, images: torch.Tensor) -> InferenceOutput:
        out = self.model(images)  # eval mode: (decoded, raw maps)
        return InferenceOutput(self._main_output(out), out[1])


class BackendInference(Inference):
    """An exported model (``.pt`` / ``.onnx`` / ``.engine`` back-end): fp16 inputs when it takes them."""

    def __init__(self, backend: BackendLike) -> None:
        self.backend = backend
        self.device = backend.device
        self.input_dtype = torch.float16 if backend.half else torch.float32

    def __call__(self, images: torch.Tensor) -> InferenceOutput:
        return InferenceOutput(self.backend(images))


def as_inference(model_or_backend: nn.Module | BackendLike | Inference, half: bool = False) -> Inference:
    """Wrap a module or a back-end (an :class:`Inference` is returned as it is). ``half`` applies to a
    module on CUDA; a back-end takes the precision it was loaded or exported with."""
    if isinstance(model_or_backend, Inference):
        return model_or_backend
    inference = (ModuleInference(model_or_backend, half) if isinstance(model_or_backend, nn.Module)
                 else BackendInference(model_or_backend))
    if half and inference.device.type != "cuda":
        LOGGER.debug("evaluate: half precision is used on CUDA only; running fp32")
    return inference
