"""Distillation terms as pure tensor functions and small modules (no model, hyp file or assigner).

Logit terms take per-anchor tensors flattened from the head maps and return UNREDUCED losses, so
that the caller normalises them the way the detection loss normalises its own terms:
- class logits ``Tensor[B, A, C]`` (before the sigmoid),
- DFL logits ``Tensor[B, A, 4 * reg_max]`` side-major (side * reg_max + bin; sides l, t, r, b).

Feature terms compare two maps of one shape ``Tensor[B, C, H, W]`` (the student map already through
its connector, the teacher map as it is) and return a scalar. Every term is 0 when the student
equals the teacher, and detaches the teacher inside, so a caller cannot leak gradients into it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

REG_MAX = 16  # DFL bins per box side in the YOLOv9 head
NUM_SIDES = 4  # l, t, r, b
STD_EPS = 1e-6  # variance floor for per-channel standardisation (PKD)


def _kl_of_softmax(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(teacher / T) || softmax(student / T)) over the last dim, times T^2 (Hinton's scaling,
    which keeps the gradient size independent of T)."""
    log_p_student = F.log_softmax(student / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher.detach() / temperature, dim=-1)
    return (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1) * temperature**2


def binary_kd(student: torch.Tensor, teacher: torch.Tensor, beta: float = 1.0,
              temperature: float = 1.0) -> torch.Tensor:
    """Per-class binary distillation, the BCKD / CrossKD form, element-wise ``[B, A, C]``.

    ``BCE(z_s / T, sigmoid(z_t / T))`` minus the teacher's own entropy (a constant: the gradient is
    BCE's, and the value is the binary KL, 0 where the two agree), weighted by
    ``|sigmoid(z_s / T) - sigmoid(z_t / T)| ** beta`` as quality focal loss weights its targets:
    anchors where the student already agrees fade out, and a student false positive (teacher low,
    student high) weighs as much as a miss. Times T^2 (a constant: T is never scheduled).
    """
    teacher = teacher.detach() / temperature
    student = student / temperature
    target = teacher.sigmoid()
    kl = (F.binary_cross_entropy_with_logits(student, target, reduction="none")
          - F.binary_cross_entropy_with_logits(teacher, target, reduction="none"))
    weight = (student.sigmoid() - target).abs().pow(beta)
    return kl * weight * temperature**2


def softmax_kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Classic (Hinton) KD over the classes: per-anchor KL of the softmaxes at T, times T^2; ``[B, A]``."""
    return _kl_of_softmax(student, teacher, temperature)


def dfl_kd(student: torch.Tensor, teacher: torch.Tensor, reg_max: int = REG_MAX,
           temperature: float = 1.0) -> torch.Tensor:
    """Localization distillation (LD): KL between the DFL bin distributions of each box side at T
    (times T^2), averaged over the bins as in the LD paper's loss (its KL is a mean over the bins, so
    its weight is on the scale of the DFL gain), then over the 4 sides; ``[B, A]`` from
    ``[B, A, 4 * reg_max]`` logits. A sum over the bins would be ``reg_max`` times stronger: at T 10
    it outweighed the whole detection loss on BCCD (benchmarks/distill_gain.py)."""
    batch, anchors, _ = student.shape
    student = student.reshape(batch, anchors, NUM_SIDES, reg_max)
    teacher = teacher.reshape(batch, anchors, NUM_SIDES, reg_max)
    return _kl_of_softmax(student, teacher, temperature).mean(-1) / reg_max


# ------------------------------------------------------------------------------- feature terms
class MSEFeatureLoss(nn.Module):
    """FitNets hint loss: mean squared error between ``[B, C, H, W]`` maps (mean over elements).

    Always used behind a trainable 1x1 conv + BN connector (see :mod:`utils.distill.connectors`).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(student, teacher.detach())


class CWDLoss(nn.Module):
    """Channel-wise distillation (CWD).

    Each channel of ``[B, C, H, W]`` becomes a distribution over the H * W positions (softmax at
    ``tau``); the loss is KL(teacher || student) per channel, times tau^2, averaged over channels and
    images. 0 when student == teacher.
    """

    def __init__(self, channels: int, tau: float = 1.0) -> None:
        super().__init__()
        self.tau = tau

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        batch, channels = student.shape[:2]
        return _kl_of_softmax(student.reshape(batch, channels, -1), teacher.reshape(batch, channels, -1),
                              self.tau).mean()


class MGDLoss(nn.Module):
    """Masked generative distillation (MGD).

    In training mode a random fraction ``mask_ratio`` of the spatial positions of the student map
    ``[B, C, H, W]`` is zeroed; a small generator (3x3 conv, ReLU, 3x3 conv) must then reproduce the
    teacher map; the loss is ``alpha_mgd`` times the mean squared error. In eval mode nothing is
    masked. The generator is trainable (it is one of the distillation modules).
    """

    def __init__(self, channels: int, alpha_mgd: float = 1.0, mask_ratio: float = 0.65) -> None:
        super().__init__()
        self.alpha_mgd = alpha_mgd
        self.mask_ratio = mask_ratio
        self.generation = nn.Sequential(
            nn.Conv2d(channels, channels, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, kernel_size=3, padding=1),
        )

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        if self.training and self.mask_ratio > 0:
            batch, _, height, width = student.shape
            keep = torch.rand(batch, 1, height, width, device=student.device) >= self.mask_ratio
            student = student * keep.to(student.dtype)
        return self.alpha_mgd * F.mse_loss(self.generation(student), teacher.detach())


def standardise_channels(x: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit std per channel over all N * H * W values of ``[B, C, H, W]`` (PKD's form)."""
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    std = x.std(dim=(0, 2, 3), keepdim=True, unbiased=False)
    return (x - mean) / (std + STD_EPS)


class PKDLoss(nn.Module):
    """Pearson-correlation distillation (PKD, Cao et al. 2022).

    Both ``[B, C, H, W]`` maps are standardised per channel over the batch and all positions, then
    compared with half the mean squared error, which equals 1 - the mean per-channel Pearson
    correlation (0 when the maps agree up to a per-channel scale and shift, 2 at worst). Needs no
    connector when the widths agree.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(standardise_channels(student), standardise_channels(teacher.detach())) / 2


class AttentionTransferLoss(nn.Module):
    """Attention transfer on spatial and channel attention maps.

    Spatial attention: mean over channels of x^2 -> ``[B, H * W]``; channel attention: mean over
    positions of x^2 -> ``[B, C]``. Each is L2-normalised per image; the loss is the squared L2
    distance between the normalised maps, summed over the two kinds, averaged over images.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()

    @staticmethod
    def _distance(student_att: torch.Tensor, teacher_att: torch.Tensor) -> torch.Tensor:
        diff = F.normalize(student_att, dim=1) - F.normalize(teacher_att, dim=1)
        return diff.pow(2).sum(dim=1).mean()

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        student_sq, teacher_sq = student.pow(2), teacher.detach().pow(2)
        spatial = self._distance(student_sq.mean(1).flatten(1), teacher_sq.mean(1).flatten(1))
        channel = self._distance(student_sq.mean((2, 3)), teacher_sq.mean((2, 3)))
        return spatial + channel


# Every feature term is built as ``cls(teacher_channels, **options)``; only MGD has parameters.
FEATURE_LOSSES: dict[str, type[nn.Module]] = {
    "mse": MSEFeatureLoss,
    "cwd": CWDLoss,
    "mgd": MGDLoss,
    "pkd": PKDLoss,
    "at": AttentionTransferLoss,
}
# Feature terms that compare raw values and so need a trainable connector even at equal widths.
NEEDS_CONNECTOR = frozenset({"mse"})
