"""Optimizer with the three YOLO parameter groups, learning-rate schedules and warm-up."""

from __future__ import annotations

import math
from typing import Callable, Iterable, Mapping

import numpy as np
import torch
from torch import nn

from utils.core.errors import UserError

NOMINAL_BATCH = 64  # gradients are accumulated to this batch size (hyp ``nbs``); weight decay is scaled to it
MIN_WARMUP_ITERS = 100
OPTIMIZERS = ("SGD", "Adam", "AdamW")

_NORM_TYPES = tuple(cls for name, cls in vars(nn).items() if "Norm" in name and isinstance(cls, type))


AUTO = "auto"  # hyp value (or an absent key) that lets the tool choose from the data set's size
MIN_STEPS_PER_EPOCH = 50  # auto nbs: a smaller set lowers the nominal batch to keep this many steps


def nominal_batch(hyp: Mapping, images: int | None = None, batch_size: int | None = None) -> int:
    """The hyp's ``nbs``: images per optimizer step that gradients are accumulated to.

    ``nbs: auto`` (or no ``nbs`` key) chooses it from the training set (:func:`auto_nominal_batch`);
    without ``images`` and ``batch_size`` it is YOLO's 64.
    """
    value = hyp.get("nbs", AUTO)
    if value == AUTO or value is None:
        if images is None or batch_size is None:
            return NOMINAL_BATCH
        return auto_nominal_batch(images, batch_size)[0]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"hyp key 'nbs' (nominal batch size) must be a positive integer or auto, got {value!r}")
    return value


def auto_nominal_batch(images: int, batch_size: int) -> tuple[int, str]:
    """``nbs`` for ``nbs: auto`` and the reason, in one line.

    YOLO's 64 images per optimizer step while that leaves at least ``MIN_STEPS_PER_EPOCH`` steps per
    epoch (3,200 training images and more: COCO, most public sets). A smaller set gets the largest
    multiple of the batch, at most 64, that keeps that many steps, and at least one batch per step:
    at 64 a 200-image set would take about 3 steps per epoch, too few for SGD to converge in a
    schedule of tens of epochs. The scale is the number of steps, so the rule has no data set in it.
    """
    if images >= NOMINAL_BATCH * MIN_STEPS_PER_EPOCH:
        return NOMINAL_BATCH, (f"{images} training images give at least {MIN_STEPS_PER_EPOCH} optimizer steps "
                               f"per epoch at YOLO's 64")
    batches_per_step = max(1, min(NOMINAL_BATCH // batch_size, images // (MIN_STEPS_PER_EPOCH * batch_size)))
    nbs = batches_per_step * batch_size
    return nbs, (f"{images} training images would give {images / NOMINAL_BATCH:.1f} optimizer steps per epoch "
                 f"at YOLO's 64; {nbs} gives {images / nbs:.0f} (a set under "
                 f"{NOMINAL_BATCH * MIN_STEPS_PER_EPOCH} images steps more often)")


def accumulate_steps(batch_size: int, nominal: int = NOMINAL_BATCH) -> int:
    """Micro-batches per optimizer step so that the effective batch is about ``nominal``."""
    return max(round(nominal / batch_size), 1)


def scaled_weight_decay(weight_decay: float, batch_size: int, nominal: int = NOMINAL_BATCH) -> float:
    """Weight decay scaled by ``batch * accumulate / nominal`` (at 64: x1.0 at batch 16, x2.0 at 128)."""
    return weight_decay * batch_size * accumulate_steps(batch_size, nominal) / nominal


def parameter_groups(modules: Iterable[nn.Module]) -> tuple[list, list, list]:
    """Split parameters into (biases, decayed weights, norm-layer weights), each listed once."""
    biases, weights, norm_weights, seen = [], [], [], set()
    for module in modules:
        for sub in module.modules():
            for name, param in sub.named_parameters(recurse=False):
                if not param.requires_grad or id(param) in seen:
                    continue
                seen.add(id(param))
                if name == "bias":
                    biases.append(param)
                elif isinstance(sub, _NORM_TYPES):
                    norm_weights.append(param)
                else:
                    weights.append(param)
    return biases, weights, norm_weights


def build_optimizer(modules: Iterable[nn.Module], name: str = "SGD", lr: float = 0.01, momentum: float = 0.937,
                    weight_decay: float = 5e-4) -> torch.optim.Optimizer:
    """Optimizer with groups [0] biases (no decay), [1] weights (decay), [2] norm weights (no decay).

    SGD uses Nesterov momentum; Adam/AdamW use ``momentum`` as beta1.
    """
    biases, weights, norm_weights = parameter_groups(modules)
    if name == "SGD":
        optimizer = torch.optim.SGD(biases, lr=lr, momentum=momentum, nesterov=True)
    elif name == "Adam":
        optimizer = torch.optim.Adam(biases, lr=lr, betas=(momentum, 0.999))
    elif name == "AdamW":
        optimizer = torch.optim.AdamW(biases, lr=lr, betas=(momentum, 0.999), weight_decay=0.0)
    else:
        raise UserError(f"--optimizer {name!r} is not supported: choose one of {', '.join(OPTIMIZERS)}")
    optimizer.add_param_group({"params": weights, "weight_decay": weight_decay})
    optimizer.add_param_group({"params": norm_weights, "weight_decay": 0.0})
    return optimizer


def lr_lambda(epochs: int, lrf: float, cosine: bool = False) -> Callable[[int], float]:
    """Learning-rate factor per epoch: linear from 1 to ``lrf``, or a cosine from 1 to ``lrf``."""
    if cosine:
        return lambda epoch: ((1 - math.cos(epoch * math.pi / epochs)) / 2) * (lrf - 1) + 1
    return lambda epoch: (1 - epoch / epochs) * (1.0 - lrf) + lrf


def warmup_iterations(hyp: dict, batches_per_epoch: int) -> int:
    """Warm-up length in iterations: ``warmup_epochs`` epochs, at least 100 iterations (0 disables)."""
    if hyp.get("warmup_epochs", 0) <= 0:
        return 0
    return max(round(hyp["warmup_epochs"] * batches_per_epoch), MIN_WARMUP_ITERS)


def apply_warmup(optimizer: torch.optim.Optimizer, iteration: int, warmup_iters: int, epoch_factor: float,
                 hyp: dict) -> None:
    """Ramp learning rates and momentum during warm-up.

    The bias group falls from ``warmup_bias_lr`` to its scheduled lr, the others rise from 0; SGD
    momentum (or Adam beta1) rises from ``warmup_momentum`` to ``momentum``.
    """
    xp = [0, warmup_iters]
    for index, group in enumerate(optimizer.param_groups):
        start = hyp.get("warmup_bias_lr", 0.1) if index == 0 else 0.0
        group["lr"] = float(np.interp(iteration, xp, [start, group["initial_lr"] * epoch_factor]))
        momentum = float(np.interp(iteration, xp, [hyp.get("warmup_momentum", 0.8), hyp["momentum"]]))
        if "momentum" in group:
            group["momentum"] = momentum
        elif "betas" in group:
            group["betas"] = (momentum, group["betas"][1])


def warmup_accumulate(iteration: int, warmup_iters: int, batch_size: int, nominal: int = NOMINAL_BATCH) -> int:
    """Accumulation steps grow from 1 to the nominal value during warm-up."""
    if warmup_iters <= 0 or iteration >= warmup_iters:
        return accumulate_steps(batch_size, nominal)
    return max(1, round(float(np.interp(iteration, [0, warmup_iters], [1, nominal / batch_size]))))
