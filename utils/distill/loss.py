"""DistillationLoss: the detection loss, whole, plus weighted KD terms normalised by the teacher.

For one batch of B images::

    L = B * (det_weight * L_det + w(epoch, step) * (lambda_cls * KD_cls + lambda_box * KD_box
                                                    + lambda_feat * KD_feat))

- ``L_det``: the student's own detection loss (box + cls + dfl), exactly as in plain training.
- ``KD_cls``: binary KD (:func:`~utils.distill.terms.binary_kd`) summed over all anchors and classes,
  divided by the teacher's foreground mass ``M = sum over anchors and classes of sigmoid(z_t)``; or
  softmax KL over classes, averaged over anchors (the classic recipe, as published).
- ``KD_box``: LD (:func:`~utils.distill.terms.dfl_kd`) averaged over all anchors, each weighted by the
  teacher's confidence ``q_t = max over classes of sigmoid(z_t)`` (a weighted mean: divided by the sum
  of ``q_t``).

Why the teacher's mass: it does not depend on the student's predictions, so a KD weight means the
same at the first step and the last, at 40 epochs and at 400, on large objects and small. The
student's own ``target_scores_sum`` (the detection loss's normaliser) grows with the student's IoUs,
about fivefold over a run, which made KD a hidden schedule. The teacher's mass is what that
normaliser would be for a student as good as the teacher (on BCCD the two agree within 2%), so the
weights keep their scale: about the detection gain of the same kind times a few. Both are per-batch
sums over the same anchors as their numerators, so crowded and sparse images weigh alike, and under
DDP each process normalises its own batch, as the detection loss does.
- ``KD_feat``: a feature term on the distilled layers (PKD, CWD, MGD, MSE, AT), mean over levels.
- With CrossKD, KD_cls and KD_box compare the cross-head maps (student features through the
  teacher's last convs) instead of the student's own maps.
- With ``distill_assign: teacher`` (label assignment distillation, Nguyen et al., 2022) the assigner
  of ``L_det`` ranks anchors by the teacher's scores and boxes instead of the student's, so the
  student's positives and soft targets are the ones the teacher's predictions give; the box and DFL
  terms still regress to the ground-truth boxes. It acts whenever the teacher does, whatever ``w``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from models.heads import branch_maps, flatten_maps
from utils.core.errors import UserError
from utils.core.log import LOGGER
from utils.distill.config import NEVER, DistillConfig
from utils.distill.connectors import DistillModules, FeatureAdapter
from utils.distill.crosskd import CrossKDHead
from utils.distill.schedule import (backbone_end, backbone_frozen, distill_weight_at, resolve_stop_epoch,
                                    set_backbone_trainable)
from utils.distill.terms import FEATURE_LOSSES, NEEDS_CONNECTOR, REG_MAX, binary_kd, dfl_kd, softmax_kd

# The teacher's foreground mass is clamped here: a batch where it sees nothing gives a mean, not a blow-up.
MIN_TEACHER_MASS = 1.0
PROBE_STRIDES = 2  # the channel probe runs on an image of 2 x the largest stride (small, valid)
ITEM_KEYS = ("box", "cls", "dfl", "distill/cls", "distill/box", "distill/feat", "distill/total")


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


def check_teacher_fits(student: nn.Module, teacher: nn.Module, config: DistillConfig,
                       img: int | None = None, teacher_img: int | None = None) -> None:
    """UserError (one line) when the teacher cannot teach this student with this recipe."""
    if int(student.nc) != int(teacher.nc):
        raise UserError(f"the teacher predicts {teacher.nc} classes but the student {student.nc}: "
                        f"train the teacher on the same data set (--data)")
    s_head, t_head = student.head, teacher.head
    if int(s_head.nl) != int(t_head.nl):
        raise UserError(f"the teacher's head has {t_head.nl} levels but the student's {s_head.nl}: "
                        f"distillation pairs the levels one to one")
    s_strides = [int(s) for s in torch.as_tensor(student.stride).tolist()]
    t_strides = [int(s) for s in torch.as_tensor(teacher.stride).tolist()]
    if s_strides != t_strides:
        raise UserError(f"the teacher's strides {t_strides} differ from the student's {s_strides}: "
                        f"their anchors would not pair; pick a teacher with the student's strides")
    if config.uses_teacher_maps:
        s_reg, t_reg = int(getattr(s_head, "reg_max", REG_MAX)), int(getattr(t_head, "reg_max", REG_MAX))
        if s_reg != t_reg:
            raise UserError(f"the teacher's head outputs {t_reg} DFL bins per side but the student's {s_reg}: "
                            f"box KD needs the same bins (set distill_box 0 and distill_cls 0 for feature KD only)")
        if config.crosskd and not (hasattr(s_head, "branch_modules") and hasattr(t_head, "branch_modules")):
            raise UserError("distill_crosskd needs DDetect-style heads (box and class branches) in both models")
        if teacher_img and img and int(teacher_img) != int(img):
            raise UserError(f"--teacher-img {teacher_img} with class or box KD or distill_assign teacher: "
                            f"the teacher's anchors at "
                            f"{teacher_img} px do not pair with the student's at {img} px (objects change "
                            f"pyramid levels); drop --teacher-img or use a feature-only recipe")


class DistillationLoss(nn.Module):
    """Detection loss plus class, box (LD) and feature distillation; see the module docstring.

    Args:
        detection_loss: the student's ``DetectionLoss`` (``__call__`` and ``branch_loss`` are used).
        student_model, teacher_model: ``DetectionModel`` s; :func:`check_teacher_fits` must pass.
        hyp: hyper-parameters with the ``distill_*`` keys (:class:`DistillConfig`).
        close_mosaic: the run's close-mosaic epochs (for ``distill_stop_epoch: close_mosaic``).
        img, teacher_img: the student's and the teacher's input sizes (None: the same).

    Attributes:
        student_layers, teacher_layers: the distilled layers (feature KD).
        modules_: :class:`DistillModules` (connectors, MGD generators, CrossKD connectors): trained
            with the student, inside :class:`~utils.distill.connectors.DistillStudent`.
    """

    def __init__(self, detection_loss: Any, student_model: nn.Module, teacher_model: nn.Module, hyp: dict,
                 close_mosaic: int = 0, img: int | None = None, teacher_img: int | None = None) -> None:
        super().__init__()
        self.config = config = DistillConfig.from_hyp(hyp)
        check_teacher_fits(student_model, teacher_model, config, img, teacher_img)
        self.detection_loss = detection_loss
        self.num_classes = int(student_model.nc)
        self.reg_max = int(getattr(student_model.head, "reg_max", REG_MAX))
        self.close_mosaic = int(close_mosaic or 0)
        self.student_layers = list(config.student_layers or student_model.distill_layers)
        self.teacher_layers = list(config.teacher_layers or teacher_model.distill_layers)
        if len(self.student_layers) != len(self.teacher_layers):
            raise UserError(f"hyp keys 'distill_student_layers' {self.student_layers} and "
                            f"'distill_teacher_layers' {self.teacher_layers} must name as many layers")
        adapters, feature_losses = nn.ModuleList(), nn.ModuleList()
        if config.uses_features:
            student_channels = feature_channels(student_model, self.student_layers)
            teacher_channels = feature_channels(teacher_model, self.teacher_layers)
            options = {"cwd": {"tau": config.cwd_tau},
                       "mgd": {"alpha_mgd": config.mgd_alpha, "mask_ratio": config.mgd_ratio}}
            for c_student, c_teacher in zip(student_channels, teacher_channels):
                needed = c_student != c_teacher or config.feat_type in NEEDS_CONNECTOR
                adapters.append(FeatureAdapter(c_student, c_teacher, needed))
                feature_losses.append(FEATURE_LOSSES[config.feat_type](c_teacher, **options.get(config.feat_type, {})))
        cross = (CrossKDHead(student_model.head, teacher_model.head, box=config.box > 0, cls=config.cls > 0)
                 if config.crosskd else None)
        self.modules_ = DistillModules(adapters, feature_losses, cross)
        self._backbone_frozen = False
        self.to(next(student_model.parameters()).device)

    # ----------------------------------------------------------------------------- what is used
    @property
    def uses_features(self) -> bool:
        """Whether the student and the teacher must return their distilled layers' maps."""
        return self.config.uses_features

    def trainable_modules(self) -> nn.ModuleList:
        """The modules the optimiser trains next to the student (connectors, MGD, CrossKD)."""
        return nn.ModuleList([self.modules_])

    def active(self, epoch: float, epochs: int) -> bool:
        """Whether the teacher takes part in ``epoch``: some KD term or its assignment is on, and the
        stop epoch has not come. When False the engine does not run the teacher at all."""
        config = self.config
        if not config.active:
            return False
        stop = resolve_stop_epoch(config.stop_epoch, epochs, self.close_mosaic)
        return not 0 < stop <= epoch

    def weight(self, epoch: float, epochs: int, step: float | None = None) -> float:
        """``w(epoch, step)``: the KD weight factor (0 when the teacher is not active); ``step`` is the
        number of nominal optimizer steps taken (images seen / nbs), None for "past any warm-up"."""
        config = self.config
        if not self.active(epoch, epochs):
            return 0.0
        return distill_weight_at(epoch, epochs, config.schedule, config.weight_end, NEVER,
                                 config.warmup_steps, step)

    def on_epoch_start(self, student_model: nn.Module, epoch: int, epochs: int) -> None:
        """Engine hook: train mode for the distillation modules, and the two-stage backbone freeze.

        With ``freeze_backbone_epochs`` N > 0 the student's backbone (layers before
        :func:`~utils.distill.schedule.backbone_end`) is frozen during epochs 0 .. N-1.
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

    # ------------------------------------------------------------------------------------ loss
    def forward(self, student_out: Any, teacher_out: Any, targets: torch.Tensor,
                student_feats: Sequence[torch.Tensor] | None = None,
                teacher_feats: Sequence[torch.Tensor] | None = None,
                cross_maps: Sequence[torch.Tensor] | None = None,
                epoch: float = 0, epochs: int = 1,
                step: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of one batch.

        Args:
            student_out: the student head's train output (dual heads: the main branch is distilled).
            teacher_out: the teacher head's output, train or eval (dual: main branch), on the same
                grid as the student's. May be None when :meth:`active` is False (the teacher is skipped).
            targets: ``Tensor[N, 6]`` (image index, class, cx, cy, w, h normalised).
            student_feats: the student's distilled maps ALREADY through their connectors
                (``DistillStudent`` does it); teacher_feats: the teacher's; needed for feature KD.
            cross_maps: the CrossKD maps (``DistillStudent``), needed when ``distill_crosskd``.
            epoch, epochs: 0-based (possibly fractional) epoch and the number of epochs.
            step: nominal optimizer steps taken so far (the KD warm-up's clock); None: past it.

        Returns:
            ``loss`` (scalar, times the batch size) and detached ``items``: ``box``, ``cls``, ``dfl``
            (detection), ``distill/cls``, ``distill/box``, ``distill/feat`` (lambda_i * KD_i) and
            ``distill/total`` (w times their sum); ``loss / B = det_weight * (box + cls + dfl) + distill/total``.
        """
        config = self.config
        active = self.active(epoch, epochs)
        weight = self.weight(epoch, epochs, step)
        batch_size = branch_maps(student_out)[-1][0].shape[0]
        if active and config.teacher_assigns:  # the teacher's assignment (LAD) does not wait for w
            det_loss, det_items, _ = self._detection_with_targets(student_out, targets,
                                                                  branch_maps(teacher_out)[-1])
        else:
            det_loss, det_items = self.detection_loss(student_out, targets)
        zero = det_loss.new_zeros(())
        terms = {"cls": zero, "box": zero, "feat": zero}
        # computed whenever the teacher ran, also at w = 0 (a warm-up's first step): every trainable
        # distillation module then takes part in each step's graph, as DistributedDataParallel requires
        if active:
            with torch.autocast(device_type=det_loss.device.type, enabled=False):
                if config.uses_logits:
                    source = cross_maps if config.crosskd else branch_maps(student_out)[-1]
                    if source is None:
                        raise ValueError("distill_crosskd is on: pass the cross-head maps (DistillStudent)")
                    terms.update(self._logit_terms(source, teacher_out))
                if config.uses_features:
                    terms["feat"] = self._feature_term(student_feats, teacher_feats)
        weighted = {"cls": config.cls * terms["cls"], "box": config.box * terms["box"],
                    "feat": config.feat * terms["feat"]}
        distill = weight * (weighted["cls"] + weighted["box"] + weighted["feat"])
        loss = config.det_weight * det_loss + distill * batch_size
        items = {"box": det_items[0], "cls": det_items[1], "dfl": det_items[2],
                 "distill/cls": weighted["cls"], "distill/box": weighted["box"],
                 "distill/feat": weighted["feat"], "distill/total": distill}
        return loss, {key: value.detach() for key, value in items.items()}

    def _detection_with_targets(self, student_out: Any, targets: torch.Tensor,
                                assign_maps: Sequence[torch.Tensor] | None = None):
        """The detection loss and items, and the main branch's ``BranchTargets`` (assigner output).

        Combined from ``branch_loss`` by the same rule as ``DetectionLoss.forward`` (auxiliary branches
        times ``aux_weight``), so the assigner runs once per branch and the value is the same.
        ``assign_maps`` (the teacher's main maps) set every branch's targets (``distill_assign: teacher``).
        """
        branches = branch_maps(student_out)
        total, main = None, None
        for index, maps in enumerate(branches):
            items, main = self.detection_loss.branch_loss(maps, targets, assign_maps)
            if index < len(branches) - 1:
                items = items * self.detection_loss.aux_weight
            total = items if total is None else total + items
        return total.sum() * branches[-1][0].shape[0], total.detach(), main

    def _logit_terms(self, student_maps: Sequence[torch.Tensor], teacher_out: Any) -> dict:
        """``{'cls', 'box'}`` in float32, normalised by the teacher's foreground (module docstring)."""
        config = self.config
        teacher_maps = [m.detach().float() for m in branch_maps(teacher_out)[-1]]
        student_maps = [m.float() for m in student_maps]
        for s, t in zip(student_maps, teacher_maps):
            if s.shape != t.shape:
                raise ValueError(f"teacher map {tuple(t.shape)} does not match the student's {tuple(s.shape)}")
        split = (4 * self.reg_max, self.num_classes)
        student_distri, student_scores = flatten_maps(student_maps).split(split, -1)
        teacher_distri, teacher_scores = flatten_maps(teacher_maps).split(split, -1)
        teacher_probs = teacher_scores.sigmoid()  # [B, A, C]
        terms = {}
        if config.cls > 0:
            if config.cls_type == "softmax":
                terms["cls"] = softmax_kd(student_scores, teacher_scores, config.temperature).mean()
            else:
                kd = binary_kd(student_scores, teacher_scores, config.cls_beta, config.temperature)
                terms["cls"] = kd.sum() / teacher_probs.sum().clamp(min=MIN_TEACHER_MASS)
        if config.box > 0:
            confidence = teacher_probs.amax(-1)  # [B, A]
            kd = dfl_kd(student_distri, teacher_distri, self.reg_max, config.box_temperature)
            terms["box"] = (kd * confidence).sum() / confidence.sum().clamp(min=MIN_TEACHER_MASS)
        return terms

    def _feature_term(self, student_feats: Sequence[torch.Tensor] | None,
                      teacher_feats: Sequence[torch.Tensor] | None) -> torch.Tensor:
        losses = self.modules_.feature_losses
        if student_feats is None or teacher_feats is None:
            raise ValueError("feature distillation is on: pass student_feats and teacher_feats")
        if not len(student_feats) == len(teacher_feats) == len(losses):
            raise ValueError(f"expected {len(losses)} student and teacher feature maps "
                             f"(layers {self.student_layers} / {self.teacher_layers})")
        teacher_feats = [resize_like(t.detach().float(), s) for s, t in zip(student_feats, teacher_feats)]
        per_level = [term(s.float(), t) for term, s, t in zip(losses, student_feats, teacher_feats)]
        return torch.stack(per_level).mean()


def resize_like(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """A teacher feature map ``[B, C, h, w]`` on the student's grid (bilinear) when they differ:
    only feature KD accepts a teacher run at another size (``--teacher-img``)."""
    if teacher.shape[-2:] == student.shape[-2:]:
        return teacher
    return torch.nn.functional.interpolate(teacher, size=student.shape[-2:], mode="bilinear", align_corners=False)
