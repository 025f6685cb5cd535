"""Structured channel pruning of a (distilled) detector with torch-pruning.

Whole channels are removed from convolutions (and the BatchNorms, concatenations, splits and
residual sums that share them) so that the pruned model is an ordinary, smaller DetectionModel:
no masks, and it exports to ONNX / TensorRT as it is. torch-pruning's DependencyGraph finds the
layers that must lose the same channels ("groups"); a group's channels are ranked by

- ``l1``: the L1 norm of every weight slice the channel owns in the group (MagnitudeImportance, p=1);
- ``bn-scale``: the absolute BatchNorm scale (network slimming; BNScaleImportance).

Scope: ``uniform`` (the default) removes ``ratio`` of the channels of every prunable group, so the
layer widths shrink alike and the result is predictable; ``global`` ranks all groups together
(importance normalised per group) and removes ``ratio`` of all prunable channels, thinning the
least important layers most.

What is never pruned:

- the output convolutions of the head (the last Conv2d of every box and class branch: 4 * 16 DFL
  logits and ``nc`` class logits) and the DFL; their *input* channels are pruned like any other;
- channels that pass through a ShuffleNetV2 channel shuffle. torch-pruning cannot follow the
  shuffle (a view / transpose / reshape permutation). For tracing only, the concatenation and the
  shuffle of every ``ShuffleV2Block`` are replaced by one opaque graph node, a customized layer
  (``customized_pruners``) that couples its inputs and outputs and is in ``ignored_layers``: every
  group that reaches a shuffle is left whole, while the convolutions inside the units (the
  bottleneck width of each branch) are pruned as usual. The model's own forward is untouched;
- channels that reach a ``chunk`` / ``split`` (ELAN1 / RepNCSPELAN4 ``cv1``, ADown, CBLinear).
  The forward splits by fixed sizes, and torch-pruning 1.6 maps split indices wrongly here: it
  misses the chunk size torch 2.x records (``_saved_split_size`` next to ``_saved_self_sym_sizes``)
  and assigns the parts' offsets per consumer, not per part, so a part read by two layers is
  miswired (pruning crashes or silently removes other channels). Groups that reach a split are
  therefore left whole too.

The pruned model keeps its yaml; its state_dict holds the new shapes, and ``utils.checkpoint.ours``
rebuilds the yaml's model and resizes each Conv2d / BatchNorm2d to the stored shapes before
loading (``_fit_shapes``). A pruned checkpoint therefore loads with ``load_model`` and fine-tunes
with ``train_distill.py --weights pruned.pt`` (teacher-guided) or ``train.py --weights pruned.pt``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from models.backbones import ShuffleV2Block
from models.heads import DDetect, branch_maps
from models.info import count_params, gflops
from models.yolo import DetectionModel
from utils.checkpoint.ours import load_model, make_checkpoint, save_checkpoint
from utils.core.errors import UserError

MAX_RATIO = 0.9  # keep at least 10 % of every group; beyond that a detector is not fine-tunable
PRUNE_METHODS: dict[str, Callable[[], tp.importance.Importance]] = {
    "l1": lambda: tp.importance.MagnitudeImportance(p=1),
    "bn-scale": tp.importance.BNScaleImportance,
}
SCOPES = ("uniform", "global")
TRACE_STRIDES = 2  # the tracing input is this many largest strides wide (P5 maps of 2x2)


@dataclasses.dataclass
class PruneSummary:
    """What one pruning run did (stored as ``extra['pruned']`` of the pruned checkpoint)."""

    method: str
    ratio: float
    scope: str
    params_before: int
    params_after: int
    gflops_before: float
    gflops_after: float
    img_size: int  # of the GFLOPs
    channels_before: int  # prunable channels (sum over the groups that could be pruned)
    channels_after: int
    groups: int  # groups that could be pruned
    protected_groups: int  # groups left whole (head outputs, shuffles, splits)

    @property
    def params_drop(self) -> float:
        """Fraction of the parameters removed."""
        return 1.0 - self.params_after / max(self.params_before, 1)

    def as_dict(self) -> dict[str, Any]:
        """Builtins only, for the checkpoint."""
        return {**dataclasses.asdict(self), "params_drop": self.params_drop}


def check_ratio(ratio: float) -> float:
    """The pruning ratio as a float in (0, MAX_RATIO]; UserError naming ``--ratio`` otherwise."""
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0.0 < float(ratio) <= MAX_RATIO:
        raise UserError(f"--ratio {ratio} must be in (0, {MAX_RATIO}]: the fraction of channels to remove")
    return float(ratio)


def _check_choice(value: str, options: Sequence[str], flag: str) -> None:
    if value not in options:
        raise UserError(f"{flag} {value} is not one of {', '.join(options)}")


def protected_layers(model: DetectionModel) -> list[nn.Module]:
    """Layers whose output channels stay: the last Conv2d of every box / class branch of the head
    (4 * reg_max DFL logits, ``nc`` class logits) and the DFL modules of every branch."""
    head: DDetect = model.head
    layers: list[nn.Module] = []
    for branch in range(head.num_branches):
        box, cls, dfl = head.branch_modules(branch)
        layers.extend(seq[-1] for seq in (*box, *cls))
        layers.append(dfl)
    return layers


# ----------------------------------------------------------------------------------------------
# Tracing: the ShuffleNetV2 shuffle as one opaque node


class _Opaque(torch.autograd.Function):
    """Identity on ``result`` whose autograd node links only to ``sources``: torch-pruning walks
    the autograd graph, so it sees the sources feeding one op and nothing of what is inside."""

    @staticmethod
    def forward(ctx, result: torch.Tensor, *sources: torch.Tensor) -> torch.Tensor:
        return result.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        raise RuntimeError("the pruning trace node is never differentiated")


class TraceBoundary(nn.Module):
    """Graph node that stands, during tracing only, for an op torch-pruning cannot follow.

    ``forward(result, *sources)`` returns ``result``; in the traced graph its inputs are the
    ``sources``. ``in_channels`` / ``out_channels`` are the channels of the op it replaces.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels

    def forward(self, result: torch.Tensor, *sources: torch.Tensor) -> torch.Tensor:
        return _Opaque.apply(result.detach(), *sources)


class BoundaryPruner(tp.pruner.function.BasePruningFunc):
    """torch-pruning layer pruner for :class:`TraceBoundary`. Input and output pruning are one
    function, so every group that reaches a boundary contains it; the boundaries are in
    ``ignored_layers``, so those groups are never pruned and these functions never run."""

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        raise RuntimeError(f"internal error: a group through {layer} was pruned although it is ignored")

    prune_in_channels = prune_out_channels  # couples the inputs and the outputs of the boundary

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.out_channels

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.in_channels


@contextlib.contextmanager
def shuffle_boundaries(model: nn.Module) -> Iterator[list[TraceBoundary]]:
    """While active, every ShuffleV2Block's output is re-routed through a :class:`TraceBoundary`
    whose sources are the block input and its branch outputs (forward hooks; removed on exit,
    together with the boundary modules). Yields the boundaries (their channel counts are set by
    the first forward)."""
    hooks: list[torch.utils.hooks.RemovableHandle] = []
    blocks: list[ShuffleV2Block] = []

    def remember(store: dict, key: str):
        def hook(_module, _inputs, output):
            store[key] = output
        return hook

    def reroute(block: ShuffleV2Block, store: dict):
        def hook(_module, inputs, output):
            branches = [store.pop(key) for key in ("branch1", "branch2") if key in store]
            boundary = block.prune_boundary
            boundary.in_channels, boundary.out_channels = inputs[0].shape[1], output.shape[1]
            return boundary(output, inputs[0], *branches)
        return hook

    try:
        for block in [m for m in model.modules() if isinstance(m, ShuffleV2Block)]:
            store: dict[str, torch.Tensor] = {}
            block.prune_boundary = TraceBoundary(0, 0)  # a child module, so torch-pruning hooks it
            blocks.append(block)
            for name in ("branch1", "branch2"):
                if hasattr(block, name):
                    hooks.append(getattr(block, name).register_forward_hook(remember(store, name)))
            hooks.append(block.register_forward_hook(reroute(block, store)))
        yield [block.prune_boundary for block in blocks]
    finally:
        for hook in hooks:
            hook.remove()
        for block in blocks:
            del block.prune_boundary


def _head_maps(output: Any) -> list[torch.Tensor]:
    """The raw head maps of an eval-mode output: the graph to trace (the decode is not pruned)."""
    return [m for maps in branch_maps(output) for m in maps]


@contextlib.contextmanager
def _traceable(model: nn.Module) -> Iterator[None]:
    """Gradients on (torch-pruning traces autograd) and the model's modes and flags restored."""
    flags = {p: p.requires_grad for p in model.parameters()}
    modes = {m: m.training for m in model.modules()}
    try:
        for p in flags:
            p.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        for m, mode in modes.items():
            m.training = mode


# ----------------------------------------------------------------------------------------------
# Pruning

ROOT_TYPES = (nn.modules.conv._ConvNd, nn.Linear)  # a group is named after a conv whose outputs it prunes


def _trace_input(model: DetectionModel) -> torch.Tensor:
    size = TRACE_STRIDES * int(model.stride.max().item())
    reference = next(model.parameters())
    return torch.zeros(1, int(model.yaml.get("ch", 3)), size, size, device=reference.device, dtype=reference.dtype)


def classify_groups(graph: tp.DependencyGraph,
                    protected: Sequence[nn.Module]) -> tuple[list[nn.Module], list[nn.Module]]:
    """Split the pruning groups of ``graph`` into prunable ones and ones to leave whole.

    A group is left whole when it would prune the outputs of a ``protected`` module or when it
    reaches a split (see the module docstring).

    Returns:
        ``(roots of the prunable groups, roots of the groups left whole)``; a root is the conv
        whose output channels name the group.
    """
    protected_ids = {id(m) for m in protected}
    prunable, whole = [], []
    for group in graph.get_all_groups(ignored_layers=[], root_module_types=ROOT_TYPES):
        blocked = any(dep.target.type == tp.ops.OPTYPE.SPLIT
                      or (id(dep.target.module) in protected_ids and graph.is_out_channel_pruning_fn(dep.handler))
                      for dep, _ in group)
        (whole if blocked else prunable).append(group[0].dep.target.module)
    return prunable, whole


def build_pruner(model: DetectionModel, ratio: float, method: str = "l1", scope: str = "uniform",
                 ignored_layers: Sequence[nn.Module] = ()) -> tuple[tp.pruner.MetaPruner, list[nn.Module], int]:
    """A torch-pruning MetaPruner for ``model`` with the protections of the module docstring.

    Args:
        model: the DetectionModel (unfused); traced once at a tiny size, on its own device.
        ratio: fraction of channels to remove, in (0, MAX_RATIO].
        method: ``l1`` or ``bn-scale``.
        scope: ``uniform`` (every group loses ``ratio``) or ``global`` (one ranking).
        ignored_layers: further modules (with their submodules) whose outputs must stay.

    Returns:
        ``(pruner, roots of the prunable groups, number of groups left whole)``.
    """
    ratio = check_ratio(ratio)
    _check_choice(method, tuple(PRUNE_METHODS), "--method")
    _check_choice(scope, SCOPES, "--scope")
    example = _trace_input(model)
    customized = {TraceBoundary: BoundaryPruner()}
    with _traceable(model), shuffle_boundaries(model) as boundaries:
        protected = [m for layer in (*protected_layers(model), *ignored_layers) for m in layer.modules()]
        protected.extend(boundaries)
        graph = tp.DependencyGraph().build_dependency(model, example, output_transform=_head_maps,
                                                      customized_pruners=customized)
        prunable, whole = classify_groups(graph, protected)
        pruner = tp.pruner.MetaPruner(
            model, example, importance=PRUNE_METHODS[method](), pruning_ratio=ratio,
            global_pruning=scope == "global", max_pruning_ratio=MAX_RATIO, ignored_layers=[*protected, *whole],
            root_module_types=list(ROOT_TYPES), customized_pruners=customized, output_transform=_head_maps,
            in_channel_groups={}, out_channel_groups={})  # fresh dicts: the library mutates its defaults
    return pruner, prunable, len(whole)


def prune_model(model: DetectionModel, ratio: float, method: str = "l1", scope: str = "uniform",
                ignored_layers: Sequence[nn.Module] = (), img_size: int = 640,
                source: str = "the model") -> PruneSummary:
    """Prune ``model`` in place (see the module docstring) and return what was done.

    Args:
        model: an unfused DetectionModel; its train/eval mode is kept.
        ratio / method / scope / ignored_layers: as for :func:`build_pruner`.
        img_size: image size of the GFLOPs in the summary.
        source: the model's name in error messages (e.g. the weights file).

    Raises:
        UserError: bad ratio / method / scope, a fused model, or no prunable channel at all.
    """
    if getattr(model, "is_fused", False):
        raise UserError(f"{source} is fused (no BatchNorm left); prune the unfused checkpoint")
    params_before, gflops_before = count_params(model), gflops(model, img_size)
    pruner, roots, whole = build_pruner(model, ratio, method, scope, ignored_layers)
    if not roots:
        raise UserError(f"{source} has no prunable layers: every channel reaches a head output, a "
                        f"channel shuffle or a split")
    channels_before = sum(root.out_channels for root in roots)
    pruner.step()
    for layer in getattr(model, "model", ()):  # the per-layer parameter counts of the summary table
        layer.np = count_params(layer)
    return PruneSummary(method=method, ratio=float(ratio), scope=scope, params_before=params_before,
                        params_after=count_params(model), gflops_before=gflops_before,
                        gflops_after=gflops(model, img_size), img_size=img_size,
                        channels_before=channels_before, channels_after=sum(root.out_channels for root in roots),
                        groups=len(roots), protected_groups=whole)


def pruned_checkpoint(model: DetectionModel, summary: PruneSummary, source: str | Path = "",
                      opt: Any = None) -> dict:
    """Our checkpoint dict of a pruned model: fp32 weights in their pruned shapes, the unchanged
    yaml (``load_model`` resizes the layers to the stored shapes), epoch -1 (a model to fine-tune,
    not a run to resume), and ``extra['pruned']`` = the summary plus the source file."""
    extra = {"pruned": {**summary.as_dict(), "source": str(source)}}
    return make_checkpoint(model, epoch=-1, half=False, opt=opt, extra=extra)


def default_output(weights: str | Path, ratio: float) -> Path:
    """``best.pt`` pruned at 0.3 -> ``best-pruned30.pt`` next to it."""
    weights = Path(weights)
    return weights.with_name(f"{weights.stem}-pruned{round(ratio * 100)}.pt")


def prune_weights(weights: str | Path, out: str | Path | None = None, ratio: float = 0.3, method: str = "l1",
                  scope: str = "uniform", img_size: int = 640, opt: Any = None) -> tuple[Path, PruneSummary]:
    """Load ``weights`` (ours or official YOLOv9, unfused), prune it and save the pruned checkpoint
    atomically to ``out`` (default :func:`default_output`). Returns ``(path, summary)``.

    Raises:
        UserError: missing or unreadable weights, bad ratio / method / scope, nothing to prune.
    """
    ratio = check_ratio(ratio)
    _check_choice(method, tuple(PRUNE_METHODS), "--method")
    _check_choice(scope, SCOPES, "--scope")
    if not Path(weights).is_file():
        raise UserError(f"--weights {weights} does not exist")
    model = load_model(weights)
    summary = prune_model(model, ratio, method, scope, img_size=img_size, source=f"--weights {weights}")
    path = save_checkpoint(pruned_checkpoint(model, summary, weights, opt),
                           out if out else default_output(weights, ratio))
    return path, summary
