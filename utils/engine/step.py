"""One training step, shared by the Trainer and the training-speed benchmark.

A step is: the forward pass and loss of one batch (under autocast), the backward pass (through the
gradient scaler), and, when the caller's accumulation says so, the optimizer update: unscale, clip
the optimized parameters' gradient norm, skip the update when that norm is not finite (and stop the
run after too many in a row), step, update the scaler, clear the gradients, update the weight average.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from utils.core.errors import UserError
from utils.core.log import LOGGER
from utils.engine.ema import ModelEMA

GRAD_CLIP_NORM = 10.0
MAX_NONFINITE_STEPS = 10  # consecutive skipped optimizer steps before the run is stopped


class TrainingDiverged(UserError):
    """Raised after too many consecutive non-finite losses; last.pt keeps the last good epoch."""


def autocast(device: torch.device, amp_dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """The mixed-precision context of the student's forward pass and loss (off when ``amp_dtype`` is None)."""
    return torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)


@dataclass
class Optimization:
    """What an optimizer update needs, and the count of updates skipped in a row.

    ``params`` are the optimizer's parameters listed once (clip_grad_norm_ skips those without a
    gradient, e.g. a frozen backbone); ``ema`` follows ``model`` (None: no weight average, as on the
    processes of a distributed run other than the first); ``last_good`` is named in the message
    that stops a diverged run.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    params: list[torch.Tensor]
    ema: ModelEMA | None = None
    last_good: Path | None = None
    nonfinite_steps: int = 0

    @classmethod
    def for_optimizer(cls, model: nn.Module, optimizer: torch.optim.Optimizer, amp_dtype: torch.dtype | None,
                      ema: ModelEMA | None = None, last_good: Path | None = None) -> "Optimization":
        """The parts for ``optimizer``: its parameters listed once and a gradient scaler that is on for fp16."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
        return cls(model, optimizer, scaler, params, ema, last_good)


def optimizer_step(parts: Optimization) -> bool:
    """Unscale, clip, step when the gradient norm is finite, update the scaler and the weight average.

    Returns whether the step was taken. Raises :class:`TrainingDiverged` after MAX_NONFINITE_STEPS
    skipped steps in a row.
    """
    parts.scaler.unscale_(parts.optimizer)
    norm = torch.nn.utils.clip_grad_norm_(parts.params, max_norm=GRAD_CLIP_NORM)
    # one host sync per optimizer step (as GradScaler does): a non-finite step must not be taken
    taken = bool(torch.isfinite(norm))
    if taken:
        parts.scaler.step(parts.optimizer)
        parts.nonfinite_steps = 0
    else:
        parts.nonfinite_steps += 1
        LOGGER.warning(f"non-finite loss or gradient: optimizer step skipped ({parts.nonfinite_steps} in a row)")
        if parts.nonfinite_steps >= MAX_NONFINITE_STEPS:
            kept = f"; {parts.last_good} holds the last good epoch" if parts.last_good is not None else ""
            raise TrainingDiverged(f"{MAX_NONFINITE_STEPS} non-finite steps in a row: training stopped{kept}")
    parts.scaler.update()
    parts.optimizer.zero_grad(set_to_none=True)
    if parts.ema is not None:
        parts.ema.update(parts.model)
    return taken


def train_step(parts: Optimization, forward_loss: Callable[[], tuple[torch.Tensor, Any]], update: bool,
               loss_scale: float = 1.0) -> Any:
    """One batch: ``forward_loss()`` (forward pass and loss, under the caller's autocast) gives
    ``(loss, items)``; the loss, times ``loss_scale`` (the number of processes under DDP, which averages
    gradients), is back-propagated; with ``update`` the optimizer step follows. Returns ``items``."""
    loss, items = forward_loss()
    if loss_scale != 1:
        loss = loss * loss_scale
    parts.scaler.scale(loss).backward()
    if update:
        optimizer_step(parts)
    return items


def detection_forward_loss(model: nn.Module, loss_fn: Callable, imgs: torch.Tensor, targets: torch.Tensor,
                           amp_dtype: torch.dtype | None) -> tuple[torch.Tensor, Any]:
    """The plain detector's forward pass and loss of one batch under autocast.

    Args:
        imgs: ``float Tensor[B, 3, H, W]`` in [0, 1] on the model's device.
        targets: ``Tensor[N, 6]`` (image index, class, cx, cy, w, h normalised).
    Returns ``(loss, items)`` as ``loss_fn`` gives them.
    """
    with autocast(imgs.device, amp_dtype):
        return loss_fn(model(imgs), targets)
