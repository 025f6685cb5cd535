"""Knowledge distillation for detection (see :mod:`utils.distill.loss` for the formula).

- :mod:`~utils.distill.config`: the ``distill_*`` hyper-parameters;
- :mod:`~utils.distill.schedule`: the KD weight over training and the two-stage backbone freeze;
- :mod:`~utils.distill.terms`: the class, box (LD) and feature terms;
- :mod:`~utils.distill.connectors`: connectors and the student wrapped with them (one DDP module);
- :mod:`~utils.distill.crosskd`: CrossKD through the teacher's final convs;
- :mod:`~utils.distill.loss`: DistillationLoss and the teacher fit checks.
``utils.loss`` re-exports :class:`DistillationLoss`. The package may import ``utils.core`` and ``models``
(the head's output helpers), nothing else in ``utils``.
"""

from utils.distill.config import DistillConfig
from utils.distill.connectors import DistillModules, DistillStudent, FeatureAdapter, StudentOutput
from utils.distill.loss import ITEM_KEYS, DistillationLoss, check_teacher_fits

__all__ = ["ITEM_KEYS", "DistillConfig", "DistillModules", "DistillStudent", "DistillationLoss", "FeatureAdapter",
           "StudentOutput", "check_teacher_fits"]
