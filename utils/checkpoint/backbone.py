"""Pretrained student backbones: torchvision's ImageNet ShuffleNetV2 / MobileNetV3 weights in our blocks.

The student blocks of ``models/backbones.py`` hold the same convolutions and BatchNorms as
torchvision's ``ShuffleNetV2`` and ``MobileNetV3`` classes, in the same order, under other names.
:func:`backbone_key_map` pairs every tensor of a student's backbone with the torchvision
state_dict key of the same layer::

    torchvision ShuffleNetV2                ours (rows ShuffleV2Stem, ShuffleV2Stage x 3)
      conv1.0 / conv1.1 (conv / BN)           model.0.conv.conv / model.0.conv.bn
      stageK.U.branch1.{0,1 | 2,3}            model.<K-1>.m.U.branch1.{0 | 1}.{conv, bn}
      stageK.U.branch2.{0,1 | 3,4 | 5,6}      model.<K-1>.m.U.branch2.{0 | 1 | 2}.{conv, bn}
      conv5, fc                               none: the detector's neck and head replace them
    torchvision MobileNetV3                 ours (rows ConvBNAct, MobileV3Block ...)
      features.0.{0,1}                        model.0.{conv, bn}
      features.I.block.J: expand, depthwise,  model.I.{expand, dw, se.fc1/fc2, project}
        SE fc1/fc2, project (J counts only
        the parts the block has)
      features.<last> (1x1 conv), classifier  none: the detector's neck and head replace them

torchvision's ShuffleNetV2 BatchNorms use eps 1e-5, ours 1e-3 (``models.yolo.BN_EPS``). The eps
is not stored in a checkpoint (the model is rebuilt from its yaml), so instead of changing it the
loader stores ``running_var + 1e-5 - 1e-3``: BatchNorm only ever uses ``running_var + eps``, so
the layer computes what torchvision's does, in eval mode and after any reload.

A weights source is a file (a state_dict saved by ``torch.save(model.state_dict(), f)``, as
torchvision's download files are), ``imagenet`` (torchvision's own weights API downloads the file
of the matching architecture into torch's hub cache), or ``none`` (random init, overriding a
``backbone_weights`` key of the model yaml).
"""

from __future__ import annotations

import argparse
import functools
import os
import pickle
import socket
import threading
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from models.backbones import ConvBNAct, MobileV3Block, ShuffleV2Block, ShuffleV2Stage, ShuffleV2Stem
from utils.checkpoint.official import exception_text
from utils.core.errors import UserError
from utils.core.log import LOGGER

IMAGENET = "imagenet"  # name: torchvision's default ImageNet weights of the matching architecture
NO_WEIGHTS = "none"  # name: random init even when the model yaml names backbone weights
YAML_KEY = "backbone_weights"
FLAG = "--backbone-weights"
FETCH_TIMEOUT_S = 15.0  # name lookup, connection and each read of the download; offline fails within it
BN_ENTRIES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
SHUFFLENET, MOBILENET = "ShuffleNetV2", "MobileNetV3"
# BatchNorm eps the torchvision classes are built with (ShuffleNetV2: BatchNorm2d's default;
# MobileNetV3: BatchNorm2d(eps=0.001)); their weights were trained with it
TORCHVISION_BN_EPS = {SHUFFLENET: 1e-5, MOBILENET: 1e-3}
SHOWN_NAMES = 4  # module names quoted in a message before "..."


@dataclass(frozen=True)
class Variant:
    """One torchvision architecture with ImageNet weights: its builder, weights enum and family."""

    builder: str  # torchvision.models function, e.g. "shufflenet_v2_x0_5"
    weights_enum: str  # torchvision.models class, e.g. "ShuffleNet_V2_X0_5_Weights"
    family: str  # SHUFFLENET or MOBILENET


VARIANTS: tuple[Variant, ...] = (
    Variant("shufflenet_v2_x0_5", "ShuffleNet_V2_X0_5_Weights", SHUFFLENET),
    Variant("shufflenet_v2_x1_0", "ShuffleNet_V2_X1_0_Weights", SHUFFLENET),
    Variant("shufflenet_v2_x1_5", "ShuffleNet_V2_X1_5_Weights", SHUFFLENET),
    Variant("shufflenet_v2_x2_0", "ShuffleNet_V2_X2_0_Weights", SHUFFLENET),
    Variant("mobilenet_v3_small", "MobileNet_V3_Small_Weights", MOBILENET),
    Variant("mobilenet_v3_large", "MobileNet_V3_Large_Weights", MOBILENET),
)


@dataclass
class LoadReport:
    """What one load did: tensors of the backbone filled from the file, left as they were, and
    tensors of the file that have no place in the backbone."""

    source: str  # the file read
    variant: str  # torchvision builder the file is, or "a <family> state_dict"
    layers: list[int]  # backbone layer indices
    loaded: list[str] = field(default_factory=list)  # our keys
    missing: list[str] = field(default_factory=list)  # our backbone keys the file does not fill
    unexpected: list[str] = field(default_factory=list)  # file keys with no counterpart

    def line(self) -> str:
        """The one log line: counts, and the modules behind the missing and unexpected keys."""
        text = (f"backbone weights {self.source} ({self.variant}) -> layers {self.layers[0]}-{self.layers[-1]}: "
                f"loaded {len(self.loaded)}, missing {len(self.missing)}")
        if self.missing:
            text += f" ({_modules(self.missing)}: left at random init)"
        text += f", unexpected {len(self.unexpected)}"
        if self.unexpected:
            text += f" ({_modules(self.unexpected)}: no counterpart in the detector, not used)"
        return text


def _modules(keys: list[str]) -> str:
    """Short module names for a list of state_dict keys: 'conv5, fc' or 'model.3.m.4, ...'."""
    names: list[str] = []
    for key in keys:
        parts = key.split(".")
        depth = 2 if parts[0] in ("features", "model") or parts[0].startswith("stage") else 1
        if parts[0] == "model" and len(parts) > 3 and parts[2] == "m":
            depth = 4  # one unit of one of our stages
        name = ".".join(parts[:depth])
        if name not in names:
            names.append(name)
    shown = ", ".join(names[:SHOWN_NAMES])
    return shown + (", ..." if len(names) > SHOWN_NAMES else "")


# ----------------------------------------------------------------------------- key mapping


def _conv_bn(ours: str, tv_conv: str, tv_bn: str) -> dict[str, str]:
    """Keys of one ConvBNAct at prefix ``ours`` -> torchvision's conv and BatchNorm keys."""
    keys = {f"{ours}.conv.weight": f"{tv_conv}.weight"}
    keys.update({f"{ours}.bn.{entry}": f"{tv_bn}.{entry}" for entry in BN_ENTRIES})
    return keys


def _shufflenet_keys(backbone: list[nn.Module]) -> dict[str, str]:
    """Our key -> torchvision ShuffleNetV2 key, for a stem at row 0 followed by stages."""
    keys: dict[str, str] = {}
    stage = 2  # torchvision names its stages stage2, stage3, stage4
    for i, layer in enumerate(backbone):
        row = f"model.{i}"
        if isinstance(layer, ShuffleV2Stem) and i == 0:
            keys.update(_conv_bn(f"{row}.conv", "conv1.0", "conv1.1"))
        elif isinstance(layer, ShuffleV2Stage):
            for u, unit in enumerate(layer.m):
                ours, tv = f"{row}.m.{u}", f"stage{stage}.{u}"
                if unit.stride == 2:  # torchvision branch1: dw conv 0, BN 1, 1x1 conv 2, BN 3, ReLU 4
                    keys.update(_conv_bn(f"{ours}.branch1.0", f"{tv}.branch1.0", f"{tv}.branch1.1"))
                    keys.update(_conv_bn(f"{ours}.branch1.1", f"{tv}.branch1.2", f"{tv}.branch1.3"))
                # torchvision branch2: 1x1 conv 0, BN 1, ReLU 2, dw conv 3, BN 4, 1x1 conv 5, BN 6, ReLU 7
                for j, (conv, bn) in enumerate(((0, 1), (3, 4), (5, 6))):
                    keys.update(_conv_bn(f"{ours}.branch2.{j}", f"{tv}.branch2.{conv}", f"{tv}.branch2.{bn}"))
            stage += 1
    return keys


def _mobilenet_keys(backbone: list[nn.Module]) -> dict[str, str]:
    """Our key -> torchvision MobileNetV3 key; backbone row I is torchvision's ``features.I``."""
    keys: dict[str, str] = {}
    for i, layer in enumerate(backbone):
        ours, tv = f"model.{i}", f"features.{i}"
        if isinstance(layer, ConvBNAct):  # torchvision Conv2dNormActivation: conv 0, BN 1
            keys.update(_conv_bn(ours, f"{tv}.0", f"{tv}.1"))
        elif isinstance(layer, MobileV3Block):
            j = 0  # torchvision numbers only the parts a block has
            if not isinstance(layer.expand, nn.Identity):
                keys.update(_conv_bn(f"{ours}.expand", f"{tv}.block.{j}.0", f"{tv}.block.{j}.1"))
                j += 1
            keys.update(_conv_bn(f"{ours}.dw", f"{tv}.block.{j}.0", f"{tv}.block.{j}.1"))
            j += 1
            if not isinstance(layer.se, nn.Identity):
                for fc in ("fc1", "fc2"):
                    for entry in ("weight", "bias"):
                        keys[f"{ours}.se.{fc}.{entry}"] = f"{tv}.block.{j}.{fc}.{entry}"
                j += 1
            keys.update(_conv_bn(f"{ours}.project", f"{tv}.block.{j}.0", f"{tv}.block.{j}.1"))
    return keys


def backbone_layers(model: nn.Module) -> list[nn.Module]:
    """The layers of the model yaml's ``backbone`` list."""
    return list(model.model[:len(model.yaml.get("backbone") or [])])


def backbone_family(model: nn.Module) -> str:
    """SHUFFLENET or MOBILENET from the backbone's blocks; UserError for any other backbone."""
    layers = backbone_layers(model)
    if any(isinstance(m, (ShuffleV2Stem, ShuffleV2Stage, ShuffleV2Block)) for m in layers):
        return SHUFFLENET
    if any(isinstance(m, MobileV3Block) for m in layers):
        return MOBILENET
    first = type(layers[0]).__name__ if layers else "nothing"
    raise UserError(f"{FLAG}: the backbone of {model.yaml_file or 'this model'} (layer 0: {first}) is neither "
                    f"ShuffleNetV2 nor MobileNetV3 blocks; pretrained backbones fit yolov9-tiny.yaml, "
                    f"yolov9-tiny-1.0x.yaml and mobilenetv3-small.yaml")


def backbone_key_map(model: nn.Module) -> tuple[str, dict[str, str]]:
    """``(family, {our state_dict key: torchvision state_dict key})`` for the model's backbone."""
    family = backbone_family(model)
    layers = backbone_layers(model)
    return family, (_shufflenet_keys(layers) if family == SHUFFLENET else _mobilenet_keys(layers))


@functools.lru_cache(maxsize=None)
def torchvision_shapes(builder: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a torchvision model's state_dict (built on the meta device: no memory, no init)."""
    import torchvision.models

    with torch.device("meta"):
        model = getattr(torchvision.models, builder)(weights=None)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def matching_variant(family: str, key_map: dict[str, str], own: Mapping[str, torch.Tensor]) -> Variant | None:
    """The torchvision architecture of ``family`` that has every mapped key, each in our shape."""
    for variant in VARIANTS:
        shapes = torchvision_shapes(variant.builder) if variant.family == family else {}
        if shapes and all(shapes.get(tv) == tuple(own[ours].shape) for ours, tv in key_map.items()):
            return variant
    return None


def describe_state(state: Mapping[str, torch.Tensor]) -> str:
    """What a state_dict is: a torchvision builder name, a family, or 'no ... state_dict'."""
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    for variant in VARIANTS:
        if torchvision_shapes(variant.builder) == shapes:
            return f"torchvision {variant.builder}"
    if "stage2.0.branch2.0.weight" in state:
        return f"a {SHUFFLENET} state_dict of another width or depth"
    if "features.1.block.0.0.weight" in state or "features.0.0.weight" in state:
        return f"a {MOBILENET}-like state_dict of another layout"
    return f"no torchvision {SHUFFLENET} or {MOBILENET} state_dict (its first keys: {_modules(list(state))})"


# ----------------------------------------------------------------------------- sources


def read_state_dict(path: Path, what: str) -> dict[str, torch.Tensor]:
    """A state_dict file (``torch.load(weights_only=True)``: reading it runs no code).

    Accepts a plain ``{key: Tensor}`` (torchvision's files), ``{'state_dict': {...}}``, and keys
    that all start with ``module.`` (saved from DataParallel). UserError for anything else.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UserError(f"{what}: {path} holds pickled objects, not a state_dict; save one with "
                        f"torch.save(model.state_dict(), file)") from exc
    except Exception as exc:  # whatever a corrupt or foreign file makes torch raise: bad input, not a bug
        raise UserError(f"{what}: {path} is not a readable PyTorch file ({type(exc).__name__}: "
                        f"{exception_text(exc)})") from exc
    if isinstance(obj, Mapping) and isinstance(obj.get("format"), str) and "state_dict" in obj:
        raise UserError(f"{what}: {path} is a yolo-distill checkpoint, not a torchvision backbone file; "
                        f"start from it with --weights")
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not (isinstance(obj, Mapping) and obj and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                     for k, v in obj.items())):
        raise UserError(f"{what}: {path} is not a state_dict (a dict of tensors, as "
                        f"torch.save(model.state_dict(), file) writes)")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def _name_lookup_problem(host: str, timeout: float) -> str | None:
    """None when ``host`` resolves within ``timeout`` seconds, else why not (a name lookup has no
    socket timeout of its own, so it runs in a thread that is given up after ``timeout``)."""
    outcome: list[str | None] = []

    def lookup() -> None:
        try:
            socket.getaddrinfo(host, 443)
            outcome.append(None)
        except OSError as exc:
            outcome.append(f"{type(exc).__name__}: {exception_text(exc)}")

    thread = threading.Thread(target=lookup, daemon=True)
    thread.start()
    thread.join(timeout)
    return outcome[0] if outcome else f"no answer for {host} within {timeout:.0f} s"


def cached_weights_path(url: str) -> Path:
    """Where torch.hub keeps (and first looks for) the file of ``url``: <hub dir>/checkpoints/<name>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def fetch_imagenet(variant: Variant, what: str) -> tuple[dict[str, torch.Tensor], Path]:
    """torchvision's default ImageNet weights of ``variant`` through its weights API: read from
    torch's hub cache, else downloaded into it. Offline: UserError naming the URL and the cache path."""
    import torchvision.models

    weights = getattr(torchvision.models, variant.weights_enum).DEFAULT
    cached = cached_weights_path(weights.url)
    advice = (f"on a machine with internet download {weights.url} and put it at {cached} "
              f"(or pass {FLAG} <that file>)")
    if not cached.is_file():
        problem = _name_lookup_problem(urlparse(weights.url).hostname or "", FETCH_TIMEOUT_S)
        if problem:
            raise UserError(f"{what}: cannot download torchvision's {variant.builder} ImageNet weights, the "
                            f"machine looks offline ({problem}); {advice}")
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(FETCH_TIMEOUT_S)  # urllib's connect and reads then give up instead of hanging
    try:
        state = weights.get_state_dict(progress=True, check_hash=True, weights_only=True)
    except OSError as exc:  # URLError, timeouts, refused or reset connections
        reason = getattr(exc, "reason", exc)
        raise UserError(f"{what}: cannot download torchvision's {variant.builder} ImageNet weights "
                        f"({type(exc).__name__}: {exception_text(reason)}); {advice}") from exc
    except Exception as exc:  # a hash mismatch or a damaged cached file: torch raises several types
        raise UserError(f"{what}: torchvision's {variant.builder} ImageNet weights at {cached} cannot be read "
                        f"({type(exc).__name__}: {exception_text(exc)}); delete the file and try again") from exc
    finally:
        socket.setdefaulttimeout(previous)
    return dict(state), cached


# ----------------------------------------------------------------------------- loading


def _shift_running_var(model: nn.Module, key: str, value: torch.Tensor, family: str) -> torch.Tensor:
    """torchvision's running_var stored for our BatchNorm's eps: var + eps_tv - eps_ours, so that
    var + eps, the only use BatchNorm makes of it, is unchanged (see the module docstring)."""
    bn = model.get_submodule(key.rsplit(".", 1)[0])
    return value.double().add(TORCHVISION_BN_EPS[family] - bn.eps).to(value.dtype)


def load_backbone_weights(model: nn.Module, source: str | Path, what: str = FLAG) -> LoadReport:
    """Load torchvision ShuffleNetV2 / MobileNetV3 weights into the model's backbone (in place).

    Args:
        model: a ``DetectionModel`` whose yaml backbone is built from our ShuffleNetV2 or
            MobileNetV3 blocks (not fused).
        source: a state_dict file, or ``imagenet`` for torchvision's weights of the matching
            architecture (downloaded through torchvision's weights API when not in torch's cache).
        what: how the user named the source, for messages (the flag or the yaml key).
    Returns:
        the report, also logged as one line.
    Raises:
        UserError: the backbone is not one of those, the file or download cannot be read, a
            tensor has another shape than ours (another architecture or width), or no tensor fits.
    """
    family, key_map = backbone_key_map(model)
    own = model.state_dict()
    name = model.yaml_file or "this model"
    student_variant = matching_variant(family, key_map, own)
    if str(source).lower() == IMAGENET:
        if student_variant is None:
            raise UserError(f"{what}: the {family} backbone of {name} has widths that match none of torchvision's "
                            f"{family} models with ImageNet weights "
                            f"({', '.join(v.builder for v in VARIANTS if v.family == family)})")
        state, path = fetch_imagenet(student_variant, what)
    else:
        path = Path(source)
        state = read_state_dict(path, what)
    student = f"torchvision {student_variant.builder}" if student_variant else f"a {family} of its own widths"
    misfit = [(ours, tv) for ours, tv in key_map.items()
              if tv in state and tuple(state[tv].shape) != tuple(own[ours].shape)]
    fitting = [ours for ours, tv in key_map.items() if tv in state and (ours, tv) not in misfit]
    if misfit or not fitting:
        if misfit:
            ours, tv = misfit[0]
            detail = (f"{tv} is {list(state[tv].shape)} in the file but {list(own[ours].shape)} in the "
                      f"student ({len(misfit)} tensors differ)")
        else:
            detail = f"none of the student's {len(key_map)} backbone tensors is in the file"
        raise UserError(f"{what}: {path} does not fit the backbone of {name}: the file "
                        f"is {describe_state(state)}, the student's backbone is {student}; {detail}")
    with torch.no_grad():
        for ours in fitting:
            value = state[key_map[ours]]
            if ours.endswith(".bn.running_var"):
                value = _shift_running_var(model, ours, value, family)
            own[ours].copy_(value)
    used, filled = {key_map[ours] for ours in fitting}, set(fitting)
    layer_count = len(backbone_layers(model))
    backbone_keys = [k for k in own if k.startswith("model.") and int(k.split(".")[1]) < layer_count]
    report = LoadReport(
        source=str(path), variant=describe_state(state).removeprefix("torchvision "), layers=list(range(layer_count)),
        loaded=fitting, missing=[k for k in backbone_keys if k not in filled],
        unexpected=[k for k in state if k not in used])
    LOGGER.info(report.line())
    return report


def requested_source(opt: argparse.Namespace, model: nn.Module, cfg: str | Path) -> tuple[str, str] | None:
    """``(source, what)`` the run asks for: ``--backbone-weights``, else the cfg yaml's
    ``backbone_weights`` key (a relative path is looked up from the current folder, then from the
    yaml's folder); None for no source or ``none``. UserError for a file that does not exist."""
    flag_value = str(getattr(opt, "backbone_weights", "") or "")
    if flag_value:
        value, what, folders = flag_value, f"{FLAG} {flag_value}", [Path.cwd()]
    else:
        raw = model.yaml.get(YAML_KEY)
        if raw in (None, ""):
            return None
        if not isinstance(raw, str):
            raise UserError(f"{cfg}: '{YAML_KEY}' must be a file name, '{IMAGENET}' or '{NO_WEIGHTS}', got {raw!r}")
        value, what, folders = raw, f"{YAML_KEY}: {raw} in {cfg}", [Path.cwd(), Path(cfg).resolve().parent]
    if value.lower() == NO_WEIGHTS:
        return None
    if value.lower() == IMAGENET:
        return IMAGENET, what
    found = next((folder / value for folder in folders if (folder / value).is_file()), None)
    if found is None:
        raise UserError(f"{what}: no such file; give a torchvision {SHUFFLENET} / {MOBILENET} state_dict file, "
                        f"'{IMAGENET}' (download through torchvision) or '{NO_WEIGHTS}'")
    return str(found), what


def start_backbone(model: nn.Module, opt: argparse.Namespace, cfg: str | Path) -> LoadReport | None:
    """Load the backbone weights a new run asks for (``--backbone-weights`` or the yaml key) into
    ``model``, built from ``cfg``; a resumed run keeps its checkpoint's weights. None when nothing loads."""
    if getattr(opt, "resume", False):
        return None
    request = requested_source(opt, model, cfg)
    return None if request is None else load_backbone_weights(model, *request)
