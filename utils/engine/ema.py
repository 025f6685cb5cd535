"""Exponential moving average of model weights, with the YOLO warm-up ramp."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from utils.core.device import unwrap
from utils.core.errors import UserError
from utils.engine.optim import AUTO

DEFAULT_DECAY = 0.9999
DEFAULT_TAU = 2000


AUTO_SMALL_EPOCHS = 3  # ema auto on a small set: average about the last 3 epochs
AUTO_MAX_EPOCHS = 10  # ema auto keeps YOLO's EMA while its horizon (1 / (1 - decay) updates) spans at most this


def ema_choice(hyp: dict, updates_per_epoch: float) -> tuple[float, float, str]:
    """``(decay, tau, reason)`` of the weight average.

    - ``ema_epochs: N`` averages over about the last N epochs whatever the data set size:
      ``decay = 1 - 1 / (N * updates_per_epoch)`` and the ramp ``tau`` = one epoch of updates.
    - ``ema_decay`` / ``ema_tau`` set YOLO's two numbers directly.
    - Neither (or ``ema_epochs: auto``): YOLO's 0.9999 / 2000 while their horizon of 10,000 updates
      spans at most ``AUTO_MAX_EPOCHS`` epochs (1,000 updates per epoch: 64,000 images at nbs 64;
      COCO has 1,850); on a smaller set it would average over hundreds of epochs and its ramp of 2,000
      updates would outlast a short run, so the average spans the last ``AUTO_SMALL_EPOCHS`` epochs.
    """
    epochs = hyp.get("ema_epochs", AUTO)
    explicit = "ema_decay" in hyp or "ema_tau" in hyp
    updates = max(float(updates_per_epoch), 1.0)
    if epochs in (AUTO, None) and explicit:
        decay, tau = hyp.get("ema_decay", DEFAULT_DECAY), hyp.get("ema_tau", DEFAULT_TAU)
        for key, value, low, high in (("ema_decay", decay, 0.0, 1.0), ("ema_tau", tau, 1e-9, math.inf)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise UserError(f"hyp key '{key}' must be a number in [{low}, {high}], got {value!r}")
        return float(decay), float(tau), "ema_decay / ema_tau from the hyp file"
    if epochs in (AUTO, None):
        yolo_epochs = 1.0 / (1.0 - DEFAULT_DECAY) / updates
        if yolo_epochs <= AUTO_MAX_EPOCHS:
            return DEFAULT_DECAY, float(DEFAULT_TAU), (f"YOLO's decay {DEFAULT_DECAY} and ramp {DEFAULT_TAU} "
                                                       f"span {yolo_epochs:.1f} epochs of {updates:.0f} updates")
        epochs = AUTO_SMALL_EPOCHS
        reason = (f"YOLO's decay {DEFAULT_DECAY} would span {yolo_epochs:.0f} epochs of {updates:.0f} updates; "
                  f"averaging the last {epochs} epochs instead")
    else:
        reason = f"ema_epochs {epochs} from the hyp file"
    if isinstance(epochs, bool) or not isinstance(epochs, (int, float)) or epochs <= 0:
        raise UserError(f"hyp key 'ema_epochs' must be a positive number of epochs or auto, got {epochs!r}")
    return 1.0 - 1.0 / max(epochs * updates, 1.0 + 1e-9), updates, reason


class ModelEMA:
    """Keeps ``ema = d * ema + (1 - d) * model`` with ``d = decay * (1 - exp(-updates / tau))``.

    The ramp lets the average follow the model closely early in training. Only floating-point
    entries are averaged; integer buffers (``num_batches_tracked``) are copied.
    """

    def __init__(self, model: nn.Module, decay: float = DEFAULT_DECAY, tau: float = DEFAULT_TAU,
                 updates: int = 0) -> None:
        self.ema = copy.deepcopy(unwrap(model)).eval()
        self.decay, self.tau, self.updates = decay, tau, updates
        for p in self.ema.parameters():
            p.requires_grad_(False)

    def current_decay(self) -> float:
        return self.decay * (1 - math.exp(-self.updates / self.tau))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Blend the current weights of ``model`` into the average (call after each optimizer step)."""
        self.updates += 1
        d = self.current_decay()
        model_state = unwrap(model).state_dict()
        ema_float, model_float = [], []
        for key, value in self.ema.state_dict().items():
            if value.dtype.is_floating_point:
                ema_float.append(value)
                model_float.append(model_state[key].detach())
            else:
                value.copy_(model_state[key])
        torch._foreach_lerp_(ema_float, model_float, 1.0 - d)

    def update_attr(self, model: nn.Module, names: tuple[str, ...] = ("names", "nc", "stride", "yaml")) -> None:
        """Copy plain attributes (class names, strides, ...) from the model."""
        source = unwrap(model)
        for name in names:
            if hasattr(source, name):
                setattr(self.ema, name, getattr(source, name))
