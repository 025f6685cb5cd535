"""Helpers that write "official-shaped" YOLOv9 checkpoints from our own DetectionModel.

Official ``.pt`` files pickle whole modules under the class names of the official code
(``models.yolo.DetectionModel``, ``models.common.RepNCSPELAN4``, ``models.yolo.DualDDetect``,
``models.common.DFL``). Our blocks already live in ``models.common`` with those names; our heads
and DFL live in ``models.heads``, so while saving they are temporarily given the official module
name. The dict layouts follow shared/reference/yolov9/FACTS.md section 3.
"""

from __future__ import annotations

import contextlib
import copy
import io
import pickletools
import sys
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn

OFFICIAL_HEAD_CLASSES = ("DDetect", "DualDDetect", "Detect")
OFFICIAL_MODULES = ("models.common", "models.yolo")
EPOCH = 3
EMA_UPDATES = 120
BEST_FITNESS = 0.4321
WARMUP_MOMENTUM = 0.8
PROBE_SHAPE = (1, 3, 64, 64)
OFFICIAL_DATE = "2024-06-10T12:00:00"

# GLOBALs that FACTS.md section 3 lists for official s-model files (numpy under numpy 2 names)
FACTS_GLOBALS = frozenset(
    [f"models.common.{n}" for n in ("AConv", "Concat", "Conv", "DFL", "ELAN1", "RepConvN", "RepNBottleneck",
                                    "RepNCSP", "RepNCSPELAN4", "SP", "SPPELAN")]
    + ["models.yolo.DetectionModel", "models.yolo.DualDDetect", "models.yolo.DDetect"]
    + [f"torch.nn.modules.{n}" for n in ("activation.SiLU", "batchnorm.BatchNorm2d", "container.Sequential",
                                         "container.ModuleList", "conv.Conv2d", "linear.Identity",
                                         "pooling.MaxPool2d", "upsampling.Upsample")]
    + ["torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_parameter", "torch.HalfStorage",
       "torch.FloatStorage", "torch.LongStorage", "torch.Size", "collections.OrderedDict", "__builtin__.set",
       "_codecs.encode", "numpy._core.multiarray._reconstruct", "numpy._core.multiarray.scalar",
       "numpy.ndarray", "numpy.dtype"])


@contextlib.contextmanager
def official_class_names(model: nn.Module) -> Iterator[None]:
    """While active, every non-torch class in ``model`` pickles under its official global name."""
    restore: list[tuple[type, str]] = []
    added: list[tuple[object, str, object]] = []
    try:
        for cls in {type(m) for m in model.modules()}:
            if cls.__module__.startswith("torch.") or (cls.__module__ in OFFICIAL_MODULES and \
                    getattr(sys.modules[cls.__module__], cls.__name__, None) is cls):
                continue
            target = "models.yolo" if cls.__name__ in OFFICIAL_HEAD_CLASSES else "models.common"
            module = sys.modules[target]
            added.append((module, cls.__name__, getattr(module, cls.__name__, None)))
            setattr(module, cls.__name__, cls)
            restore.append((cls, cls.__module__))
            cls.__module__ = target
        yield
    finally:
        for cls, name in restore:
            cls.__module__ = name
        for module, name, previous in reversed(added):
            if previous is None:
                delattr(module, name)
            else:
                setattr(module, name, previous)


def official_copy(model: nn.Module, *, training: bool) -> nn.Module:
    """An FP16 copy with the attributes official training adds (FACTS.md section 3)."""
    m = copy.deepcopy(model).half().train(training)
    m.names = dict(enumerate(model.names))  # official training stores {index: name}
    m.hyp = {"lr0": 0.01, "box": 7.5, "anchor_t": 5.0, "label_smoothing": 0.0}
    m.class_weights = torch.ones(model.nc)
    head = m.model[-1]
    head._anchor_key = None  # our anchor cache key holds a torch.device, which official files never pickle
    for name, p in m.named_parameters():
        p.requires_grad_(training and ".dfl" not in name)
    if not training:
        head.shape = torch.Size(PROBE_SHAPE)  # set by the official eval forward on the EMA head
    return m


def official_optimizer_state(model: nn.Module) -> dict:
    """SGD state with np.float64 momenta (from the official warmup's np.interp) and one buffer."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.937, nesterov=True)
    state = optimizer.state_dict()
    for group in state["param_groups"]:
        group["momentum"] = np.float64(WARMUP_MOMENTUM)
    state["state"][0] = {"momentum_buffer": torch.zeros_like(params[0], dtype=torch.float32)}
    return state


def save_official(obj: dict, model: nn.Module, path: Path) -> Path:
    """``torch.save`` with the official class names in force."""
    with official_class_names(model):
        torch.save(obj, path)
    return path


def write_training(model: nn.Module, ema: nn.Module, path: Path) -> Path:
    """A per-epoch official checkpoint: raw model (train mode) and EMA, both FP16."""
    ckpt = {
        "epoch": EPOCH,
        "best_fitness": np.array([BEST_FITNESS]),
        "model": official_copy(model, training=True),
        "ema": official_copy(ema, training=False),
        "updates": EMA_UPDATES,
        "optimizer": official_optimizer_state(model),
        "opt": {"epochs": 10, "batch_size": 16, "save_dir": "runs/train/exp", "hyp": {"lr0": 0.01}},
        "git": None,
        "date": OFFICIAL_DATE,
    }
    return save_official(ckpt, model, path)


def write_stripped(ema: nn.Module, path: Path) -> Path:
    """The end-of-training form: model = EMA, optimizer/ema/updates/best_fitness None, epoch -1."""
    ckpt = {"epoch": -1, "best_fitness": None, "model": official_copy(ema, training=False), "ema": None,
            "updates": None, "optimizer": None, "opt": {"epochs": 10}, "git": None, "date": OFFICIAL_DATE}
    return save_official(ckpt, ema, path)


def write_converted(gelan: nn.Module, path: Path, names_as_list: bool = False) -> Path:
    """A reparameterized (gelan layout) checkpoint as the official notebook writes it."""
    m = copy.deepcopy(gelan).half().eval()
    m.names = list(gelan.names) if names_as_list else dict(enumerate(gelan.names))
    m.model[-1]._anchor_key = None
    ckpt = {"model": m, "optimizer": None, "best_fitness": None, "ema": None, "updates": None, "opt": None,
            "git": None, "date": None, "epoch": -1}
    return save_official(ckpt, gelan, path)


def pickle_globals(path: Path) -> set[str]:
    """Every GLOBAL named by the ``data.pkl`` of a torch zip file (static scan, nothing runs)."""
    with zipfile.ZipFile(path) as zf:
        name = next(n for n in zf.namelist() if n.endswith("/data.pkl"))
        data = zf.read(name)
    return {arg.replace(" ", ".") for op, arg, _ in pickletools.genops(io.BytesIO(data))
            if op.name == "GLOBAL"}


def rewrite_pickle(path: Path, old: bytes, new: bytes) -> Path:
    """Replace bytes in the ``data.pkl`` of a torch zip (e.g. to write numpy 1.x global names)."""
    with zipfile.ZipFile(path) as zf:
        records = [(info.filename, zf.read(info)) for info in zf.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, data in records:
            zf.writestr(name, data.replace(old, new) if name.endswith("/data.pkl") else data)
    return path
