"""Knowledge distillation for detection: settings, schedules, backbone freezing and DistillationLoss.

The loss of one batch is::

    share = (1 - distill_alpha) * schedule(epoch)          # schedule in [0, 1], 0 after the stop epoch
    total = (1 - share) * detection + share * (distill_cls * cls_KD + distill_box * box_KD
                                              + distill_feat * feat_KD) * batch_size

so at full schedule weight it is ``alpha * detection + (1 - alpha) * KD`` and, once the schedule
reaches 0, plain detection training. The terms themselves live in :mod:`utils.distill_terms`.
``utils.loss`` re-exports :class:`DistillationLoss`; this module must therefore not import it: the
detection loss comes in as an object (``DetectionLoss`` or anything with the same methods).
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, fields
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.heads import branch_maps
from utils.distill_terms import (
    FEATURE_LOSSES,
    LOGIT_LOSSES,
    REG_MAX,
    FeatureAdapter,
    LocalizationDistillation,
    anchor_confidence_weights,
)
from utils.errors import UserError
from utils.log import LOGGER

SCHEDULES = ("constant", "linear", "cosine")
BOX_MASKS = ("assigner", "teacher")
CLS_WEIGHTINGS = ("none", "confidence", "threshold")
NEVER = -1  # distill_stop_epoch value that keeps distilling to the end
PROBE_STRIDES = 2  # the channel probe runs on an image of 2 x the largest stride (small, valid)
ITEM_KEYS = ("box", "cls", "dfl", "distill/cls", "distill/box", "distill/feat", "distill/total")


def hyp_key(field_name: str) -> str:
    """The hyp file key of a :class:`DistillConfig` field (``distill_`` prefix, except the freeze key)."""
    return field_name if field_name == "freeze_backbone_epochs" else f"distill_{field_name}"


@dataclass
class DistillConfig:
    """The ``distill_*`` hyper-parameters (see hyp/hyp.distill.yaml for what each one does).

    Keys without a default must be in the hyp file; the defaults are neutral choices, not a recipe.
    """

    alpha: float
    cls: float
    cls_type: str
    temperature: float
    box: float
    box_mask: str
    feat: float
    feat_type: str
    schedule: str
    temperature_end: float | None = None
    cls_weighting: str = "none"
    cls_gamma: float = 1.0
    score_threshold: float = 0.5
    cwd_tau: float = 1.0
    mgd_alpha: float = 1.0
    mgd_ratio: float = 0.65
    weight_end: float = 0.0
    stop_epoch: int = NEVER
    student_layers: tuple[int, ...] | None = None
    teacher_layers: tuple[int, ...] | None = None
    freeze_backbone_epochs: int = 0

    @classmethod
    def from_hyp(cls, hyp: dict) -> "DistillConfig":
        """Read and check the settings; a missing or bad value raises UserError naming the hyp key."""
        values: dict[str, Any] = {}
        for field in fields(cls):
            key = hyp_key(field.name)
            if key in hyp and hyp[key] is not None:
                values[field.name] = hyp[key]
            elif field.default is MISSING:
                raise UserError(f"hyp key '{key}' is missing (see hyp/hyp.distill.yaml)")
        config = cls(**values)
        config._check()
        if config.temperature_end is None:
            config.temperature_end = config.temperature
        return config

    def _check(self) -> None:
        def number(name: str, low: float, high: float = math.inf) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise UserError(f"hyp key '{hyp_key(name)}' must be a number in [{low}, {high}], got {value!r}")

        def choice(name: str, options: Sequence[str]) -> None:
            if getattr(self, name) not in options:
                raise UserError(f"hyp key '{hyp_key(name)}' must be one of {', '.join(options)}, "
                                f"got {getattr(self, name)!r}")

        for name in ("alpha", "score_threshold", "mgd_ratio", "weight_end"):
            number(name, 0.0, 1.0)
        for name in ("cls", "box", "feat", "cls_gamma", "mgd_alpha"):
            number(name, 0.0)
        for name in ("temperature", "cwd_tau"):
            number(name, 1e-3)
        if self.temperature_end is not None:
            number("temperature_end", 1e-3)
        choice("cls_type", tuple(LOGIT_LOSSES))
        choice("feat_type", tuple(FEATURE_LOSSES))
        choice("box_mask", BOX_MASKS)
        choice("schedule", SCHEDULES)
        choice("cls_weighting", CLS_WEIGHTINGS)
        for name in ("stop_epoch", "freeze_backbone_epochs"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int):
                raise UserError(f"hyp key '{hyp_key(name)}' must be an integer, got {getattr(self, name)!r}")
        for name in ("student_layers", "teacher_layers"):
            layers = getattr(self, name)
            if layers is not None:
                if not isinstance(layers, (list, tuple)) or not all(isinstance(i, int) for i in layers):
                    raise UserError(f"hyp key '{hyp_key(name)}' must be a list of layer indices or null")
                setattr(self, name, tuple(layers))


# ----------------------------------------------------------------------------------- schedules


def training_progress(epoch: float, epochs: int) -> float:
    """Where ``epoch`` (0-based, may be fractional) lies in training: 0 at the first epoch, 1 at the last."""
    return min(max(epoch / max(epochs - 1, 1), 0.0), 1.0)


def temperature_at(epoch: float, epochs: int, start: float, end: float) -> float:
    """Distillation temperature, linear from ``start`` (first epoch) to ``end`` (last epoch)."""
    return start + (end - start) * training_progress(epoch, epochs)


def distill_weight_at(epoch: float, epochs: int, schedule: str = "constant", end: float = 0.0,
                      stop_epoch: int = NEVER) -> float:
    """Schedule factor in [0, 1] that multiplies the distillation share.

    ``constant``: 1; ``linear`` / ``cosine``: from 1 at the first epoch to ``end`` at the last.
    From ``stop_epoch`` on (when it is > 0) the factor is 0: the rest is plain detection training.
    """
    if 0 < stop_epoch <= epoch:
        return 0.0
    progress = training_progress(epoch, epochs)
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return 1.0 + (end - 1.0) * progress
    if schedule == "cosine":
        return end + (1.0 - end) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown distillation schedule {schedule!r}")


# ----------------------------------------------------------------------------- backbone freezing


def backbone_end(model: nn.Module) -> int:
    """Index of the first neck layer of a DetectionModel: the number of rows under ``backbone:``."""
    return len(model.yaml.get("backbone", []))


def set_backbone_trainable(model: nn.Module, first_neck_layer: int, trainable: bool) -> int:
    """Set ``requires_grad`` of every parameter in layers ``i < first_neck_layer``; return how many.

    Used for two-stage training (``freeze_backbone_epochs``): the engine freezes the student's
    backbone for the first epochs and unfreezes it afterwards. Batch-norm statistics still update
    in train mode; only the weights are held. Unfreezing sets every backbone parameter trainable
    (backbones hold no fixed weights; the fixed DFL weights are in the head).
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


# ------------------------------------------------------------------------------- tensor helpers


def flatten_maps(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Head maps ``list[Tensor[B, no, H_i, W_i]]`` -> ``Tensor[B, A, no]`` (P3 first, row-major)."""
    batch = maps[0].shape[0]
    return torch.cat([m.reshape(batch, m.shape[1], -1) for m in maps], 2).transpose(1, 2)


def resize_to(maps: Sequence[torch.Tensor], like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Bilinearly resize each ``maps[i]`` ``[B, C, h, w]`` to the grid of ``like[i]`` where they differ.

    Used for a teacher that saw a different input size than the student (logits and features).
    """
    if len(maps) != len(like):
        raise ValueError(f"the teacher gives {len(maps)} maps but the student {len(like)}")
    return [m if m.shape[-2:] == ref.shape[-2:] else
            F.interpolate(m, size=ref.shape[-2:], mode="bilinear", align_corners=False)
            for m, ref in zip(maps, like)]


def feature_channels(model: nn.Module, layers: Sequence[int]) -> list[int]:
    """Channel counts of the outputs of ``layers``, from one small eval-mode forward without grad."""
    param = next(model.parameters())
    size = PROBE_STRIDES * int(torch.as_tensor(model.stride).max())
    image = torch.zeros(1, int(model.yaml.get("ch", 3)), size, size, device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()  # no batch-norm statistics are touched by the probe
    try:
        with torch.no_grad():
            _, feats = model(image, feature_layers=list(layers))
    finally:
        model.train(was_training)
    return [int(f.shape[1]) for f in feats]


def _number_of_levels(model: nn.Module) -> int:
    return int(model.head.nl)


# ------------------------------------------------------------------------------ the loss


class DistillationLoss(nn.Module):
    """Detection loss plus logit (cls), localization (box, LD) and feature distillation.

    Args:
        detection_loss: the student's ``DetectionLoss`` (called as ``detection_loss(preds, targets)``;
            ``branch_loss`` and ``aux_weight`` are used when ``distill_box_mask`` is ``assigner``).
        student_model, teacher_model: ``DetectionModel`` s with the same ``nc`` and number of head
            levels. Both run one tiny forward here to read the channels of the distilled layers.
        hyp: hyper-parameters with the ``distill_*`` keys (:class:`DistillConfig`).

    Attributes:
        student_layers, teacher_layers: the layers whose outputs ``forward`` expects in
            ``student_feats`` / ``teacher_feats`` (pass them as ``feature_layers``).
        adapters: ``nn.ModuleList`` of :class:`FeatureAdapter`, one per level.
        feature_losses: ``nn.ModuleList`` of the feature terms (MGD has a trainable generator).
    """

    def __init__(self, detection_loss: Any, student_model: nn.Module, teacher_model: nn.Module,
                 hyp: dict) -> None:
        super().__init__()
        self.config = DistillConfig.from_hyp(hyp)
        self.detection_loss = detection_loss
        if int(student_model.nc) != int(teacher_model.nc):
            raise UserError(f"the teacher predicts {teacher_model.nc} classes but the student "
                            f"{student_model.nc}: train the teacher on the same data set (--data)")
        if _number_of_levels(student_model) != _number_of_levels(teacher_model):
            raise UserError(f"the teacher's head has {_number_of_levels(teacher_model)} levels but the "
                            f"student's {_number_of_levels(student_model)}: distillation needs the same levels")
        self.num_classes = int(student_model.nc)
        self.reg_max = int(getattr(student_model.head, "reg_max", REG_MAX))
        config = self.config
        self.student_layers = list(config.student_layers or student_model.distill_layers)
        self.teacher_layers = list(config.teacher_layers or teacher_model.distill_layers)
        if len(self.student_layers) != len(self.teacher_layers):
            raise UserError(f"hyp keys 'distill_student_layers' {self.student_layers} and "
                            f"'distill_teacher_layers' {self.teacher_layers} must name as many layers")

        self.cls_loss = LOGIT_LOSSES[config.cls_type]()
        self.box_loss = LocalizationDistillation(self.reg_max)
        self.adapters = nn.ModuleList()
        self.feature_losses = nn.ModuleList()
        if config.feat > 0:
            student_channels = feature_channels(student_model, self.student_layers)
            teacher_channels = feature_channels(teacher_model, self.teacher_layers)
            options = {"cwd": {"tau": config.cwd_tau},
                       "mgd": {"alpha_mgd": config.mgd_alpha, "mask_ratio": config.mgd_ratio}}
            for c_student, c_teacher in zip(student_channels, teacher_channels):
                self.adapters.append(FeatureAdapter(c_student, c_teacher))
                self.feature_losses.append(
                    FEATURE_LOSSES[config.feat_type](c_teacher, **options.get(config.feat_type, {})))
        self._backbone_frozen = False
        self.to(next(student_model.parameters()).device)

    @property
    def uses_features(self) -> bool:
        """Whether ``forward`` needs ``student_feats`` and ``teacher_feats``."""
        return self.config.feat > 0

    def trainable_modules(self) -> nn.ModuleList:
        """The modules whose parameters the optimiser must train next to the student (adapters, MGD)."""
        return nn.ModuleList([self.adapters, self.feature_losses])

    def on_epoch_start(self, student_model: nn.Module, epoch: int, epochs: int) -> None:
        """Engine hook: train mode for the adapters, and the two-stage backbone freeze.

        With ``freeze_backbone_epochs`` N > 0 the student's backbone (layers before
        :func:`backbone_end`) is frozen during epochs 0 .. N-1 and trainable from epoch N on.
        """
        self.train()
        frozen_epochs = self.config.freeze_backbone_epochs
        if frozen_epochs <= 0:
            return
        model = getattr(student_model, "module", student_model)  # unwrap DataParallel / DDP
        frozen = backbone_frozen(epoch, frozen_epochs)
        if frozen != self._backbone_frozen:
            set_backbone_trainable(model, backbone_end(model), trainable=not frozen)
            self._backbone_frozen = frozen
            LOGGER.info(f"epoch {epoch}: student backbone {'frozen' if frozen else 'trainable'} "
                        f"(freeze_backbone_epochs={frozen_epochs})")

    def schedule(self, epoch: float, epochs: int) -> tuple[float, float]:
        """``(share, temperature)`` at ``epoch``: the distillation share of the loss and T."""
        config = self.config
        weight = distill_weight_at(epoch, epochs, config.schedule, config.weight_end, config.stop_epoch)
        temperature = temperature_at(epoch, epochs, config.temperature, config.temperature_end)
        return (1.0 - config.alpha) * weight, temperature

    def forward(self, student_out: Any, teacher_out: Any, targets: torch.Tensor,
                student_feats: Sequence[torch.Tensor] | None = None,
                teacher_feats: Sequence[torch.Tensor] | None = None,
                epoch: float = 0, epochs: int = 1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of one batch.

        Args:
            student_out: the student head's train output (``list[Tensor[B, no, H_i, W_i]]``, or
                ``[aux_maps, main_maps]`` for a dual head; the main branch is distilled).
            teacher_out: the teacher head's output, train or eval (dual: the main branch is used);
                its grid may differ from the student's (it is resized). Never receives gradients.
                May be None (like the feature lists) while the schedule's share is 0, so the engine
                can skip the teacher's forward after ``distill_stop_epoch``.
            targets: ``Tensor[N, 6]`` (image index, class, cx, cy, w, h normalised).
            student_feats, teacher_feats: outputs of ``student_layers`` / ``teacher_layers``
                (``list[Tensor[B, C_i, H_i, W_i]]``); needed when :attr:`uses_features`.
            epoch, epochs: 0-based (possibly fractional) epoch and the number of epochs.

        Returns:
            ``loss`` (scalar, times the batch size, for backward) and ``items``: detached scalars
            ``box``, ``cls``, ``dfl`` (the detection loss items), ``distill/cls``, ``distill/box``,
            ``distill/feat`` (each term times its weight) and ``distill/total`` (the share times
            their sum); ``loss / batch_size = (1 - share) * (box + cls + dfl) + distill/total``.
        """
        config = self.config
        share, temperature = self.schedule(epoch, epochs)
        need_assigner = share > 0 and config.box > 0 and config.box_mask == "assigner"
        det_loss, det_items, fg_mask = self._detection(student_out, targets, need_assigner)
        zero = det_loss.new_zeros(())
        terms = {"cls": zero, "box": zero, "feat": zero}
        if share > 0:
            with torch.autocast(device_type=det_loss.device.type, enabled=False):
                terms = self._terms(student_out, teacher_out, student_feats, teacher_feats, temperature,
                                    fg_mask)
        weighted = {"cls": config.cls * terms["cls"], "box": config.box * terms["box"],
                    "feat": config.feat * terms["feat"]}
        distill = share * (weighted["cls"] + weighted["box"] + weighted["feat"])
        batch_size = branch_maps(student_out)[-1][0].shape[0]
        loss = (1.0 - share) * det_loss + distill * batch_size
        items = {"box": det_items[0], "cls": det_items[1], "dfl": det_items[2],
                 "distill/cls": weighted["cls"], "distill/box": weighted["box"],
                 "distill/feat": weighted["feat"], "distill/total": distill}
        return loss, {key: value.detach() for key, value in items.items()}

    def _detection(self, student_out: Any, targets: torch.Tensor, need_assigner: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The detection loss and items; with ``need_assigner`` also the main branch's fg_mask [B, A].

        The branches are then combined here from ``branch_loss`` (the same rule as
        ``DetectionLoss.forward``: auxiliary branches times ``aux_weight``) so that the assigner
        runs once per branch, not twice for the main one.
        """
        if not need_assigner:
            loss, items = self.detection_loss(student_out, targets)
            return loss, items, None
        branches = branch_maps(student_out)
        total, main = None, None
        for index, maps in enumerate(branches):
            items, main = self.detection_loss.branch_loss(maps, targets)
            if index < len(branches) - 1:
                items = items * self.detection_loss.aux_weight
            total = items if total is None else total + items
        return total.sum() * branches[-1][0].shape[0], total.detach(), main.fg_mask

    def _terms(self, student_out: Any, teacher_out: Any, student_feats: Sequence[torch.Tensor] | None,
               teacher_feats: Sequence[torch.Tensor] | None, temperature: float,
               fg_mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The unweighted terms in float32: ``{'cls', 'box', 'feat'}`` scalars."""
        config = self.config
        student_maps = [m.float() for m in branch_maps(student_out)[-1]]
        teacher_maps = resize_to([m.detach().float() for m in branch_maps(teacher_out)[-1]], student_maps)
        student_flat, teacher_flat = flatten_maps(student_maps), flatten_maps(teacher_maps)
        split = (4 * self.reg_max, self.num_classes)
        student_distri, student_scores = student_flat.split(split, -1)
        teacher_distri, teacher_scores = teacher_flat.split(split, -1)
        zero = student_flat.new_zeros(())
        terms = {"cls": zero, "box": zero, "feat": zero}

        if config.cls > 0:
            weights = anchor_confidence_weights(teacher_scores, config.cls_weighting, config.cls_gamma,
                                                config.score_threshold)
            terms["cls"] = self.cls_loss(student_scores, teacher_scores, temperature, weights)
        if config.box > 0:
            if fg_mask is None:  # teacher mask: anchors where the teacher is confident
                fg_mask = teacher_scores.sigmoid().amax(-1) > config.score_threshold
            terms["box"] = self.box_loss(student_distri, teacher_distri, fg_mask, temperature)
        if config.feat > 0:
            if student_feats is None or teacher_feats is None:
                raise ValueError("feature distillation is on: pass student_feats and teacher_feats")
            if not len(student_feats) == len(teacher_feats) == len(self.adapters):
                raise ValueError(f"expected {len(self.adapters)} student and teacher feature maps "
                                 f"(layers {self.student_layers} / {self.teacher_layers})")
            student_feats = [f.float() for f in student_feats]
            teacher_feats = resize_to([f.detach().float() for f in teacher_feats], student_feats)
            per_level = [term(adapter(s), t) for adapter, term, s, t in
                         zip(self.adapters, self.feature_losses, student_feats, teacher_feats)]
            terms["feat"] = torch.stack(per_level).mean()
        return terms
