"""benchmarks/gpu_proof.py: the dry run writes every step's figures; a step that overruns is stopped
and recorded while the others keep theirs; the budget is shared out and the accuracy plan fits it."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import gpu_proof, gpu_proof_steps

ROOT = Path(__file__).resolve().parents[2]
TOP_KEYS = {"benchmark", "dry_run", "command", "started", "finished", "budget_s", "machine", "environment", "steps",
            "summary", "elapsed_s"}
STEP_KEYS = {"title", "status", "reason", "budget_s", "elapsed_s", "cpu_s", "result"}
SLEEP_S = 60  # the overrunning fake step would sleep this long; it is given BUDGET_S
BUDGET_S = 2


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting for its parent counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def test_dry_run_records_every_step(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    payload = gpu_proof.main([str(out), "--dry-run", "--work", str(work)])
    saved = json.loads((out / gpu_proof.JSON_NAME).read_text())
    assert saved["steps"].keys() == payload["steps"].keys() == set(gpu_proof_steps.STEP_NAMES)
    assert TOP_KEYS <= saved.keys() and saved["dry_run"] is True and saved["finished"]
    for name, entry in saved["steps"].items():
        assert STEP_KEYS <= entry.keys()
        assert entry["status"] == "ok", (name, entry["reason"], (work / "logs" / f"{name}.log").read_text()[-3000:])
    steps = {name: entry["result"] for name, entry in saved["steps"].items()}
    assert steps["prepare"]["machine"]["gpu"] == "none"
    assert steps["prepare"]["data"]["train_images"] > 0
    assert "numpy" in steps["prepare"]["environment"]["packages"]

    speed = steps["train_speed"]
    assert set(speed["ceilings"]) == {"16"}  # the dry run checks one batch size; the real run adds 64
    assert [(r["batch_label"], r["augment"]) for r in speed["runs"]] == [(16, "gpu"), (16, "cpu")]
    for run in speed["runs"]:
        assert run["images_s"] > 0 and run["timed_steps"] >= 1
        assert run["vs_public_43"] == pytest.approx(run["images_s"] / speed["public_images_s"])
        ceiling = speed["ceilings"][str(run["batch_label"])]["images_s"]
        assert run["vs_ceiling"] == pytest.approx(run["images_s"] / ceiling)
        assert Path(run["run_dir"], "results.csv").is_file()
    distill = steps["distill_cost"]
    assert distill["time_ratio"] == pytest.approx(distill["scratch"]["images_s"] / distill["distill"]["images_s"])
    assert "train_distill.py" in distill["distill"]["command"] and "--teacher" in distill["distill"]["command"]
    accuracy = steps["accuracy"]
    assert 0 <= accuracy["val_map"] <= 1 and accuracy["epochs"] == gpu_proof_steps.DRY.epochs
    assert accuracy["comparison"] is None and "no public figure" in accuracy["comparison_note"]
    latency = steps["latency"]
    for record in latency["models"]:
        for batch in latency["batches"]:
            assert record[f"torch_b{batch}"]["median_ms"] > 0
            if latency["ort"]:
                assert record[f"ort_b{batch}"]["images_s"] > 0
    assert saved["summary"]["distill_time_ratio"] == distill["time_ratio"]
    assert saved["summary"]["train_b16_gpu"]["images_s"] == speed["runs"][0]["images_s"]

    report = (out / gpu_proof.MD_NAME).read_text()
    assert "DRY RUN" in report and "| step | status | budget (s) | used (s) | CPU (s) | reason |" in report
    for name in gpu_proof_steps.STEP_NAMES:
        assert f"| {name} | ok |" in report
    for header in ("| measurement | batch | timed steps | images/s |", "| run | student | images/s | time / scratch |",
                   "| code | model | epochs | batch | val mAP50 | val mAP50-95 |", "| model | role | params (M) |"):
        assert header in report
    assert "no table" not in report
    assert "===== latency (ok)" in (out / gpu_proof.LOG_NAME).read_text()


class FakeSteps(gpu_proof.Orchestrator):
    """Each step's child is a small Python program instead of this script: quick, no torch."""

    def __init__(self, *args, programs: dict[str, str]) -> None:
        super().__init__(*args)
        self.programs = programs

    def child_command(self, step, budget):
        path = gpu_proof_steps.step_file(self.work, step.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        program = self.programs[step.name].format(path=str(path), quoted=shlex.quote(str(path)), sleep=SLEEP_S)
        return ["sh", "-c", program] if program.startswith("sleep") else [sys.executable, "-c", program]


WRITE = "import json, os; open({path!r}, 'w').write(json.dumps({result}))"
PREPARE = WRITE.replace("{result}", "{{'data': {{'kind': 'fake'}}, 'machine': {{'gpu': 'fake'}}}}")
LATENCY = WRITE.replace("{result}", "{{'models': 'fake'}}")
# starts a grandchild, records a partial result, then overruns: the whole process group must go
# (a shell: it starts in milliseconds even on a busy machine, well inside the step's budget)
OVERRUN = "sleep {sleep} & echo '{{\"partial\": true, \"pids\": ['$$', '$!']}}' > {quoted}; wait"


def test_overrunning_step_is_stopped_and_the_others_kept(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    opt = gpu_proof.parse_args([str(out), "--work", str(work), "--steps", "train_speed", "latency",
                                "--step-budget", f"train_speed={BUDGET_S}"])
    out.mkdir()
    orchestrator = FakeSteps(opt, [], programs={"prepare": PREPARE, "train_speed": OVERRUN, "latency": LATENCY})
    start = time.monotonic()
    payload = orchestrator.run()
    assert time.monotonic() - start < SLEEP_S / 2
    steps = payload["steps"]
    assert steps["train_speed"]["status"] == "timeout" and f"budget of {BUDGET_S} s" in steps["train_speed"]["reason"]
    assert steps["train_speed"]["result"]["partial"] is True  # what it recorded before the kill is kept
    assert not any(alive(pid) for pid in steps["train_speed"]["result"]["pids"])
    assert steps["prepare"]["status"] == steps["latency"]["status"] == "ok"
    assert steps["latency"]["result"] == {"models": "fake"} and payload["machine"] == {"gpu": "fake"}
    assert steps["distill_cost"]["status"] == steps["accuracy"]["status"] == "not selected"
    saved = json.loads((out / gpu_proof.JSON_NAME).read_text())
    assert saved["steps"]["train_speed"]["status"] == "timeout"
    report = (out / gpu_proof.MD_NAME).read_text()
    assert f"| train_speed | timeout | {BUDGET_S} |" in report and "| latency | ok |" in report
    assert "no table" in report  # the fake partial result cannot be drawn, the report is still written


def test_failed_step_is_recorded_with_its_error(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    opt = gpu_proof.parse_args([str(out), "--work", str(work), "--steps", "latency"])
    out.mkdir()
    failing = "import sys; print('error: no CUDA here'); sys.exit(3)"
    payload = FakeSteps(opt, [], programs={"prepare": PREPARE, "latency": failing}).run()
    latency = payload["steps"]["latency"]
    assert latency["status"] == "failed" and latency["reason"] == "exit code 3: error: no CUDA here"


def test_budget_is_shared_by_the_steps_left(tmp_path):
    opt = gpu_proof.parse_args([str(tmp_path / "out"), "--work", str(tmp_path / "work")])
    orchestrator = gpu_proof.Orchestrator(opt, [])
    prepare, speed = gpu_proof_steps.STEPS[:2]
    assert orchestrator.budget_for(prepare) == prepare.share_s  # its own seconds: every other step needs it
    orchestrator.payload["steps"][prepare.name]["status"] = "ok"
    measuring = sum(s.share_s for s in gpu_proof_steps.STEPS[1:])
    assert orchestrator.budget_for(speed) == pytest.approx((opt.budget_s - gpu_proof.RESERVE_S) * speed.share_s
                                                           / measuring, abs=0.5)
    short = gpu_proof.Orchestrator(gpu_proof.parse_args([str(tmp_path / "out"), "--budget-s", "60"]), [])
    assert short.budget_for(prepare) == prepare.share_s and short.skip_reason(prepare) is None
    for step in gpu_proof_steps.STEPS[:3]:  # three steps done: the last two share what is left
        orchestrator.payload["steps"][step.name]["status"] = "ok"
    accuracy, latency = gpu_proof_steps.STEPS[3], gpu_proof_steps.STEPS[4]
    left = opt.budget_s - gpu_proof.RESERVE_S
    assert orchestrator.budget_for(accuracy) == pytest.approx(left * accuracy.share_s
                                                              / (accuracy.share_s + latency.share_s), abs=0.5)
    orchestrator.deadline = time.monotonic() + gpu_proof.RESERVE_S + 1
    orchestrator.payload["steps"]["prepare"]["result"] = {"data": {}}
    assert orchestrator.skip_reason(accuracy).startswith("out of time")


def test_accuracy_plan_fits_the_budget_and_stops_at_the_public_epochs():
    run = {"batch_label": 16, "augment": "gpu", "first_epoch_done_s": 20.0, "epoch_cycle_s": 3.0, "end_s": 5.0}
    speed = {"model": "gelan-s", "runs": [run]}
    plan = gpu_proof_steps.plan_epochs(180.0, 205, speed, "gelan-s", gpu_augment=True)
    room = 180 - 20 - 5 - gpu_proof_steps.VAL_RESERVE_S
    assert plan["epochs"] == 1 + int(room * gpu_proof_steps.FIT_SAFETY / 3.0) == 36
    assert 20 + (plan["epochs"] - 1) * 3.0 + 5 + gpu_proof_steps.VAL_RESERVE_S <= 180  # fits even without the safety
    run["epoch_cycle_s"] = 0.5
    fast = gpu_proof_steps.plan_epochs(180.0, 205, speed, "gelan-s", gpu_augment=True)
    assert fast["epochs"] == 100 < fast["fit_epochs"]  # at most the public run's epochs
    for model, gpu_augment in (("gelan-t", True), ("gelan-s", False)):  # no run of that model or mode: public rate
        fallback = gpu_proof_steps.plan_epochs(180.0, 205, speed, model, gpu_augment)
        assert fallback["epoch_cycle_s"] == pytest.approx(205 / 43.0 + gpu_proof_steps.FALLBACK_EPOCH_OVERHEAD_S)
        assert "public" in fallback["rate_from"]


def test_latency_without_cuda_onnxruntime_records_why(tmp_path, monkeypatch):
    """The real (not dry) latency path on a machine whose onnxruntime has no CUDA provider: the
    PyTorch column is measured, the ONNX Runtime one is skipped with the reason, nothing fails."""
    from benchmarks import latency

    pytest.importorskip("onnxruntime")
    monkeypatch.setattr(gpu_proof_steps, "IMG", 64)
    monkeypatch.setattr(gpu_proof_steps, "LATENCY_BATCHES", (1,))
    monkeypatch.setattr(gpu_proof_steps, "LATENCY_WARMUP", 1)
    monkeypatch.setattr(gpu_proof_steps, "LATENCY_RUNS", 1)
    monkeypatch.setattr(latency, "TEACHERS", ())
    monkeypatch.setattr(latency, "STUDENTS", ("yolov9-tiny",))
    monkeypatch.setattr("onnxruntime.get_available_providers", lambda: ["CPUExecutionProvider"])
    opt = gpu_proof.parse_args([str(tmp_path / "out"), "--work", str(tmp_path)])
    recorded = []
    gpu_proof_steps.step_latency(gpu_proof_steps.Context(opt, tmp_path, 60.0, time.time() + 60, recorded.append))
    result = recorded[-1]
    assert result["ort"] is None and "no CUDAExecutionProvider" in result["ort_skipped"]
    assert "onnxruntime-gpu" in result["ort_skipped"]
    (record,) = result["models"]
    assert record["model"] == "yolov9-tiny" and record["torch_b1"]["median_ms"] > 0 and "ort_b1" not in record
    assert "ONNX Runtime skipped: onnxruntime" in gpu_proof_steps.latency_md(result)


FAKE_PYTHON = """#!/bin/sh
echo "$(pwd) PYTHONPATH=${PYTHONPATH:-} $*" >> "$(dirname "$0")/calls.txt"
"""


def test_accuracy_prefers_the_default_cpu_augmentation_when_it_reaches_the_public_epochs():
    def speed(cpu_cycle: float, gpu_cycle: float) -> dict:
        return {"model": "gelan-s", "runs": [
            {"batch_label": 16, "augment": mode, "first_epoch_done_s": 10.0, "epoch_cycle_s": cycle, "end_s": 2.0}
            for mode, cycle in (("gpu", gpu_cycle), ("cpu", cpu_cycle))]}

    gpu_augment, plan = gpu_proof_steps.choose_plan(240.0, 205, speed(1.0, 0.5), "gelan-s")
    assert not gpu_augment and plan["epochs"] == 100  # both reach 100 epochs: train.py's default
    gpu_augment, plan = gpu_proof_steps.choose_plan(240.0, 205, speed(4.0, 1.0), "gelan-s")
    assert gpu_augment and plan["epochs"] > gpu_proof_steps.plan_epochs(240.0, 205, speed(4.0, 1.0), "gelan-s",
                                                                         gpu_augment=False)["epochs"]


def test_wrapper_installs_carried_wheels_offline_then_runs_the_entry_point(tmp_path):
    fake = tmp_path / "python"  # records how the wrapper calls Python (cwd, PYTHONPATH, arguments)
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "onnxruntime_gpu-1.0-py3-none-any.whl").write_bytes(b"")
    site = tmp_path / "site"
    env = {"PATH": "/usr/bin:/bin", "PYTHON": str(fake), "GPU_PROOF_WHEELS": str(wheels), "GPU_PROOF_SITE": str(site)}
    done = subprocess.run([str(ROOT / "benchmarks" / "gpu_proof.sh"), "OUT", "--dry-run"], capture_output=True,
                          text=True, timeout=60, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    install, run = (tmp_path / "calls.txt").read_text().splitlines()
    assert install.startswith(f"{tmp_path} ") and "-m pip install" in install and "--no-index" in install
    assert f"--target {site} {wheels}/onnxruntime_gpu-1.0-py3-none-any.whl" in install
    assert run == f"{tmp_path} PYTHONPATH={ROOT}:{site} -m benchmarks.gpu_proof OUT --dry-run"  # OUT: from the cwd
    (tmp_path / "calls.txt").unlink()
    env["GPU_PROOF_WHEELS"] = str(tmp_path / "none")  # no wheels: straight to the entry point
    subprocess.run([str(ROOT / "benchmarks" / "gpu_proof.sh"), "OUT"], check=True, timeout=60, env=env, cwd=tmp_path)
    assert (tmp_path / "calls.txt").read_text() == f"{tmp_path} PYTHONPATH={ROOT} -m benchmarks.gpu_proof OUT\n"
