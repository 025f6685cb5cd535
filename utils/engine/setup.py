"""Building what a training run needs from its options: model, teacher, resume point, precision."""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import torch
import yaml
from torch import nn

from models.yolo import DetectionModel
from utils.checkpoint.backbone import start_backbone
from utils.checkpoint.ours import load_checkpoint, load_model
from utils.core.errors import UserError
from utils.core.log import LOGGER
from utils.distill.config import TEACHER_DTYPES
from utils.engine.args import option_defaults

HASH_CHUNK = 1 << 20


def load_hyp(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """Read a hyper-parameter yaml into a dict (UserError when missing or not a mapping).

    A file may start from others with ``base: other.yaml`` or ``base: [a.yaml, b.yaml]`` (relative to
    its own folder): the bases are read in order, each overriding the one before, and this file's keys
    override them all.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--hyp {path} does not exist")
    if path.resolve() in _seen:
        raise UserError(f"--hyp {path}: 'base' files form a loop")
    with open(path) as f:
        hyp = yaml.safe_load(f)
    if not isinstance(hyp, dict):
        raise UserError(f"--hyp {path} is not a yaml mapping of hyper-parameters")
    base = hyp.pop("base", None)
    if not base:
        return hyp
    merged: dict = {}
    for name in [base] if isinstance(base, str) else list(base):
        merged.update(load_hyp(path.parent / str(name), _seen + (path.resolve(),)))
    merged.update(hyp)
    return merged


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file (the teacher's identity recorded in the student's checkpoint)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def transfer_weights(target: nn.Module, source_state: dict[str, torch.Tensor]) -> int:
    """Copy every entry of ``source_state`` whose name and shape match ``target``; return the count."""
    own = target.state_dict()
    matched = {k: v for k, v in source_state.items() if k in own and own[k].shape == v.shape}
    target.load_state_dict(matched, strict=False)
    return len(matched)


def _state_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def build_model(opt: argparse.Namespace, nc: int, names: list[str]) -> DetectionModel:
    """The model to train: from ``--cfg``, initialised from ``--weights`` when given.

    With weights and no cfg, the checkpoint's own architecture is used (also for pruned models);
    with both, matching tensors are transferred into the cfg's architecture. A model built from
    ``--cfg`` first gets the pretrained backbone that ``--backbone-weights`` or the yaml's
    ``backbone_weights`` key names (``utils.checkpoint.backbone``); ``--weights`` then overrides the
    tensors it has.
    """
    if not opt.cfg and not opt.weights:
        raise UserError("give a model: --cfg models/detect/<model>.yaml and/or --weights <file>.pt")
    if opt.cfg and not Path(opt.cfg).is_file():
        raise UserError(f"--cfg {opt.cfg} does not exist")
    if opt.backbone_weights and not opt.cfg and not opt.resume:
        raise UserError("--backbone-weights needs --cfg (the student's model yaml): with --weights alone every "
                        "weight comes from that checkpoint")
    if opt.weights:
        pretrained = load_model(opt.weights)
        pruned = _state_shapes(pretrained) != _state_shapes(DetectionModel(pretrained.yaml, nc=pretrained.nc))
        if pruned and (opt.cfg or pretrained.nc != nc):
            raise UserError(f"--weights {opt.weights} is a pruned model: fine-tune it without --cfg and on data "
                            f"with its {pretrained.nc} classes (a new architecture would undo the pruning)")
        if opt.cfg:
            model = DetectionModel(opt.cfg, nc=nc)
            start_backbone(model, opt, opt.cfg)
            count = transfer_weights(model, pretrained.state_dict())
            LOGGER.info(f"transferred {count}/{len(model.state_dict())} tensors from {opt.weights}")
        elif pretrained.nc != nc:
            model = DetectionModel(pretrained.yaml, nc=nc)
            count = transfer_weights(model, pretrained.state_dict())
            LOGGER.info(f"new head for nc={nc}: transferred {count}/{len(model.state_dict())} tensors")
        else:
            model = pretrained
    else:
        model = DetectionModel(opt.cfg, nc=nc)
        start_backbone(model, opt, opt.cfg)
    model.names = list(names)
    model.nc = nc
    model.train()
    for param in model.parameters():
        param.requires_grad_(True)
    for module in model.modules():  # the DFL expectation weights stay fixed
        if type(module).__name__ == "DFL":
            module.requires_grad_(False)
    return model


def load_teacher(path: str, names: list[str], device: torch.device,
                 dtype: torch.dtype = torch.float32) -> nn.Module:
    """The frozen teacher: eval mode, no gradients, Conv+BN and RepConvN branches folded (the same function,
    fewer operations per batch), channels-last on the CPU, in ``dtype``; its classes must match the data's."""
    if not Path(path).is_file():
        raise UserError(f"--teacher {path} does not exist")
    teacher = load_model(path)
    teacher_names = list(teacher.names.values()) if isinstance(teacher.names, dict) else list(teacher.names)
    if teacher.nc != len(names) or teacher_names != list(names):
        raise UserError(f"teacher {path} has {teacher.nc} classes {teacher_names} but the data set has "
                        f"{len(names)} classes {list(names)}: train or pick a teacher on these classes")
    teacher.eval().fuse()  # frozen and in eval mode for the whole run: its BatchNorms are constants
    teacher.requires_grad_(False).to(device, memory_format=teacher_memory_format(device))
    return teacher.to(dtype)


def cpu_has_native_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """Whether this CPU does bfloat16 arithmetic in hardware (the ``amx_bf16`` or ``avx512_bf16`` flag of
    Linux's /proc/cpuinfo); elsewhere bf16 convolutions are emulated and slower than fp32."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            return bool({"amx_bf16", "avx512_bf16"} & set(line.partition(":")[2].split()))
    return False


def resolve_teacher_dtype(name: str, device: torch.device) -> torch.dtype:
    """The teacher's dtype for hyp ``distill_teacher_dtype`` on ``device``.

    ``auto``: fp16 on CUDA; bf16 on a CPU with bf16 hardware (AMX / AVX512-BF16: the teacher's forward,
    most of a CPU distillation step, takes about a third of the fp32 time there,
    benchmarks/teacher_speed.py); fp32 elsewhere. Only the teacher's dtype: the student keeps its own precision.
    """
    if name == "auto":
        if device.type == "cuda":
            return torch.float16
        return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else torch.float32
    if name == "fp16" and device.type == "cpu":
        raise UserError("hyp key 'distill_teacher_dtype' is fp16 but the device is the CPU, where fp16 "
                        "convolutions are slow: use bf16, fp32 or auto")
    return getattr(torch, TEACHER_DTYPES[name])


def teacher_memory_format(device: torch.device) -> torch.memory_format:
    """The teacher's layout (weights and input): channels-last on the CPU, where oneDNN's convolutions
    are faster so (benchmarks/teacher_speed.py), else as it is."""
    return torch.channels_last if device.type == "cpu" else torch.preserve_format


def freeze_layers(model: DetectionModel, count: int) -> list[str]:
    """Switch off gradients of the first ``count`` top-level layers; returns the frozen names."""
    frozen = []
    for name, param in model.named_parameters():
        parts = name.split(".")
        if len(parts) > 1 and parts[0] == "model" and parts[1].isdigit() and int(parts[1]) < count:
            param.requires_grad_(False)
            frozen.append(name)
    return frozen


def find_resume_checkpoint(resume: bool | str, project: str | Path) -> Path:
    """The ``last.pt`` to resume: the given path, or the newest under ``project``."""
    if isinstance(resume, str) and resume not in ("True", "true", "1"):
        path = Path(resume)
        if not path.is_file():
            raise UserError(f"--resume {resume} does not exist")
        return path
    candidates = sorted(Path(project).glob("**/weights/last.pt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise UserError(f"--resume: no weights/last.pt found under {project}")
    return candidates[-1]


def resume_options(path: Path, cli: argparse.Namespace) -> tuple[argparse.Namespace, dict]:
    """Options of the interrupted run (device and workers from the new command line) and its checkpoint.

    Options the run did not record (flags added since it started) take their defaults.
    """
    ckpt = load_checkpoint(path)
    saved = dict(ckpt.get("opt") or {})
    if not saved:
        raise UserError(f"--resume {path}: the checkpoint has no training options (a released model?)")
    if ckpt.get("epoch", -1) < 0:
        raise UserError(f"--resume {path}: this run already finished")
    given = vars(cli)
    for key in ("device", "workers", "max_batches"):
        saved[key] = given[key]
    saved["resume"] = str(path)
    return argparse.Namespace(**{**option_defaults(distill=bool(saved.get("teacher"))), **saved}), ckpt


def resolve_amp(flag: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``--amp`` on ``device`` (None = full precision)."""
    if device.type != "cuda":
        if flag in ("bf16", "fp16"):
            LOGGER.warning(f"--amp {flag} is only used on CUDA devices: training in fp32 on {device}")
        return None
    if flag == "off":
        return None
    if flag == "bf16" or (flag == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16
