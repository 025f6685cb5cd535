"""The ``distill_*`` hyper-parameters of a distillation recipe, read and checked once.

The loss they describe (see :mod:`utils.distill.loss`)::

    L = distill_det_weight * L_det + w(epoch, step) * (distill_cls * KD_cls + distill_box * KD_box
                                                       + distill_feat * KD_feat)

``distill_det_weight`` is 1 in every recipe but the classic baseline (which trades detection away,
as it was published); ``w(epoch, step)`` is the weight schedule of :mod:`utils.distill.schedule`.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, fields
from typing import Any, Sequence

from utils.core.errors import UserError

SCHEDULES = ("constant", "linear", "cosine")
CLS_TYPES = ("sigmoid", "softmax")
FEATURE_TYPES = ("mse", "cwd", "mgd", "pkd", "at")
# distill_teacher_dtype values -> torch dtype names (auto: utils.engine.setup.resolve_teacher_dtype picks one)
TEACHER_DTYPES = {"auto": None, "fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
ASSIGNERS = ("student", "teacher")  # whose predictions the task-aligned assigner ranks anchors by
NEVER = -1  # distill_stop_epoch value that keeps distilling to the end
STOP_AT_CLOSE_MOSAIC = "close_mosaic"  # distill_stop_epoch value: stop when mosaic closes

# Keys of the first recipe format and what replaced them; a hyp file that still has one is refused,
# because silently ignoring it would change the loss the user thinks they train with.
REMOVED_KEYS = {
    "distill_alpha": "detection now keeps weight 1 (distill_det_weight) and KD is added on top",
    "distill_temperature_end": "the temperature is constant (a T schedule was a hidden weight schedule)",
    "distill_cls_weighting": "class KD weights every anchor by |p_student - p_teacher|^distill_cls_beta",
    "distill_cls_gamma": "see distill_cls_beta",
    "distill_score_threshold": "class KD covers every anchor; box KD uses the assigner's positives",
    "distill_box_mask": "box KD weights every anchor by the teacher's confidence",
    "distill_box_teacher_score": "box KD always weights each anchor by the teacher's confidence (a weighted mean "
                                 "over the teacher's foreground)",
    "distill_warmup_fraction": "a warm-up over a fraction of the epochs had a length that changed with the "
                               "schedule; use distill_warmup_steps (nominal optimizer steps)",
}


def hyp_key(field_name: str) -> str:
    """The hyp file key of a :class:`DistillConfig` field (``distill_`` prefix, except the freeze key)."""
    return field_name if field_name == "freeze_backbone_epochs" else f"distill_{field_name}"


@dataclass
class DistillConfig:
    """The distillation settings (hyp/hyp.distill.yaml documents every key).

    Fields without a default must be in the hyp file; the defaults are neutral, not a recipe.
    """

    cls: float
    box: float
    feat: float
    cls_type: str = "sigmoid"
    cls_beta: float = 1.0
    temperature: float = 1.0
    box_temperature: float = 1.0
    feat_type: str = "pkd"
    cwd_tau: float = 1.0
    mgd_alpha: float = 1.0
    mgd_ratio: float = 0.65
    crosskd: bool = False
    assign: str = "student"
    det_weight: float = 1.0
    schedule: str = "constant"
    weight_end: float = 0.0
    warmup_steps: int = 0
    stop_epoch: int | str = NEVER
    student_layers: tuple[int, ...] | None = None
    teacher_layers: tuple[int, ...] | None = None
    freeze_backbone_epochs: int = 0
    teacher_dtype: str = "auto"

    @classmethod
    def from_hyp(cls, hyp: dict) -> "DistillConfig":
        """Read and check the settings; a missing, removed or bad value raises UserError naming the key."""
        for key, why in REMOVED_KEYS.items():
            if key in hyp:
                raise UserError(f"hyp key '{key}' is no longer used ({why}): remove it; "
                                f"hyp/hyp.distill.yaml shows the current keys")
        values: dict[str, Any] = {}
        for field in fields(cls):
            key = hyp_key(field.name)
            if key in hyp and hyp[key] is not None:
                values[field.name] = hyp[key]
            elif field.default is MISSING:
                raise UserError(f"hyp key '{key}' is missing (see hyp/hyp.distill.yaml)")
        config = cls(**values)
        config._check()
        return config

    @property
    def uses_logits(self) -> bool:
        """Whether class or box KD is on (they need the teacher's head maps)."""
        return self.cls > 0 or self.box > 0

    @property
    def teacher_assigns(self) -> bool:
        """Whether the detection loss's targets come from the teacher's predictions (label assignment
        distillation, LAD): the assigner ranks anchors by the teacher's scores and boxes."""
        return self.assign == "teacher"

    @property
    def uses_teacher_maps(self) -> bool:
        """Whether the teacher's head maps are needed (class or box KD, or the teacher's assignment)."""
        return self.uses_logits or self.teacher_assigns

    @property
    def uses_features(self) -> bool:
        """Whether feature KD is on (it needs the distilled layers' feature maps)."""
        return self.feat > 0

    @property
    def active(self) -> bool:
        """Whether the teacher does anything: with no KD weight and the student's own assignment, a
        distillation run is a scratch run."""
        return self.uses_teacher_maps or self.uses_features

    def _check(self) -> None:
        def number(name: str, low: float, high: float = math.inf) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise UserError(f"hyp key '{hyp_key(name)}' must be a number in [{low}, {high}], got {value!r}")

        def choice(name: str, options: Sequence[str]) -> None:
            if getattr(self, name) not in options:
                raise UserError(f"hyp key '{hyp_key(name)}' must be one of {', '.join(options)}, "
                                f"got {getattr(self, name)!r}")

        def flag(name: str) -> None:
            if not isinstance(getattr(self, name), bool):
                raise UserError(f"hyp key '{hyp_key(name)}' must be true or false, got {getattr(self, name)!r}")

        for name in ("mgd_ratio", "weight_end"):
            number(name, 0.0, 1.0)
        for name in ("cls", "box", "feat", "cls_beta", "mgd_alpha", "det_weight"):
            number(name, 0.0)
        for name in ("temperature", "box_temperature", "cwd_tau"):
            number(name, 1e-3)
        choice("cls_type", CLS_TYPES)
        choice("feat_type", FEATURE_TYPES)
        choice("schedule", SCHEDULES)
        choice("assign", ASSIGNERS)
        choice("teacher_dtype", TEACHER_DTYPES)
        flag("crosskd")
        if 0 < self.cls_beta < 1:  # d|x|^beta/dx is infinite at x = 0 (student equals teacher): NaN gradients
            raise UserError(f"hyp key 'distill_cls_beta' must be 0 or at least 1, got {self.cls_beta!r} "
                            f"(|p_s - p_t|^beta with 0 < beta < 1 has an infinite gradient where they agree)")
        stop = self.stop_epoch
        if stop != STOP_AT_CLOSE_MOSAIC and (isinstance(stop, bool) or not isinstance(stop, int)
                                             or (stop <= 0 and stop != NEVER)):
            raise UserError(f"hyp key 'distill_stop_epoch' must be an epoch number >= 1, -1 (never) or "
                            f"'{STOP_AT_CLOSE_MOSAIC}', got {stop!r}")
        for name in ("freeze_backbone_epochs", "warmup_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise UserError(f"hyp key '{hyp_key(name)}' must be a non-negative integer, got {value!r}")
        if self.crosskd and not self.uses_logits:
            raise UserError("hyp key 'distill_crosskd' is true but distill_cls and distill_box are 0: "
                            "CrossKD distils the head's outputs, give one of them a weight")
        for name in ("student_layers", "teacher_layers"):
            layers = getattr(self, name)
            if layers is not None:
                if not isinstance(layers, (list, tuple)) or not all(isinstance(i, int) for i in layers):
                    raise UserError(f"hyp key '{hyp_key(name)}' must be a list of layer indices or null")
                setattr(self, name, tuple(layers))
