"""Our checkpoint format: plain dicts that ``torch.load(weights_only=True)`` reads, written atomically.

A checkpoint (format ``yolo-distill/1``, see docs/internals.md) is::

    {'format': 'yolo-distill/1', 'model_yaml': dict, 'state_dict': {key: tensor},
     'names': list[str], 'nc': int, 'epoch': int, 'best_fitness': float,
     'optimizer': optimizer state | None, 'ema': state_dict | None, 'ema_updates': int,
     'opt': dict, 'hyp': dict, 'date': ISO str, 'extra': dict}

It holds only builtins, tensors and OrderedDicts, so reading it never runs code. The model is
rebuilt from ``model_yaml`` and the weights are loaded strictly. :func:`load_model` also reads
official YOLOv9 ``.pt`` files, through the restricted unpickler of ``utils.checkpoint.official``.
"""

from __future__ import annotations

import argparse
import collections
import copy
import datetime
import pickle
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.yolo import DetectionModel
from utils.checkpoint.official import OfficialModel, check_file, exception_text, read_official
from utils.core.atomic import atomic_write
from utils.core.device import unwrap
from utils.core.errors import UserError
from utils.core.log import LOGGER

CHECKPOINT_FORMAT = "yolo-distill/1"
FORMAT_PREFIX = "yolo-distill/"
FORMAT_VERSION = 1
REQUIRED_KEYS = ("model_yaml", "state_dict", "names", "nc")
_PLAIN_SCALARS = (bool, int, float, str, bytes, type(None))


def _plain(value: Any) -> Any:
    """A copy of ``value`` made only of builtins, tensors (CPU) and dicts/lists/tuples.

    numpy scalars (momentum from ``np.interp``, ``best_fitness`` arrays) become Python numbers,
    numpy arrays become tensors, paths and other objects become strings, so that
    ``torch.load(weights_only=True)`` accepts the result.
    """
    if type(value) in _PLAIN_SCALARS:
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy()) if value.dtype.kind in "biuf" else _plain(value.tolist())
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, argparse.Namespace):
        value = vars(value)
    if isinstance(value, Mapping):
        items = ((_plain(k), _plain(v)) for k, v in value.items())
        return collections.OrderedDict(items) if isinstance(value, collections.OrderedDict) else dict(items)
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, (list, set, frozenset)):
        return [_plain(v) for v in value]
    return str(value)


def _weights(state: Mapping[str, torch.Tensor], half: bool) -> dict[str, torch.Tensor]:
    """Detached CPU copies of a state_dict; floating tensors in fp16 when ``half``."""
    out = {}
    for key, tensor in state.items():
        tensor = tensor.detach().to("cpu", copy=True)
        out[key] = tensor.half() if half and tensor.is_floating_point() else tensor
    return out


def _names(names: Any, nc: int) -> list[str]:
    if isinstance(names, Mapping):
        names = [names[k] for k in sorted(names)]
    names = [str(n) for n in (names or [])]
    return names if len(names) == nc else [str(i) for i in range(nc)]


def make_checkpoint(model: nn.Module, *, ema: Any = None, ema_updates: int = 0, optimizer: Any = None,
                    epoch: int = -1, best_fitness: float = 0.0, opt: Any = None, hyp: Any = None,
                    half: bool = True, extra: Any = None) -> dict:
    """Snapshot a DetectionModel (and optionally its training state) as our checkpoint dict.

    Args:
        model: the DetectionModel (DataParallel / DDP / compiled wrappers are unwrapped).
        ema: the EMA model (``nn.Module``), a ``ModelEMA`` (its ``.ema`` and ``.updates`` are
            used) or an EMA state_dict; None for no EMA.
        ema_updates: EMA step count (taken from a ``ModelEMA`` when left at 0).
        optimizer: a ``torch.optim.Optimizer`` or its ``state_dict()``; None to leave it out.
        epoch: last finished epoch; -1 marks a finished (released) model.
        best_fitness: best validation fitness so far (numpy values are accepted).
        opt: the run's options (``argparse.Namespace`` or dict), stored as builtins.
        hyp: hyper-parameters dict.
        half: store floating weights (model and EMA) in fp16; optimizer state keeps its dtype.
        extra: any further builtins/tensors (e.g. RNG state), stored as given.

    Returns:
        the checkpoint dict (CPU tensors, copies: later training does not change it).
    """
    model = unwrap(model)
    if isinstance(ema, nn.Module):
        ema_state = ema.state_dict()
    elif isinstance(getattr(ema, "ema", None), nn.Module):
        ema_state = ema.ema.state_dict()
        ema_updates = ema_updates or int(getattr(ema, "updates", 0))
    elif isinstance(ema, Mapping):
        ema_state = ema
    elif ema is None:
        ema_state = None
    else:
        raise TypeError(f"make_checkpoint: ema must be a module, ModelEMA or state_dict, got {type(ema)}")
    if isinstance(optimizer, torch.optim.Optimizer):
        optimizer = optimizer.state_dict()
    model_yaml = _plain(copy.deepcopy(model.yaml))
    nc = int(getattr(model, "nc", model_yaml.get("nc")))
    return {
        "format": CHECKPOINT_FORMAT,
        "model_yaml": model_yaml,
        "state_dict": _weights(model.state_dict(), half),
        "names": _names(getattr(model, "names", None), nc),
        "nc": nc,
        "epoch": int(epoch),
        "best_fitness": 0.0 if best_fitness is None else float(np.asarray(best_fitness, np.float64).reshape(-1)[0]),
        "optimizer": None if optimizer is None else _plain(optimizer),
        "ema": None if ema_state is None else _weights(ema_state, half),
        "ema_updates": int(ema_updates),
        "opt": _plain(opt if opt is not None else {}),
        "hyp": _plain(hyp if hyp is not None else {}),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "extra": _plain(extra if extra is not None else {}),
    }


def _stripped(ckpt: dict, half: bool) -> dict:
    weights = ckpt.get("ema") or ckpt["state_dict"]
    out = dict(ckpt)
    out.update(state_dict=_weights(weights, half), optimizer=None, ema=None, ema_updates=0, epoch=-1)
    return out


def strip_checkpoint(ckpt: dict | str | Path, out: str | Path | None = None,
                     half: bool = True) -> dict | Path:
    """The release form of a checkpoint: EMA weights (if any) as the model, no optimizer, epoch -1.

    Options, hyper-parameters and ``best_fitness`` are kept as the record of how it was trained.

    Args:
        ckpt: a checkpoint dict (a stripped copy is returned) or a checkpoint file (it is
            rewritten atomically, in place or to ``out``, and the written path is returned).
        out: destination file when ``ckpt`` is a path.
        half: store the weights in fp16.
    """
    if isinstance(ckpt, dict):
        return _stripped(ckpt, half)
    stripped = _stripped(load_checkpoint(ckpt), half)
    return save_checkpoint(stripped, out if out is not None else ckpt)


def save_checkpoint(ckpt: dict, path: str | Path) -> Path:
    """Write ``ckpt`` to ``path`` atomically and durably (``utils.core.atomic``): the file is either the
    old one or the complete new one, and a failed write (disk full, interrupt) leaves no temporary
    file behind. Returns ``path``."""
    return atomic_write(path, lambda f: torch.save(ckpt, f), durable=True)


def _torch_load(path: Path) -> Any | None:
    """``torch.load(weights_only=True)`` of a complete zip archive (see ``check_file``): the object,
    or None when torch's safe unpickler refuses a global (an official YOLOv9 file pickles its
    modules; a malicious one worse): only the restricted reader may then look further, and it
    names what it refuses."""
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the verdict below says enough
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        return None
    except Exception as exc:  # whatever a corrupt archive makes torch raise: bad input, not a bug
        raise UserError(f"{path} is not a readable PyTorch checkpoint ({type(exc).__name__}: {exception_text(exc)}); "
                        f"download or copy it again") from exc


def _check_ours(obj: Any, path: Path) -> dict:
    if not isinstance(obj, dict):
        raise UserError(f"{path} is not a checkpoint: it holds a {type(obj).__name__}, not a dict")
    fmt = obj.get("format")
    if not isinstance(fmt, str) or not fmt.startswith(FORMAT_PREFIX):
        what = "its 'model' entry is not a pickled YOLOv9 model" if "model" in obj else "it holds no model"
        raise UserError(f"{path} is not a yolo-distill checkpoint (no 'format' entry; {what})")
    version = fmt[len(FORMAT_PREFIX):]
    if not version.isdigit() or int(version) > FORMAT_VERSION:
        raise UserError(f"{path} has checkpoint format {fmt!r}; this version reads up to "
                        f"{CHECKPOINT_FORMAT}: update yolo-distill")
    missing = [k for k in REQUIRED_KEYS if k not in obj]
    if missing or not isinstance(obj["model_yaml"], dict) or not isinstance(obj["state_dict"], Mapping) \
            or not isinstance(obj["nc"], int):
        raise UserError(f"{path} is an incomplete yolo-distill checkpoint (missing or bad: "
                        f"{', '.join(missing) or 'model_yaml/state_dict/nc'})")
    return obj


def load_checkpoint(path: str | Path) -> dict:
    """Read one of our checkpoints (``torch.load(weights_only=True)``: no code can run).

    Raises:
        UserError: missing, empty, cut-off or unreadable file, not our format (official YOLOv9 files
            are read by :func:`load_model`), or a pickled global outside the allowlist.
    """
    path = check_file(path)
    obj = _torch_load(path)
    if obj is None:
        read_official(path)  # names a refused global, or says what is wrong with the file
        raise UserError(f"{path} is an official YOLOv9 checkpoint, not a yolo-distill one: use it as "
                        f"--weights or --teacher, or convert it once with "
                        f"'python -m utils.checkpoint convert {path} <out.pt>'")
    return _check_ours(obj, path)


def official_to_checkpoint(path: str | Path, prefer_ema: bool = True) -> dict:
    """An official YOLOv9 ``.pt`` as our checkpoint dict (weights of its EMA or model, no optimizer).

    ``save_checkpoint(official_to_checkpoint(p), out)`` converts a file once, for good.
    """
    official: OfficialModel = read_official(path, prefer_ema=prefer_ema)
    return {
        "format": CHECKPOINT_FORMAT,
        "model_yaml": _plain(official.yaml),
        "state_dict": official.state_dict,
        "names": official.names,
        "nc": official.nc,
        "epoch": official.epoch,
        "best_fitness": official.best_fitness,
        "optimizer": None,
        "ema": None,
        "ema_updates": 0,
        "opt": {},
        "hyp": {},
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "extra": {"source": str(path), "official_branch": official.branch,
                  "official_stride": official.stride, "official_date": official.extra.get("date")},
    }


def _fit_shapes(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Resize Conv2d / BatchNorm2d / Linear layers to the stored tensor shapes (pruned models).

    A pruned model keeps its yaml but has fewer channels in some layers; the stored shapes are
    the truth. Values are filled by the strict ``load_state_dict`` that follows.
    """
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        stored = state.get(prefix + "weight")
        weight = getattr(module, "weight", None)
        if not isinstance(stored, torch.Tensor) or not isinstance(weight, torch.Tensor) \
                or stored.shape == weight.shape or stored.dim() != weight.dim():
            continue
        if isinstance(module, nn.Conv2d):
            per_group_out = module.out_channels // module.groups
            depthwise = module.groups > 1 and module.groups == module.in_channels
            module.out_channels = stored.shape[0]
            if depthwise:
                module.groups = module.out_channels // per_group_out
            module.in_channels = stored.shape[1] * module.groups
        elif isinstance(module, nn.BatchNorm2d):
            module.num_features = stored.shape[0]
        elif isinstance(module, nn.Linear):
            module.out_features, module.in_features = stored.shape
        else:
            continue
        for pname, param in list(module.named_parameters(recurse=False)):
            if prefix + pname in state:
                shape = state[prefix + pname].shape
                setattr(module, pname, nn.Parameter(param.new_empty(shape), param.requires_grad))
        for bname, buf in list(module.named_buffers(recurse=False)):
            if prefix + bname in state and buf is not None:
                setattr(module, bname, buf.new_empty(state[prefix + bname].shape))


def _layer_of(key: str) -> tuple[int, list[str]] | None:
    parts = key.split(".")
    if len(parts) > 2 and parts[0] == "model" and parts[1].isdigit():
        return int(parts[1]), parts[2:]
    return None


def weights_mismatch(model: DetectionModel, weights: Mapping[str, torch.Tensor]) -> str | None:
    """Why ``weights`` do not fit ``model`` (first problem, in the file's key order), or None.

    Names the layer and the key, e.g. ``layer 24 (RepNCSPELAN4) has no m.0 but the file holds
    'model.24.m.0.weight'``.
    """
    own = model.state_dict()
    problems: list[str] = []
    modules = dict(model.named_modules())
    for key, tensor in weights.items():
        if key in own:
            if tuple(own[key].shape) != tuple(tensor.shape):
                where = _layer_of(key)
                layer = f" of layer {where[0]} ({type(model.model[where[0]]).__name__})" if where else ""
                problems.append(f"'{key}'{layer} is {list(tensor.shape)} in the file but {list(own[key].shape)} "
                                f"in the model")
            continue
        where = _layer_of(key)
        if where is None:
            problems.append(f"the file holds '{key}', which the model has no place for")
        elif where[0] >= len(model.model):
            problems.append(f"the file holds '{key}' but the model has only layers 0-{len(model.model) - 1}")
        else:
            layer, rest = where
            path = f"model.{layer}"
            missing = ".".join(rest)
            for depth, part in enumerate(rest[:-1]):
                if f"{path}.{part}" not in modules:
                    missing = ".".join(rest[:depth + 1])
                    break
                path = f"{path}.{part}"
            problems.append(f"layer {layer} ({type(model.model[layer]).__name__}) has no {missing} but the file "
                            f"holds '{key}'")
    missing_keys = [k for k in own if k not in weights]
    if missing_keys:
        where = _layer_of(missing_keys[0])
        layer = f" of layer {where[0]} ({type(model.model[where[0]]).__name__})" if where else ""
        problems.append(f"the file has no '{missing_keys[0]}'{layer}" +
                        (f" (and {len(missing_keys) - 1} more missing)" if len(missing_keys) > 1 else ""))
    if not problems:
        return None
    more = f" ({len(problems) - 1} more mismatches)" if len(problems) > 1 else ""
    return problems[0] + more


def model_from_checkpoint(ckpt: dict, prefer_ema: bool = True, source: str = "checkpoint") -> DetectionModel:
    """Build the DetectionModel a checkpoint dict describes and load its weights (strict).

    Uses the EMA weights when present and ``prefer_ema``. The model is fp32, on the CPU, in
    train mode as built; the global RNG is left as it was (building initialises weights).
    """
    cfg = copy.deepcopy(ckpt["model_yaml"])
    nc = int(ckpt["nc"])
    with torch.random.fork_rng(devices=[]):
        try:
            model = DetectionModel(cfg, ch=int(cfg.get("ch", 3)), nc=nc)
        except UserError as exc:
            raise UserError(f"{source}: its model cannot be built: {exc}") from exc
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as exc:
            raise UserError(f"{source}: its model yaml cannot be built ({type(exc).__name__}: "
                            f"{exception_text(exc)})") from exc
    weights = ckpt.get("ema") if prefer_ema and ckpt.get("ema") else ckpt["state_dict"]
    extra = ckpt.get("extra") or {}
    if not extra.get("official_branch"):
        _fit_shapes(model, weights)  # only our own files can hold pruned shapes
    problem = weights_mismatch(model, weights)
    if problem is not None:
        raise UserError(f"{source}: the weights do not fit the model its yaml describes: {problem}; the "
                        f"weights were built from another yaml")
    model.load_state_dict(weights, strict=True)
    stride = extra.get("official_stride")
    if stride is not None and [float(s) for s in model.stride.tolist()] != [float(s) for s in stride]:
        raise UserError(f"{source}: the model rebuilt from its yaml has strides {model.stride.tolist()} "
                        f"but the file says {stride}")
    model.names = _names(ckpt.get("names"), nc)
    model.nc = nc
    return model


def load_model(path: str | Path, device: str | torch.device = "cpu", fuse: bool = False,
               prefer_ema: bool = True) -> DetectionModel:
    """Load a DetectionModel from our checkpoint or an official YOLOv9 ``.pt``, safely.

    Official files (training, stripped, or converted gelan checkpoints) are read by the
    restricted unpickler of ``utils.checkpoint.official``: module classes become inert records and any
    global outside the allowlist is refused, so the file cannot run code.

    Args:
        path: the ``.pt`` file.
        device: where to put the model.
        fuse: fold RepConvN branches and Conv+BN (inference only).
        prefer_ema: use the EMA weights when the file has them.

    Returns:
        the model in eval mode, fp32, with ``names`` (list[str]) and ``nc`` restored.

    Raises:
        UserError: missing or unreadable file, not a checkpoint, a refused global, or weights
            that do not fit the model the file describes.
    """
    path = check_file(path)
    obj = _torch_load(path)
    # torch refused it (an official YOLOv9 file pickles its modules): only the restricted reader looks further
    ckpt = _check_ours(obj, path) if obj is not None else official_to_checkpoint(path, prefer_ema)
    with torch.random.fork_rng(devices=[]):  # building and fusing draw random initial weights
        model = model_from_checkpoint(ckpt, prefer_ema=prefer_ema, source=str(path)).float()
        if fuse:
            model.fuse()
    return model.to(device).eval()


def convert_checkpoint(src: str | Path, dst: str | Path, prefer_ema: bool = True) -> Path:
    """Rewrite an official YOLOv9 ``.pt`` once as our plain-dict checkpoint (``weights_only`` readable).

    The model is rebuilt from the file's yaml and its weights checked to fit before ``dst`` is
    written (atomically); the EMA weights are taken when the file has them and ``prefer_ema``.
    """
    src, dst = check_file(src), Path(dst)
    if dst.resolve() == src.resolve():
        raise UserError(f"convert {src} {dst}: the output must be another file (keep the official one)")
    if _torch_load(src) is not None:
        raise UserError(f"{src} is already a yolo-distill checkpoint: there is nothing to convert")
    ckpt = official_to_checkpoint(src, prefer_ema)
    with torch.random.fork_rng(devices=[]):
        model_from_checkpoint(ckpt, prefer_ema=prefer_ema, source=str(src))
    return save_checkpoint(ckpt, dst)
