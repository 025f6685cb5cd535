"""Student backbone blocks: ShuffleNetV2 and MobileNetV3 units usable from model yaml files.

Every block takes `Tensor[B, c1, H, W]` and returns `Tensor[B, c2, H / s, W / s]`. The blocks
follow the yaml channel protocol of `models/yolo.py` (see docs/internals.md): each defines
`yaml_args` so that it rounds its own widths (ShuffleNet widths such as 116 or 232 are
multiples of 4, not of 8) and, for whole stages, receives the repeat count `n` itself.

Every convolution is a `ConvBNAct`, a subclass of `models.common.Conv` (attributes `conv`, `bn`,
`act`), so a model's `fuse()` folds the student backbones exactly as it folds `Conv`.
"""

from __future__ import annotations

import torch
from torch import nn

from models.common import Conv
from utils.core.errors import UserError

SHUFFLE_WIDTH_DIVISOR = 4  # ShuffleNetV2 widths (58, 116, 232, 464) are multiples of 4
MOBILE_WIDTH_DIVISOR = 8  # MobileNetV3 rounds every width to a multiple of 8
SHUFFLE_GROUPS = 2  # a ShuffleNetV2 unit concatenates two branches and shuffles them
SE_REDUCTION = 4  # MobileNetV3 squeeze-excitation squeezes to a quarter of the channels

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "hswish": nn.Hardswish,
    "hardswish": nn.Hardswish,
    "silu": nn.SiLU,
    "none": nn.Identity,
}


def round_channels(value: float, divisor: int) -> int:
    """Round a channel count to the nearest multiple of `divisor`, never below `divisor` and
    never more than 10 % below `value` (the MobileNet rule, so rounding does not shrink a layer
    noticeably)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def make_activation(name: str | None) -> nn.Module:
    """Activation module from a yaml name (`relu`, `hswish`, `silu`, `none`)."""
    key = "none" if name is None else str(name).lower()
    if key not in ACTIVATIONS:
        raise UserError(f"Unknown activation '{name}' in a model yaml; use one of {sorted(ACTIVATIONS)}.")
    act_cls = ACTIVATIONS[key]
    return act_cls() if act_cls is nn.Identity else act_cls(inplace=True)


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave the channels of `groups` equal groups.

    x: Tensor[B, C, H, W] with C divisible by `groups`. Channel `g * (C / groups) + j` moves to
    position `j * groups + g`, so with 2 groups [a0, a1, b0, b1] becomes [a0, b0, a1, b1].
    """
    batch, channels, height, width = x.shape
    per_group = channels // groups
    x = x.view(batch, groups, per_group, height, width).transpose(1, 2)
    return x.reshape(batch, channels, height, width)


def _init_conv_bn(module: nn.Module) -> None:
    """He init for convolutions (the backbones use ReLU-like activations), BN as identity."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ConvBNAct(Conv):
    """`models.common.Conv` (Conv2d without bias + BatchNorm2d + activation, 'same' padding) with
    the activation named in the yaml and He init; it fuses exactly like `Conv` (`fuse()` folds
    `bn` into `conv`).

    Yaml args: `[c2, k=1, s=1, act='relu', g=1]`; c2 is rounded to a multiple of 8 times width.
    """

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, act: str | None = "relu", g: int = 1) -> None:
        super().__init__(c1, c2, k, s, g=g, act=make_activation(act))
        _init_conv_bn(self)

    @classmethod
    def yaml_args(cls, ch_in: list[int], args: list, n: int, width: float) -> tuple[list, int]:
        c2 = round_channels(args[0] * width, MOBILE_WIDTH_DIVISOR)
        return [ch_in[0], c2, *args[1:]], c2


def _shuffle_width(args: list, width: float) -> int:
    """Output width of a ShuffleNetV2 yaml row: args[0] * width rounded to a multiple of 4."""
    return round_channels(args[0] * width, SHUFFLE_WIDTH_DIVISOR)


class ShuffleV2Stem(nn.Module):
    """ShuffleNetV2 stem: 3x3 stride-2 ConvBNAct (ReLU), then 3x3 stride-2 max-pool (stride 4).

    Yaml args: `[c2]` (24 in the paper). Tensor[B, c1, H, W] -> Tensor[B, c2, H / 4, W / 4].
    """

    STEM_KERNEL = 3
    STEM_STRIDE = 2

    def __init__(self, c1: int, c2: int) -> None:
        super().__init__()
        self.conv = ConvBNAct(c1, c2, self.STEM_KERNEL, self.STEM_STRIDE, "relu")
        self.pool = nn.MaxPool2d(self.STEM_KERNEL, self.STEM_STRIDE, self.STEM_KERNEL // 2)

    @classmethod
    def yaml_args(cls, ch_in: list[int], args: list, n: int, width: float) -> tuple[list, int]:
        c2 = _shuffle_width(args, width)
        return [ch_in[0], c2], c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: Tensor[B, c1, H, W] -> Tensor[B, c2, H / 4, W / 4]."""
        return self.pool(self.conv(x))


class ShuffleV2Block(nn.Module):
    """One ShuffleNetV2 unit (Ma et al. 2018, figure 3 c/d).

    Stride 1 (needs c1 == c2): split the channels in half, keep one half, send the other through
    1x1 conv-BN-ReLU, 3x3 depthwise conv-BN, 1x1 conv-BN-ReLU, concatenate, shuffle.
    Stride 2: both branches see all c1 input channels (`branch1`: 3x3 depthwise stride-2 + 1x1,
    `branch2` as above with a stride-2 depthwise conv); each gives c2 / 2 channels.
    Yaml args: `[c2, s=1]`. Tensor[B, c1, H, W] -> Tensor[B, c2, H / s, W / s].
    """

    DW_KERNEL = 3

    def __init__(self, c1: int, c2: int, s: int = 1) -> None:
        super().__init__()
        if s not in (1, 2):
            raise UserError(f"ShuffleV2Block stride must be 1 or 2 in the model yaml, got {s}.")
        if c2 % SHUFFLE_GROUPS:
            raise UserError(f"ShuffleV2Block output channels must be even in the model yaml, got {c2}.")
        if s == 1 and c1 != c2:
            raise UserError(
                f"A stride-1 ShuffleV2Block needs equal input and output channels in the model yaml, got {c1} -> {c2}."
            )
        self.stride = s
        half = c2 // SHUFFLE_GROUPS
        branch_in = c1 if s == 2 else c1 // SHUFFLE_GROUPS
        if s == 2:
            self.branch1 = nn.Sequential(
                ConvBNAct(c1, c1, self.DW_KERNEL, s, act=None, g=c1),
                ConvBNAct(c1, half, 1, 1, "relu"),
            )
        self.branch2 = nn.Sequential(
            ConvBNAct(branch_in, half, 1, 1, "relu"),
            ConvBNAct(half, half, self.DW_KERNEL, s, act=None, g=half),
            ConvBNAct(half, half, 1, 1, "relu"),
        )

    @classmethod
    def yaml_args(cls, ch_in: list[int], args: list, n: int, width: float) -> tuple[list, int]:
        c2 = _shuffle_width(args, width)
        return [ch_in[0], c2, *args[1:]], c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: Tensor[B, c1, H, W] -> Tensor[B, c2, H / s, W / s]."""
        if self.stride == 1:
            kept, active = x.chunk(SHUFFLE_GROUPS, dim=1)
            out = torch.cat((kept, self.branch2(active)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, SHUFFLE_GROUPS)


class ShuffleV2Stage(nn.Module):
    """A ShuffleNetV2 stage: one stride-2 unit, then n - 1 stride-1 units (`m`).

    Yaml row `[from, n, ShuffleV2Stage, [c2]]`, e.g. n = 4 / 8 / 4 for the three stages.
    Tensor[B, c1, H, W] -> Tensor[B, c2, H / 2, W / 2].
    """

    repeats = True

    def __init__(self, c1: int, c2: int, n: int = 1) -> None:
        super().__init__()
        units = [ShuffleV2Block(c1, c2, 2)] + [ShuffleV2Block(c2, c2, 1) for _ in range(n - 1)]
        self.m = nn.Sequential(*units)

    @classmethod
    def yaml_args(cls, ch_in: list[int], args: list, n: int, width: float) -> tuple[list, int]:
        c2 = _shuffle_width(args, width)
        return [ch_in[0], c2, n], c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: Tensor[B, c1, H, W] -> Tensor[B, c2, H / 2, W / 2]."""
        return self.m(x)


class SqueezeExcite(nn.Module):
    """MobileNetV3 squeeze-excitation: global mean, 1x1 reduce + ReLU, 1x1 expand + hard-sigmoid,
    then scale the input channels. Tensor[B, C, H, W] -> Tensor[B, C, H, W]."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        squeezed = round_channels(channels / SE_REDUCTION, MOBILE_WIDTH_DIVISOR)
        self.fc1 = nn.Conv2d(channels, squeezed, 1)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(squeezed, channels, 1)
        self.gate = nn.Hardsigmoid(inplace=True)
        _init_conv_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: Tensor[B, C, H, W] -> Tensor[B, C, H, W]."""
        weights = x.mean(dim=(2, 3), keepdim=True)
        return x * self.gate(self.fc2(self.act(self.fc1(weights))))


class MobileV3Block(nn.Module):
    """MobileNetV3 inverted residual ("bneck", Howard et al. 2019, table 2).

    1x1 expansion to `exp` channels (skipped when exp == c1), k x k depthwise conv with stride s,
    optional squeeze-excitation, 1x1 linear projection to c2; identity shortcut when s == 1 and
    c1 == c2. `act` is `relu` or `hswish` for the expansion and depthwise convs.
    Yaml args: `[c2, k, exp, se, act, s]`; c2 and exp are rounded to multiples of 8 times width.
    Tensor[B, c1, H, W] -> Tensor[B, c2, H / s, W / s].
    """

    def __init__(self, c1: int, c2: int, k: int = 3, exp: int = 16, se: bool = False, act: str = "relu", s: int = 1) -> None:
        super().__init__()
        if s not in (1, 2):
            raise UserError(f"MobileV3Block stride must be 1 or 2 in the model yaml, got {s}.")
        if k % 2 == 0:
            raise UserError(f"MobileV3Block kernel size must be odd in the model yaml, got {k}.")
        self.add = s == 1 and c1 == c2
        self.expand = ConvBNAct(c1, exp, 1, 1, act) if exp != c1 else nn.Identity()
        self.dw = ConvBNAct(exp, exp, k, s, act, g=exp)
        self.se = SqueezeExcite(exp) if se else nn.Identity()
        self.project = ConvBNAct(exp, c2, 1, 1, act=None)

    @classmethod
    def yaml_args(cls, ch_in: list[int], args: list, n: int, width: float) -> tuple[list, int]:
        c2 = round_channels(args[0] * width, MOBILE_WIDTH_DIVISOR)
        rest = list(args[1:])
        if len(rest) >= 2:  # the expansion width scales with the model width too
            rest[1] = round_channels(rest[1] * width, MOBILE_WIDTH_DIVISOR)
        return [ch_in[0], c2, *rest], c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: Tensor[B, c1, H, W] -> Tensor[B, c2, H / s, W / s]."""
        out = self.project(self.se(self.dw(self.expand(x))))
        return x + out if self.add else out


BLOCKS: dict[str, type] = {
    "ConvBNAct": ConvBNAct,
    "ShuffleV2Stem": ShuffleV2Stem,
    "ShuffleV2Block": ShuffleV2Block,
    "ShuffleV2Stage": ShuffleV2Stage,
    "MobileV3Block": MobileV3Block,
}
