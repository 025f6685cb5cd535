"""Model size and cost: parameter counts, GFLOPs and the per-layer summary table.

What ``gflops`` counts (chosen to reproduce the GFLOPs of the official YOLOv9 summary, which
uses the thop counter, to within rounding):
- convolutions, linear layers and matrix products: 2 FLOPs per multiply-accumulate, bias adds
  not counted (``torch.utils.flop_counter.FlopCounterMode``);
- BatchNorm2d: 8 FLOPs per output element (thop counts 2 operations for the normalisation, 2
  more for the affine scale/shift, and the result is doubled like MACs), so a fused model (no
  BN) reports fewer GFLOPs than the same model unfused;
- nn.Upsample: 2 FLOPs per output element (thop counts one operation for nearest);
- activations, pooling, concatenation, additions, functional resizes and the box decoding:
  nothing.
The model runs once in eval mode on a square zero image of the largest stride and the count is
scaled by ``(img_size / stride)^2``; every counted op scales exactly with the pixel count.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from utils.core.log import LOGGER

DEFAULT_PROBE_SIZE = 32  # used when the model has no stride attribute
# FLOPs per output element of modules the FlopCounterMode does not see (see above)
ELEMENTWISE_FLOPS: dict[type[nn.Module], int] = {nn.BatchNorm2d: 8, nn.Upsample: 2}
GIGA = 1e9


def count_params(model: nn.Module) -> int:
    """Number of parameter elements, frozen ones included (e.g. the fixed DFL weights)."""
    return sum(p.numel() for p in model.parameters())


def count_trainable(model: nn.Module) -> int:
    """Number of parameter elements with ``requires_grad``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _probe_size(model: nn.Module) -> int:
    stride = getattr(model, "stride", None)
    if isinstance(stride, torch.Tensor) and stride.numel():
        return max(int(stride.max().item()), 1)
    return DEFAULT_PROBE_SIZE


def gflops(model: nn.Module, img_size: int | Sequence[int] = 640) -> float:
    """Forward cost in GFLOPs for one ``img_size`` image (int or (h, w)); see the module docstring.

    The model's train/eval flags and BN statistics are left as they were.
    """
    height, width = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    size = _probe_size(model)
    reference = next(model.parameters())
    channels = int(getattr(model, "yaml", {}).get("ch", 3)) if hasattr(model, "yaml") else 3
    probe = torch.zeros(1, channels, size, size, device=reference.device, dtype=reference.dtype)

    elementwise = [0]

    def count_elementwise(module: nn.Module, _inputs, output: torch.Tensor) -> None:
        elementwise[0] += ELEMENTWISE_FLOPS[type(module)] * output.numel()

    modes = {m: m.training for m in model.modules()}
    hooks = [m.register_forward_hook(count_elementwise) for m in model.modules()
             if type(m) in ELEMENTWISE_FLOPS]
    try:
        model.eval()
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(probe)
    finally:
        for hook in hooks:
            hook.remove()
        for m, training in modes.items():
            m.training = training
    flops = counter.get_total_flops() + elementwise[0]
    return flops * (height / size) * (width / size) / GIGA


def log_model_info(model: nn.Module, verbose: bool = False, img_size: int = 640) -> None:
    """Log the per-layer table (index, from, n, params, module, args) when ``verbose``, then
    ``<name> summary: L layers, P parameters, G gradients, F GFLOPs`` (F at ``img_size``)."""
    layers = getattr(model, "model", [])
    if verbose:
        LOGGER.info(f"{'':>3}{'from':>26}{'n':>4}{'params':>12}  {'module':<42}{'arguments'}")
        for m in layers:
            LOGGER.info(f"{m.i:>3}{str(m.f):>26}{getattr(m, 'layer_n', 1):>4}{m.np:>12,}  "
                        f"{m.type:<42}{getattr(m, 'layer_args', '')}")
    name = str(getattr(model, "yaml_file", "") or type(model).__name__)
    name = name.rsplit(".", 1)[0] if name.endswith((".yaml", ".yml")) else name
    try:
        cost = f", {gflops(model, img_size):.1f} GFLOPs"
    except (RuntimeError, ValueError) as exc:  # an exotic block the counter cannot run
        LOGGER.debug(f"GFLOPs not available: {exc}")
        cost = ""
    LOGGER.info(f"{name} summary: {len(list(model.modules()))} layers, {count_params(model):,} parameters, "
                f"{count_trainable(model):,} gradients{cost}")
