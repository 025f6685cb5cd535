"""The model as every export takes it: loaded, dual heads reparameterized, fused, head in export mode."""

from __future__ import annotations

from pathlib import Path

import torch

from models.yolo import DetectionModel, reparameterize
from utils.checkpoint.ours import load_model


def prepare_model(weights: str | Path, device: torch.device, half: bool = False) -> DetectionModel:
    """Load for export: dual heads reparameterized to the gelan layout, RepConvN and Conv+BN fused,
    eval, no gradients, head in export mode (one output: the main branch's decode ``Tensor[B, 4 + nc, A]``);
    FP32 unless ``half`` (``export_onnx`` traces FP32 and converts the graph itself: export.py never
    passes it)."""
    model = reparameterize(load_model(weights, device=device))
    model.fuse().eval()
    for param in model.parameters():
        param.requires_grad_(False)
    model.head.export = True
    return model.half() if half else model
