"""Small helpers shared by several test files."""

import csv
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
STUDENT_YAML = str(ROOT / "models" / "detect" / "yolov9-tiny.yaml")
HYP_LOW = str(ROOT / "hyp" / "hyp.scratch-low.yaml")
HYP_DISTILL = str(ROOT / "hyp" / "hyp.distill.yaml")


def randomize_bn(model: nn.Module) -> None:
    """Give every BatchNorm non-trivial statistics and affine terms, so that folding them is really tested."""
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.1)


def interrupt_after_epoch(monkeypatch, last_epoch: int) -> None:
    """Make the Trainer stop with KeyboardInterrupt after ``last_epoch`` (0-based) has been validated and
    saved, as a killed run would: last.pt holds that epoch. ``monkeypatch.undo()`` restores it."""
    from utils.engine.trainer import Trainer

    original = Trainer.after_epoch

    def after_epoch_then_stop(self, epoch, row, elapsed):
        out = original(self, epoch, row, elapsed)
        if epoch >= last_epoch:
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(Trainer, "after_epoch", after_epoch_then_stop)


def train_argv(data: str, project: Path, name: str, epochs: int = 2, extra: tuple[str, ...] = (),
               cfg: str = STUDENT_YAML) -> list[str]:
    """train.py / train_distill.py flags of a tiny CPU run: 64 px, batch 4, 2 batches per epoch, no plots."""
    return ["--cfg", cfg, "--data", data, "--img", "64", "--batch", "4", "--epochs", str(epochs),
            "--workers", "0", "--device", "cpu", "--project", str(project), "--name", name, "--noplots",
            "--hyp", HYP_LOW, "--max-batches", "2", *extra]


def results_rows(run: Path) -> list[dict[str, str]]:
    """The rows of a run's results.csv, as dicts of strings."""
    with open(run / "results.csv", newline="") as f:
        return list(csv.DictReader(f))
