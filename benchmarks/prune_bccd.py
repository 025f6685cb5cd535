"""Pruning after distillation on BCCD: prune a distilled student, fine-tune with and without the teacher.

For each ratio (default 30 % and 50 % of the channels) the distilled student is pruned with
``prune.py``, then fine-tuned for the same epochs with the same hyp file twice: with the teacher
(``train_distill.py``) and without (``train.py``). Every model is scored on the test split
(``val.py --task test``); params and GFLOPs are those of the fused inference model, and the latency
is ONNX Runtime on the CPU at batch 1, timed round-robin in one run and given as a ratio to the
unpruned student. Prints a markdown table with the command, the machine and the date.

Run from the repository root (a GPU machine for the fine-tunes):
    python -m benchmarks.prune_bccd --weights runs/distill/yolov9-tiny/weights/best.pt \
        --teacher runs/train/gelan-s/weights/best.pt --epochs 30 --device 0
Without ``--data`` it trains on data/bccd.yaml, which converts BCCD on first use.
Each step is a subprocess of the entry scripts; the steps' commands go to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.harness.commands import display
from benchmarks.harness.data import BCCD_DATA
from benchmarks.harness.machine import machine_info
from benchmarks.latency import machine_line, time_onnxruntime
from models.info import count_params, gflops
from utils.core.errors import ArgumentParser, cli_main
from utils.export.model import prepare_model
from utils.export.onnx import export_onnx

ROOT = Path(__file__).resolve().parents[1]
MEGA = 1e6


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--weights", required=True, help="the distilled student (e.g. yolov9-tiny best.pt)")
    add("--teacher", required=True, help="the teacher of the distillation (for the teacher-guided fine-tune)")
    add("--data", default=str(BCCD_DATA), help="data.yaml (default: BCCD, converted by its data config)")
    add("--ratios", type=float, nargs="+", default=[0.3, 0.5], help="pruning ratios")
    add("--method", default="l1", choices=["l1", "bn-scale"], help="channel importance (prune.py --method)")
    add("--scope", default="uniform", choices=["uniform", "global"], help="prune.py --scope")
    add("--epochs", type=int, default=30, help="fine-tune epochs (both fine-tunes)")
    add("--hyp", default=str(ROOT / "hyp" / "hyp.distill.yaml"), help="hyp file of both fine-tunes")
    add("--img", type=int, default=640, help="train / test / latency image size")
    add("--batch", type=int, default=32)
    add("--device", default="", help="training and validation device (0 or cpu)")
    add("--workers", type=int, default=8)
    add("--split", default="test", choices=["test", "val"], help="split the mAP is measured on")
    add("--project", default=str(ROOT / "runs" / "prune_bccd"), help="folder for every output")
    add("--threads", type=int, default=2, help="ONNX Runtime CPU threads")
    add("--warmup", type=int, default=5, help="untimed ONNX Runtime runs per model")
    add("--runs", type=int, default=30, help="timed ONNX Runtime runs per model")
    add("--out", default="", help="also write the results and step commands as JSON here")
    add("--max-batches", type=int, default=0, help=argparse.SUPPRESS)  # dry runs: cap batches per epoch
    return parser.parse_args(argv)


class Steps:
    """Runs the entry scripts as subprocesses from the repository root and remembers the commands."""

    def __init__(self) -> None:
        self.commands: list[str] = []

    def __call__(self, *args: str | Path) -> None:
        cmd = [sys.executable, *(str(a) for a in args)]
        self.commands.append(display(["python", *cmd[1:]]))
        print(f"$ {self.commands[-1]}", flush=True)
        result = subprocess.run(cmd, cwd=ROOT)
        if result.returncode:
            raise SystemExit(f"step failed (exit {result.returncode}): {self.commands[-1]}")


def fine_tune(opt: argparse.Namespace, run: Steps, data: str, weights: Path, name: str, teacher: bool) -> Path:
    """Fine-tune ``weights`` for ``--epochs``; returns its best.pt."""
    script = ["train_distill.py", "--teacher", opt.teacher] if teacher else ["train.py"]
    extra = ["--max-batches", str(opt.max_batches)] if opt.max_batches else []
    project = Path(opt.project) / "finetune"
    run(*script, "--weights", weights, "--data", data, "--epochs", str(opt.epochs), "--img", str(opt.img),
        "--batch", str(opt.batch), "--device", opt.device, "--workers", str(opt.workers), "--hyp", opt.hyp,
        "--project", project, "--name", name, "--exist-ok", *extra)
    return project / name / "weights" / "best.pt"


def split_map(opt: argparse.Namespace, run: Steps, data: str, weights: Path, name: str) -> dict:
    """``val.py --task <split>`` of ``weights``; returns its metrics.json."""
    project = Path(opt.project) / "val"
    run("val.py", "--weights", weights, "--data", data, "--task", opt.split, "--img", str(opt.img),
        "--batch", str(opt.batch), "--device", opt.device, "--workers", str(opt.workers),
        "--project", project, "--name", name, "--exist-ok", "--noplots")
    return json.loads((project / name / "metrics.json").read_text())


def inference_record(weights: Path, img: int, folder: Path, name: str) -> dict:
    """Params and GFLOPs of the fused inference model and its ONNX file (as export.py writes it)."""
    model = prepare_model(weights, torch.device("cpu"))
    onnx_path = export_onnx(model, folder / f"{name}.onnx", img, names=list(model.names))
    return {"model": name, "params": count_params(model), "gflops": gflops(model, img), "onnx": onnx_path}


def markdown(rows: list[dict], info: dict, opt: argparse.Namespace) -> str:
    """The results table, with the machine, settings and command."""
    lines = [f"| model | fine-tune | params (M) | GFLOPs | ORT CPU latency ratio | {opt.split} mAP50-95 | mAP50 |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['fine_tune']} | {r['params'] / MEGA:.3f} | {r['gflops']:.2f} | "
                     f"{r['latency_ratio']:.2f} | {r['map']:.4f} | {r['map50']:.4f} |")
    machine = machine_line(info)
    settings = (f"Pruning: {opt.method}, {opt.scope} ratio; fine-tunes: {opt.epochs} epochs, {Path(opt.hyp).name}, "
                f"{opt.img} px, batch {opt.batch}. Latency: ONNX Runtime CPU, batch 1, {opt.img}x{opt.img}, "
                f"{opt.threads} threads, {opt.runs} timed runs round-robin; ratio = median / unpruned median.")
    command = "Command: `python -m benchmarks.prune_bccd " + " ".join(sys.argv[1:]) + "`"
    return "\n".join([*lines, "", machine, settings, command])


@cli_main
def main(argv: list[str] | None = None) -> list[dict]:
    opt = parse_args(argv)
    torch.set_num_threads(opt.threads)
    project = Path(opt.project)
    project.mkdir(parents=True, exist_ok=True)
    run = Steps()
    data = opt.data
    student = Path(opt.weights)
    rows = [{"model": "student", "ratio": 0.0, "fine_tune": "-", "weights": student,
             "metrics": split_map(opt, run, data, student, "student")}]
    for ratio in opt.ratios:
        tag = f"pruned{round(ratio * 100)}"
        pruned = project / "pruned" / f"{tag}.pt"
        run("prune.py", "--weights", student, "--ratio", str(ratio), "--method", opt.method, "--scope", opt.scope,
            "--img", str(opt.img), "--out", pruned)
        rows.append({"model": tag, "ratio": ratio, "fine_tune": "none", "weights": pruned,
                     "metrics": split_map(opt, run, data, pruned, tag)})
        for teacher, label in ((False, "plain"), (True, "teacher")):
            best = fine_tune(opt, run, data, pruned, f"{tag}-{label}", teacher)
            rows.append({"model": tag, "ratio": ratio, "fine_tune": f"{opt.epochs} ep, {label}", "weights": best,
                         "metrics": split_map(opt, run, data, best, f"{tag}-{label}")})
    with tempfile.TemporaryDirectory() as folder:  # one latency per architecture: the student and each ratio
        records = [inference_record(r["weights"], opt.img, Path(folder), r["model"])
                   for r in rows if r["fine_tune"] in ("-", "none")]
        time_onnxruntime(records, opt.img, opt.threads, opt.warmup, opt.runs)
    by_model = {r["model"]: r for r in records}
    reference = records[0]["ort_cpu"]["median_ms"]
    for row in rows:
        record = by_model[row["model"]]
        row.update(params=record["params"], gflops=record["gflops"], ort_cpu=record["ort_cpu"],
                   latency_ratio=record["ort_cpu"]["median_ms"] / reference,
                   map=float(row["metrics"]["map"]), map50=float(row["metrics"]["map50"]))
    info = machine_info()
    print(markdown(rows, info, opt))
    results = [{k: (str(v) if isinstance(v, Path) else v) for k, v in r.items() if k != "metrics"} for r in rows]
    if opt.out:
        out = Path(opt.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"machine": info, "settings": vars(opt), "steps": run.commands,
                                   "results": results}, indent=2, default=str))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
