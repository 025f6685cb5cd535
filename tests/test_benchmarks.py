"""The GPU training benchmarks: flags, helpers, and a --dry-run of each on the tiny synthetic set (CPU).

The dry runs use --in-process (no interpreter start per run) and one small model each, to stay fast.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from benchmarks import common, distill_bccd, train_bccd, train_speed

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("module", [train_bccd, train_speed, distill_bccd])
def test_help_lists_the_flags(module, capsys):
    with pytest.raises(SystemExit) as exit_info:
        module.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--dry-run", "--epochs", "--batch", "--img", "--device", "--workers", "--cache", "--amp", "--out"):
        assert flag in text


def test_help_as_a_script_from_another_folder(tmp_path):
    # `python benchmarks/x.py` must find the project's packages without -m and from any folder
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "distill_bccd.py"), "--help"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--ablation" in result.stdout and "--teacher" in result.stdout


def test_bad_model_name_is_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_bccd.main(["--dry-run", "--models", "no-such-model", "--work", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "no-such-model" in capsys.readouterr().err


def test_table_and_statistics_helpers():
    table = common.markdown_table(["a", "b"], [[1, "x"], [2, "y"]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1 | x |", "| 2 | y |"]
    mean, std = common.mean_spread([0.5, 0.7])
    assert mean == pytest.approx(0.6) and std == pytest.approx(0.1414, abs=1e-4)
    assert common.mean_spread([0.3]) == (0.3, 0.0)
    assert common.fmt_spread([0.5, 0.7]) == "0.600 ± 0.141"
    assert common.fmt(math.nan) == "-" and common.fmt(None) == "-"


def test_train_settings_flags():
    settings = common.TrainSettings(data=Path("d.yaml"), epochs=3, batch=8, img=64, device="cpu", cache="off",
                                    gpu_augment=True, close_mosaic=1, max_batches=2, noval=True)
    flags = settings.flags()
    assert flags[flags.index("--epochs") + 1] == "3" and flags[flags.index("--device") + 1] == "cpu"
    assert "--gpu-augment" in flags and "--noval" in flags and "--cache" not in flags
    assert flags[flags.index("--max-batches") + 1] == "2"


def test_train_rate_skips_the_first_epoch(tmp_path):
    (tmp_path / "results.csv").write_text("epoch,speed/img_per_s,time/epoch_s\n0,10,1\n1,100,1\n2,200,1\n")
    assert common.train_rate(tmp_path) == pytest.approx(150.0)
    (tmp_path / "results.csv").write_text("epoch,speed/img_per_s\n0,10\n")
    assert common.train_rate(tmp_path) == pytest.approx(10.0)  # one epoch: nothing to skip


def test_ablation_recipes_zero_the_right_weights(tmp_path):
    paths = distill_bccd.ablation_recipes(ROOT / "hyp" / "hyp.distill.yaml", tmp_path)
    hyps = [yaml.safe_load(p.read_text()) for p in paths]
    base = yaml.safe_load((ROOT / "hyp" / "hyp.distill.yaml").read_text())
    assert [(h["distill_cls"] > 0, h["distill_box"] > 0, h["distill_feat"] > 0) for h in hyps] == [
        (True, False, False), (True, True, False), (True, True, True)]
    assert hyps[-1] == base
    with pytest.raises(common.UserError, match="ablation-base"):
        distill_bccd.ablation_recipes(ROOT / "hyp" / "hyp.scratch-high.yaml", tmp_path / "x")


def test_summary_gap_closed_and_slowdown():
    def run(method, teacher, seed, test_map, rate):
        return {"student": "s", "method": method, "teacher": teacher, "seed": seed, "test_map50": test_map,
                "test_map": test_map, "images_s": rate}

    runs = [run("scratch", None, 0, 0.40, 200.0), run("scratch", None, 1, 0.42, 200.0),
            run("kd", "t", 0, 0.45, 150.0), run("kd", "t", 1, 0.47, 150.0)]
    rows = {r["method"]: r for r in distill_bccd.summarize(runs, [{"label": "t", "test_map": 0.51}])}
    assert rows["kd"]["gap_closed"] == pytest.approx(0.5)  # (0.46 - 0.41) / (0.51 - 0.41)
    assert rows["kd"]["slowdown"] == pytest.approx(0.25)
    assert math.isnan(rows["scratch"]["gap_closed"])
    assert math.isnan(distill_bccd.gap_closed(0.5, 0.4, 0.3))  # teacher behind: no gap to close


def test_reuse_needs_the_same_command(tmp_path):
    runner = common.Runner(tmp_path, reuse=True)
    run_dir = tmp_path / "runs" / "r"
    (run_dir / "weights").mkdir(parents=True)
    (run_dir / "weights" / "best.pt").write_bytes(b"")
    (run_dir / common.RUN_MARKER).write_text(json.dumps({"command": "python train.py --epochs 3"}))
    assert runner._finished(run_dir, "python train.py --epochs 3") is not None
    assert runner._finished(run_dir, "python train.py --epochs 4") is None
    assert common.Runner(tmp_path)._finished(run_dir, "python train.py --epochs 3") is None


def test_train_bccd_dry_run_and_reuse(tmp_path, capsys):
    argv = ["--dry-run", "--in-process", "--models", "gelan-t", "--epochs", "1", "--work", str(tmp_path)]
    first = train_bccd.main(argv)
    out = capsys.readouterr().out
    assert "DRY RUN" in out and "| gelan-t | ours | 0 |" in out and "| gelan-t | public YOLOv9 |" in out
    (run,) = first["runs"]
    assert run["params"] > 1_000_000 and 0.0 <= run["test_map"] <= 1.0
    assert json.loads((tmp_path / "results.json").read_text())["runs"][0]["model"] == "gelan-t"
    second = train_bccd.main(argv + ["--reuse"])  # nothing is trained again
    assert second["runs"][0]["wall_s"] == run["wall_s"]


def test_train_speed_dry_run(tmp_path, capsys):
    result = train_speed.main(["--dry-run", "--in-process", "--model", "gelan-t", "--modes", "gpu", "--epochs", "1",
                               "--work", str(tmp_path)])
    assert "(b) GPU-only step" in capsys.readouterr().out
    assert result["gpu_only"]["images_s"] > 0 and result["gpu_only"]["device"] == "cpu"
    (row,) = result["end_to_end"]
    assert row["mode"] == "gpu" and row["images_s"] > 0 and row["wall_images_s"] > 0


def test_distill_bccd_dry_run(tmp_path, capsys):
    result = distill_bccd.main(["--dry-run", "--in-process", "--teacher-models", "gelan-t", "--students",
                                "yolov9-tiny", "--recipes", "hyp.distill.yaml", "--epochs", "1",
                                "--work", str(tmp_path)])
    out = capsys.readouterr().out
    assert "gelan-t (teacher)" in out and "| yolov9-tiny | distill | gelan-t |" in out
    methods = {(r["method"], r["teacher"]) for r in result["runs"]}
    assert methods == {("scratch", None), ("distill", "gelan-t")}
    distilled = next(r for r in result["summary"] if r["method"] == "distill")
    assert not math.isnan(distilled["slowdown"]) and distilled["images_s"] > 0
    assert "--teacher" in result["runs"][1]["command"]


def test_bccd_is_converted_once_into_the_cache(bccd_root, tmp_path):
    from utils.data_config import load_data_config

    yaml_file = common.bccd_data(str(bccd_root), tmp_path)
    config = load_data_config(yaml_file)
    assert config["names"] == ["RBC", "WBC", "Platelets"]
    assert [common.count_images(config[s]) for s in ("train", "val", "test")] == [205, 87, 72]
    stamp = yaml_file.stat().st_mtime_ns
    assert common.bccd_data(str(bccd_root), tmp_path) == yaml_file and yaml_file.stat().st_mtime_ns == stamp


def test_model_sizes_reports_official_counts(capsys):
    from benchmarks.model_sizes import main as model_sizes

    rows = model_sizes(["--models", "gelan-t", "yolov9-tiny", "--nc", "80"])
    assert rows[0]["nc80"]["params"] == 2_442_640  # FACTS.md: official gelan-t at nc=80
    assert rows[1]["nc80"]["params"] < 3_500_000
    assert "| gelan-t | 2,442,640 |" in capsys.readouterr().out
