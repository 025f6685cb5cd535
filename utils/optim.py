"""Optimizer with the three YOLO parameter groups, learning-rate schedules and warm-up."""

from __future__ import annotations

import math
from typing import Callable, Iterable, Mapping

import numpy as np
import torch
from torch import nn

from utils.errors import UserError

NOMINAL_BATCH = 64  # gradients are accumulated to this batch size (hyp ``nbs``); weight decay is scaled to it
MIN_WARMUP_ITERS = 100
OPTIMIZERS = ("SGD", "Adam", "AdamW")

_NORM_TYPES = tuple(cls for name, cls in vars(nn).items() if "Norm" in name and isinstance(cls, type))


def nominal_batch(hyp: Mapping) -> int:
    """The hyp's ``nbs``: images per optimizer step that gradients are accumulated to (64 when absent).

    At 64 a 200-image set at batch 16 gets about 3 optimizer steps per epoch; ``nbs: 16`` makes every
    batch of 16 a step (4x the steps for the same images), with weight decay scaled to match.
    """
    value = hyp.get("nbs", NOMINAL_BATCH)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"hyp key 'nbs' (nominal batch size) must be a positive integer, got {value!r}")
    return value


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
