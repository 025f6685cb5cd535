"""Anchor-free DFL detection heads: DDetect (one branch) and DualDDetect (aux + main branch).

Raw maps per level are ``Tensor[B, no, H_i, W_i]`` with ``no = nc + 4 * reg_max``: channels
0..63 are DFL logits, side-major (``side * reg_max + bin``, sides left, top, right, bottom, in
grid units), channels 64.. are class logits. Decoded predictions are ``Tensor[B, 4 + nc, A]``:
rows 0-3 are (cx, cy, w, h) in input pixels, rows 4.. sigmoid class scores; anchors are ordered
P3 row-major, then P4, then P5.

Return contract (docs/internals.md):
- train: DDetect -> ``list[Tensor]`` (one map per level); DualDDetect -> ``[aux_maps, main_maps]``.
- eval: DDetect -> ``(y, maps)``; DualDDetect -> ``([y_aux, y_main], [aux_maps, main_maps])``.
- eval with ``export = True``: only ``y`` of the main (last) branch.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from models.anchors import dist2bbox, make_anchors
from models.common import Conv, make_divisible

REG_MAX = 16  # DFL bins per box side
BOX_GROUPS = 4  # the box branch's second conv and output conv are grouped per box side
MIN_BOX_HIDDEN = 16
MAX_CLS_HIDDEN = 128  # cap on 2 * nc when sizing the class branch
# bias prior: about this many objects per image of this size, spread over all cells and classes
PRIOR_OBJECTS_PER_IMAGE = 5
PRIOR_IMAGE_SIZE = 640
BOX_BIAS_INIT = 1.0


class DFL(nn.Module):
    """Distribution Focal Loss integral: expected distance of a softmax over ``c1`` bins.

    The 1x1 conv holds the fixed bin values 0..c1-1 (frozen); keeping it as a conv keeps the
    official key ``dfl.conv.weight`` and makes the expectation export as a plain convolution.
    """

    def __init__(self, c1: int = REG_MAX):
        super().__init__()
        self.c1 = c1
        self.conv = nn.Conv2d(c1, 1, 1, bias=False).requires_grad_(False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.arange(c1, dtype=torch.float).view(1, c1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` Tensor[B, 4 * c1, A] logits -> Tensor[B, 4, A] distances in bins (grid units)."""
        b, _, a = x.shape
        prob = x.view(b, 4, self.c1, a).transpose(1, 2).softmax(1)  # [B, c1, 4, A]: bins as channels
        return self.conv(prob).view(b, 4, a)


def _branch_names(branch: int) -> tuple[str, str, str]:
    """Attribute names (box convs, class convs, DFL) of a branch: cv2/cv3/dfl, cv4/cv5/dfl2, ..."""
    dfl_name = "dfl" if branch == 0 else f"dfl{branch + 1}"
    return f"cv{2 + 2 * branch}", f"cv{3 + 2 * branch}", dfl_name


class DDetect(nn.Module):
    """Decoupled anchor-free head with DFL box regression; ``num_branches`` copies of it.

    Args:
        nc: number of classes.
        ch: input channels of every branch input, branch after branch (``num_branches * nl``
            entries); the last ``nl`` inputs form the main branch.
    """

    num_branches = 1
    export = False  # eval forward returns only the main branch's decoded predictions

    def __init__(self, nc: int = 80, ch: Sequence[int] = ()):
        super().__init__()
        ch = tuple(ch)
        if not ch or len(ch) % self.num_branches:
            raise ValueError(f"{type(self).__name__} needs a multiple of {self.num_branches} "
                             f"inputs, got {len(ch)}")
        self.nc = nc
        self.nl = len(ch) // self.num_branches
        self.reg_max = REG_MAX
        self.no = nc + 4 * REG_MAX
        self.stride = torch.zeros(self.nl)  # set by the model once it has probed the strides
        for branch in range(self.num_branches):
            box_name, cls_name, _ = _branch_names(branch)
            branch_ch = ch[branch * self.nl:(branch + 1) * self.nl]
            box, cls = self._make_branch(branch_ch)
            setattr(self, box_name, box)
            setattr(self, cls_name, cls)
        for branch in range(self.num_branches):
            setattr(self, _branch_names(branch)[2], DFL(REG_MAX))
        self._anchor_key: tuple | None = None
        self.anchors = torch.empty(0)
        self.strides = torch.empty(0)

    @classmethod
    def yaml_args(cls, ch_in: list[int], args: list, n: int, width: float) -> tuple[list, int]:
        """Yaml ``[nc]`` -> ``(nc, ch_in)``; the head has no output channels for later layers."""
        return [args[0], list(ch_in), *args[1:]], 0

    def _make_branch(self, ch: Sequence[int]) -> tuple[nn.ModuleList, nn.ModuleList]:
        box_hidden = make_divisible(max(ch[0] // 4, 4 * REG_MAX, MIN_BOX_HIDDEN), BOX_GROUPS)
        cls_hidden = max(ch[0], min(2 * self.nc, MAX_CLS_HIDDEN))
        box = nn.ModuleList(
            nn.Sequential(Conv(c, box_hidden, 3), Conv(box_hidden, box_hidden, 3, g=BOX_GROUPS),
                          nn.Conv2d(box_hidden, 4 * REG_MAX, 1, groups=BOX_GROUPS))
            for c in ch)
        cls = nn.ModuleList(
            nn.Sequential(Conv(c, cls_hidden, 3), Conv(cls_hidden, cls_hidden, 3),
                          nn.Conv2d(cls_hidden, self.nc, 1))
            for c in ch)
        return box, cls

    def branch_modules(self, branch: int) -> tuple[nn.ModuleList, nn.ModuleList, DFL]:
        """(box convs, class convs, DFL) of ``branch`` (0 = aux for dual heads, last = main)."""
        return tuple(getattr(self, name) for name in _branch_names(branch))  # type: ignore[return-value]

    def bias_init(self) -> None:
        """Box output bias 1.0; class bias log(prior) so that initial scores are ~5 objects/image.

        Needs ``self.stride``; applied to every branch.
        """
        for branch in range(self.num_branches):
            box, cls, _ = self.branch_modules(branch)
            for box_seq, cls_seq, stride in zip(box, cls, self.stride.tolist()):
                cells = (PRIOR_IMAGE_SIZE / stride) ** 2
                with torch.no_grad():
                    box_seq[-1].bias.fill_(BOX_BIAS_INIT)
                    cls_seq[-1].bias[:self.nc] = math.log(PRIOR_OBJECTS_PER_IMAGE / self.nc / cells)

    def _anchors_for(self, maps: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Anchor points ``[2, A]`` (grid units) and strides ``[1, A]``, cached per input shape.

        The cache key leaves out ``stride``: whoever sets it resets ``_anchor_key``.
        """
        key = (tuple(m.shape[2:] for m in maps), maps[0].device, maps[0].dtype)
        if self.export or key != self._anchor_key:
            points, strides = make_anchors(maps, self.stride)
            self.anchors, self.strides = points.transpose(0, 1), strides.transpose(0, 1)
            self._anchor_key = None if self.export else key
        return self.anchors, self.strides

    def decode(self, maps: list[torch.Tensor], branch: int = -1) -> torch.Tensor:
        """Raw maps of one branch -> ``Tensor[B, 4 + nc, A]`` (cx, cy, w, h pixels; sigmoid scores)."""
        dfl = self.branch_modules(branch % self.num_branches)[2]
        batch = maps[0].shape[0]
        flat = torch.cat([m.reshape(batch, self.no, -1) for m in maps], 2)
        box_logits, cls_logits = flat.split((4 * REG_MAX, self.nc), 1)
        anchors, strides = self._anchors_for(maps)
        boxes = dist2bbox(dfl(box_logits), anchors.unsqueeze(0), xywh=True, dim=1) * strides
        return torch.cat((boxes, cls_logits.sigmoid()), 1)

    def forward(self, x: list[torch.Tensor]):
        """``x``: ``num_branches * nl`` maps ``[B, C_i, H_i, W_i]``; see the module docstring."""
        all_maps = []
        for branch in range(self.num_branches):
            box, cls, _ = self.branch_modules(branch)
            inputs = x[branch * self.nl:(branch + 1) * self.nl]
            all_maps.append([torch.cat((box[i](inputs[i]), cls[i](inputs[i])), 1)
                             for i in range(self.nl)])
        if self.training:
            return all_maps[0] if self.num_branches == 1 else all_maps
        if self.export:
            return self.decode(all_maps[-1], -1)
        preds = [self.decode(maps, branch) for branch, maps in enumerate(all_maps)]
        if self.num_branches == 1:
            return preds[0], all_maps[0]
        return preds, all_maps


class DualDDetect(DDetect):
    """DDetect with an auxiliary branch (cv2/cv3/dfl, first ``nl`` inputs) and a main branch
    (cv4/cv5/dfl2, last ``nl`` inputs). Only the main branch is used for inference."""

    num_branches = 2


def main_output(out) -> torch.Tensor:
    """Decoded main-branch predictions ``Tensor[B, 4 + nc, A]`` from any eval-mode head output.

    Accepts ``y`` (export), ``(y, maps)`` (DDetect) and ``([y_aux, y_main], maps)`` (dual).
    """
    if isinstance(out, torch.Tensor):
        return out
    preds = out[0]
    if isinstance(preds, (list, tuple)):
        return preds[-1]
    return preds


def flatten_maps(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Head maps ``list[Tensor[B, no, H_i, W_i]]`` -> ``Tensor[B, A, no]`` (P3 first, row-major)."""
    batch = maps[0].shape[0]
    return torch.cat([m.reshape(batch, m.shape[1], -1) for m in maps], 2).transpose(1, 2)


def branch_maps(out) -> list[list[torch.Tensor]]:
    """Raw maps per branch (main branch last) from a train-mode (or eval-mode) head output.

    Train DDetect ``[P3, P4, P5]`` -> ``[[P3, P4, P5]]``; dual ``[aux, main]`` is returned as is;
    an eval tuple ``(y, maps)`` is unwrapped first.
    """
    if isinstance(out, tuple):
        out = out[1]
    if isinstance(out[0], torch.Tensor):
        return [list(out)]
    return [list(maps) for maps in out]


BLOCKS: dict[str, type] = {"DDetect": DDetect, "DualDDetect": DualDDetect}
