"""Building blocks of the YOLOv9 / GELAN family (plus a few YOLOv5-style blocks).

Attribute names (``conv``, ``bn``, ``cv1``..., ``m``) follow the YOLO world on purpose: official
checkpoints address their weights through them (e.g. ``model.4.cv2.0.m.0.cv1.conv1.conv.weight``).
All feature maps are ``Tensor[B, C, H, W]``.

Channel protocol (see docs/internals.md): the yaml parser builds a block as
``cls(c_in, c_out, *args[1:])`` unless the class defines ``yaml_args``; ``repeats = True`` means
the block takes the yaml ``number`` as its third argument.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

CHANNEL_DIVISOR = 8  # yaml widths are rounded up to a multiple of this after width scaling
SMOOTH_POOL = 2  # AConv / ADown: a 2x2 stride-1 average pool smooths before the stride-2 step
DOWN_POOL_KERNEL, DOWN_POOL_STRIDE = 3, 2  # ADown's max-pool half


def make_divisible(x: float, divisor: int) -> int:
    """Round ``x`` up to the nearest multiple of ``divisor``."""
    return int(math.ceil(x / divisor) * divisor)


def autopad(k: int | Sequence[int], p: int | Sequence[int] | None = None,
            d: int = 1) -> int | list[int]:
    """'Same' padding for kernel ``k`` and dilation ``d`` unless ``p`` is given explicitly."""
    if p is not None:
        return p
    if d > 1:
        k = d * (k - 1) + 1 if isinstance(k, int) else [d * (x - 1) + 1 for x in k]
    return k // 2 if isinstance(k, int) else [x // 2 for x in k]


def fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [C2, C1/g, kh, kw], bias [C2]) of ``conv`` followed by eval-mode ``bn`` (or none)."""
    with torch.no_grad():
        bias = conv.bias if conv.bias is not None else torch.zeros(
            conv.out_channels, device=conv.weight.device, dtype=conv.weight.dtype)
        if bn is None:
            return conv.weight.detach(), bias.detach()
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        return conv.weight * scale.view(-1, 1, 1, 1), bn.bias + (bias - bn.running_mean) * scale


def conv_like(conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor) -> nn.Conv2d:
    """A Conv2d with the geometry of ``conv`` and the given weight / bias (no random init)."""
    out = torch.nn.utils.skip_init(nn.Conv2d, conv.in_channels, conv.out_channels, conv.kernel_size,
                                   conv.stride, conv.padding, conv.dilation, conv.groups, bias=True,
                                   device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        out.weight.copy_(weight)
        out.bias.copy_(bias)
    return out


def fuse_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """Fold an eval-mode BatchNorm into the preceding convolution; returns a new Conv2d with bias."""
    return conv_like(conv, *fold_bn(conv, bn))


def make_act(act: bool | nn.Module) -> nn.Module:
    """The activation of a conv block: SiLU for True, the module itself, or Identity for False."""
    if act is True:
        return nn.SiLU()
    return act if isinstance(act, nn.Module) else nn.Identity()


class Conv(nn.Module):
    """Conv2d (no bias) -> BatchNorm2d -> SiLU. ``act=False`` gives Identity, a module is used as is.

    ``fuse()`` folds the BN into ``conv`` (which then has a bias) and drops ``bn``.
    """

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, p: int | None = None, g: int = 1,
                 d: int = 1, act: bool | nn.Module = True):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p, d), groups=g, dilation=d, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = make_act(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        return self.act(x)

    def fuse(self) -> None:
        """Fold ``bn`` into ``conv`` in place (no-op when already fused)."""
        if self.bn is not None:
            self.conv = fuse_conv_bn(self.conv, self.bn)
            self.bn = None

    def equivalent_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight [C2, C1/g, k, k], bias [C2]) of the conv with the BN folded in, fused or not."""
        return fold_bn(self.conv, self.bn)


class AConv(nn.Module):
    """Downsample x2: a 2x2 stride-1 average pool (smoothing) then a 3x3 stride-2 Conv."""

    def __init__(self, c1: int, c2: int):
        super().__init__()
        self.cv1 = Conv(c1, c2, 3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.avg_pool2d(x, SMOOTH_POOL, 1, 0, False, True)
        return self.cv1(x)


class ADown(nn.Module):
    """Downsample x2 on two halves of the channels: strided 3x3 Conv, and max-pool + 1x1 Conv."""

    def __init__(self, c1: int, c2: int):
        super().__init__()
        self.c = c2 // 2
        self.cv1 = Conv(c1 // 2, self.c, 3, 2, 1)
        self.cv2 = Conv(c1 // 2, self.c, 1, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.avg_pool2d(x, SMOOTH_POOL, 1, 0, False, True)
        x1, x2 = x.chunk(2, 1)
        x1 = self.cv1(x1)
        x2 = self.cv2(F.max_pool2d(x2, DOWN_POOL_KERNEL, DOWN_POOL_STRIDE, DOWN_POOL_KERNEL // 2))
        return torch.cat((x1, x2), 1)


class RepConvN(nn.Module):
    """Re-parameterisable 3x3 conv: SiLU(BN(3x3) + BN(1x1)) in training, one 3x3 conv once fused.

    The identity branch of RepVGG is not used (``bn`` stays None). After ``fuse()`` the sum is a
    single Conv2d with bias in ``conv`` and ``conv1`` / ``conv2`` are gone.
    """

    def __init__(self, c1: int, c2: int, k: int = 3, s: int = 1, p: int = 1, g: int = 1,
                 d: int = 1, act: bool | nn.Module = True, bn: bool = False, deploy: bool = False):
        super().__init__()
        if k != 3 or p != 1:
            raise ValueError("RepConvN supports only a 3x3 kernel with padding 1")
        self.g, self.c1, self.c2 = g, c1, c2
        self.act = make_act(act)
        self.bn = None
        self.conv1 = Conv(c1, c2, k, s, p=p, g=g, act=False)
        self.conv2 = Conv(c1, c2, 1, s, p=p - k // 2, g=g, act=False)
        self.register_module("conv", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is not None:
            return self.act(self.conv(x))
        return self.act(self.conv1(x) + self.conv2(x))

    def fuse(self) -> None:
        """Merge both branches into one 3x3 Conv2d with bias (in place, idempotent)."""
        if self.conv is not None:
            return
        k3, b3 = self.conv1.equivalent_kernel_bias()
        k1, b1 = self.conv2.equivalent_kernel_bias()
        # the 1x1 kernel sits at the centre of the 3x3 one: pad one pixel on each side
        fused = conv_like(self.conv1.conv, k3 + F.pad(k1, [1, 1, 1, 1]), b3 + b1)
        self.conv = fused
        self.conv1 = None
        self.conv2 = None


class Bottleneck(nn.Module):
    """YOLOv5 bottleneck: Conv k[0] -> Conv k[1], with a residual when shapes allow."""

    first_conv: type[nn.Module] = Conv

    def __init__(self, c1: int, c2: int, shortcut: bool = True, g: int = 1,
                 k: tuple[int, int] = (3, 3), e: float = 0.5):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = self.first_conv(c1, c_, k[0], 1)
        self.cv2 = Conv(c_, c2, k[1], 1, g=g)
        self.add = shortcut and c1 == c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class RepNBottleneck(Bottleneck):
    """Bottleneck whose first conv is a RepConvN (no identity branch)."""

    first_conv = RepConvN


class C3(nn.Module):
    """CSP block with 3 convs: cv3(cat(m(cv1 x), cv2 x)), ``m`` = ``n`` Bottlenecks."""

    repeats = True
    bottleneck: type[nn.Module] = Bottleneck

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True, g: int = 1,
                 e: float = 0.5):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c1, c_, 1, 1)
        self.cv3 = Conv(2 * c_, c2, 1)
        self.m = nn.Sequential(*(self.bottleneck(c_, c_, shortcut, g, e=1.0) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class RepNCSP(C3):
    """C3 built from RepNBottlenecks (the inner block of RepNCSPELAN4)."""

    bottleneck = RepNBottleneck


class _ELANBase(nn.Module):
    """Shared ELAN data flow: cv1 -> split in halves a, b -> cv2(b) -> cv3(cv2(b)) -> cat -> cv4."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = list(self.cv1(x).chunk(2, 1))
        parts.append(self.cv2(parts[-1]))
        parts.append(self.cv3(parts[-1]))
        return self.cv4(torch.cat(parts, 1))


class ELAN1(_ELANBase):
    """ELAN block whose two stages are plain 3x3 Convs.

    Args: c1 in, c2 out, c3 width after cv1 (split in two halves), c4 width of the 3x3 stages.
    """

    def __init__(self, c1: int, c2: int, c3: int, c4: int):
        super().__init__()
        self.c = c3 // 2
        self.cv1 = Conv(c1, c3, 1, 1)
        self.cv2 = Conv(c3 // 2, c4, 3, 1)
        self.cv3 = Conv(c4, c4, 3, 1)
        self.cv4 = Conv(c3 + 2 * c4, c2, 1, 1)


class RepNCSPELAN4(_ELANBase):
    """GELAN block: an ELAN whose stages are RepNCSP (``c5`` bottlenecks) followed by a 3x3 Conv.

    Args as ELAN1, plus c5 = number of RepNBottlenecks in each RepNCSP.
    """

    def __init__(self, c1: int, c2: int, c3: int, c4: int, c5: int = 1):
        super().__init__()
        self.c = c3 // 2
        self.cv1 = Conv(c1, c3, 1, 1)
        self.cv2 = nn.Sequential(RepNCSP(c3 // 2, c4, c5), Conv(c4, c4, 3, 1))
        self.cv3 = nn.Sequential(RepNCSP(c4, c4, c5), Conv(c4, c4, 3, 1))
        self.cv4 = Conv(c3 + 2 * c4, c2, 1, 1)


class SP(nn.Module):
    """Stride-1 max pool with 'same' padding (one stage of SPPELAN)."""

    def __init__(self, k: int = 3, s: int = 1):
        super().__init__()
        self.m = nn.MaxPool2d(kernel_size=k, stride=s, padding=k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.m(x)


class SPPELAN(nn.Module):
    """Spatial pyramid pooling as an ELAN: cv1, three chained 5x5 max pools, concat all, cv5."""

    POOL_KERNEL = 5

    def __init__(self, c1: int, c2: int, c3: int):
        super().__init__()
        self.c = c3
        self.cv1 = Conv(c1, c3, 1, 1)
        self.cv2 = SP(self.POOL_KERNEL)
        self.cv3 = SP(self.POOL_KERNEL)
        self.cv4 = SP(self.POOL_KERNEL)
        self.cv5 = Conv(4 * c3, c2, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [self.cv1(x)]
        for pool in (self.cv2, self.cv3, self.cv4):
            parts.append(pool(parts[-1]))
        return self.cv5(torch.cat(parts, 1))


class SPPF(nn.Module):
    """YOLOv5 fast SPP: 1x1 Conv to c1/2, three chained k x k max pools, concat, 1x1 Conv."""

    def __init__(self, c1: int, c2: int, k: int = 5):
        super().__init__()
        c_ = c1 // 2
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c_ * 4, c2, 1, 1)
        self.m = nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [self.cv1(x)]
        for _ in range(3):
            parts.append(self.m(parts[-1]))
        return self.cv2(torch.cat(parts, 1))


class Concat(nn.Module):
    """Concatenate a list of tensors along ``dimension`` (channels by default)."""

    def __init__(self, dimension: int = 1):
        super().__init__()
        self.d = dimension

    @classmethod
    def yaml_args(cls, ch_in: list[int], args: list, n: int, width: float) -> tuple[list, int]:
        return list(args), sum(ch_in)

    def forward(self, x: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(x, self.d)


class Silence(nn.Module):
    """Identity layer; gives the input image a layer index that later layers can reference."""

    @classmethod
    def yaml_args(cls, ch_in: list[int], args: list, n: int, width: float) -> tuple[list, int]:
        return [], ch_in[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class CBLinear(nn.Module):
    """One 1x1 conv (with bias) whose output is split into chunks of widths ``c2s``.

    Returns a tuple of ``Tensor[B, c2s[i], H, W]``; CBFuse later picks one chunk per source.
    """

    def __init__(self, c1: int, c2s: Sequence[int], k: int = 1, s: int = 1, p: int | None = None,
                 g: int = 1):
        super().__init__()
        self.c2s = list(c2s)
        self.conv = nn.Conv2d(c1, sum(self.c2s), k, s, autopad(k, p), groups=g, bias=True)

    @classmethod
    def yaml_args(cls, ch_in: list[int], args: list, n: int, width: float) -> tuple[list, list[int]]:
        widths = args[0] if isinstance(args[0], (list, tuple)) else [args[0]]
        c2s = [make_divisible(c * width, CHANNEL_DIVISOR) for c in widths]
        return [ch_in[0], c2s, *args[1:]], c2s

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.conv(x).split(self.c2s, dim=1)


class CBFuse(nn.Module):
    """Sum the last input with chunk ``idx[i]`` of each earlier CBLinear output (nearest-resized).

    Input: ``[cblinear_out_0, ..., cblinear_out_{k-1}, x]``; output has the shape of ``x``.
    """

    def __init__(self, idx: Sequence[int]):
        super().__init__()
        self.idx = list(idx)

    @classmethod
    def yaml_args(cls, ch_in: list, args: list, n: int, width: float) -> tuple[list, int]:
        return list(args), ch_in[-1]

    def forward(self, xs: list) -> torch.Tensor:
        target = xs[-1]
        out = target
        for source, chunk in zip(xs[:-1], self.idx):
            out = out + F.interpolate(source[chunk], size=target.shape[2:], mode="nearest")
        return out


BLOCKS: dict[str, type] = {
    cls.__name__: cls
    for cls in (Conv, AConv, ADown, RepConvN, Bottleneck, RepNBottleneck, C3, RepNCSP, ELAN1,
                RepNCSPELAN4, SP, SPPELAN, SPPF, Concat, Silence, CBLinear, CBFuse)
}
