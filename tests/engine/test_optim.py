"""utils/engine/optim.py: the learning-rate schedules and the warm-up ramp, on hand-computed values."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from utils.engine.optim import apply_warmup, build_optimizer, lr_lambda, warmup_iterations

HYP = {"warmup_epochs": 3.0, "warmup_bias_lr": 0.1, "warmup_momentum": 0.8, "momentum": 0.937}


@pytest.mark.parametrize("cosine", [False, True])
def test_lr_lambda_runs_from_one_to_lrf(cosine):
    factor = lr_lambda(10, 0.01, cosine)
    assert factor(0) == pytest.approx(1.0) and factor(10) == pytest.approx(0.01)
    assert factor(5) == pytest.approx((1.0 + 0.01) / 2)  # both pass the midpoint halfway
    linear, curved = lr_lambda(10, 0.01, False), lr_lambda(10, 0.01, True)
    assert linear(2) == pytest.approx(1 - 0.2 * 0.99)
    assert curved(2) > linear(2)  # the cosine stays high longer at the start ...
    assert curved(8) < linear(8)  # ... and lower at the end


def test_warmup_iterations_are_epochs_with_a_floor():
    assert warmup_iterations(HYP, 1000) == 3000
    assert warmup_iterations(HYP, 13) == 100  # BCCD: 39 iterations would be too short a ramp
    assert warmup_iterations({"warmup_epochs": 0}, 1000) == 0


@pytest.mark.parametrize("name, momentum_key", [("SGD", "momentum"), ("AdamW", "betas")])
def test_apply_warmup_ramps_learning_rates_and_momentum(name, momentum_key):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    optimizer = build_optimizer([model], name, lr=0.01, momentum=0.937, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(10, 0.01))  # sets initial_lr
    assert scheduler.last_epoch == 0

    def momentum(group):
        return group[momentum_key] if momentum_key == "momentum" else group["betas"][0]

    apply_warmup(optimizer, 0, 100, 1.0, HYP)
    bias, weights, norms = optimizer.param_groups
    assert bias["lr"] == pytest.approx(0.1) and weights["lr"] == 0 and norms["lr"] == 0
    assert all(momentum(g) == pytest.approx(0.8) for g in optimizer.param_groups)
    apply_warmup(optimizer, 50, 100, 1.0, HYP)
    assert bias["lr"] == pytest.approx(0.055) and weights["lr"] == pytest.approx(0.005)
    assert momentum(weights) == pytest.approx(0.8685)
    apply_warmup(optimizer, 100, 100, 0.5, HYP)  # the end of the ramp: the epoch's scheduled lr
    assert all(g["lr"] == pytest.approx(0.005) for g in optimizer.param_groups)
    assert all(momentum(g) == pytest.approx(0.937) for g in optimizer.param_groups)
