"""Official YOLOv9 checkpoint files, written the way the public code writes them, without its code.

The public code (WongKinYiu/yolov9) pickles whole modules: a file holds a graph of
``models.common.*``, ``models.yolo.*`` and ``torch.nn.modules.*`` objects whose ``__dict__`` is what
``nn.Module`` and each block's ``__init__`` set. This module rebuilds that graph from the measured
facts (``shared/reference/yolov9/FACTS.md`` sections 1-3 and 5, ``LAYERS.md``) with stand-in
classes that pickle under the official global names:

- every block has the attributes of FACTS section 5 in their order (the state_dict keys and their
  order are checked against the measured key lists), and every layer the plain attributes
  ``i``, ``f``, ``type``, ``np``;
- ``Conv`` and ``RepConvN`` take their activation from a class attribute ``default_act``: one
  SiLU object per class is referenced from every such block, so the module graph is a DAG;
- the head keeps ``stride`` as a plain tensor, ``_apply`` (``.half()``) turns the class-level
  ``anchors``/``strides`` into instance tensors, and an eval forward (validation on the EMA) sets
  ``shape`` (a ``torch.Size``) and the anchor tensors;
- the files are written by ``torch.save`` (pickle protocol 2, fp16 storages, ``LongStorage``
  for ``num_batches_tracked``), with numpy 2 or numpy 1.x global names, torch 2.x or 1.13 module
  attributes, and storages tagged ``cuda:0`` for a checkpoint of a GPU run.

Each stand-in also computes its forward from the block descriptions of FACTS section 5, so the
tests compare our ``DetectionModel`` with an independent implementation of the pickled graph.
Nothing here imports our ``models`` package; model rows are read from the yaml files as data.
"""

from __future__ import annotations

import contextlib
import copy
import copyreg
import functools
import io
import math
import pickle
import pickletools
import sys
import types
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
MODEL_YAMLS = ROOT / "models" / "detect"
OFFICIAL_COMMON, OFFICIAL_YOLO = "models.common", "models.yolo"
MODEL_NAMES = tuple(f"{family}-{size}" for family in ("yolov9", "gelan") for size in "tsmce")

REG_MAX = 16  # DFL bins per box side
BOX_GROUPS = 4  # grouped second conv and output conv of the box branch
MIN_BOX_HIDDEN = 16
MAX_CLS_HIDDEN = 128
PRIOR_OBJECTS, PRIOR_SIZE = 5, 640  # bias_init: about 5 objects per 640x640 image
CHANNEL_ROUND = 8  # make_divisible(args[0] * width, 8)
STRIDE_PROBE = 64  # the official probe uses 256; any multiple of 32 gives the same strides
KNOWN_STRIDES = (8.0, 16.0, 32.0)  # FACTS section 1
ANCHOR_OFFSET = 0.5
BN_EPS, BN_MOMENTUM = 1e-3, 0.03
INPLACE_ACTS = (nn.Hardswish, nn.LeakyReLU, nn.ReLU, nn.ReLU6, nn.SiLU)
NARROW_FACTOR = 8  # "narrow" fixtures divide every width of a yaml by this (rounded up to 8)

# what official training adds (FACTS section 3); values are arbitrary but of the right types
EPOCH, EMA_UPDATES = 3, 120
BEST_FITNESS = 0.4321
WARMUP_MOMENTUM, WARMUP_LR = 0.8, 0.0042
DATE = "2024-06-10T12:00:00.000000"
GPU_LOCATION = "cuda:0"
HYP = {"lr0": 0.01, "lrf": 0.01, "momentum": 0.937, "weight_decay": 0.0005, "box": 7.5, "cls": 0.5,
       "dfl": 1.5, "mosaic": 1.0, "anchor_t": 5.0, "label_smoothing": 0.0}
# nn.Module attributes torch 1.13 pickles (torch 2.x adds more hook dicts)
TORCH1_MODULE_KEYS = ("training", "_parameters", "_buffers", "_non_persistent_buffers_set", "_backward_hooks",
                      "_is_full_backward_hook", "_forward_hooks", "_forward_pre_hooks", "_state_dict_hooks",
                      "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks", "_modules")
TORCH1_RECORDS = ("data.pkl", "version")
NUMPY2_CORE, NUMPY1_CORE = "numpy._core.multiarray", "numpy.core.multiarray"
SILU_GLOBAL = "torch.nn.modules.activation SiLU"


def _official(module: str):
    """Class decorator: instances pickle as ``module.ClassName`` (the official global)."""
    def mark(cls: type) -> type:
        cls.__module__ = module
        return cls
    return mark


def _divisible(x: float, divisor: int) -> int:
    return int(math.ceil(x / divisor) * divisor)


def _same_pad(k: int, p: int | None, d: int = 1) -> int:
    return p if p is not None else (d * (k - 1) + 1) // 2


def _activation(owner: type, act: Any) -> nn.Module:
    """True -> the class-level ``default_act`` (one object shared by all blocks of the class)."""
    if act is True:
        return owner.default_act
    return act if isinstance(act, nn.Module) else nn.Identity()


# ------------------------------------------------------------------------------ models.common
@_official(OFFICIAL_COMMON)
class Conv(nn.Module):
    default_act = nn.SiLU()

    def __init__(self, c1, c2, k=1, s=1, p=None, g=1, d=1, act=True):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, _same_pad(k, p, d), groups=g, dilation=d, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = _activation(Conv, act)

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


@_official(OFFICIAL_COMMON)
class AConv(nn.Module):
    def __init__(self, c1, c2):
        super().__init__()
        self.cv1 = Conv(c1, c2, 3, 2, 1)

    def forward(self, x):
        return self.cv1(F.avg_pool2d(x, 2, 1, 0))


@_official(OFFICIAL_COMMON)
class ADown(nn.Module):
    def __init__(self, c1, c2):
        super().__init__()
        self.c = c2 // 2
        self.cv1 = Conv(c1 // 2, self.c, 3, 2, 1)
        self.cv2 = Conv(c1 // 2, self.c, 1, 1, 0)

    def forward(self, x):
        first, second = F.avg_pool2d(x, 2, 1, 0).chunk(2, 1)
        return torch.cat((self.cv1(first), self.cv2(F.max_pool2d(second, 3, 2, 1))), 1)


@_official(OFFICIAL_COMMON)
class RepConvN(nn.Module):
    default_act = nn.SiLU()

    def __init__(self, c1, c2, k=3, s=1, p=1, g=1, d=1, act=True, bn=False, deploy=False):
        super().__init__()
        self.g, self.c1, self.c2 = g, c1, c2
        self.act = _activation(RepConvN, act)
        self.bn = None  # the identity branch is never built
        self.conv1 = Conv(c1, c2, k, s, p=p, g=g, act=False)
        self.conv2 = Conv(c1, c2, 1, s, p=p - k // 2, g=g, act=False)

    def forward(self, x):
        return self.act(self.conv1(x) + self.conv2(x))


@_official(OFFICIAL_COMMON)
class RepNBottleneck(nn.Module):
    def __init__(self, c1, c2, shortcut=True, g=1, k=(3, 3), e=0.5):
        super().__init__()
        hidden = int(c2 * e)
        self.cv1 = RepConvN(c1, hidden, k[0], 1)
        self.cv2 = Conv(hidden, c2, k[1], 1, g=g)
        self.add = shortcut and c1 == c2

    def forward(self, x):
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


@_official(OFFICIAL_COMMON)
class RepNCSP(nn.Module):
    def __init__(self, c1, c2, n=1, shortcut=True, g=1, e=0.5):
        super().__init__()
        hidden = int(c2 * e)
        self.cv1 = Conv(c1, hidden, 1, 1)
        self.cv2 = Conv(c1, hidden, 1, 1)
        self.cv3 = Conv(2 * hidden, c2, 1)
        self.m = nn.Sequential(*[RepNBottleneck(hidden, hidden, shortcut, g, e=1.0) for _ in range(n)])

    def forward(self, x):
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


def _elan_forward(block: nn.Module, x: torch.Tensor, last: str) -> torch.Tensor:
    """cv1 -> halves a, b -> cv2(b) -> cv3(cv2(b)) -> concatenate all four -> ``last``."""
    parts = list(block.cv1(x).chunk(2, 1))
    for stage in (block.cv2, block.cv3):
        parts.append(stage(parts[-1]))
    return getattr(block, last)(torch.cat(parts, 1))


@_official(OFFICIAL_COMMON)
class ELAN1(nn.Module):
    def __init__(self, c1, c2, c3, c4):
        super().__init__()
        self.c = c3 // 2
        self.cv1 = Conv(c1, c3, 1, 1)
        self.cv2 = Conv(c3 // 2, c4, 3, 1)
        self.cv3 = Conv(c4, c4, 3, 1)
        self.cv4 = Conv(c3 + 2 * c4, c2, 1, 1)

    def forward(self, x):
        return _elan_forward(self, x, "cv4")


@_official(OFFICIAL_COMMON)
class RepNCSPELAN4(nn.Module):
    def __init__(self, c1, c2, c3, c4, c5=1):
        super().__init__()
        self.c = c3 // 2
        self.cv1 = Conv(c1, c3, 1, 1)
        self.cv2 = nn.Sequential(RepNCSP(c3 // 2, c4, c5), Conv(c4, c4, 3, 1))
        self.cv3 = nn.Sequential(RepNCSP(c4, c4, c5), Conv(c4, c4, 3, 1))
        self.cv4 = Conv(c3 + 2 * c4, c2, 1, 1)

    def forward(self, x):
        return _elan_forward(self, x, "cv4")


@_official(OFFICIAL_COMMON)
class SP(nn.Module):
    def __init__(self, k=3, s=1):
        super().__init__()
        self.m = nn.MaxPool2d(kernel_size=k, stride=s, padding=k // 2)

    def forward(self, x):
        return self.m(x)


@_official(OFFICIAL_COMMON)
class SPPELAN(nn.Module):
    def __init__(self, c1, c2, c3):
        super().__init__()
        self.c = c3
        self.cv1 = Conv(c1, c3, 1, 1)
        self.cv2, self.cv3, self.cv4 = SP(5), SP(5), SP(5)
        self.cv5 = Conv(4 * c3, c2, 1, 1)

    def forward(self, x):
        parts = [self.cv1(x)]
        for pool in (self.cv2, self.cv3, self.cv4):
            parts.append(pool(parts[-1]))
        return self.cv5(torch.cat(parts, 1))


@_official(OFFICIAL_COMMON)
class Concat(nn.Module):
    def __init__(self, dimension=1):
        super().__init__()
        self.d = dimension

    def forward(self, x):
        return torch.cat(x, self.d)


@_official(OFFICIAL_COMMON)
class Silence(nn.Module):
    def forward(self, x):
        return x


@_official(OFFICIAL_COMMON)
class CBLinear(nn.Module):
    def __init__(self, c1, c2s, k=1, s=1, p=None, g=1):
        super().__init__()
        self.c2s = c2s
        self.conv = nn.Conv2d(c1, sum(c2s), k, s, _same_pad(k, p), groups=g, bias=True)

    def forward(self, x):
        return self.conv(x).split(self.c2s, dim=1)


@_official(OFFICIAL_COMMON)
class CBFuse(nn.Module):
    def __init__(self, idx):
        super().__init__()
        self.idx = idx

    def forward(self, xs):
        size = xs[-1].shape[2:]
        parts = [F.interpolate(x[self.idx[i]], size=size, mode="nearest") for i, x in enumerate(xs[:-1])]
        return torch.stack(parts + xs[-1:]).sum(0)


@_official(OFFICIAL_COMMON)
class DFL(nn.Module):
    def __init__(self, c1=17):
        super().__init__()
        self.conv = nn.Conv2d(c1, 1, 1, bias=False).requires_grad_(False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.arange(c1, dtype=torch.float).view(1, c1, 1, 1))
        self.c1 = c1

    def forward(self, x):
        b, _, a = x.shape
        return self.conv(x.view(b, 4, self.c1, a).transpose(2, 1).softmax(1)).view(b, 4, a)


# ------------------------------------------------------------------------------ models.yolo heads
def _anchor_grid(maps: list[torch.Tensor], strides: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cell centres ``[A, 2]`` (x, y in grid units; P3 row-major first) and strides ``[A, 1]``."""
    points, per_anchor = [], []
    for m, s in zip(maps, strides):
        h, w = m.shape[2:]
        ys = torch.arange(h, dtype=m.dtype, device=m.device) + ANCHOR_OFFSET
        xs = torch.arange(w, dtype=m.dtype, device=m.device) + ANCHOR_OFFSET
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack((grid_x, grid_y), -1).view(-1, 2))
        per_anchor.append(torch.full((h * w, 1), float(s), dtype=m.dtype, device=m.device))
    return torch.cat(points), torch.cat(per_anchor)


def _branch(ch: list[int], nc: int) -> tuple[nn.ModuleList, nn.ModuleList]:
    """Box and class convs of one head branch, widths as FACTS section 1 'Head widths'."""
    box = _divisible(max(ch[0] // 4, 4 * REG_MAX, MIN_BOX_HIDDEN), BOX_GROUPS)
    cls = max(ch[0], min(2 * nc, MAX_CLS_HIDDEN))
    return (nn.ModuleList(nn.Sequential(Conv(c, box, 3), Conv(box, box, 3, g=BOX_GROUPS),
                                        nn.Conv2d(box, 4 * REG_MAX, 1, groups=BOX_GROUPS)) for c in ch),
            nn.ModuleList(nn.Sequential(Conv(c, cls, 3), Conv(cls, cls, 3), nn.Conv2d(cls, nc, 1)) for c in ch))


class _HeadBase(nn.Module):
    """What DDetect and DualDDetect share; this base never appears in a pickle."""

    dynamic = False
    export = False
    shape = None
    anchors = torch.empty(0)
    strides = torch.empty(0)

    def _setup(self, nc: int, nl: int, inplace: bool) -> None:
        self.nc, self.nl, self.reg_max = nc, nl, REG_MAX
        self.no = nc + 4 * REG_MAX
        self.inplace = inplace
        self.stride = torch.zeros(nl)

    def _maps(self, xs, box, cls) -> list[torch.Tensor]:
        return [torch.cat((box[i](xs[i]), cls[i](xs[i])), 1) for i in range(self.nl)]

    def _decode(self, maps: list[torch.Tensor], dfl: nn.Module) -> torch.Tensor:
        """``[B, 4 + nc, A]``: cx, cy, w, h in pixels, then sigmoid class scores."""
        shape = maps[0].shape
        if self.dynamic or self.shape != shape:
            self.anchors, self.strides = (t.transpose(0, 1) for t in _anchor_grid(maps, self.stride))
            self.shape = shape
        flat = torch.cat([m.view(shape[0], self.no, -1) for m in maps], 2)
        box, cls = flat.split((4 * REG_MAX, self.nc), 1)
        left_top, right_bottom = dfl(box).chunk(2, 1)
        anchors = self.anchors.unsqueeze(0)
        corner1, corner2 = anchors - left_top, anchors + right_bottom
        boxes = torch.cat(((corner1 + corner2) / 2, corner2 - corner1), 1) * self.strides
        return torch.cat((boxes, cls.sigmoid()), 1)

    def branches(self) -> list[tuple[nn.ModuleList, nn.ModuleList]]:
        raise NotImplementedError


@_official(OFFICIAL_YOLO)
class DDetect(_HeadBase):
    def __init__(self, nc=80, ch=(), inplace=True):
        super().__init__()
        self._setup(nc, len(ch), inplace)
        self.cv2, self.cv3 = _branch(list(ch), nc)
        self.dfl = DFL(REG_MAX)

    def branches(self):
        return [(self.cv2, self.cv3)]

    def forward(self, x):
        maps = self._maps(x, self.cv2, self.cv3)
        if self.training:
            return maps
        y = self._decode(maps, self.dfl)
        return y if self.export else (y, maps)


@_official(OFFICIAL_YOLO)
class DualDDetect(_HeadBase):
    def __init__(self, nc=80, ch=(), inplace=True):
        super().__init__()
        self._setup(nc, len(ch) // 2, inplace)
        self.cv2, self.cv3 = _branch(list(ch[:self.nl]), nc)
        self.cv4, self.cv5 = _branch(list(ch[self.nl:]), nc)
        self.dfl = DFL(REG_MAX)
        self.dfl2 = DFL(REG_MAX)

    def branches(self):
        return [(self.cv2, self.cv3), (self.cv4, self.cv5)]

    def forward(self, x):
        aux = self._maps(x[:self.nl], self.cv2, self.cv3)
        main = self._maps(x[self.nl:], self.cv4, self.cv5)
        if self.training:
            return [aux, main]
        y = [self._decode(aux, self.dfl), self._decode(main, self.dfl2)]
        return y if self.export else (y, [aux, main])


HEADS = (DDetect, DualDDetect)
BLOCKS = {cls.__name__: cls for cls in (Conv, AConv, ADown, RepConvN, RepNBottleneck, RepNCSP, ELAN1,
                                        RepNCSPELAN4, SP, SPPELAN, Concat, Silence, CBLinear, CBFuse, DFL,
                                        DDetect, DualDDetect)}
BLOCKS["nn.Upsample"] = nn.Upsample
OUT_WIDTH_BLOCKS = (Conv, AConv, ADown, ELAN1, RepNCSPELAN4, SPPELAN)  # args[0] = output width


def _build_layers(cfg: dict, in_ch: int) -> tuple[nn.Sequential, list[int]]:
    """The official yaml rules (FACTS section 1): only ``args[0]`` of a block is width-scaled and
    rounded up to 8; CBLinear widths are used as written; heads get the list of input widths."""
    nc, width, depth = cfg["nc"], cfg["width_multiple"], cfg["depth_multiple"]
    words = {"None": None, "nc": nc, "True": True, "False": False}
    ch, layers, save = [in_ch], [], []
    for i, (f, n, name, args) in enumerate(cfg["backbone"] + cfg["head"]):
        cls = BLOCKS[name]
        args = [words.get(a, a) if isinstance(a, str) else a for a in args]
        n = max(round(n * depth), 1) if n > 1 else n
        froms = [f] if isinstance(f, int) else f
        if cls in OUT_WIDTH_BLOCKS:
            c2 = _divisible(args[0] * width, CHANNEL_ROUND)
            args = [ch[f], c2, *args[1:]]
        elif cls is Concat:
            c2 = sum(ch[j] for j in f)
        elif cls is CBLinear:
            c2 = args[0]
            args = [ch[f], c2, *args[1:]]
        elif cls is CBFuse:
            c2 = ch[f[-1]]
        elif cls in HEADS:
            args.append([ch[j] for j in f])
            c2 = 0
        else:  # Silence, nn.Upsample
            c2 = ch[f]
        layer = nn.Sequential(*(cls(*args) for _ in range(n))) if n > 1 else cls(*args)
        layer.i, layer.f = i, f
        layer.type = f"{cls.__module__}.{cls.__qualname__}"
        layer.np = sum(p.numel() for p in layer.parameters())
        save.extend(j % i for j in froms if j != -1)
        layers.append(layer)
        if i == 0:
            ch = []
        ch.append(c2)
    return nn.Sequential(*layers), sorted(save)


@_official(OFFICIAL_YOLO)
class DetectionModel(nn.Module):
    def __init__(self, cfg: dict, yaml_file: str, ch: int = 3, nc: int | None = None, probe: bool = True):
        super().__init__()
        self.yaml_file = yaml_file
        self.yaml = copy.deepcopy(cfg)
        in_ch = self.yaml["ch"] = self.yaml.get("ch", ch)
        if nc and nc != self.yaml["nc"]:
            self.yaml["nc"] = nc
        self.model, self.save = _build_layers(copy.deepcopy(self.yaml), in_ch)
        self.names = [str(i) for i in range(self.yaml["nc"])]
        self.inplace = self.yaml.get("inplace", True)
        head = self.model[-1]
        head.inplace = self.inplace
        # strides from one train-mode forward (this also leaves BN running_var 0.9, as FACTS says);
        # a structure-only build on the meta device takes the known ones (its forward is slow)
        if probe:
            out = self.forward(torch.zeros(1, in_ch, STRIDE_PROBE, STRIDE_PROBE))
            strides = [STRIDE_PROBE / m.shape[-2] for m in (out[0] if isinstance(head, DualDDetect) else out)]
        else:
            strides = list(KNOWN_STRIDES)
        head.stride = torch.tensor(strides)
        self.stride = head.stride
        for box, cls in head.branches():  # bias_init, on every branch
            for box_seq, cls_seq, s in zip(box, cls, strides):
                with torch.no_grad():
                    box_seq[-1].bias.fill_(1.0)
                    cls_seq[-1].bias[:head.nc] = math.log(PRIOR_OBJECTS / head.nc / (PRIOR_SIZE / s) ** 2)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eps, m.momentum = BN_EPS, BN_MOMENTUM
            elif isinstance(m, INPLACE_ACTS):
                m.inplace = True

    def forward(self, x):
        outputs = []
        for m in self.model:
            if m.f != -1:
                x = outputs[m.f] if isinstance(m.f, int) else [x if j == -1 else outputs[j] for j in m.f]
            x = m(x)
            outputs.append(x if m.i in self.save else None)
        return x

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        head = self.model[-1]
        head.stride, head.anchors, head.strides = fn(head.stride), fn(head.anchors), fn(head.strides)
        return self


# ------------------------------------------------------------------------------ building models
@functools.lru_cache(maxsize=None)
def _model_rows(name: str) -> dict:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return yaml.load((MODEL_YAMLS / f"{name}.yaml").read_text(), Loader=loader)


def official_yaml(name: str, narrow: bool = False) -> dict:
    """The yaml dict of an official model as the public code loads it (``anchors: 3`` included).

    ``narrow`` divides every width by NARROW_FACTOR (rounded up to 8): the same rows and blocks
    (ADown, CBLinear, CBFuse, Silence ...) at a fraction of the size, for fast tests.
    """
    cfg = copy.deepcopy(_model_rows(name))
    cfg = {"nc": cfg["nc"], "depth_multiple": cfg["depth_multiple"], "width_multiple": cfg["width_multiple"],
           "anchors": 3, "backbone": cfg["backbone"], "head": cfg["head"]}
    if narrow:
        def thin(c: int) -> int:
            return _divisible(c / NARROW_FACTOR, CHANNEL_ROUND)
        widths = {"Conv": 1, "AConv": 1, "ADown": 1, "ELAN1": 3, "RepNCSPELAN4": 3, "SPPELAN": 2}
        for row in cfg["backbone"] + cfg["head"]:
            module, args = row[2], row[3]
            if module in widths:
                row[3] = [thin(a) for a in args[:widths[module]]] + args[widths[module]:]
            elif module == "CBLinear":
                row[3] = [[thin(c) for c in args[0]], *args[1:]]
    return cfg


@contextlib.contextmanager
def _no_conv_init() -> Iterator[None]:
    """Conv2d layers keep uninitialised memory (a structure-only build touches no weight pages)."""
    original = nn.modules.conv._ConvNd.reset_parameters
    nn.modules.conv._ConvNd.reset_parameters = lambda self: None
    try:
        yield
    finally:
        nn.modules.conv._ConvNd.reset_parameters = original


def build(name: str, nc: int, narrow: bool = False, seed: int = 0, structure_only: bool = False) -> DetectionModel:
    """A freshly built official model, with BN statistics and affine terms as after training.

    ``structure_only`` skips weight initialisation and the stride probe (the conv weights are
    uninitialised memory): for counting parameters and keys, or for a model whose every weight is
    loaded next.
    """
    torch.manual_seed(seed)
    with _no_conv_init() if structure_only else contextlib.nullcontext():
        model = DetectionModel(official_yaml(name, narrow), f"{name}.yaml", nc=nc, probe=not structure_only)
    if not structure_only:
        gen = torch.Generator().manual_seed(seed)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                with torch.no_grad():
                    m.running_mean.copy_(torch.randn(c, generator=gen) * 0.2)
                    m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
                    m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                    m.bias.copy_(torch.randn(c, generator=gen) * 0.2)
                    m.num_batches_tracked.fill_(int(torch.randint(1, 10_000, (1,), generator=gen)))
    return model


def add_training_attributes(model: DetectionModel, names: list[str]) -> DetectionModel:
    """What train_dual.py sets on the model (FACTS section 3): nc, hyp, class_weights, names dict."""
    model.nc = len(names)
    model.hyp = dict(HYP)
    model.class_weights = torch.rand(len(names)) * len(names)
    model.names = dict(enumerate(names))
    return model


def make_ema(weights: DetectionModel, trained: DetectionModel, probe: int = STRIDE_PROBE) -> DetectionModel:
    """ModelEMA: a deep copy of ``weights`` in eval mode without gradients, the attributes that
    ``update_attr`` copies from the ``trained`` model, and one validation (eval) forward, which
    leaves ``shape``, ``anchors`` and ``strides`` on the head."""
    ema = copy.deepcopy(weights).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    for key in ("yaml", "nc", "hyp", "names", "stride", "class_weights"):
        if hasattr(trained, key):
            setattr(ema, key, getattr(trained, key))
    with torch.no_grad():
        ema(torch.zeros(1, ema.yaml["ch"], probe, probe))
    return ema


def optimizer_state(model: DetectionModel) -> dict:
    """``optimizer.state_dict()`` of the official SGD (3 groups: biases, decayed weights, BN
    weights) after some warmup steps: momentum buffers, and lr/momentum as ``np.float64``."""
    biases, weights, norms = [], [], []
    for module in model.modules():
        if hasattr(module, "bias") and isinstance(module.bias, nn.Parameter):
            biases.append(module.bias)
        if isinstance(module, nn.BatchNorm2d):
            norms.append(module.weight)
        elif hasattr(module, "weight") and isinstance(module.weight, nn.Parameter) and module.weight.requires_grad:
            weights.append(module.weight)
    optimizer = torch.optim.SGD(biases, lr=HYP["lr0"], momentum=HYP["momentum"], nesterov=True)
    optimizer.add_param_group({"params": weights, "weight_decay": HYP["weight_decay"]})
    optimizer.add_param_group({"params": norms, "weight_decay": 0.0})
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = torch.full_like(p, 1e-3)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    state = optimizer.state_dict()
    for group in state["param_groups"]:
        group["initial_lr"] = HYP["lr0"]
        group["lr"] = np.float64(WARMUP_LR)  # np.interp in the warmup
        group["momentum"] = np.float64(WARMUP_MOMENTUM)
    return state


def _as_saved(model: nn.Module, training: bool) -> nn.Module:
    """``deepcopy(model).half()`` as a checkpoint stores it."""
    return copy.deepcopy(model).half().train(training)


def reparameterized(dual: DetectionModel, narrow: bool = False, seed: int = 0) -> DetectionModel:
    """tools/reparameterization.ipynb (FACTS section 2): a fresh gelan-X gets the dual model's
    layers (shifted past Silence for m/c, past the aux neck for e) and its main head branch."""
    size = dual.yaml_file.removesuffix(".yaml").rsplit("-", 1)[1]
    # every weight is copied below, so the fresh model needs no initialisation
    gelan = build(f"gelan-{size}", nc=dual.yaml["nc"], narrow=narrow, seed=seed + 1, structure_only=True)
    head = len(gelan.model) - 1
    if size in "ts":
        source_layer = {i: i for i in range(head)}
    elif size in "mc":
        source_layer = {i: i + 1 for i in range(head)}
    else:
        source_layer = {i: (i if i < 29 else i + 7) for i in range(head)}
    source_layer[head] = len(dual.model) - 1
    head_names = {"cv2": "cv4", "cv3": "cv5", "dfl": "dfl2"}
    source = dual.state_dict()
    target = {}
    for key in gelan.state_dict():
        _, layer, rest = key.split(".", 2)
        if int(layer) == head:
            first, tail = rest.split(".", 1)
            rest = f"{head_names[first]}.{tail}"
        target[key] = source[f"model.{source_layer[int(layer)]}.{rest}"]
    gelan.load_state_dict(target)
    gelan.names = copy.deepcopy(dual.names)
    gelan.nc = dual.yaml["nc"]
    return gelan.eval()


# ------------------------------------------------------------------------------ writing files
@contextlib.contextmanager
def official_globals() -> Iterator[None]:
    """While active, ``models.common`` / ``models.yolo`` resolve to the stand-ins, so that the
    pickler (which checks that a class is importable under its name) writes the official globals."""
    fakes = {}
    for module_name in (OFFICIAL_COMMON, OFFICIAL_YOLO):
        fake = types.ModuleType(module_name)
        for cls in list(BLOCKS.values()) + [DetectionModel]:
            if cls.__module__ == module_name:
                setattr(fake, cls.__name__, cls)
        fakes[module_name] = fake
    saved = {name: sys.modules.get(name) for name in fakes}
    sys.modules.update(fakes)
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def _rename_numpy_globals(data: bytes) -> bytes:
    """The same pickle as numpy 1.x writes it: GLOBAL ``numpy.core.multiarray`` for ``numpy._core``."""
    out, last = [], 0
    for opcode, arg, pos in pickletools.genops(data):
        if opcode.name == "GLOBAL" and arg.startswith(NUMPY2_CORE + " "):
            module, name = arg.split(" ")
            out.append(data[last:pos])
            out.append(b"c" + NUMPY1_CORE.encode() + b"\n" + name.encode() + b"\n")
            last = pos + 1 + len(module) + 1 + len(name) + 1
    out.append(data[last:])
    return b"".join(out)


def _pickle_module(numpy1: bool, torch1: bool) -> types.ModuleType:
    """A ``pickle_module`` for torch.save: the C pickler, optionally writing numpy 1.x global names
    and the nn.Module attributes of torch 1.13."""

    class Pickler(pickle.Pickler):
        def __init__(self, file, protocol=None):
            self._target, self._buffer = file, io.BytesIO()
            super().__init__(self._buffer if numpy1 else file, protocol=protocol)

        def reducer_override(self, obj):
            if torch1 and isinstance(obj, nn.Module):
                state = {k: v for k, v in obj.__getstate__().items()
                         if not k.startswith("_") or k in TORCH1_MODULE_KEYS}
                return copyreg.__newobj__, (type(obj),), state
            return NotImplemented

        def dump(self, obj):
            super().dump(obj)
            if numpy1:
                self._target.write(_rename_numpy_globals(self._buffer.getvalue()))

    module = types.ModuleType("official_pickle")
    module.Pickler = Pickler
    return module


@contextlib.contextmanager
def _storage_location(location: str | None) -> Iterator[None]:
    """Tag every storage with ``location`` (a GPU run saves 'cuda:0' storages)."""
    if location is None:
        yield
        return
    import torch.serialization as serialization
    original = serialization.location_tag
    serialization.location_tag = lambda storage: location
    try:
        yield
    finally:
        serialization.location_tag = original


def save(obj: Any, path: Path, *, numpy1: bool = False, torch1: bool = False, location: str | None = None) -> Path:
    """``torch.save(obj, path)`` (pickle protocol 2, as the official code calls it) with the official
    globals, numpy 1.x names, torch 1.x module attributes and records, or GPU storage tags."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with official_globals(), _storage_location(location):
        torch.save(obj, path, pickle_module=_pickle_module(numpy1, torch1), pickle_protocol=2)
    if torch1:  # torch 1.x archives hold data.pkl, data/<key> and version only (no byteorder record)
        with zipfile.ZipFile(path) as zf:
            records = [(i.filename, zf.read(i)) for i in zf.infolist()
                       if i.filename.split("/", 1)[1] in TORCH1_RECORDS or "/data/" in i.filename]
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
            for name, data in records:
                zf.writestr(name, data)
    return path


# ------------------------------------------------------------------------------ the layouts
@dataclass
class OfficialFile:
    """A written file and what the official loader (``ckpt['ema'] or ckpt['model']``) would see.

    ``graph`` is a float copy of the pickled module graph that the loader should pick, ``raw`` the
    one of ``ckpt['model']`` when it differs (training checkpoints); ``state_dict`` is the picked
    model's state_dict as stored (fp16).
    """

    path: Path
    name: str
    layout: str
    names: list[str]
    graph: DetectionModel
    state_dict: dict[str, torch.Tensor]
    raw: DetectionModel | None = None
    raw_state_dict: dict[str, torch.Tensor] | None = None
    extra: dict = field(default_factory=dict)


def _float_graph(saved: nn.Module) -> nn.Module:
    return copy.deepcopy(saved).float()


def write_training(path: Path, model: DetectionModel, names: list[str], *, numpy1: bool = False,
                   torch1: bool = False) -> OfficialFile:
    """A per-epoch checkpoint of train_dual.py: the raw model (train mode) and the EMA (the weights
    of ``model``), both fp16; SGD state with numpy scalars; ``best_fitness`` a numpy array;
    storages tagged as on the GPU."""
    raw = add_training_attributes(copy.deepcopy(model), names)
    with torch.no_grad():  # the raw model has moved on from the EMA: other weights
        for p in raw.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.01)
    saved_model = _as_saved(raw, training=True)
    saved_ema = _as_saved(make_ema(model, raw), training=False)
    ckpt = {"epoch": EPOCH, "best_fitness": np.array([BEST_FITNESS]), "model": saved_model, "ema": saved_ema,
            "updates": EMA_UPDATES, "optimizer": optimizer_state(raw),
            "opt": {"weights": "", "cfg": f"models/detect/{model.yaml_file}", "data": "data/bccd.yaml",
                    "hyp": dict(HYP), "epochs": 10, "batch_size": 16, "imgsz": 640, "device": "0",
                    "save_dir": "runs/train/exp", "close_mosaic": 15},
            "git": None, "date": DATE}
    save(ckpt, path, numpy1=numpy1, torch1=torch1, location=GPU_LOCATION)
    return OfficialFile(path, model.yaml_file.removesuffix(".yaml"), "training", list(names),
                        _float_graph(saved_ema), saved_ema.state_dict(), _float_graph(saved_model),
                        saved_model.state_dict())


def write_stripped(path: Path, model: DetectionModel, names: list[str], *, numpy1: bool = False) -> OfficialFile:
    """strip_optimizer's output: ``model`` = the EMA, fp16, no gradients; ema/optimizer/updates/
    best_fitness None, epoch -1."""
    saved = _as_saved(make_ema(model, add_training_attributes(copy.deepcopy(model), names)), training=False)
    ckpt = {"epoch": -1, "best_fitness": None, "model": saved, "ema": None, "updates": None,
            "optimizer": None, "opt": {"epochs": 10, "hyp": dict(HYP)}, "git": None, "date": DATE}
    save(ckpt, path, numpy1=numpy1)
    return OfficialFile(path, model.yaml_file.removesuffix(".yaml"), "stripped", list(names),
                        _float_graph(saved), saved.state_dict())


def write_converted(path: Path, dual: DetectionModel, names: list[str], narrow: bool = False) -> OfficialFile:
    """A ``*-converted.pt``: the reparameterized gelan model, fp16, eval, epoch -1, no torch.Size.

    ``extra['source']`` is the dual model with the same fp16-rounded weights, for comparisons.
    """
    gelan = reparameterized(add_training_attributes(copy.deepcopy(dual), names), narrow)
    saved = gelan.half()
    ckpt = {"model": saved, "optimizer": None, "best_fitness": None, "ema": None, "updates": None,
            "opt": None, "git": None, "date": None, "epoch": -1}
    save(ckpt, path)
    return OfficialFile(path, dual.yaml_file.removesuffix(".yaml") + "-converted", "converted", list(names),
                        _float_graph(saved), saved.state_dict(),
                        extra={"source": copy.deepcopy(dual).half().float().eval()})


# ------------------------------------------------------------------------------ inspecting files
def pickle_bytes(path: Path) -> bytes:
    with zipfile.ZipFile(path) as zf:
        name = next(n for n in zf.namelist() if n.endswith("/data.pkl"))
        return zf.read(name)


def pickle_globals(path: Path) -> set[str]:
    """Every GLOBAL named by the ``data.pkl`` of a torch zip file (static scan, nothing runs)."""
    return {arg.replace(" ", ".") for op, arg, _ in pickletools.genops(pickle_bytes(path)) if op.name == "GLOBAL"}


def shared_modules(model: nn.Module) -> list[tuple[str, int]]:
    """``(class name, number of parents)`` of every module object that several parents reference."""
    parents: dict[int, int] = {}
    objects: dict[int, nn.Module] = {}
    stack, seen = [model], set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        for child in node._modules.values():
            if child is not None:
                parents[id(child)] = parents.get(id(child), 0) + 1
                objects[id(child)] = child
                stack.append(child)
    return sorted((type(objects[k]).__name__, n) for k, n in parents.items() if n > 1)


def count_instances(data: bytes, cls: str) -> int:
    """How many objects of class ``cls`` ('module name', as pickletools writes a GLOBAL) a protocol 2
    pickle creates: each is ``<cls> EMPTY_TUPLE NEWOBJ``, the class pushed by GLOBAL or a memo GET."""
    memo: set[int] = set()
    pushes_class: list[bool] = []
    count = 0
    for opcode, arg, _ in pickletools.genops(data):
        previous = pushes_class[-1] if pushes_class else False
        if opcode.name == "GLOBAL":
            pushed = arg == cls
        elif opcode.name in ("BINPUT", "LONG_BINPUT", "PUT"):
            pushed = previous  # a PUT leaves the class on the stack
            if previous:
                memo.add(arg)
        elif opcode.name in ("BINGET", "LONG_BINGET", "GET"):
            pushed = arg in memo
        else:
            pushed = False
            if opcode.name == "NEWOBJ" and len(pushes_class) >= 2 and pushes_class[-2]:
                count += 1
        pushes_class.append(pushed)
    return count


def rewrite_pickle(path: Path, data: bytes) -> Path:
    """Replace the ``data.pkl`` of a torch zip (crafted files), keeping every other record."""
    with zipfile.ZipFile(path) as zf:
        records = [(info.filename, zf.read(info)) for info in zf.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, record in records:
            zf.writestr(name, data if name.endswith("/data.pkl") else record)
    return path
