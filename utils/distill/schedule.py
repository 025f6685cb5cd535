"""When distillation acts: the KD weight over training, and the two-stage backbone freeze.

The weight schedule multiplies every KD term at once and never touches the detection loss; the
temperatures are constants of the terms, so no schedule hides inside them.
"""

from __future__ import annotations

import math

from torch import nn

from utils.distill.config import NEVER, STOP_AT_CLOSE_MOSAIC


def training_progress(epoch: float, epochs: int) -> float:
    """Where ``epoch`` (0-based, may be fractional) lies in training: 0 at the first epoch, 1 at the last."""
    return min(max(epoch / max(epochs - 1, 1), 0.0), 1.0)


def resolve_stop_epoch(stop_epoch: int | str, epochs: int, close_mosaic: int = 0) -> int:
    """The first epoch without KD: ``stop_epoch`` itself, or where mosaic closes for ``'close_mosaic'``.

    Returns :data:`NEVER` (-1) when distillation runs to the end (also for ``'close_mosaic'``
    without a close-mosaic phase).
    """
    if stop_epoch == STOP_AT_CLOSE_MOSAIC:
        return epochs - close_mosaic if 0 < close_mosaic < epochs else NEVER
    return int(stop_epoch)


def distill_weight_at(epoch: float, epochs: int, schedule: str = "constant", end: float = 0.0,
                      stop_epoch: int = NEVER, warmup_steps: int = 0, step: float | None = None) -> float:
    """KD weight factor ``w(epoch, step)`` in [0, 1].

    ``constant``: 1; ``linear`` / ``cosine``: from 1 at the first epoch to ``end`` at the last.
    ``warmup_steps`` N > 0 multiplies that by a ramp from 0 to 1 over the first N nominal optimizer
    steps (``step``: images seen / nominal batch), a length that does not change with the number of
    epochs or the size of the data set; ``step`` None means "past the warm-up".
    From ``stop_epoch`` on (when it is > 0) the factor is 0: the rest is plain detection training.
    """
    if 0 < stop_epoch <= epoch:
        return 0.0
    progress = training_progress(epoch, epochs)
    if schedule == "constant":
        weight = 1.0
    elif schedule == "linear":
        weight = 1.0 + (end - 1.0) * progress
    elif schedule == "cosine":
        weight = end + (1.0 - end) * 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"unknown distillation schedule {schedule!r}")
    ramp = 1.0 if warmup_steps <= 0 or step is None else min(max(step, 0.0) / warmup_steps, 1.0)
    return ramp * weight


def backbone_end(model: nn.Module) -> int:
    """Index of the first neck layer of a DetectionModel: the number of rows under ``backbone:``."""
    return len(model.yaml.get("backbone", []))


def set_backbone_trainable(model: nn.Module, first_neck_layer: int, trainable: bool) -> int:
    """Set ``requires_grad`` of every parameter in layers ``i < first_neck_layer``; return how many.

    Two-stage training (``freeze_backbone_epochs``) freezes the student's backbone for the first
    epochs. Batch-norm statistics still update in train mode; only the weights are held. A
    DistributedDataParallel wrapper must be rebuilt after a change (the engine does it), because
    DDP fixes the set of trainable parameters when it is built.
    """
    count = 0
    for layer in model.model:
        if getattr(layer, "i", math.inf) < first_neck_layer:
            for param in layer.parameters():
                param.requires_grad_(trainable)
                count += 1
    return count


def backbone_frozen(epoch: int, freeze_backbone_epochs: int) -> bool:
    """Whether the student's backbone is frozen during ``epoch`` (0-based)."""
    return epoch < freeze_backbone_epochs
