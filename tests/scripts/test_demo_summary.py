"""The demo's closing table names each model after the model yaml its checkpoint was trained from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from models.yolo import DetectionModel
from scripts import demo_summary
from utils.checkpoint.ours import make_checkpoint, save_checkpoint
from utils.core.errors import UserError

ROOT = Path(__file__).resolve().parents[2]


def _run(runs: Path, run: str, cfg: str, map50_95: float) -> None:
    model = DetectionModel(str(ROOT / "models" / "detect" / cfg), nc=3)
    weights = runs / run / "weights"
    weights.mkdir(parents=True)
    save_checkpoint(make_checkpoint(model, epoch=-1, opt={"cfg": f"models/detect/{cfg}"}), weights / "best.pt")
    (weights / "best.onnx").write_bytes(b"")  # collect() only needs it to exist
    (runs / f"val-{run}").mkdir()
    (runs / f"val-{run}" / "metrics.json").write_text(json.dumps({"map50": 0.8, "map": map50_95}))


def test_labels_follow_the_checkpoints_model_yaml(tmp_path):
    _run(tmp_path, "teacher", "gelan-s.yaml", 0.59)
    _run(tmp_path, "student-scratch", "yolov9-tiny.yaml", 0.48)
    _run(tmp_path, "student-distill", "yolov9-tiny.yaml", 0.49)
    records = demo_summary.collect(tmp_path, 64)
    assert [r["model"] for r in records] == ["teacher (gelan-s)", "student (yolov9-tiny), scratch",
                                             "student (yolov9-tiny), distilled"]
    assert records[0]["params"] > records[1]["params"] and records[2]["map"] == pytest.approx(0.49)


def test_a_missing_step_is_named(tmp_path):
    _run(tmp_path, "teacher", "gelan-t.yaml", 0.5)
    with pytest.raises(UserError, match="student-scratch"):
        demo_summary.collect(tmp_path, 64)


def test_training_time_sums_each_students_epochs(tmp_path):
    for run, seconds in (("student-distill", (9.0, 8.5)), ("student-scratch", (7.0, 6.5))):
        (tmp_path / run).mkdir()
        # as utils/engine/run_logger.py writes it: a header row, one row per epoch, the epoch's seconds in time/epoch_s
        rows = [f"{e},1.5,{t}" for e, t in enumerate(seconds)]
        (tmp_path / run / "results.csv").write_text("epoch,train/box_loss,time/epoch_s\n" + "\n".join(rows) + "\n")
    assert demo_summary.training_time_line(tmp_path) == ("Training time (the epochs in results.csv): distilled 18 s, "
                                                         "scratch 14 s (1.30x).")
    (tmp_path / "student-scratch" / "results.csv").unlink()
    assert "not logged" in demo_summary.training_time_line(tmp_path)


def _record(path: Path, epochs: int, scratch: list[float], default: list[float], teacher: str = "t" * 64) -> Path:
    """A results JSON as benchmarks.distill_gain writes it (settings, one record per method and seed)."""
    runs = [{"method": "scratch", "seed": s, "val_map": v, "teacher_sha256": None} for s, v in enumerate(scratch)]
    runs += [{"method": "default", "seed": s, "val_map": v, "teacher_sha256": teacher} for s, v in enumerate(default)]
    path.write_text(json.dumps({"settings": {"epochs": epochs, "img": 256, "batch": 16, "close_mosaic": 5},
                                "runs": runs}))
    return path


def _student(runs: Path, epochs: int, teacher: str = "t" * 64) -> None:
    model = DetectionModel(str(ROOT / "models" / "detect" / "yolov9-tiny.yaml"), nc=3)
    weights = runs / "student-distill" / "weights"
    weights.mkdir(parents=True)
    opt = {"epochs": epochs, "img": 256, "batch": 16, "close_mosaic": 5}
    save_checkpoint(make_checkpoint(model, epoch=epochs - 1, opt=opt, extra={"teacher": {"sha256": teacher}}),
                    weights / "last.pt")


def test_the_demos_gain_is_compared_with_the_spread_of_one_run(tmp_path):
    _student(tmp_path, 40)
    record = _record(tmp_path / "r.json", 40, [0.47, 0.48, 0.49], [0.49, 0.50, 0.51])
    line = demo_summary.seed_spread_line(record, tmp_path, 0.015)
    assert "paired gain +2.0 points (+2.0, +2.0, +2.0)" in line and "about 1.0 points" in line
    assert "+1.5 is above the spread" in line
    assert "is within the spread" in demo_summary.seed_spread_line(record, tmp_path, 0.005)
    other = _record(tmp_path / "o.json", 80, [0.47, 0.48, 0.49], [0.49, 0.50, 0.51])
    assert "epochs differ" in demo_summary.seed_spread_line(other, tmp_path, 0.015)
    another_teacher = _record(tmp_path / "t.json", 40, [0.47, 0.48, 0.49], [0.49, 0.50, 0.51], teacher="u" * 64)
    assert "teacher differ" in demo_summary.seed_spread_line(another_teacher, tmp_path, 0.015)
    assert "No 3-seed record" in demo_summary.seed_spread_line(tmp_path / "missing.json", tmp_path, 0.015)
