"""The demo's closing table: teacher vs scratch student vs distilled student.

Reads what the demo's commands left in the runs folder (best.pt, best.onnx, val-*/metrics.json),
times the ONNX files with ONNX Runtime on the CPU in one round-robin run, and prints a table and
where to look.

    python -m scripts.demo_summary --runs runs/demo --img 256
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks.common import epoch_seconds
from benchmarks.latency import time_onnxruntime
from utils.checkpoint import load_checkpoint, load_model
from utils.errors import ArgumentParser, UserError, cli_main
from utils.model_info import count_params, gflops

RUNS = (("teacher", "teacher ({})"), ("student-scratch", "student ({}), scratch"),
        ("student-distill", "student ({}), distilled"))  # {}: the model yaml's name, from the checkpoint
LATENCY_THREADS = 2
LATENCY_WARMUP, LATENCY_RUNS = 3, 20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs/demo", help="the demo's runs folder")
    parser.add_argument("--img", type=int, default=256, help="image size the demo used")
    return parser.parse_args(argv)


def collect(runs: Path, img: int) -> list[dict]:
    """One record per run: params and GFLOPs of the fused model, validation metrics, ONNX path."""
    records = []
    for run, label in RUNS:
        weights = runs / run / "weights" / "best.pt"
        metrics_file = runs / f"val-{run}" / "metrics.json"
        onnx_path = weights.with_suffix(".onnx")
        for needed in (weights, metrics_file, onnx_path):
            if not needed.exists():
                raise UserError(f"{needed} is missing: run the demo's earlier steps first (make demo)")
        model = load_model(weights, fuse=True)
        metrics = json.loads(metrics_file.read_text())
        cfg = Path(str((load_checkpoint(weights).get("opt") or {}).get("cfg") or "model")).stem
        records.append({"model": label.format(cfg), "params": count_params(model), "gflops": gflops(model, img),
                        "map50": metrics["map50"], "map": metrics["map"], "onnx": onnx_path})
    return records


def training_time_line(runs: Path) -> str:
    """How long each student's epochs took (results.csv, ``time/epoch_s``), and the ratio."""
    distilled, scratch = epoch_seconds(runs / "student-distill"), epoch_seconds(runs / "student-scratch")
    if not (distilled and scratch):
        return "Training time: not logged (results.csv missing)."
    return (f"Training time (the epochs in results.csv): distilled {distilled:.0f} s, scratch {scratch:.0f} s "
            f"({distilled / scratch:.2f}x).")


def table(records: list[dict], img: int) -> str:
    teacher_ms = records[0]["ort_cpu"]["median_ms"]
    lines = [f"| model | params | GFLOPs @{img} | val mAP50 | val mAP50-95 | ONNX CPU ms (median) | vs teacher |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        ms = r["ort_cpu"]["median_ms"]
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.2f}M | {r['gflops']:.2f} | {r['map50']:.3f} | "
                     f"{r['map']:.3f} | {ms:.1f} | {ms / teacher_ms:.2f}x |")
    return "\n".join(lines)


@cli_main
def main(argv: list[str] | None = None) -> None:
    opt = parse_args(argv)
    runs = Path(opt.runs)
    records = collect(runs, opt.img)
    time_onnxruntime(records, opt.img, LATENCY_THREADS, LATENCY_WARMUP, LATENCY_RUNS)
    print("\n" + table(records, opt.img))
    scratch, distilled = records[1]["map"], records[2]["map"]
    print(f"\nDistillation changed the student's val mAP50-95 by {100 * (distilled - scratch):+.1f} points "
          f"(same epochs, same seed, one run each; the 3-seed proof is benchmarks/distill_bccd.py, README).")
    print(training_time_line(runs))
    print(f"\nWhere to look:\n"
          f"  curves:              {runs}/<run>/results.png (and TensorBoard: tensorboard --logdir {runs})\n"
          f"  PR curve, confusion: {runs}/val-student-distill/PR_curve.png, confusion_matrix.png\n"
          f"  predictions:         {runs}/val-student-distill/val_batch0_pred.jpg\n"
          f"  detections (ONNX):   {runs}/detect/\n"
          f"  training batches:    {runs}/student-distill/train_batch0.jpg")


if __name__ == "__main__":
    main(sys.argv[1:])
