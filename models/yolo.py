"""The model yaml parser and DetectionModel (with feature taps for distillation).

A model yaml has ``nc``, ``depth_multiple``, ``width_multiple``, optional ``names`` and
``distill_layers``, and two lists of rows ``[from, number, module, args]`` (``backbone`` then
``head``) that are numbered together; the last row must be a detection head. See
docs/internals.md for the channel protocol. An optional ``backbone_weights`` key is read by
training only (``utils.checkpoint.backbone``), never when a model is built or rebuilt from a checkpoint.
"""

from __future__ import annotations

import ast
import copy
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml
from torch import nn

from models import backbones, common, heads
from models.common import CHANNEL_DIVISOR, Conv, RepConvN, make_divisible
from models.heads import DDetect, branch_maps
from models.info import log_model_info
from utils.core.errors import UserError
from utils.core.log import LOGGER

DETECT_DIR = Path(__file__).resolve().parent / "detect"
STRIDE_PROBE_SIZE = 256  # square zero image used to measure the head strides (train mode)
BN_EPS = 1e-3
BN_MOMENTUM = 0.03
# torch modules usable in yaml rows; they keep the channel count and take their args verbatim
PASSTHROUGH_MODULES: dict[str, type] = {"nn.Upsample": nn.Upsample, "Upsample": nn.Upsample}
INPLACE_ACTIVATIONS = (nn.Hardswish, nn.LeakyReLU, nn.ReLU, nn.ReLU6, nn.SiLU)


def module_table() -> dict[str, type]:
    """Name -> class for every block a yaml row may use (common, backbones, heads, nn.Upsample)."""
    table: dict[str, type] = dict(common.BLOCKS)
    table.update(backbones.BLOCKS)
    table.update(heads.BLOCKS)
    table.update(PASSTHROUGH_MODULES)
    return table


def _resolve_arg(value: Any, names: dict[str, Any]) -> Any:
    """Yaml argument -> Python value: fixed names first, then a literal, else the string itself."""
    if not isinstance(value, str):
        return value
    if value in names:
        return names[value]
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value  # a plain word such as 'nearest' or an activation name


def _absolute_inputs(i: int, f: int | Sequence[int]) -> list[int]:
    """Absolute layer indices of a row's ``from`` (-1 = previous layer; layer 0 reads the image)."""
    return [j if j >= 0 else i + j for j in ([f] if isinstance(f, int) else f)]


def _check_row(row: Any, i: int, source: str) -> None:
    if not (isinstance(row, (list, tuple)) and len(row) == 4):
        raise UserError(f"{source}: layer {i} must be [from, number, module, args], got {row!r}.")
    f, n, m, args = row
    froms = [f] if isinstance(f, int) else f
    if not (isinstance(froms, (list, tuple)) and froms and all(isinstance(j, int) for j in froms)):
        raise UserError(f"{source}: layer {i} has an invalid 'from' {f!r}.")
    if any(j >= i or (j < 0 and i + j < 0 and not (i == 0 and j == -1)) for j in froms):
        raise UserError(f"{source}: layer {i} reads from {f!r}, which is not an earlier layer.")
    if not isinstance(n, int) or n < 1:
        raise UserError(f"{source}: layer {i} has an invalid number {n!r}.")
    if not isinstance(m, str):
        raise UserError(f"{source}: layer {i} has an invalid module name {m!r}.")
    if not isinstance(args, list):
        raise UserError(f"{source}: layer {i} args must be a list, got {args!r}.")


def parse_model(cfg: dict, ch: Sequence[int], source: str = "model yaml") -> tuple[nn.Sequential, list[int]]:
    """Build the layers of a model yaml dict.

    Args:
        cfg: the yaml dict (``nc``, ``depth_multiple``, ``width_multiple``, ``backbone``, ``head``).
        ch: ``[input channels]`` (a one-element list).
        source: name used in error messages (the yaml file).
    Returns:
        ``(nn.Sequential of layers, sorted indices of layers whose outputs later layers read)``.
        Each layer carries ``i``, ``f``, ``type``, ``np`` and, for the summary, ``layer_n`` and
        ``layer_args``.
    """
    depth = float(cfg.get("depth_multiple", 1.0))
    width = float(cfg.get("width_multiple", 1.0))
    names = {"nc": cfg["nc"], "None": None, "True": True, "False": False}
    table = module_table()
    rows = list(cfg.get("backbone") or []) + list(cfg.get("head") or [])
    if not rows:
        raise UserError(f"{source}: the 'backbone' and 'head' lists are empty or missing.")
    out_channels: list = []
    layers, save = [], set()
    for i, row in enumerate(rows):
        _check_row(row, i, source)
        f, n, name, raw_args = row
        if name not in table:
            raise UserError(f"{source}: layer {i} uses unknown module '{name}'; "
                            f"known: {', '.join(sorted(table))}.")
        cls = table[name]
        args = [_resolve_arg(a, names) for a in raw_args]
        n_eff = max(round(n * depth), 1) if n > 1 else n
        inputs = _absolute_inputs(i, f)
        ch_in = [out_channels[j] if j >= 0 else ch[0] for j in inputs]
        repeated = False
        try:
            if name in PASSTHROUGH_MODULES:
                ctor_args, c_out = args, ch_in[0]
            elif hasattr(cls, "yaml_args"):
                ctor_args, c_out = cls.yaml_args(ch_in, args, n_eff, width)
                repeated = getattr(cls, "repeats", False)
            else:
                if not args:
                    raise UserError(f"{source}: layer {i} ({name}) needs the output width as args[0].")
                c_out = make_divisible(args[0] * width, CHANNEL_DIVISOR)
                repeated = getattr(cls, "repeats", False)
                ctor_args = [ch_in[0], c_out, n_eff, *args[1:]] if repeated else [ch_in[0], c_out, *args[1:]]
            if n_eff > 1 and not repeated:
                module = nn.Sequential(*(cls(*ctor_args) for _ in range(n_eff)))
            else:
                module = cls(*ctor_args)
        except (TypeError, ValueError, IndexError) as exc:
            raise UserError(f"{source}: layer {i} ({name} {raw_args}) cannot be built: {exc}.") from exc
        module.i, module.f = i, f
        module.type = f"{cls.__module__}.{cls.__name__}"
        module.np = sum(p.numel() for p in module.parameters())
        module.layer_n, module.layer_args = n_eff, ctor_args
        raw_froms = [f] if isinstance(f, int) else f
        save.update(j for raw, j in zip(raw_froms, inputs) if raw != -1)  # -1 is the running x
        layers.append(module)
        out_channels.append(c_out)
    return nn.Sequential(*layers), sorted(j for j in save if j >= 0)


def load_model_yaml(cfg: str | Path) -> tuple[dict, Path]:
    """Read a model yaml; a bare name such as ``gelan-s`` or ``gelan-s.yaml`` is looked up in
    ``models/detect/``. Raises UserError for a missing or malformed file."""
    path = Path(cfg)
    candidates = [path, DETECT_DIR / path.name, DETECT_DIR / f"{path.name}.yaml"]
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        raise UserError(f"Model config {cfg} not found (also looked in {DETECT_DIR}).")
    try:
        data = yaml.safe_load(found.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise UserError(f"Model config {found} is not valid yaml: {exc}.") from exc
    if not isinstance(data, dict):
        raise UserError(f"Model config {found} must be a yaml mapping.")
    return data, found


def initialize_weights(model: nn.Module) -> None:
    """BatchNorm eps 1e-3 and momentum 0.03, in-place activations; convs keep PyTorch's init."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps, m.momentum = BN_EPS, BN_MOMENTUM
        elif isinstance(m, INPLACE_ACTIVATIONS):
            m.inplace = True


def _class_names(cfg: dict, nc: int) -> list[str]:
    names = cfg.get("names")
    if isinstance(names, dict):
        names = [names[k] for k in sorted(names)]
    if isinstance(names, list) and len(names) == nc:
        return [str(n) for n in names]
    return [str(i) for i in range(nc)]


class DetectionModel(nn.Module):
    """A detector built from a model yaml.

    Args:
        cfg: yaml path, bare name in ``models/detect/``, or an already loaded dict.
        ch: input image channels.
        nc: number of classes; overrides the yaml's ``nc`` when given.

    Input ``Tensor[B, ch, H, W]`` (H, W multiples of the largest stride); the output is the
    head's (see ``models/heads.py``).
    """

    def __init__(self, cfg: str | Path | dict = "yolov9-s.yaml", ch: int = 3, nc: int | None = None):
        super().__init__()
        if isinstance(cfg, dict):
            self.yaml, self.yaml_file = copy.deepcopy(cfg), str(cfg.get("yaml_file", ""))
            source = self.yaml_file or "model yaml"
        else:
            self.yaml, path = load_model_yaml(cfg)
            self.yaml_file, source = path.name, str(path)
        if nc is not None:
            self.yaml["nc"] = int(nc)
        if not isinstance(self.yaml.get("nc"), int) or self.yaml["nc"] < 1:
            raise UserError(f"{source}: 'nc' must be a positive integer, got {self.yaml.get('nc')!r}.")
        ch = self.yaml["ch"] = int(self.yaml.get("ch", ch))
        self.model, self.save = parse_model(self.yaml, [ch], source)
        if not isinstance(self.model[-1], DDetect):
            raise UserError(f"{source}: the last layer must be a detection head (DDetect or DualDDetect).")
        self.nc = self.yaml["nc"]
        self.names = _class_names(self.yaml, self.nc)
        self._inputs = [_absolute_inputs(m.i, m.f) for m in self.model]
        self.distill_layers = self._distill_layers(source)

        head = self.head
        with torch.no_grad():  # train mode on purpose: BN statistics start as in the official code
            maps = branch_maps(self.forward(torch.zeros(1, ch, STRIDE_PROBE_SIZE, STRIDE_PROBE_SIZE)))[-1]
        # kept on the CPU even when built under a device context; _apply moves it with the model
        head.stride = torch.tensor([STRIDE_PROBE_SIZE / m.shape[-2] for m in maps], device="cpu")
        self.stride = head.stride
        head._anchor_key = None
        head.bias_init()
        initialize_weights(self)

    def _distill_layers(self, source: str) -> list[int]:
        layers = self.yaml.get("distill_layers")
        if layers is None:
            return list(self._inputs[-1][-self.head.nl:])
        n = len(self.model)
        if not (isinstance(layers, list) and all(isinstance(j, int) and 0 <= j < n - 1 for j in layers)):
            raise UserError(f"{source}: 'distill_layers' must be a list of layer indices below {n - 1}.")
        return list(layers)

    @property
    def head(self) -> DDetect:
        """The detection head (the last layer)."""
        return self.model[-1]

    def forward(self, x: torch.Tensor, feature_layers: Sequence[int] | None = None):
        """Run the network once.

        Args:
            x: ``Tensor[B, ch, H, W]`` float images in [0, 1].
            feature_layers: layer indices whose outputs to return too (e.g. ``distill_layers``).
        Returns:
            the head output, or ``(head output, [feature maps in the order asked])``.
        """
        wanted = set()
        if feature_layers is not None:
            n = len(self.model)
            feature_layers = [j if j >= 0 else n + j for j in feature_layers]
            if any(not 0 <= j < n for j in feature_layers):
                raise ValueError(f"feature_layers {feature_layers} out of range for {n} layers")
            wanted = set(feature_layers)
        outputs: list = []
        for i, (m, inputs) in enumerate(zip(self.model, self._inputs)):
            if m.f != -1:
                x = outputs[inputs[0]] if isinstance(m.f, int) else [
                    x if j == i - 1 else outputs[j] for j in inputs]
            x = m(x)
            outputs.append(x if i in self.save or i in wanted else None)
        if feature_layers is None:
            return x
        return x, [outputs[j] for j in feature_layers]

    def _apply(self, fn, recurse=True):
        """Move / cast the stride tensor with the parameters (it is not a buffer)."""
        super()._apply(fn, recurse)
        head = self.head
        head.stride = fn(head.stride)
        self.stride = head.stride
        head._anchor_key = None
        return self

    def fuse(self) -> "DetectionModel":
        """Fold RepConvN branches and every Conv+BN into single convs (in place; for inference)."""
        modules = list(self.modules())
        for m in modules:
            if isinstance(m, RepConvN):
                m.fuse()
        for m in self.modules():
            if isinstance(m, Conv):
                m.fuse()
        for m in self.model:
            m.np = sum(p.numel() for p in m.parameters())
        return self

    @property
    def is_fused(self) -> bool:
        """True once ``fuse()`` has folded the BatchNorms."""
        return not any(isinstance(m, nn.BatchNorm2d) for m in self.modules())

    def info(self, verbose: bool = False, img_size: int = 640) -> None:
        """Log the per-layer table (verbose) and a one-line summary with GFLOPs at ``img_size``."""
        log_model_info(self, verbose=verbose, img_size=img_size)


def single_branch_yaml(cfg: dict) -> tuple[dict, dict[int, int]]:
    """Layout of the inference model of a dual-head yaml (yolov9-X -> gelan-X).

    Keeps only the layers the main (last) head branch depends on and renumbers them; a leading
    Silence that only feeds layer 1 is dropped (it is an identity on the image). Returns the new
    yaml dict (head ``DDetect`` on the main-branch inputs) and ``{new layer index: old index}``.
    """
    table = module_table()
    rows = list(cfg["backbone"]) + list(cfg["head"])
    head_row = rows[-1]
    head_cls = table[head_row[2]]
    inputs = [_absolute_inputs(i, row[0]) for i, row in enumerate(rows)]
    nl = len(inputs[-1]) // head_cls.num_branches
    main_inputs = inputs[-1][-nl:]

    needed, stack = set(), list(main_inputs)
    while stack:
        j = stack.pop()
        if j >= 0 and j not in needed:
            needed.add(j)
            stack.extend(inputs[j])
    kept = sorted(needed)
    consumers_of_first = [k for k in kept if 0 in inputs[k]]
    if (kept and kept[0] == 0 and table[rows[0][2]] is common.Silence
            and consumers_of_first == [1] and rows[1][0] == -1):
        kept = kept[1:]
    new_index = {old: new for new, old in enumerate(kept)}

    def remap(new_i: int, old_i: int, f):
        out = []
        for raw, old in zip([f] if isinstance(f, int) else f, inputs[old_i]):
            if old not in new_index or (raw == -1 and new_index[old] == new_i - 1):
                out.append(-1)  # previous layer, or the image when the dropped Silence fed it
            else:
                out.append(new_index[old])
        return out[0] if isinstance(f, int) else out

    new_rows = [[remap(n, o, rows[o][0]), *copy.deepcopy(rows[o][1:])] for n, o in enumerate(kept)]
    new_rows.append([[new_index[j] for j in main_inputs], head_row[1], "DDetect", copy.deepcopy(head_row[3])])
    n_backbone = sum(1 for o in kept if o < len(cfg["backbone"]))
    out = {k: copy.deepcopy(v) for k, v in cfg.items() if k not in ("backbone", "head", "distill_layers")}
    out["backbone"], out["head"] = new_rows[:n_backbone], new_rows[n_backbone:]
    if "distill_layers" in cfg and all(j in new_index for j in cfg["distill_layers"]):
        out["distill_layers"] = [new_index[j] for j in cfg["distill_layers"]]
    mapping = {new: old for new, old in enumerate(kept)}
    mapping[len(kept)] = len(rows) - 1
    return out, mapping


def reparameterize(model: DetectionModel) -> DetectionModel:
    """Dual-head model (yolov9-X) -> the equivalent single-head model (gelan-X layout).

    Weights are copied layer by layer; the new head takes the main branch (cv4/cv5/dfl2 ->
    cv2/cv3/dfl). The result's output equals the source's main-branch output. Models with a
    single-branch head are returned unchanged.
    """
    head = model.head
    if head.num_branches == 1:
        return model
    cfg, mapping = single_branch_yaml(model.yaml)
    target = DetectionModel(cfg, ch=model.yaml["ch"], nc=model.nc)
    if model.is_fused:
        target.fuse()
    source_sd = model.state_dict()
    target_sd = target.state_dict()
    head_index = len(target.model) - 1
    head_names = dict(zip(("cv2", "cv3", "dfl"), _main_branch_names(head)))
    new_sd = {}
    for key, value in target_sd.items():
        _, layer, rest = key.split(".", 2)
        old_layer = mapping[int(layer)]
        if int(layer) == head_index:
            first, tail = rest.split(".", 1)
            rest = f"{head_names[first]}.{tail}"
        src_key = f"model.{old_layer}.{rest}"
        if src_key not in source_sd or source_sd[src_key].shape != value.shape:
            raise RuntimeError(f"reparameterize: no source of shape {tuple(value.shape)} for {key}")
        new_sd[key] = source_sd[src_key]
    target.load_state_dict(new_sd)
    target.names = list(model.names)
    reference = next(model.parameters())
    target.to(device=reference.device, dtype=reference.dtype)
    target.train(model.training)
    LOGGER.info(f"Reparameterized {model.yaml_file or 'model'}: {len(model.model)} -> {len(target.model)} layers")
    return target


def _main_branch_names(head: DDetect) -> tuple[str, str, str]:
    box, cls, dfl = head.branch_modules(head.num_branches - 1)
    names = {id(m): n for n, m in head.named_children()}
    return names[id(box)], names[id(cls)], names[id(dfl)]
