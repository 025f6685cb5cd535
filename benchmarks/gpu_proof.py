"""Every GPU figure the README owes, in one command that fits a short device lease (8 minutes).

    python -m benchmarks.gpu_proof OUT_DIR                 # one H100/H200, about 8 minutes
    python -m benchmarks.gpu_proof OUT_DIR --budget-s 300  # a shorter lease: every step gets less
    python -m benchmarks.gpu_proof OUT_DIR --dry-run       # CPU check of every step (about a minute)
    benchmarks/gpu_proof.sh OUT_DIR                        # the same, installing carried wheels first

Steps, in order of value (``prepare`` always runs first):

0. prepare: machine, installed packages, the data (BCCD through data/bccd.yaml; when BCCD is
   missing the speed steps run on a synthetic set of BCCD's size, marked as such, and the
   accuracy step is skipped).
1. train_speed: train.py end to end (real loader, augmentation, loss, optimizer, EMA) on BCCD at
   640, gelan-s, batch 16 and 64, CPU augmentation and ``--gpu-augment``, ``--cache ram``:
   images/s over the epochs after the first (a fixed number of steps), and the same model's
   training step on random tensors (the ceiling, benchmarks/train_speed.py); ratios to the public
   code's 43 images/s and to the ceiling.
2. distill_cost: train_distill.py (an untrained gelan-s teacher made here: only speed counts)
   against train.py on the same student and settings; goal at most 1.35x the time.
3. accuracy: train.py on BCCD for as many epochs as fit this step's budget (at most the public
   run's 100, with its 10% close-mosaic; planned from step 1's epoch times), val mAP50-95 by
   val.py, against the public figure where one exists at that epoch count.
4. latency: teacher and students, PyTorch fp16 and ONNX Runtime CUDA, batch 1 and 32.

Each step runs in its own process group under its own time budget (a share of what is left of
``--budget-s``; time a step leaves unused goes to the next ones) and is killed when it overruns;
whatever it recorded before is kept. After every step, and while one runs, ``OUT_DIR`` gets
``gpu_proof.json`` (every figure), ``gpu_proof.md`` (the tables) and ``gpu_proof.log`` (the tails
of the step logs). Runs and their logs go to ``--work`` (default runs/gpu_proof).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.gpu_proof_steps import PREPARE, STEP_NAMES, STEPS, Context, Step, step_file
from benchmarks.harness.cli import RUNS_DIR, model_cfg
from benchmarks.harness.commands import ROOT, command_line
from benchmarks.harness.results import fmt, markdown_table, write_results
from utils.core.atomic import atomic_write_text
from utils.core.errors import ArgumentParser, UserError, cli_main
from utils.core.log import LOGGER, setup_logging

BUDGET_S = 480.0  # the whole command: 8 minutes of a 15-minute lease (the machine's start is not in it)
DRY_BUDGET_S = 1800.0  # a dry run checks, it does not time: generous for a shared CPU (its work is ~1 CPU-minute)
RESERVE_S = 10.0  # kept back for the final report and the kill of a late step
MIN_STEP_S = 15.0  # a step given less than this is skipped (dry run: DRY_MIN_STEP_S)
DRY_MIN_STEP_S = 1.0
KILL_GRACE_S = 5.0  # SIGTERM, then SIGKILL after this
POLL_S = 5.0  # while a step runs, its partial results are copied into OUT_DIR this often
LOG_TAIL_LINES = 60  # per step, in OUT_DIR/gpu_proof.log
LAST_ERROR_CHARS = 500
JSON_NAME, MD_NAME, LOG_NAME = "gpu_proof.json", "gpu_proof.md", "gpu_proof.log"
DRY_THREADS = 1  # a dry run is a check for one core (CI; OpenMP threads on a busy machine spin)
EXIT_INTERRUPTED = 130  # the shell's code for a command stopped by a signal


# ------------------------------------------------------------------------------------------- flags
def _name_seconds(text: str) -> tuple[str, float]:
    name, sep, seconds = text.partition("=")
    if not sep or name not in STEP_NAMES:
        raise argparse.ArgumentTypeError(f"{text!r}: expected STEP=SECONDS with STEP in {', '.join(STEP_NAMES)}")
    try:
        return name, float(seconds)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: SECONDS must be a number") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags (see the module docstring); UserError for a bad value."""
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("out", help="folder for gpu_proof.json, gpu_proof.md and gpu_proof.log ($OUT on the device)")
    add("--budget-s", type=float, default=None, help=f"the whole command's time (default {BUDGET_S:.0f}; "
        f"dry run {DRY_BUDGET_S:.0f})")
    add("--steps", nargs="+", default=list(STEP_NAMES[1:]), choices=STEP_NAMES[1:],
        help="steps to run (prepare always runs)")
    add("--work", default=str(RUNS_DIR.parent / "gpu_proof"), help="folder for the runs and their logs")
    add("--data", default="", help="a data.yaml with train/val/test instead of BCCD")
    add("--device", default="", help="cuda device; '' = the first GPU")
    add("--workers", type=int, default=16, help="loader workers (capped at the CPU count - 1)")
    add("--accuracy-model", default="gelan-s",
        help="model of the accuracy step (gelan-s and gelan-t have public figures)")
    add("--dry-run", action="store_true", help="CPU check of every step: tiny images, 1-2 steps, synthetic data")
    add("--step-budget", type=_name_seconds, action="append", default=[], metavar="STEP=SECONDS",
        help="cap one step's budget (tests)")
    add("--run-step", choices=STEP_NAMES, help=argparse.SUPPRESS)  # internal: run one step in this process
    add("--this-budget-s", type=float, default=0.0, help=argparse.SUPPRESS)  # internal: its budget
    add("--this-deadline", type=float, default=math.inf, help=argparse.SUPPRESS)  # internal: its end, time.time()
    opt = parser.parse_args(argv)
    if opt.budget_s is None:
        opt.budget_s = DRY_BUDGET_S if opt.dry_run else BUDGET_S
    if opt.budget_s <= 0:
        raise UserError(f"--budget-s must be positive, got {opt.budget_s}")
    if opt.workers < 0:
        raise UserError(f"--workers must not be negative, got {opt.workers}")
    model_cfg(opt.accuracy_model, "--accuracy-model")
    return opt


# ------------------------------------------------------------------------------------ one step here
def run_step_here(opt: argparse.Namespace) -> None:
    """The child side: run ``opt.run_step`` in this process, recording into work/steps/NAME.json."""
    import torch

    step = next(s for s in STEPS if s.name == opt.run_step)
    work = Path(opt.work).resolve()
    path = step_file(work, step.name)
    path.unlink(missing_ok=True)
    if opt.dry_run:
        torch.set_num_threads(DRY_THREADS)
    step.run(Context(opt, work, opt.this_budget_s, opt.this_deadline, lambda result: write_results(path, result)))


# ---------------------------------------------------------------------------------------- the parent
class Orchestrator:
    """Runs the steps one by one, each as a child process under a budget, and keeps the report current."""

    def __init__(self, opt: argparse.Namespace, argv: list[str]) -> None:
        self.opt, self.argv = opt, argv
        self.out, self.work = Path(opt.out).resolve(), Path(opt.work).resolve()
        self.start = time.monotonic()
        self.deadline = self.start + opt.budget_s
        self.selected = [s for s in STEPS if s.name == PREPARE or s.name in opt.steps]
        self.caps = dict(opt.step_budget)
        self.child: subprocess.Popen | None = None
        self.payload = {
            "benchmark": "gpu_proof", "dry_run": opt.dry_run, "command": command_line("gpu_proof", argv),
            "started": now(), "finished": None, "budget_s": opt.budget_s, "machine": None, "environment": None,
            "steps": {s.name: {"title": s.title, "status": "pending" if s in self.selected else "not selected",
                               "reason": None, "budget_s": None, "elapsed_s": None, "cpu_s": None, "result": {}}
                      for s in STEPS}}

    def budget_for(self, step: Step, capped: bool = True) -> float:
        """This step's share of the time left, by the nominal shares of the measuring steps still
        to run (and at most its ``--step-budget`` when ``capped``). ``prepare``, which every other
        step needs, gets its nominal seconds whatever the budget."""
        left = self.deadline - time.monotonic() - RESERVE_S
        todo = [s for s in self.selected if self.payload["steps"][s.name]["status"] == "pending"
                and s.name != PREPARE]
        if self.opt.dry_run:  # a dry run checks that every step works, not how long it takes: all that is left
            budget = left
        elif step.name == PREPARE:
            budget = min(step.share_s, left)
        else:
            budget = left * step.share_s / sum(s.share_s for s in todo)
        return min(budget, self.caps.get(step.name, math.inf)) if capped else budget

    def run(self) -> dict:
        """Every selected step in order (each run, or skipped with its reason); returns the payload."""
        self.work.mkdir(parents=True, exist_ok=True)
        (self.work / "logs").mkdir(exist_ok=True)
        self.write()
        for step in self.selected:
            entry = self.payload["steps"][step.name]
            reason = self.skip_reason(step)
            if reason:
                entry.update(status="skipped", reason=reason)
                LOGGER.info(f"[{step.name}] skipped: {reason}")
            else:
                self.run_child(step, entry)
            self.write()
        self.payload["finished"] = now()
        self.write()
        return self.payload

    def skip_reason(self, step: Step) -> str | None:
        """Why ``step`` cannot run now (a missing package, no data, no time), or None."""
        missing = [m for m in step.needs if importlib.util.find_spec(m) is None]
        if missing:
            return f"needs {', '.join(missing)} (not installed)"
        if step.name != PREPARE and self.payload["steps"][PREPARE]["result"].get("data") is None:
            return "the prepare step gave no data (see its reason)"
        minimum = DRY_MIN_STEP_S if self.opt.dry_run else MIN_STEP_S
        budget = self.budget_for(step, capped=False)  # a smaller --step-budget is the user's choice
        if budget < minimum:
            return f"out of time: {budget:.0f} s left for it (at least {minimum:.0f} s needed)"
        return None

    def run_child(self, step: Step, entry: dict) -> None:
        """Run one step in its own process group, stop it at its budget, record how it ended."""
        budget = self.budget_for(step)
        entry.update(status="running", budget_s=round(budget, 1))
        self.write()
        log = self.work / "logs" / f"{step.name}.log"
        args = self.child_command(step, budget)
        LOGGER.info(f"[{step.name}] budget {budget:.0f} s: {step.title}")
        begin, cpu_before = time.monotonic(), children_cpu_s()
        with open(log, "w") as f:
            self.child = subprocess.Popen(args, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                          env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
            try:
                code = self.wait(step, entry, begin + budget)
            finally:
                self.kill_child()
        entry["elapsed_s"] = round(time.monotonic() - begin, 1)
        entry["cpu_s"] = round(children_cpu_s() - cpu_before, 1)  # the step's processes, waited for
        entry["result"] = self.read_step(step)
        if code is None:
            entry.update(status="timeout", reason=f"stopped after its budget of {budget:.0f} s; results recorded "
                                                  f"before that are kept")
        elif code:
            entry.update(status="failed", reason=f"exit code {code}: {last_error(log)}")
        else:
            entry["status"] = "ok"
        if step.name == PREPARE:
            self.payload["machine"] = entry["result"].get("machine")
            self.payload["environment"] = entry["result"].get("environment")
        LOGGER.info(f"[{step.name}] {entry['status']} in {entry['elapsed_s']:.0f} s"
                    + (f": {entry['reason']}" if entry["reason"] else ""))
        self.append_log(step, log)

    def interrupted(self) -> None:
        """This command was stopped: stop the running step too, keeping what it recorded."""
        self.kill_child()
        for step in self.selected:
            entry = self.payload["steps"][step.name]
            if entry["status"] == "running":
                entry.update(status="interrupted", reason="the whole command was stopped during this step",
                             result=self.read_step(step))
        self.payload["finished"] = f"interrupted {now()}"
        self.write()

    def child_command(self, step: Step, budget: float) -> list[str]:
        """This very script with the same flags, told to run one step in its own process."""
        return [sys.executable, "-m", "benchmarks.gpu_proof", *self.argv, "--run-step", step.name,
                "--this-budget-s", f"{budget:.1f}", "--this-deadline", f"{time.time() + budget:.2f}"]

    def wait(self, step: Step, entry: dict, until: float) -> int | None:
        """The child's exit code, or None when it ran past ``until``; partial results copied meanwhile."""
        while True:
            try:
                return self.child.wait(timeout=max(0.0, min(POLL_S, until - time.monotonic())))
            except subprocess.TimeoutExpired:
                if time.monotonic() >= until:
                    return None
                entry["result"] = self.read_step(step)
                self.write()

    def kill_child(self) -> None:
        """Stop the child's whole process group: the child, its train.py runs, their loader workers
        (also after a normal exit: nothing of a step may outlive it)."""
        child, self.child = self.child, None
        if child is None:
            return
        signal_group(child.pid, signal.SIGTERM)
        try:
            child.wait(timeout=KILL_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
        signal_group(child.pid, signal.SIGKILL)
        child.wait()

    def read_step(self, step: Step) -> dict:
        """What the step recorded so far (empty when nothing, or nothing valid)."""
        path = step_file(self.work, step.name)
        try:
            return json.loads(path.read_text()) if path.is_file() else {}
        except json.JSONDecodeError:  # written atomically, but a killed child may leave nothing valid
            return {}

    def append_log(self, step: Step, log: Path) -> None:
        """The tail of the step's log into OUT_DIR/gpu_proof.log."""
        lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
        with open(self.out / LOG_NAME, "a") as f:
            f.write(f"===== {step.name} ({self.payload['steps'][step.name]['status']}), last {LOG_TAIL_LINES} of "
                    f"{len(lines)} lines of {log}\n")
            f.write("\n".join(lines[-LOG_TAIL_LINES:]) + "\n")

    def write(self) -> None:
        """Rewrite OUT_DIR/gpu_proof.json and gpu_proof.md (each atomically)."""
        self.payload["elapsed_s"] = round(time.monotonic() - self.start, 1)
        try:
            self.payload["summary"] = headline(self.payload)
        except Exception as exc:  # a partial result must not stop the steps; the steps' results are all there
            self.payload["summary"] = {"error": f"{type(exc).__name__}: {exc}"}
        write_results(self.out / JSON_NAME, self.payload)
        try:
            report = markdown(self.payload)
        except Exception as exc:  # the JSON above holds every figure; a drawing bug must not stop the steps
            report = f"# GPU proof\n\n(no report: {type(exc).__name__}: {exc}; see {JSON_NAME})\n"
        atomic_write_text(self.out / MD_NAME, report)


def signal_group(group: int, sig: int) -> None:
    """Send ``sig`` to every process of a process group that may be gone already."""
    try:
        os.killpg(group, sig)
    except ProcessLookupError:
        pass


def children_cpu_s() -> float:
    """CPU seconds (user + system) of this process's children that have been waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def last_error(log: Path) -> str:
    """The last non-empty line of a step's log (the error that ended it)."""
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()] if log.is_file() else []
    return lines[-1][:LAST_ERROR_CHARS] if lines else "no output"


def now() -> str:
    """The local time with its offset, to the second."""
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------- report
def headline(payload: dict) -> dict:
    """The owed figures, one key each (None while not measured)."""
    steps = {name: entry["result"] for name, entry in payload["steps"].items()}
    out: dict = {}
    for run in steps["train_speed"].get("runs", []):
        key = f"train_b{run['batch_label']}_{run['augment']}"
        out[key] = {"images_s": run["images_s"], "vs_public_43": run["vs_public_43"], "vs_ceiling": run["vs_ceiling"]}
    distill = steps["distill_cost"]
    out["distill_time_ratio"] = distill.get("time_ratio")
    accuracy = steps["accuracy"]
    out["accuracy"] = ({"model": accuracy["model"], "epochs": accuracy["epochs"], "val_map": accuracy["val_map"],
                        "public_val_map_same_epochs": (accuracy["comparison"] or {}).get("public_val_map")}
                       if "val_map" in accuracy else None)
    return out


def markdown(payload: dict) -> str:
    """Title, machine, the step status table and one table per step."""
    machine = payload.get("machine") or {}
    dry = " (DRY RUN: a CPU check on tiny synthetic data, not a result)" if payload["dry_run"] else ""
    lines = [f"# GPU proof{dry}", "",
             f"Machine: GPU {machine.get('gpu', '?')}; CPU {machine.get('cpu', '?')} "
             f"({machine.get('cpus', '?')} CPUs); torch {machine.get('torch', '?')}, "
             f"Python {machine.get('python', '?')}. Started {payload['started']}"
             f", finished {payload['finished'] or '(still running)'}; budget {payload['budget_s']:.0f} s, used "
             f"{payload.get('elapsed_s', 0):.0f} s.", f"Command: `{payload['command']}`", ""]
    data = payload["steps"][PREPARE]["result"].get("data")
    if data:
        lines += [f"Data: {data.get('kind')}, {data.get('train_images')} train / {data.get('val_images')} val images"
                  + (f". {data['note']}" if data.get("note") else "") + ".", ""]
    rows = [[name, entry["status"], fmt(entry["budget_s"], 0), fmt(entry["elapsed_s"], 0), fmt(entry["cpu_s"], 0),
             entry["reason"] or ""] for name, entry in payload["steps"].items()]
    lines += [markdown_table(["step", "status", "budget (s)", "used (s)", "CPU (s)", "reason"], rows), ""]
    for step in STEPS:
        entry = payload["steps"][step.name]
        if step.render is not None and entry["result"]:
            try:
                table = step.render(entry["result"])
            except Exception as exc:  # a partial result must never cost the report (the JSON has it all)
                table = f"(no table: the recorded result is incomplete, {type(exc).__name__}: {exc})"
            lines += [f"## {entry['title']}", "", table, ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ entry
@cli_main
def main(argv: list[str] | None = None) -> dict | None:
    """Run every step (or, with the internal ``--run-step``, one step in this process)."""
    setup_logging()
    argv = list(sys.argv[1:] if argv is None else argv)
    opt = parse_args(argv)
    if opt.run_step:
        run_step_here(opt)
        return None
    orchestrator = Orchestrator(opt, argv)
    orchestrator.out.mkdir(parents=True, exist_ok=True)
    (orchestrator.out / LOG_NAME).unlink(missing_ok=True)

    def stop(signum: int, _frame) -> None:  # the lease ends: stop the step, keep the report
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        payload = orchestrator.run()
    except KeyboardInterrupt:
        orchestrator.interrupted()
        raise SystemExit(EXIT_INTERRUPTED) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(markdown(payload))
    print(f"\nresults: {orchestrator.out / JSON_NAME}")
    return payload


if __name__ == "__main__":
    main(sys.argv[1:])
