"""The training engine end to end on a tiny synthetic set (CPU): logs, checkpoints, resume, NaN guard, DDP."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
import train_distill
from utils.checkpoint.ours import load_checkpoint, load_model
from utils.data.synthetic import generate
from utils.engine.args import build_parser
from utils.engine.trainer import Trainer

from tests.helpers import HYP_DISTILL, HYP_LOW, STUDENT_YAML as STUDENT, interrupt_after_epoch
from tests.helpers import results_rows as _rows
from tests.helpers import train_argv as _args

ROOT = Path(__file__).resolve().parents[2]


def test_train_writes_run_folder(tiny_data, tmp_path):
    train.main(_args(tiny_data, tmp_path, "plain"))
    run = tmp_path / "plain"
    rows = _rows(run)
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    for key in ("train/box_loss", "train/cls_loss", "train/dfl_loss", "metrics/mAP_0.5:0.95", "lr/pg0",
                "speed/img_per_s", "time/epoch_s"):
        assert math.isfinite(float(rows[-1][key])), key
    assert (run / "opt.yaml").exists() and (run / "hyp.yaml").exists()
    best = load_checkpoint(run / "weights" / "best.pt")
    assert best["epoch"] == -1 and best["optimizer"] is None  # released: EMA weights only
    last = load_checkpoint(run / "weights" / "last.pt")
    assert last["epoch"] == 1 and last["optimizer"] is not None
    assert any(p.name.startswith("events.out.tfevents") for p in run.iterdir())
    model = load_model(run / "weights" / "best.pt")
    assert model.nc == 7 and len(model.names) == 7


def test_a_new_run_in_an_existing_folder_starts_its_results_anew(tiny_data, tmp_path):
    """--exist-ok reuses the folder (the demo does): the second run's results.csv has its own epochs only."""
    train.main(_args(tiny_data, tmp_path, "again", epochs=2, extra=("--exist-ok",)))
    train.main(_args(tiny_data, tmp_path, "again", epochs=1, extra=("--exist-ok",)))
    assert [int(r["epoch"]) for r in _rows(tmp_path / "again")] == [0]


def test_resume_matches_uninterrupted_run(tiny_data, tmp_path, monkeypatch):
    Trainer(build_parser().parse_args(_args(tiny_data, tmp_path, "full", epochs=3))).train()
    interrupt_after_epoch(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        Trainer(build_parser().parse_args(_args(tiny_data, tmp_path, "cut", epochs=3))).train()
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "cut" / "weights" / "last.pt")["epoch"] == 1

    train.main(_args(tiny_data, tmp_path, "ignored", epochs=3, extra=("--resume",
                                                                     str(tmp_path / "cut" / "weights" / "last.pt"))))
    full = load_checkpoint(tmp_path / "full" / "weights" / "last.pt")["state_dict"]
    resumed = load_checkpoint(tmp_path / "cut" / "weights" / "last.pt")["state_dict"]
    for key, value in full.items():
        torch.testing.assert_close(resumed[key].float(), value.float(), rtol=1e-4, atol=1e-5, msg=key)
    assert [int(r["epoch"]) for r in _rows(tmp_path / "cut")] == [0, 1, 2]


def test_nonfinite_loss_skips_step_then_stops(tiny_data, tmp_path, monkeypatch, capsys):
    from utils.loss import DetectionLoss

    real_forward = DetectionLoss.forward
    calls = {"n": 0}

    def sometimes_nan(self, preds, targets):
        loss, items = real_forward(self, preds, targets)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 2 else loss), items

    monkeypatch.setattr(DetectionLoss, "forward", sometimes_nan)
    train.main(_args(tiny_data, tmp_path, "onenan", epochs=1))
    state = load_checkpoint(tmp_path / "onenan" / "weights" / "last.pt")["state_dict"]
    assert all(torch.isfinite(v.float()).all() for v in state.values())
    assert "optimizer step skipped" in capsys.readouterr().err

    monkeypatch.setattr(DetectionLoss, "forward",
                        lambda self, p, t: (lambda out: (out[0] * float("nan"), out[1]))(real_forward(self, p, t)))
    with pytest.raises(SystemExit) as exit_info:
        train.main(_args(tiny_data, tmp_path, "allnan", epochs=30))
    assert exit_info.value.code == 2


def test_distillation_logs_terms_and_resumes(tiny_data, tmp_path, monkeypatch):
    train.main(_args(tiny_data, tmp_path, "teacher", epochs=1))
    teacher = str(tmp_path / "teacher" / "weights" / "best.pt")
    args = _args(tiny_data, tmp_path, "student", epochs=2, extra=("--teacher", teacher, "--hyp", HYP_DISTILL))
    train_distill.main(args)
    rows = _rows(tmp_path / "student")
    for key in ("distill/cls", "distill/box", "distill/total"):  # the default: KD at full weight from step 0
        assert float(rows[0][key]) > 0, key
    assert float(rows[0]["distill/feat"]) == 0  # feature KD is off in the default recipe
    ckpt = load_checkpoint(tmp_path / "student" / "weights" / "last.pt")
    assert ckpt["extra"]["teacher"]["path"] == teacher and len(ckpt["extra"]["teacher"]["sha256"]) == 64
    assert not any(k.startswith("teacher") for k in ckpt["state_dict"])  # never saved into the student

    interrupt_after_epoch(monkeypatch, 0)
    with pytest.raises(KeyboardInterrupt):
        train_distill.main(_args(tiny_data, tmp_path, "cut", epochs=2, extra=("--teacher", teacher, "--hyp", HYP_DISTILL)))
    monkeypatch.undo()
    train_distill.main(["--resume", str(tmp_path / "cut" / "weights" / "last.pt")])
    assert [int(r["epoch"]) for r in _rows(tmp_path / "cut")] == [0, 1]


def test_kd_warmup_ramps_in_over_nominal_steps(tiny_data, tmp_path):
    """distill_warmup_steps: KD's weight rises from 0 at the first step over that many nominal steps
    (here nbs auto = the batch, so one step per batch): with 1,000 steps the first epoch's KD is about
    a thousandth of the same run's without warm-up, and not 0 (the teacher runs from the first step)."""
    train.main(_args(tiny_data, tmp_path, "teacher", epochs=1))
    teacher = str(tmp_path / "teacher" / "weights" / "best.pt")
    for name, steps in (("cold", 0), ("warm", 1000)):
        hyp = tmp_path / f"{name}.yaml"
        hyp.write_text(f"base: {HYP_DISTILL}\ndistill_warmup_steps: {steps}\ndistill_stop_epoch: -1\n")
        train_distill.main(_args(tiny_data, tmp_path, name, epochs=1, extra=("--teacher", teacher, "--hyp", str(hyp))))
    cold, warm = (float(_rows(tmp_path / n)[0]["distill/total"]) for n in ("cold", "warm"))
    assert 0 < warm < cold / 100


def test_distillation_with_all_kd_weights_zero_equals_scratch_training(tiny_data, tmp_path):
    """The control of the distillation benchmark, made exact: same seed, same data order, no KD."""
    train.main(_args(tiny_data, tmp_path, "teacher0", epochs=1))
    hyp = tmp_path / "no-kd.yaml"
    hyp.write_text(f"base: {HYP_LOW}\ndistill_cls: 0.0\ndistill_box: 0.0\ndistill_feat: 0.0\n")
    train.main(_args(tiny_data, tmp_path, "scratch", epochs=2))
    train_distill.main(_args(tiny_data, tmp_path, "nokd", epochs=2, extra=(
        "--teacher", str(tmp_path / "teacher0" / "weights" / "best.pt"), "--hyp", str(hyp))))
    scratch = load_checkpoint(tmp_path / "scratch" / "weights" / "last.pt")
    distilled = load_checkpoint(tmp_path / "nokd" / "weights" / "last.pt")
    assert scratch["state_dict"].keys() == distilled["state_dict"].keys()
    assert all(torch.equal(v, distilled["state_dict"][k]) for k, v in scratch["state_dict"].items())
    assert [r["train/box_loss"] for r in _rows(tmp_path / "scratch")] == \
        [r["train/box_loss"] for r in _rows(tmp_path / "nokd")]


def test_teacher_with_other_classes_is_refused(tiny_data, tmp_path, capsys):
    other = generate(tmp_path / "other", n_train=4, n_val=2, img_size=64, seed=1)
    text = Path(other).read_text().replace("nc: 7", "nc: 2")
    text = text.replace("names: [circle, ring, triangle, square, star, cross, hexagon]", "names: [a, b]")
    Path(other).write_text(text)
    train.main(_args(tiny_data, tmp_path, "teacher7", epochs=1))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        train_distill.main(_args(str(other), tmp_path, "mismatch", extra=(
            "--teacher", str(tmp_path / "teacher7" / "weights" / "best.pt"))))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "classes" in err[0]


def test_two_process_ddp_distillation_with_freezing_and_stop(tiny_data, tmp_path):
    """Under DDP the wrapper is rebuilt when the trainable set changes: backbone frozen in epoch 0,
    trainable in epoch 1, KD (and its connectors) off from epoch 2."""
    train.main(_args(tiny_data, tmp_path, "ddp-teacher", epochs=1))
    hyp = tmp_path / "ddp-kd.yaml"
    hyp.write_text(f"base: {HYP_DISTILL}\nfreeze_backbone_epochs: 1\ndistill_stop_epoch: 2\ndistill_feat: 4.0\n"
                   "distill_warmup_steps: 2\n")  # w = 0 at the first step: the connectors must still take part
    env = dict(os.environ, OMP_NUM_THREADS="1")
    common = _args(tiny_data, tmp_path, "ddp-kd", epochs=3, extra=(
        "--teacher", str(tmp_path / "ddp-teacher" / "weights" / "best.pt"), "--hyp", str(hyp)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
           str(ROOT / "train_distill.py"), *common]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = _rows(tmp_path / "ddp-kd")
    assert len(rows) == 3 and float(rows[2]["distill/total"]) == 0 and float(rows[0]["distill/total"]) > 0
    assert "student backbone frozen" in result.stderr and "student backbone trainable" in result.stderr


@pytest.mark.parametrize("argv, needle", [
    (["--data", "synthetic", "--cfg", "nope.yaml"], "nope.yaml"),
    (["--epochs", "x"], "--epochs"),
    (["--data", "missing.yaml", "--cfg", STUDENT], "missing.yaml"),
])
def test_bad_input_one_line_exit_2(argv, needle, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv + ["--device", "cpu"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


@pytest.mark.slow
def test_two_process_ddp_matches_single_process_shape(tmp_path):
    data = str(generate(tmp_path / "syn128", n_train=16, n_val=4, img_size=128, seed=0))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    common = _args(data, tmp_path, "ddp", epochs=2, extra=("--img", "128", "--batch", "8"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           str(ROOT / "train.py"), *common]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    train.main(_args(data, tmp_path, "single", epochs=2, extra=("--img", "128", "--batch", "8")))
    ddp, single = _rows(tmp_path / "ddp"), _rows(tmp_path / "single")
    assert len(ddp) == len(single) == 2
    keys = ("train/box_loss", "train/cls_loss", "train/dfl_loss")
    for epoch in range(2):
        a = sum(float(ddp[epoch][k]) for k in keys)
        b = sum(float(single[epoch][k]) for k in keys)
        assert math.isfinite(a) and abs(a - b) / b < 0.5, (epoch, a, b)


def test_hyp_base_is_merged_and_loops_refused(tmp_path):
    from utils.core.errors import UserError
    from utils.engine.setup import load_hyp

    (tmp_path / "mine.yaml").write_text(f"base: [{HYP_DISTILL}, extra.yaml]\nnbs: 16\n")
    (tmp_path / "extra.yaml").write_text("ema_epochs: 3\nnbs: 32\ndistill_cls: 1.0\n")
    merged = load_hyp(tmp_path / "mine.yaml")
    distill = load_hyp(HYP_DISTILL)
    assert merged["ema_epochs"] == 3 and merged["distill_box"] == distill["distill_box"] and "base" not in merged
    assert merged["nbs"] == 16 and merged["distill_cls"] == 1.0  # this file's own key wins, then the later base
    (tmp_path / "a.yaml").write_text("base: b.yaml\nlr0: 0.1\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nlr0: 0.2\n")
    with pytest.raises(UserError, match="loop"):
        load_hyp(tmp_path / "a.yaml")


def _steps_with_hyp(data: str, project: Path, name: str, lines: str) -> int:
    """Optimizer steps (= EMA updates) of a 2-epoch, 2-batch run at batch 4 without warm-up."""
    hyp = project / f"{name}.yaml"
    hyp.write_text(f"base: {HYP_LOW}\nwarmup_epochs: 0\n{lines}")
    train.main(_args(data, project, name, extra=("--hyp", str(hyp))))
    return int(load_checkpoint(project / name / "weights" / "last.pt")["ema_updates"])


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")  # the nbs-64 run takes no step
def test_nominal_batch_hyp_sets_the_images_per_optimizer_step(tiny_data, tmp_path):
    """hyp nbs: at nbs 4 and batch 4 every batch is a step (2 epochs x 2 batches = 4 steps); at YOLO's
    64 a step needs 16 batches and these 4 make none; auto (or absent) on 8 images picks the batch."""
    assert _steps_with_hyp(tiny_data, tmp_path, "nbs4", "nbs: 4\n") == 4
    assert _steps_with_hyp(tiny_data, tmp_path, "nbs64", "nbs: 64\n") == 0
    assert _steps_with_hyp(tiny_data, tmp_path, "auto", "nbs: auto\n") == 4
    assert _steps_with_hyp(tiny_data, tmp_path, "absent", "") == 4


def test_nominal_batch_values():
    from utils.core.errors import UserError
    from utils.engine.optim import accumulate_steps, nominal_batch, scaled_weight_decay, warmup_accumulate

    assert nominal_batch({}) == 64 and nominal_batch({"nbs": 16}) == 16
    assert accumulate_steps(16) == 4 and accumulate_steps(16, 16) == 1 and accumulate_steps(16, 8) == 1
    # the decay follows the images per step: batch 16 x 1 step at nbs 16 is the nominal batch
    assert scaled_weight_decay(5e-4, 16, 16) == pytest.approx(5e-4)
    assert scaled_weight_decay(5e-4, 32, 16) == pytest.approx(1e-3)
    assert warmup_accumulate(0, 100, 16, 32) == 1 and warmup_accumulate(100, 100, 16, 32) == 2
    for bad in (0, -16, 1.5, "16", True, "automatic"):
        with pytest.raises(UserError, match="nbs"):
            nominal_batch({"nbs": bad})


@pytest.mark.parametrize("images, batch, nbs", [
    (118_287, 16, 64),  # COCO train2017: YOLO's 64
    (3200, 16, 64), (3199, 16, 48), (2000, 16, 32), (1000, 16, 16),
    (205, 16, 16), (103, 16, 16),  # BCCD and half of it: every batch a step
    (205, 8, 8), (500, 128, 128), (100_000, 128, 64)])
def test_auto_nominal_batch(images, batch, nbs):
    from utils.engine.optim import MIN_STEPS_PER_EPOCH, auto_nominal_batch, nominal_batch

    chosen, reason = auto_nominal_batch(images, batch)
    assert chosen == nbs and str(images) in reason
    assert nominal_batch({"nbs": "auto"}, images, batch) == nominal_batch({}, images, batch) == nbs
    assert chosen % batch == 0 or chosen == 64
    assert images / chosen >= MIN_STEPS_PER_EPOCH or chosen == batch


def test_ema_auto_is_yolos_on_a_large_set_and_a_few_epochs_on_a_small_one():
    from utils.engine.ema import ema_choice
    from utils.core.errors import UserError

    assert ema_choice({}, 118_287 / 64)[:2] == (0.9999, 2000.0)  # COCO at nbs 64
    decay, tau, reason = ema_choice({"ema_epochs": "auto"}, 13)  # BCCD at nbs 16: 13 updates per epoch
    assert decay == pytest.approx(1 - 1 / 39) and tau == 13 and "3 epochs" in reason
    assert ema_choice({"ema_epochs": 3}, 13)[:2] == (decay, tau)  # the same as writing it
    assert ema_choice({"ema_epochs": 5}, 13)[:2] == (pytest.approx(1 - 1 / 65), 13)
    assert ema_choice({"ema_decay": 0.999, "ema_tau": 100}, 13)[:2] == (0.999, 100.0)
    for bad in ({"ema_epochs": 0}, {"ema_epochs": "three"}, {"ema_decay": 1.5}):
        with pytest.raises(UserError, match="ema_"):
            ema_choice(bad, 13)


def test_bad_nominal_batch_is_one_line_exit_2(tiny_data, tmp_path, capsys):
    hyp = tmp_path / "bad.yaml"
    hyp.write_text(f"base: {HYP_LOW}\nnbs: 0\n")
    with pytest.raises(SystemExit) as exit_info:
        train.main(_args(tiny_data, tmp_path, "bad", extra=("--hyp", str(hyp))))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nbs" in err[0]


def test_a_checkpoint_without_auto_settings_resumes_with_yolos_values():
    """Runs record the nbs and weight average they chose; a checkpoint that has neither trained with
    YOLO's fixed 64 / 0.9999 / 2000 and keeps them when resumed (not the automatic choice)."""
    from utils.engine.trainer import legacy_resume_hyp

    old = legacy_resume_hyp({"lr0": 0.01})
    assert old["nbs"] == 64 and (old["ema_decay"], old["ema_tau"]) == (0.9999, 2000)
    recorded = {"lr0": 0.01, "nbs": 16, "ema_decay": 0.97, "ema_tau": 13.0}
    assert legacy_resume_hyp(recorded) == recorded
    assert legacy_resume_hyp({"nbs": 16, "ema_epochs": 3}) == {"nbs": 16, "ema_epochs": 3}
