"""CrossKD (Wang et al., CVPR 2024): distil through the teacher's own prediction layers.

The student's head features after its last hidden conv (per level, box and class branch of the main
branch) pass through a connector (1x1 conv + BN, only where the widths differ) and then through the
FROZEN teacher's final 1x1 convs. Class and box KD then compare these cross-head predictions with
the teacher's predictions, so the KD gradient reaches the student's features without fighting the
detection loss on the student's own outputs (which are trained by detection alone).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from utils.distill.connectors import FeatureAdapter

HIDDEN = -2  # index of the last hidden conv inside a head branch Sequential (the final 1x1 conv is -1)


def main_branch(head: nn.Module) -> tuple[nn.ModuleList, nn.ModuleList]:
    """(box convs, class convs) of a DDetect / DualDDetect head's main (last) branch."""
    box, cls, _ = head.branch_modules(head.num_branches - 1)
    return box, cls


class CrossKDHead(nn.Module):
    """Connectors from the student's hidden head features to the teacher's final convs.

    Args:
        student_head, teacher_head: DDetect / DualDDetect heads with the same number of levels.
        box, cls: which halves are distilled (their KD weight > 0). Only those get connectors: a
            connector whose output no loss reads would have no gradient, which DDP refuses.

    ``capture(student)`` is a context manager that records the hidden features during one student
    forward; ``forward(hidden) -> list[Tensor[B, 4 * reg_max + nc, H_i, W_i]]`` gives the cross-head
    maps in the layout of the head's raw maps, in float32 (zeros in a half that is not distilled).
    """

    def __init__(self, student_head: nn.Module, teacher_head: nn.Module, box: bool = True, cls: bool = True) -> None:
        super().__init__()
        student_box, student_cls = main_branch(student_head)
        teacher_box, teacher_cls = main_branch(teacher_head)
        self.box_connectors = nn.ModuleList(
            FeatureAdapter(s[-1].in_channels, t[-1].in_channels) for s, t in zip(student_box, teacher_box)
        ) if box else None
        self.cls_connectors = nn.ModuleList(
            FeatureAdapter(s[-1].in_channels, t[-1].in_channels) for s, t in zip(student_cls, teacher_cls)
        ) if cls else None
        # A plain list: the teacher's convs are neither registered (not trained, not saved) nor copied.
        self._teacher_final = [(t_box[-1], t_cls[-1]) for t_box, t_cls in zip(teacher_box, teacher_cls)]

    @contextlib.contextmanager
    def capture(self, student: nn.Module) -> Iterator[dict[str, list]]:
        """Record the student head's hidden features (``{'box': [...], 'cls': [...]}``, one per level)
        while the block runs; the hooks exist only inside it (EMA copies and exports never see them)."""
        box, cls = main_branch(student.head)
        hidden: dict[str, list] = {"box": [None] * len(box), "cls": [None] * len(cls)}

        def recorder(kind: str, level: int):
            def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
                hidden[kind][level] = output
            return hook

        handles = [seq[HIDDEN].register_forward_hook(recorder("box", i)) for i, seq in enumerate(box)]
        handles += [seq[HIDDEN].register_forward_hook(recorder("cls", i)) for i, seq in enumerate(cls)]
        try:
            yield hidden
        finally:
            for handle in handles:
                handle.remove()

    def forward(self, hidden: dict[str, list]) -> list[torch.Tensor]:
        maps = []
        for level, (box_conv, cls_conv) in enumerate(self._teacher_final):
            box = _through_teacher(self.box_connectors, level, hidden["box"][level], box_conv)
            cls = _through_teacher(self.cls_connectors, level, hidden["cls"][level], cls_conv)
            maps.append(torch.cat((box, cls), 1))
        return maps


def _through_teacher(connectors: nn.ModuleList | None, level: int, hidden: torch.Tensor,
                     conv: nn.Conv2d) -> torch.Tensor:
    """The student's hidden map of one level through its connector and the teacher's final conv
    ``[B, conv.out_channels, H, W]`` (float32); zeros when this half has no connectors."""
    if connectors is None:
        batch, _, height, width = hidden.shape
        return hidden.new_zeros((batch, conv.out_channels, height, width), dtype=torch.float32)
    features = connectors[level](hidden).float()
    bias = None if conv.bias is None else conv.bias.detach().float()
    return F.conv2d(features, conv.weight.detach().float(), bias, groups=conv.groups)
