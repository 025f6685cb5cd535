"""Distillation inside the training engine (CPU, tiny synthetic set): resume with trained distillation
modules, the teacher's dtype under autocast, the stop epoch end to end, a resumed run's teacher."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import train
import train_distill
from utils.checkpoint.ours import load_checkpoint
from utils.engine.args import build_parser
from utils.engine.trainer import Trainer

from tests.helpers import HYP_DISTILL, interrupt_after_epoch
from tests.helpers import results_rows as _rows
from tests.helpers import train_argv as _args

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def teacher(tiny_data, tmp_path_factory) -> str:
    """A gelan-s teacher trained one epoch (wider than the student: every connector is a real conv)."""
    project = tmp_path_factory.mktemp("teacher")
    train.main(_args(tiny_data, project, "t", epochs=1, cfg=str(ROOT / "models" / "detect" / "gelan-s.yaml")))
    return str(project / "t" / "weights" / "best.pt")


def _hyp(folder: Path, name: str, lines: str) -> str:
    path = folder / f"{name}.yaml"
    path.write_text(f"base: {HYP_DISTILL}\n{lines}")
    return str(path)


def test_resume_with_connectors_mgd_and_crosskd_equals_an_uninterrupted_run(tiny_data, teacher, tmp_path,
                                                                            monkeypatch):
    """MGD generators, feature connectors and CrossKD connectors are trained with the student: a run cut
    after epoch 1 and resumed ends with the same student and the same distillation modules."""
    hyp = _hyp(tmp_path, "mods", "distill_feat: 1.0\ndistill_feat_type: mgd\ndistill_crosskd: true\n"
                                 "distill_stop_epoch: -1\n")
    extra = ("--teacher", teacher, "--hyp", hyp)
    Trainer(build_parser(distill=True).parse_args(_args(tiny_data, tmp_path, "full", 3, extra))).train()
    interrupt_after_epoch(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        Trainer(build_parser(distill=True).parse_args(_args(tiny_data, tmp_path, "cut", 3, extra))).train()
    monkeypatch.undo()
    train_distill.main(["--resume", str(tmp_path / "cut" / "weights" / "last.pt")])
    full = load_checkpoint(tmp_path / "full" / "weights" / "last.pt")
    resumed = load_checkpoint(tmp_path / "cut" / "weights" / "last.pt")
    modules = full["extra"]["distill_state"]
    assert any("cross" in k for k in modules) and any("feature_losses" in k for k in modules)
    assert any("adapters" in k for k in modules)
    for key, value in modules.items():
        torch.testing.assert_close(resumed["extra"]["distill_state"][key].float(), value.float(), rtol=1e-4,
                                   atol=1e-5, msg=key)
    for key, value in full["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key].float(), value.float(), rtol=1e-4, atol=1e-5, msg=key)


def test_resume_with_another_teacher_is_refused(tiny_data, teacher, tmp_path, monkeypatch, capsys):
    copy = tmp_path / "teacher.pt"
    copy.write_bytes(Path(teacher).read_bytes())
    interrupt_after_epoch(monkeypatch, 0)
    with pytest.raises(KeyboardInterrupt):
        train_distill.main(_args(tiny_data, tmp_path, "run", 2, ("--teacher", str(copy), "--hyp", HYP_DISTILL)))
    monkeypatch.undo()
    ckpt = load_checkpoint(tmp_path / "run" / "weights" / "last.pt")  # the file at the path now holds other bytes
    other = torch.load(copy, weights_only=True)
    other["date"] = "another teacher"
    torch.save(other, copy)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        train_distill.main(["--resume", str(tmp_path / "run" / "weights" / "last.pt")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not the one this run started with" in err[0]
    assert ckpt["extra"]["teacher"]["sha256"][:12] in err[0]


def test_kd_stops_when_mosaic_closes_and_the_teacher_is_not_run_after(tiny_data, teacher, tmp_path, monkeypatch):
    """distill_stop_epoch: close_mosaic (the default) with --close-mosaic 1 over 3 epochs: the teacher runs
    in epochs 0 and 1 only, and the last epoch logs no KD."""
    calls: list[int] = []
    original = Trainer._teacher_forward
    original_epoch = Trainer.train_one_epoch

    def counting_epoch(self, epoch, nb):
        self._epoch_now = epoch
        return original_epoch(self, epoch, nb)

    def counting_teacher(self, imgs):
        calls.append(self._epoch_now)
        return original(self, imgs)

    monkeypatch.setattr(Trainer, "train_one_epoch", counting_epoch)
    monkeypatch.setattr(Trainer, "_teacher_forward", counting_teacher)
    train_distill.main(_args(tiny_data, tmp_path, "stop", 3, ("--teacher", teacher, "--hyp", HYP_DISTILL,
                                                              "--close-mosaic", "1")))
    assert sorted(set(calls)) == [0, 1] and len(calls) == 4  # 2 batches in each of the 2 KD epochs
    rows = _rows(tmp_path / "stop")
    assert float(rows[1]["distill/total"]) > 0 and float(rows[2]["distill/total"]) == 0


@pytest.mark.parametrize("teacher_dtype, expected", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_the_teacher_keeps_its_dtype_under_the_students_autocast(tiny_data, teacher, tmp_path, monkeypatch,
                                                                teacher_dtype, expected):
    """--amp bf16 on the CPU puts the student under autocast; the teacher runs outside it, in
    distill_teacher_dtype: an fp32 teacher's maps are float32 (autocast would give bfloat16)."""
    seen: list[torch.dtype] = []
    original = Trainer._teacher_forward

    def recording(self, imgs):
        out, feats = original(self, imgs)
        seen.append(out[0].dtype if isinstance(out, list) else out[1][0].dtype)
        return out, feats

    monkeypatch.setattr("utils.engine.trainer.resolve_amp", lambda flag, device: torch.bfloat16)
    monkeypatch.setattr(Trainer, "_teacher_forward", recording)
    hyp = _hyp(tmp_path, teacher_dtype, f"distill_teacher_dtype: {teacher_dtype}\n")
    train_distill.main(_args(tiny_data, tmp_path, teacher_dtype, 1, ("--teacher", teacher, "--hyp", hyp)))
    assert seen and all(dtype == expected for dtype in seen)
