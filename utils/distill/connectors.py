"""Trainable connectors between student and teacher, and the student wrapped with them.

Everything trainable that distillation adds (feature connectors, MGD generators, CrossKD head
connectors) lives in one :class:`DistillModules`; :class:`DistillStudent` puts it in ONE module with
the student, so that DistributedDataParallel wraps both at once: the connectors are broadcast from
rank 0 when DDP is built (every rank starts from the same values) and their gradients are averaged
like the student's. The connectors are used inside ``DistillStudent.forward``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn


class FeatureAdapter(nn.Module):
    """1x1 conv + BN from the student's width to the teacher's; the identity when not ``needed``.

    ``forward(x [B, C_student, H, W]) -> [B, C_teacher, H, W]``. A connector is needed where the widths
    differ, and always for terms that compare raw values (FitNets MSE).
    """

    def __init__(self, student_channels: int, teacher_channels: int, needed: bool | None = None) -> None:
        super().__init__()
        self.student_channels = student_channels
        self.teacher_channels = teacher_channels
        if needed is None:
            needed = student_channels != teacher_channels
        if not needed:
            self.proj: nn.Module = nn.Identity()
        else:
            self.proj = nn.Sequential(
                nn.Conv2d(student_channels, teacher_channels, kernel_size=1, bias=False),
                nn.BatchNorm2d(teacher_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


@dataclass
class StudentOutput:
    """What the distilled student's forward gives the loss.

    Attributes:
        preds: the student head's train output (``list[Tensor[B, no, H_i, W_i]]`` or dual lists).
        feats: the distilled layers' maps through their connectors (``list[Tensor[B, C_t, H_i, W_i]]``),
            or None when feature KD is off.
        cross: CrossKD maps (the student's head features through the teacher's last convs,
            ``list[Tensor[B, no, H_i, W_i]]``), or None when CrossKD is off.
    """

    preds: object
    feats: list[torch.Tensor] | None = None
    cross: list[torch.Tensor] | None = None


class DistillModules(nn.Module):
    """The trainable parts of distillation: ``adapters`` and ``feature_losses`` (one per distilled
    level) and ``cross`` (a CrossKD head, or None)."""

    def __init__(self, adapters: nn.ModuleList, feature_losses: nn.ModuleList, cross: nn.Module | None) -> None:
        super().__init__()
        self.adapters = adapters
        self.feature_losses = feature_losses
        self.cross = cross


class DistillStudent(nn.Module):
    """The student and its :class:`DistillModules` as one module (one DDP wrap).

    ``forward(imgs) -> StudentOutput``: one student pass that also returns the ``feature_layers``'
    maps through their connectors, and the CrossKD maps when ``modules.cross`` is set.
    """

    def __init__(self, student: nn.Module, modules: DistillModules, feature_layers: list[int] | None) -> None:
        super().__init__()
        self.student = student
        self.modules_ = modules
        self.feature_layers = list(feature_layers) if feature_layers else None

    def forward(self, imgs: torch.Tensor) -> StudentOutput:
        cross = self.modules_.cross
        with cross.capture(self.student) if cross is not None else contextlib.nullcontext() as hidden:
            if self.feature_layers:
                preds, feats = self.student(imgs, feature_layers=self.feature_layers)
                feats = [adapter(f) for adapter, f in zip(self.modules_.adapters, feats)]
            else:
                preds, feats = self.student(imgs), None
        cross_maps = cross(hidden) if cross is not None else None
        return StudentOutput(preds, feats, cross_maps)

