"""The GPU training benchmarks: flags, helpers, and a --dry-run of each on the tiny synthetic set (CPU).

The dry runs use --in-process (no interpreter start per run) and one small model each, to stay fast.
"""

import argparse
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from benchmarks import distill_gain, train_bccd, train_speed
from benchmarks.harness.cli import hyp_file, model_cfg
from benchmarks.harness.data import BCCD_DATA, count_images, resolve_data
from benchmarks.harness.results import fmt, fmt_spread, markdown_table, mean_spread
from benchmarks.harness.runner import PENDING_MARKER, RUN_MARKER, Runner, TrainSettings, read_results_csv, train_rate
from utils.core.errors import UserError
from utils.engine.setup import file_sha256

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("module", [train_bccd, train_speed, distill_gain])
def test_help_lists_the_flags(module, capsys):
    with pytest.raises(SystemExit) as exit_info:
        module.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--dry-run", "--epochs", "--batch", "--img", "--device", "--workers", "--cache", "--amp", "--out"):
        assert flag in text


def test_help_as_a_module():
    result = subprocess.run([sys.executable, "-m", "benchmarks.distill_gain", "--help"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--methods" in result.stdout and "--teacher" in result.stdout and "--data" in result.stdout


def test_bad_model_name_is_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_bccd.main(["--dry-run", "--models", "no-such-model", "--work", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "no-such-model" in capsys.readouterr().err


def test_table_and_statistics_helpers():
    table = markdown_table(["a", "b"], [[1, "x"], [2, "y"]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1 | x |", "| 2 | y |"]
    mean, std = mean_spread([0.5, 0.7])
    assert mean == pytest.approx(0.6) and std == pytest.approx(0.1414, abs=1e-4)
    assert mean_spread([0.3]) == (0.3, 0.0)
    assert fmt_spread([0.5, 0.7]) == "0.600 ± 0.141"
    assert fmt(math.nan) == "-" and fmt(None) == "-"


def test_train_settings_flags():
    settings = TrainSettings(data=Path("d.yaml"), epochs=3, batch=8, img=64, device="cpu", cache="off",
                             gpu_augment=True, close_mosaic=1, max_batches=2, noval=True)
    flags = settings.flags()
    assert flags[flags.index("--epochs") + 1] == "3" and flags[flags.index("--device") + 1] == "cpu"
    assert "--gpu-augment" in flags and "--noval" in flags and "--cache" not in flags
    assert flags[flags.index("--max-batches") + 1] == "2"


def test_train_rate_skips_the_first_epoch(tmp_path):
    (tmp_path / "results.csv").write_text("epoch,speed/img_per_s,time/epoch_s\n0,10,1\n1,100,1\n2,200,1\n")
    assert train_rate(tmp_path) == pytest.approx(150.0)
    (tmp_path / "results.csv").write_text("epoch,speed/img_per_s\n0,10\n")
    assert train_rate(tmp_path) == pytest.approx(10.0)  # one epoch: nothing to skip


def test_method_hyps_apply_the_ablation_and_the_common_changes(tmp_path):
    opt = distill_gain.parse_args(["--hyp-set", "ema_epochs=3", "lr0=0.02", "--work", str(tmp_path),
                                   "--methods", "scratch", *distill_gain.METHODS])
    hyps = {m: yaml.safe_load(p.read_text()) for m, p in distill_gain.method_hyps(opt, tmp_path / "hyp").items()}
    base = yaml.safe_load((ROOT / "hyp" / "hyp.distill.yaml").read_text())
    assert all(h["ema_epochs"] == 3 and h["lr0"] == 0.02 for h in hyps.values())
    assert "distill_cls" not in hyps["scratch"]
    assert hyps["default"] == {**base, "ema_epochs": 3, "lr0": 0.02}
    assert hyps["crosskd"]["distill_crosskd"] is True and hyps["pkd"]["distill_feat"] == 4.0
    assert base["distill_feat"] == 0 and hyps["teacher-fp32"]["distill_teacher_dtype"] == "fp32"
    assert hyps["default"]["distill_stop_epoch"] == "close_mosaic" and hyps["kd-constant"]["distill_stop_epoch"] == -1
    assert [hyps["kd-x2"][k] for k in distill_gain.KD_WEIGHTS] == [2 * base[k] for k in distill_gain.KD_WEIGHTS]
    assert hyps["kd-x2"]["distill_stop_epoch"] == base["distill_stop_epoch"]
    assert [hyps["kd-off"][k] for k in ("distill_cls", "distill_box", "distill_feat")] == [0, 0, 0]
    assert hyps["classic"]["distill_det_weight"] == 0.65
    assert hyps["lad"] == {**hyps["default"], "distill_assign": "teacher"}
    assert hyps["warmup-300"] == {**hyps["default"], "distill_warmup_steps": 300} and base["distill_warmup_steps"] == 0
    assert distill_gain.parse_args([]).methods == ["scratch", "default"]  # the headline comparison only
    with pytest.raises(UserError, match="--hyp-set"):
        distill_gain.parse_hyp_set(["novalue"])
    with pytest.raises(UserError, match="unknown"):
        distill_gain.method_hyps(distill_gain.parse_args(["--methods", "magic"]), tmp_path / "x")


def test_summary_pairs_seeds_and_claims_only_consistent_gains():
    def run(method, seed, test_map, rate):
        return {"method": method, "seed": seed, "test_map50": test_map, "test_map": test_map, "val_map": test_map,
                "val_map50": test_map, "images_s": rate, "test_per_class": {"a": test_map}}

    runs = [run("scratch", 0, 0.40, 200.0), run("scratch", 1, 0.42, 200.0), run("scratch", 2, 0.41, 200.0),
            run("default", 0, 0.45, 150.0), run("default", 1, 0.47, 150.0), run("default", 2, 0.46, 150.0),
            run("classic", 0, 0.43, 180.0), run("classic", 1, 0.40, 180.0), run("classic", 2, 0.44, 180.0)]
    rows = {r["method"]: r for r in distill_gain.summarize(runs, {"test_map": 0.51})}
    assert rows["default"]["paired_diff"] == pytest.approx([0.05, 0.05, 0.05])
    assert rows["default"]["gap_closed"] == pytest.approx(0.5)  # (0.46 - 0.41) / (0.51 - 0.41)
    assert rows["default"]["time_vs_scratch"] == pytest.approx(200 / 150)
    assert rows["default"]["claimed"] and not rows["classic"]["claimed"]  # classic loses on seed 1
    assert math.isnan(rows["scratch"]["gap_closed"]) and not rows["scratch"]["claimed"]
    assert math.isnan(distill_gain.gap_closed(0.5, 0.4, 0.3))  # teacher behind: no gap to close
    two_seeds = [r for r in runs if r["seed"] < 2]  # +5 and +5 points: consistent, but two seeds claim nothing
    assert not {r["method"]: r for r in distill_gain.summarize(two_seeds, {"test_map": 0.51})}["default"]["claimed"]
    # the cost runs (each method alone) decide the time ratio where they measured the method and scratch
    timed = {r["method"]: r for r in distill_gain.summarize(runs, {"test_map": 0.51}, {"scratch": 30.0, "default": 24.0})}
    assert timed["default"]["time_vs_scratch"] == pytest.approx(1.25) and timed["default"]["time_from"] == "cost runs"
    assert timed["classic"]["time_vs_scratch"] == pytest.approx(200 / 180) and timed["classic"]["time_from"] == "runs"


def test_best_epoch_is_the_last_maximum_of_the_engine_fitness():
    # fitness 0.1 mAP50 + 0.9 mAP50-95: epoch 1 wins on mAP50-95 alone, epoch 3 ties it and replaces it
    assert distill_gain.best_epoch([0.5, 0.5, 0.9, 0.5], [0.30, 0.40, 0.35, 0.40]) == 3
    # mAP50 counts too: epoch 2 (0.1 + 0.324) beats epoch 1 (0.05 + 0.36) with a lower mAP50-95
    assert distill_gain.best_epoch([0.5, 0.5, 1.0], [0.30, 0.40, 0.36]) == 2


def test_last_pt_scores_are_paired_only_where_both_runs_have_them():
    def run(method, seed, test_map, last=None):
        record = {"method": method, "seed": seed, "test_map50": test_map, "test_map": test_map, "val_map": test_map,
                  "val_map50": test_map, "images_s": 100.0, "wall_s": 1.0, "test_per_class": {}}
        return record if last is None else {**record, "last_test_map": last}

    runs = [run("scratch", 0, 0.50, 0.48), run("scratch", 1, 0.50), run("default", 0, 0.52, 0.51),
            run("default", 1, 0.52, 0.49)]
    rows = {r["method"]: r for r in distill_gain.summarize(runs, {"test_map": 0.6})}
    assert rows["default"]["last_test_map"] == pytest.approx([0.51, 0.49])
    assert rows["default"]["last_paired_diff"] == pytest.approx([0.03])  # seed 1's scratch has no last.pt score
    assert rows["scratch"]["last_paired_diff"] == []
    table = distill_gain.tables(distill_gain.summarize(runs, {"test_map": 0.6}), runs,
                                {"label": "t", "val_map": 0.6, "test_map": 0.6, "test_map50": 0.9}, True, {})
    assert "| default | 2 | 0.500 ± 0.014 | +3.0 (+3.0) |" in table


def test_a_kept_run_names_the_cpu_it_trained_on(tmp_path):
    """The same seed and command on another CPU is another sample: the report must say when it mixes them."""
    first = tmp_path / "first.json"
    first.write_text(json.dumps({"machine": {"cpu": "AMD EPYC"}, "settings": {"work": str(tmp_path / "a")},
                                 "runs": [{"method": "scratch", "seed": 0, "command": "python train.py"}]}))
    second = tmp_path / "second.json"  # kept the first call's run, trained one of its own on another CPU
    second.write_text(json.dumps({"machine": {"cpu": "Intel Xeon"}, "settings": {"work": str(tmp_path / "b")},
                                  "runs": [{"method": "scratch", "seed": 0, "command": "python train.py",
                                            "recorded_in": str(first)},
                                           {"method": "default", "seed": 0, "command": "python train_distill.py"},
                                           {"method": "no-pkd", "seed": 0, "command": "python train_distill.py",
                                            "cpu": "Arm"}]}))
    moved = distill_gain.moved_runs(second, tmp_path / "c")
    assert [r["cpu"] for r in moved] == ["AMD EPYC", "Intel Xeon", "Arm"]
    assert [r["cpu"] for r in distill_gain.earlier_runs(second)] == ["AMD EPYC", "Intel Xeon", "Arm"]

    def run(method, cpu):
        return {"method": method, "seed": 0, "test_map50": 0.8, "test_map": 0.5, "val_map": 0.5, "val_map50": 0.8,
                "images_s": 10.0, "wall_s": 1.0, "test_per_class": {}, "cpu": cpu}

    teacher = {"label": "t", "val_map": 0.6, "test_map": 0.6, "test_map50": 0.9}
    mixed = [run("scratch", "AMD EPYC"), run("default", "Intel Xeon")]
    assert "trained on 2 CPUs" in distill_gain.tables(distill_gain.summarize(mixed, teacher), mixed, teacher, True, {})
    alike = [run("scratch", "Intel Xeon"), run("default", "Intel Xeon")]
    assert "CPUs" not in distill_gain.tables(distill_gain.summarize(alike, teacher), alike, teacher, True, {})


def test_reuse_needs_the_same_command_and_hyp(tmp_path):
    runner = Runner(tmp_path, reuse=True)
    run_dir = tmp_path / "runs" / "r"
    (run_dir / "weights").mkdir(parents=True)
    (run_dir / "weights" / "best.pt").write_bytes(b"")
    (run_dir / RUN_MARKER).write_text(json.dumps({"command": "python train.py --epochs 3",
                                                   "hyp_sha256": "aa"}))
    assert runner._finished(run_dir, "python train.py --epochs 3", "aa") is not None
    assert runner._finished(run_dir, "python train.py --epochs 4", "aa") is None
    assert runner._finished(run_dir, "python train.py --epochs 3", "bb") is None  # the hyp file was edited
    assert Runner(tmp_path)._finished(run_dir, "python train.py --epochs 3", "aa") is None


def test_a_run_is_kept_under_another_name_when_it_trained_the_same_thing(tmp_path):
    """The recipe's weights doubled became the default: its kd-x2 runs are the new default's runs."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("lr0: 0.01\ndistill_cls: 1.0\ndistill_box: 1.5\ndistill_feat: 2.0\n")
    doubled = distill_gain.write_hyp(tmp_path / "old", "kd-x2", recipe, {distill_gain.KD_SCALE: 2.0})
    new_recipe = tmp_path / "new.yaml"
    new_recipe.write_text("# new default\nlr0: 0.01\ndistill_feat: 4.0\ndistill_cls: 2.0\ndistill_box: 3.0\n")
    default = distill_gain.write_hyp(tmp_path / "new", "default", new_recipe, {})
    assert doubled.read_bytes() != default.read_bytes()

    def identity(hyp, name, teacher="t", extra=""):
        command = f"python train_distill.py --hyp {hyp} --seed 0 --name yolov9-tiny-{name}-s0{extra}"
        return {"command": command, "hyp_sha256": file_sha256(hyp), "hyp_values_sha256":
                distill_gain.hyp_values_sha256(hyp), "teacher_sha256": teacher}

    old = {**identity(doubled, "kd-x2"), "method": "kd-x2", "seed": 0, "hyp": str(doubled), "test_map": 0.5}
    del old["hyp_values_sha256"]  # a record written before values were hashed: read from its file
    filled = {**old, "hyp_values_sha256": distill_gain._recorded_hyp_values(old)}
    assert distill_gain.recorded_run([filled], identity(default, "default"))["test_map"] == 0.5
    assert distill_gain.recorded_run([filled], identity(default, "default", teacher="u")) is None
    assert distill_gain.recorded_run([filled], identity(default, "default", extra=" --epochs 9")) is None
    halved = distill_gain.write_hyp(tmp_path / "new", "kd-half", new_recipe, {distill_gain.KD_SCALE: 0.5})
    assert distill_gain.recorded_run([filled], identity(halved, "kd-half")) is None
    doubled.write_text(doubled.read_text().replace("lr0: 0.01", "lr0: 0.02"))  # the file no longer holds the run's
    assert distill_gain._recorded_hyp_values(old) is None                    # bytes: its values are not trusted


def test_plain_and_explicit_hyps_that_train_alike_hash_alike(tmp_path):
    """A plain hyp (nbs and the weight average left to the tool) is the same run as one that writes out
    what the tool chooses for that data set: nbs 16 and ema_epochs 3 for 205 images at batch 16, YOLO's
    64 / 0.9999 / 2000 on COCO. Recorded runs of the explicit form are kept by --reuse."""
    plain = tmp_path / "plain.yaml"
    plain.write_text("lr0: 0.01\n")
    explicit = tmp_path / "explicit.yaml"
    explicit.write_text("lr0: 0.01\nnbs: 16\nema_epochs: 3\n")
    yolo = tmp_path / "yolo.yaml"
    yolo.write_text("lr0: 0.01\nnbs: 64\nema_decay: 0.9999\nema_tau: 2000\n")
    bccd, coco = (205, 16), (118_287, 16)
    assert distill_gain.hyp_values_sha256(plain, *bccd) == distill_gain.hyp_values_sha256(explicit, *bccd)
    assert distill_gain.hyp_values_sha256(plain, *coco) == distill_gain.hyp_values_sha256(yolo, *coco)
    assert distill_gain.hyp_values_sha256(plain, *coco) != distill_gain.hyp_values_sha256(explicit, *coco)
    assert distill_gain.hyp_values_sha256(plain, 2000, 16) != distill_gain.hyp_values_sha256(explicit, 2000, 16)


def test_random_teacher_file_is_the_same_in_every_session(tmp_path):
    """Its hash is part of the control run's identity: a clock in the bytes would rerun it every session."""
    import torch

    from utils.checkpoint.ours import load_model

    trained = Path(__file__).resolve().parents[2] / "weights" / "gelan-t-bccd256.pt"
    first = distill_gain.random_teacher(trained, tmp_path / "a" / "random-teacher.pt")
    second = distill_gain.random_teacher(trained, tmp_path / "b" / "random-teacher.pt")
    assert first.read_bytes() == second.read_bytes()
    untrained, shipped = load_model(first), load_model(trained)
    assert untrained.names == shipped.names and untrained.yaml == shipped.yaml
    differs = [not torch.equal(a.float(), b.float()) for a, b in
               zip(untrained.state_dict().values(), shipped.state_dict().values()) if a.is_floating_point()]
    assert sum(differs) > len(differs) // 2  # not the trained weights


def test_reuse_resumes_an_interrupted_run(tmp_path, monkeypatch):
    from utils.engine.trainer import Trainer
    from utils.data.synthetic import generate

    data = generate(tmp_path / "syn", n_train=8, n_val=4, img_size=64, seed=0)
    settings = TrainSettings(data=data, epochs=2, batch=4, img=64, device="cpu", workers=0, cache="off",
                             amp="off", max_batches=2)
    cfg, hyp = model_cfg("yolov9-tiny"), hyp_file("hyp.scratch-low.yaml")
    original = Trainer.after_epoch

    def crash(self, epoch, row, elapsed):
        original(self, epoch, row, elapsed)
        raise KeyboardInterrupt  # the session ends after the first epoch

    monkeypatch.setattr(Trainer, "after_epoch", crash)
    runner = Runner(tmp_path / "work", reuse=True, in_process=True)
    with pytest.raises(KeyboardInterrupt):
        runner.train("r", cfg, hyp, 0, settings)
    run_dir = tmp_path / "work" / "runs" / "r"
    assert (run_dir / PENDING_MARKER).is_file() and not (run_dir / RUN_MARKER).is_file()
    # the interrupted part took 1000 s (as results.csv says): the resumed run's wall time includes it
    csv_file = run_dir / "results.csv"
    header, first = csv_file.read_text().splitlines()[:2]
    column = [name.strip() for name in header.split(",")].index("time/epoch_s")
    cells = first.split(",")
    cells[column] = "1000"
    csv_file.write_text(header + "\n" + ",".join(cells) + "\n")
    monkeypatch.setattr(Trainer, "after_epoch", original)
    result = Runner(tmp_path / "work", reuse=True, in_process=True).train("r", cfg, hyp, 0, settings)
    assert result["resumed"] and "--resume" not in result["command"]
    rows = read_results_csv(run_dir)
    assert [row["epoch"] for row in rows] == [0.0, 1.0]
    assert rows[0]["time/epoch_s"] == 1000 and 1000 < result["wall_s"] < 1000 + 600
    assert not (run_dir / PENDING_MARKER).exists()
    again = Runner(tmp_path / "work", reuse=True, in_process=True).train("r", cfg, hyp, 0, settings)
    assert again["wall_s"] == result["wall_s"]  # finished now: reused, not trained again

    # an interrupted run whose hyp file was edited since starts over instead of resuming
    monkeypatch.setattr(Trainer, "after_epoch", crash)
    edited = tmp_path / "edited.yaml"
    edited.write_text(hyp.read_text())
    with pytest.raises(KeyboardInterrupt):
        runner.train("e", cfg, edited, 0, settings)
    edited.write_text(hyp.read_text() + "lr0: 0.02\n")
    monkeypatch.setattr(Trainer, "after_epoch", original)
    fresh = Runner(tmp_path / "work", reuse=True, in_process=True).train("e", cfg, edited, 0, settings)
    assert not fresh["resumed"]


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


def test_distill_gain_dry_run(tmp_path, capsys, monkeypatch):
    args = ["--dry-run", "--in-process", "--teacher-models", "gelan-t", "--methods", "scratch", "default",
            "random-teacher", "--epochs", "1", "--hyp-set", "lr0=0.011", "--work", str(tmp_path)]
    result = distill_gain.main([*args, "--cost-batches", "1"])
    teacher_hyp = tmp_path / "hyp" / "teacher.yaml"  # the teacher trained here gets the students' --hyp-set
    assert f"--hyp {teacher_hyp}" in result["commands"][0] and yaml.safe_load(teacher_hyp.read_text())["lr0"] == 0.011
    out = capsys.readouterr().out
    assert "Teacher gelan-t" in out and "| default | 1 |" in out and "Training cost" in out
    runs = {r["method"]: r for r in result["runs"]}
    assert set(runs) == {"scratch", "default", "random-teacher"}
    assert "--teacher" in runs["default"]["command"] and "--teacher" not in runs["scratch"]["command"]
    assert "random-teacher.pt" in runs["random-teacher"]["command"]
    assert set(result["costs"]) == {"scratch", "default"} and result["costs"]["default"] > 0
    assert (tmp_path / "results.md").read_text().startswith("## Distillation")
    for record in runs.values():  # last.pt scored apart, with the val curve best.pt was picked from
        assert 0 <= record["last_test_map"] <= 1 and len(record["val_curve"]) == 1 and record["best_epoch"] == 0
        assert (Path(record["run_dir"]) / "last" / "val-test" / "metrics.json").is_file()
    assert "test mAP50-95 (last.pt)" in out

    # a record written before last.pt was scored gets its scores while its run folder is there
    saved = json.loads((tmp_path / "results.json").read_text())
    for record in saved["runs"]:
        for key in ("last_val_map", "last_test_map", "last_test_map50", "val_curve", "best_epoch"):
            record.pop(key)
    (tmp_path / "results.json").write_text(json.dumps(saved))
    filled = distill_gain.main([*args, "--reuse"])
    assert {r["method"]: r["last_test_map"] for r in filled["runs"]} == {m: r["last_test_map"] for m, r in runs.items()}

    # a new checkout keeps the committed results JSON but not the run folders: --reuse keeps the
    # recorded student runs whose command, hyp bytes and teacher bytes are unchanged, and reruns the rest
    for method in runs:
        shutil.rmtree(tmp_path / "runs" / f"yolov9-tiny-{method}-s0")
    rerun = []
    monkeypatch.setattr(distill_gain, "student_run", lambda *a: rerun.append(a[3]) or {**runs[a[3]], "rerun": 1})
    again = distill_gain.main([*args, "--reuse"])
    assert rerun == []
    assert {r["method"]: r["test_map"] for r in again["runs"]} == {m: r["test_map"] for m, r in runs.items()}
    rerun.clear()
    distill_gain.main([*args, "--reuse", "--methods", "scratch", "default", "--hyp-set", "lr0=0.02"])
    assert sorted(rerun) == ["default", "scratch"]  # another hyp: nothing reused

    # --reuse-from: another call (its own --work, another teacher) keeps the first call's scratch runs,
    # which need no teacher, and runs the distilled ones anew
    rerun.clear()
    other = tmp_path / "other"
    teacher = Path(result["teacher"]["best"])
    moved = distill_gain.main(["--dry-run", "--in-process", "--teacher", str(teacher), "--methods", "scratch",
                               "default", "--epochs", "1", "--work", str(other), "--hyp-set", "lr0=0.011",
                               "--reuse-from", str(tmp_path / "results.json")])
    assert rerun == ["default"]
    scratch = next(r for r in moved["runs"] if r["method"] == "scratch")
    assert scratch["test_map"] == runs["scratch"]["test_map"] and str(other / "runs") in scratch["command"]
    assert scratch["recorded_in"] == str(tmp_path / "results.json")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        distill_gain.main([*args[:-1], str(other), "--reuse-from", str(teacher)])
    assert exit_info.value.code == 2 and "--reuse-from" in capsys.readouterr().err


def test_benchmarks_without_data_train_on_bccd_through_its_data_config(tmp_path):
    from utils.data.config import load_data_config

    opt = argparse.Namespace(dry_run=False, data="", work=str(tmp_path))
    yaml_file = resolve_data(opt)
    assert yaml_file == BCCD_DATA
    config = load_data_config(yaml_file)
    assert config["names"] == ["RBC", "WBC", "Platelets"]
    assert [count_images(config[s]) for s in ("train", "val", "test")] == [205, 87, 72]


def test_model_sizes_reports_official_counts(capsys):
    from benchmarks.model_sizes import main as model_sizes

    rows = model_sizes(["--models", "gelan-t", "yolov9-tiny", "--nc", "80"])
    assert rows[0]["nc80"]["params"] == 2_442_640  # FACTS.md: official gelan-t at nc=80
    assert rows[1]["nc80"]["params"] < 3_500_000
    assert "| gelan-t | 2,442,640 |" in capsys.readouterr().out


def test_teacher_speed_times_every_form_and_the_folded_teacher_computes_the_same(tmp_path):
    from benchmarks import teacher_speed

    out = tmp_path / "speed.json"
    teacher_speed.main(["--teacher", str(ROOT / "weights" / "gelan-t-bccd256.pt"), "--img", "64", "--batch", "1",
                        "--warmup", "1", "--runs", "1", "--data", str(ROOT / "data" / "bccd.yaml"), "--out", str(out)])
    results = json.loads(out.read_text())["results"]
    assert len(results) == 4 and results["as trained"]["vs_trained"] == 1.0
    assert all(r["median_ms"] > 0 for r in results.values())
    assert results["folded"]["max_logit_diff"] < 1e-3 < results[teacher_speed.BF16]["max_logit_diff"]
    assert f"| {teacher_speed.FP32} |" in out.with_suffix(".md").read_text()
    fp32, bf16 = results[teacher_speed.FP32], results[teacher_speed.BF16]  # scored on BCCD val and test
    assert 0 < fp32["val_map"] < 1 and 0 < fp32["test_map"] < 1 and "val_map" not in results["folded"]
    assert abs(bf16["val_map"] - fp32["val_map"]) < 0.03 and abs(bf16["test_map"] - fp32["test_map"]) < 0.03


def test_latency_and_prune_tables_share_one_machine_line():
    from benchmarks import latency, prune_bccd

    info = {"cpu": "Xeon", "cpus": 2, "gpu": "none", "onnxruntime": "1.99", "torch": "2.14", "date": "2026-12-06"}
    assert latency.machine_line(info) == "Machine: Xeon, 2 cores; onnxruntime 1.99, torch 2.14; 2026-12-06."
    assert ", GPU Orin" in latency.machine_line({**info, "gpu": "Orin"})
    opt = prune_bccd.parse_args(["--weights", "s.pt", "--teacher", "t.pt"])
    row = {"model": "p30", "fine_tune": "kd", "params": 1.5e6, "gflops": 2.0, "latency_ratio": 0.8, "map": 0.5,
           "map50": 0.8}
    table = prune_bccd.markdown([row], info, opt).splitlines()
    assert table[2] == "| p30 | kd | 1.500 | 2.00 | 0.80 | 0.5000 | 0.8000 |"
    assert latency.machine_line(info) in table
