"""Distillation terms as small, pure tensor modules (no model, no hyp file, no assigner).

Logit terms work on per-anchor tensors flattened from the head maps:
- class logits ``Tensor[B, A, C]`` (before the sigmoid),
- DFL logits ``Tensor[B, A, 4 * reg_max]`` side-major (side * reg_max + bin; sides l, t, r, b).

Feature terms work on a pair of maps of the same shape ``Tensor[B, C, H, W]``: the student map
already passed through its :class:`FeatureAdapter` and the teacher map already resized to the
student's grid. Every term returns a scalar float32 tensor and is 0 (or its minimum) when the
student equals the teacher. The teacher tensors are detached inside each term, so a caller
cannot leak gradients into the teacher by mistake.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

REG_MAX = 16  # DFL bins per box side in the YOLOv9 head
NUM_SIDES = 4  # l, t, r, b
EPS = 1e-12  # keeps logs and divisions finite; far below any meaningful probability
STD_EPS = 1e-6  # variance floor for per-channel standardisation (PKD)


def _safe_weighted_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean of ``values`` over all elements; 0 (not NaN, still in the graph) when all weights are 0.

    No Python branch on the weight sum, so there is no device synchronisation.
    """
    return (values * weights).sum() / weights.sum().clamp(min=EPS)


def _binary_kl_with_logits(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Element-wise KL(Bernoulli(sigmoid(teacher)) || Bernoulli(sigmoid(student))).

    This is BCE(student, sigmoid(teacher)) minus the teacher's own entropy: the gradient is the
    plain BCE gradient, but the value is 0 when the two agree, which makes the logged number
    readable.
    """
    target = teacher.sigmoid()
    bce = F.binary_cross_entropy_with_logits(student, target, reduction="none")
    entropy = F.binary_cross_entropy_with_logits(teacher, target, reduction="none")
    return bce - entropy


def anchor_confidence_weights(
    teacher_logits: torch.Tensor, weighting: str = "none", gamma: float = 1.0, threshold: float = 0.5
) -> torch.Tensor:
    """Per-anchor weights ``Tensor[B, A]`` from the teacher's class logits ``Tensor[B, A, C]``.

    ``none``: all ones; ``confidence``: (teacher max sigmoid score) ** gamma; ``threshold``:
    1 where the teacher max sigmoid score exceeds ``threshold``, else 0. The scores use T = 1
    (the teacher's real confidence), whatever the distillation temperature.
    """
    if weighting == "none":
        return teacher_logits.new_ones(teacher_logits.shape[:-1])
    score = teacher_logits.detach().sigmoid().amax(dim=-1)
    if weighting == "confidence":
        return score.pow(gamma)
    if weighting == "threshold":
        return (score > threshold).to(teacher_logits.dtype)
    raise ValueError(f"unknown anchor weighting {weighting!r}")


class SigmoidKD(nn.Module):
    """Binary (per-class sigmoid) logit distillation.

    ``forward(student [B, A, C], teacher [B, A, C], temperature, weights [B, A] | None)``: the
    binary KL between sigmoid(teacher / T) and sigmoid(student / T) summed over classes, times
    T^2 (so that the gradient size does not shrink with T), then averaged over anchors with
    ``weights`` (uniform when None). Returns a scalar; 0 when student == teacher.
    """

    def forward(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        temperature: float = 1.0,
        weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        teacher = teacher.detach()
        per_anchor = _binary_kl_with_logits(student / temperature, teacher / temperature).sum(-1)
        if weights is None:
            weights = torch.ones_like(per_anchor)
        return _safe_weighted_mean(per_anchor, weights.detach()) * temperature**2


class SoftmaxKD(nn.Module):
    """Classic (Hinton) logit distillation with a softmax over the classes.

    ``forward(student [B, A, C], teacher [B, A, C], temperature, weights [B, A] | None)``:
    KL(softmax(teacher / T) || softmax(student / T)) per anchor, times T^2, averaged over anchors
    with ``weights``. Returns a scalar; 0 when student == teacher.
    """

    def forward(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        temperature: float = 1.0,
        weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        teacher = teacher.detach()
        log_p_student = F.log_softmax(student / temperature, dim=-1)
        log_p_teacher = F.log_softmax(teacher / temperature, dim=-1)
        per_anchor = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)
        if weights is None:
            weights = torch.ones_like(per_anchor)
        return _safe_weighted_mean(per_anchor, weights.detach()) * temperature**2


class LocalizationDistillation(nn.Module):
    """Localization distillation (LD) on the DFL bin distributions.

    ``forward(student [B, A, 4 * reg_max], teacher [B, A, 4 * reg_max], mask [B, A] bool,
    temperature)``: for each side the KL(softmax(teacher / T) || softmax(student / T)) over the
    ``reg_max`` bins, times T^2, averaged over the 4 sides and over the anchors where ``mask`` is
    True. Returns a scalar: 0 (not NaN) when ``mask`` has no True entry.
    """

    def __init__(self, reg_max: int = REG_MAX) -> None:
        super().__init__()
        self.reg_max = reg_max

    def forward(
        self, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0
    ) -> torch.Tensor:
        batch, anchors, _ = student.shape
        student = student.reshape(batch, anchors, NUM_SIDES, self.reg_max)
        teacher = teacher.detach().reshape(batch, anchors, NUM_SIDES, self.reg_max)
        log_p_student = F.log_softmax(student / temperature, dim=-1)
        log_p_teacher = F.log_softmax(teacher / temperature, dim=-1)
        per_anchor = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1).mean(-1)
        return _safe_weighted_mean(per_anchor, mask.to(per_anchor.dtype)) * temperature**2


class FeatureAdapter(nn.Module):
    """Map student features to the teacher's channel count: 1x1 conv + BN, identity if equal.

    ``forward(x [B, C_student, H, W]) -> [B, C_teacher, H, W]``.
    """

    def __init__(self, student_channels: int, teacher_channels: int) -> None:
        super().__init__()
        self.student_channels = student_channels
        self.teacher_channels = teacher_channels
        if student_channels == teacher_channels:
            self.proj = nn.Identity()
        else:
            self.proj = nn.Sequential(
                nn.Conv2d(student_channels, teacher_channels, kernel_size=1, bias=False),
                nn.BatchNorm2d(teacher_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class MSEFeatureLoss(nn.Module):
    """FitNets hint loss: mean squared error between ``[B, C, H, W]`` maps (mean over elements)."""

    def __init__(self, channels: int) -> None:
        super().__init__()

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(student, teacher.detach())


class CWDLoss(nn.Module):
    """Channel-wise distillation (CWD).

    Each channel of ``[B, C, H, W]`` becomes a distribution over the H * W positions
    (softmax at temperature ``tau``); the loss is KL(teacher || student) per channel, times
    tau^2, averaged over channels and images. 0 when student == teacher.
    """

    def __init__(self, channels: int, tau: float = 1.0) -> None:
        super().__init__()
        self.tau = tau

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        batch, channels = student.shape[:2]
        log_p_student = F.log_softmax(student.reshape(batch, channels, -1) / self.tau, dim=-1)
        log_p_teacher = F.log_softmax(teacher.detach().reshape(batch, channels, -1) / self.tau, dim=-1)
        per_channel = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)
        return per_channel.mean() * self.tau**2


class MGDLoss(nn.Module):
    """Masked generative distillation (MGD).

    In training mode a random fraction ``mask_ratio`` (lambda_mgd) of the spatial positions of the
    adapted student map ``[B, C, H, W]`` is zeroed; a small generator (3x3 conv, ReLU, 3x3 conv)
    must then reproduce the teacher map; the loss is ``alpha_mgd`` times the mean squared error.
    In eval mode nothing is masked, so the value is deterministic. The generator is trainable and
    belongs in the optimiser (it is part of ``DistillationLoss.trainable_modules()``).
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


def _standardise(x: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit std per image and channel over the H * W positions of ``[B, C, H, W]``."""
    mean = x.mean(dim=(2, 3), keepdim=True)
    std = x.std(dim=(2, 3), keepdim=True, unbiased=False)
    return (x - mean) / (std + STD_EPS)


class PKDLoss(nn.Module):
    """Pearson-correlation distillation (PKD).

    Both ``[B, C, H, W]`` maps are standardised per image and channel over space, then compared
    with half the mean squared error, which equals 1 - the mean Pearson correlation (0 when the
    maps agree up to a per-channel scale and shift, 2 at worst).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(_standardise(student), _standardise(teacher.detach())) / 2


class AttentionTransferLoss(nn.Module):
    """Attention transfer on spatial and channel attention maps.

    Spatial attention: mean over channels of x^2 -> ``[B, H * W]``; channel attention: mean over
    positions of x^2 -> ``[B, C]``. Each is L2-normalised per image; the loss is the squared L2
    distance between the student's and the teacher's normalised maps, summed over the two
    kinds and averaged over images. 0 when student == teacher.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()

    @staticmethod
    def _distance(student_att: torch.Tensor, teacher_att: torch.Tensor) -> torch.Tensor:
        diff = F.normalize(student_att, dim=1) - F.normalize(teacher_att, dim=1)
        return diff.pow(2).sum(dim=1).mean()

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        teacher = teacher.detach()
        student_sq, teacher_sq = student.pow(2), teacher.pow(2)
        spatial = self._distance(student_sq.mean(1).flatten(1), teacher_sq.mean(1).flatten(1))
        channel = self._distance(student_sq.mean((2, 3)), teacher_sq.mean((2, 3)))
        return spatial + channel


# Every feature term is built as ``cls(teacher_channels, **options)`` so that the terms with
# parameters (MGD's generator) and those without share one constructor signature.
FEATURE_LOSSES: dict[str, type[nn.Module]] = {
    "mse": MSEFeatureLoss,
    "cwd": CWDLoss,
    "mgd": MGDLoss,
    "pkd": PKDLoss,
    "at": AttentionTransferLoss,
}
LOGIT_LOSSES: dict[str, type[nn.Module]] = {"sigmoid": SigmoidKD, "softmax": SoftmaxKD}
