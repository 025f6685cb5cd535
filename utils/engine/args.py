"""Command-line flags shared by train.py and train_distill.py (YOLOv5/YOLOv9 spellings included)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from utils.core.errors import ArgumentParser, UserError

ROOT = Path(__file__).resolve().parents[2]  # the repository root, above utils/engine/
HYP_DIR = ROOT / "hyp"
AMP_CHOICES = ("auto", "bf16", "fp16", "off")
CACHE_CHOICES = ("ram", "disk")  # disk: the YOLOv5/YOLOv9 spelling, refused with a pointer to ram
YAML_SUFFIXES = (".yaml", ".yml")
# the teacher's options: flags of train_distill.py only, and unset fields of train.py's options, so that
# the engine reads every option of either script directly
TEACHER_DEFAULTS = {"teacher": "", "teacher_img": 0}


def find_hyp(value: str) -> str:
    """``--hyp``: the file as given, else a bare name (``hyp.scratch-high.yaml``, ``.yaml`` optional)
    found in the repository's hyp/ folder, the way ``--data NAME`` is found in data/.

    Raises ``argparse.ArgumentTypeError`` (one line naming --hyp through the parser) when neither exists.
    """
    path = Path(value).expanduser()
    if path.is_file():
        return str(path)
    if not path.is_absolute() and len(path.parts) == 1:
        names = [path.name] if path.name.endswith(YAML_SUFFIXES) else [path.name, path.name + ".yaml"]
        for name in names:
            if (HYP_DIR / name).is_file():
                return str(HYP_DIR / name)
        raise argparse.ArgumentTypeError(f"{value}: no such file here or in {HYP_DIR}")
    raise argparse.ArgumentTypeError(f"{value}: no such file")


class TrainArgumentParser(ArgumentParser):
    """The training parser, with the checks that concern several flags at once."""

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        opt, rest = super().parse_known_args(args, namespace)
        if not opt.data and not opt.resume:
            self.error("--data is required: a data.yaml, a name in data/ such as bccd.yaml, or --data synthetic "
                       "for the generated demo set")
        if opt.cache == "disk":
            self.error("--cache disk is not supported: use --cache ram (decoded images kept in memory) or leave "
                       "--cache out")
        return opt, rest


def apply_local_rank(opt: argparse.Namespace) -> None:
    """Make ``--local-rank N`` (passed by ``python -m torch.distributed.launch``) act as torchrun's
    ``LOCAL_RANK`` environment variable, which is what :func:`utils.core.device.dist_info` reads.

    The launcher also sets ``LOCAL_RANK`` itself; a flag that disagrees with it is a UserError.
    """
    rank = opt.local_rank
    if rank is None or rank < 0:
        return
    env = os.environ.get("LOCAL_RANK")
    if env is not None and env.strip() != str(rank):
        raise UserError(f"--local-rank {rank} disagrees with the environment's LOCAL_RANK={env}")
    os.environ["LOCAL_RANK"] = str(rank)


def build_parser(distill: bool = False) -> argparse.ArgumentParser:
    """The training parser; ``distill`` adds the teacher flags."""
    parser = TrainArgumentParser(
        description="Distil a student from a frozen teacher." if distill else "Train a YOLO detector.")
    add = parser.add_argument
    add("--cfg", type=str, default="", help="model yaml (models/detect/*.yaml)")
    add("--weights", type=str, default="", help="initial weights .pt ('' = from scratch)")
    add("--backbone-weights", type=str, default="",
        help="pretrained student backbone: a torchvision ShuffleNetV2 / MobileNetV3 state_dict file, 'imagenet' "
             "(torchvision's download) or 'none'; '' = the model yaml's backbone_weights key, else random init")
    add("--data", type=str, default=None,
        help="data.yaml, or a name in data/ (bccd.yaml); required ('synthetic': the generated demo set)")
    default_hyp = "hyp.distill.yaml" if distill else "hyp.scratch-high.yaml"
    add("--hyp", type=find_hyp, default=str(HYP_DIR / default_hyp),
        help="hyper-parameter yaml, or a name in hyp/ (hyp.scratch-low.yaml)")
    add("--epochs", type=int, default=100, help="training epochs")
    add("--batch", "--batch-size", dest="batch", type=int, default=16, help="total batch size (all GPUs)")
    add("--img", "--imgsz", "--img-size", dest="img", type=int, default=640, help="train/val image size (px)")
    add("--device", default="", help="cuda device (0 or 0,1) or cpu; '' = the first GPU, else the CPU")
    add("--workers", type=int, default=8, help="data loader workers (per process)")
    add("--project", default=str(ROOT / "runs" / ("distill" if distill else "train")), help="runs folder")
    add("--name", default="exp", help="run name: project/name")
    add("--exist-ok", action="store_true", help="reuse project/name instead of incrementing")
    add("--resume", nargs="?", const=True, default=False, help="resume the latest (or the given) last.pt")
    add("--close-mosaic", type=int, default=0, help="switch mosaic off for the last N epochs")
    add("--cache", nargs="?", const="ram", default=None, choices=CACHE_CHOICES,
        help="cache decoded images in RAM (a bare --cache means ram; off when not given; disk is not supported)")
    add("--optimizer", default="SGD", choices=["SGD", "Adam", "AdamW"], help="optimizer")
    add("--cos-lr", action="store_true", help="cosine learning-rate schedule")
    add("--patience", type=int, default=100, help="stop after N epochs without improvement (0 = never)")
    add("--seed", type=int, default=0, help="global seed (each process adds its rank)")
    add("--deterministic", action="store_true", help="ask for deterministic kernels")
    add("--freeze", type=int, default=0, help="freeze the first N layers")
    add("--save-period", type=int, default=-1, help="also save epochN.pt every N epochs (-1 = off)")
    add("--val-period", type=int, default=1, help="validate every N epochs (and always after the last)")
    add("--noval", action="store_true", help="validate only after the last epoch")
    add("--noplots", action="store_true", help="save no plots")
    add("--amp", default="auto", choices=AMP_CHOICES,
        help="mixed precision: auto = bf16 on GPUs that support it, else fp16; off on CPU")
    add("--sync-bn", action="store_true", help="SyncBatchNorm under torchrun")
    add("--local-rank", "--local_rank", dest="local_rank", type=int, default=-1,
        help="process index on this machine, as python -m torch.distributed.launch passes it (torchrun sets "
             "LOCAL_RANK instead; -1 = not distributed)")
    add("--channels-last", action="store_true", help="channels_last memory format")
    add("--compile", action="store_true", help="torch.compile the training model")
    add("--gpu-augment", action="store_true", help="mosaic/affine/HSV/flips on the GPU, batched")
    add("--max-batches", type=int, default=0, help=argparse.SUPPRESS)  # tests: cap batches per epoch
    if distill:
        add("--teacher", type=str, default=TEACHER_DEFAULTS["teacher"],
            help="teacher checkpoint (ours or an official YOLOv9 .pt); required")
        add("--teacher-img", type=int, default=TEACHER_DEFAULTS["teacher_img"],
            help="teacher input size (0 = same as --img)")
    else:
        parser.set_defaults(**TEACHER_DEFAULTS)
    return parser


def option_defaults(distill: bool = False) -> dict:
    """Every training option with its default value (``distill``: train_distill.py's), as the parser
    gives them when no flag is set; a resumed run's recorded options are completed from these."""
    parser = build_parser(distill)
    return {name: parser.get_default(name) for name in vars(parser.parse_args(["--resume"]))}
