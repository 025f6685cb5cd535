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

from benchmarks.harness.results import mean_spread
from benchmarks.harness.runner import epoch_seconds
from benchmarks.latency import time_onnxruntime
from models.info import count_params, gflops
from utils.checkpoint.ours import load_checkpoint, load_model
from utils.core.errors import ArgumentParser, UserError, cli_main

RUNS = (("teacher", "teacher ({})"), ("student-scratch", "student ({}), scratch"),
        ("student-distill", "student ({}), distilled"))  # {}: the model yaml's name, from the checkpoint
LATENCY_THREADS = 2
LATENCY_WARMUP, LATENCY_RUNS = 3, 20
ROOT = Path(__file__).resolve().parents[1]
SEED_RECORD = ROOT / "benchmarks" / "results" / "distill_gain_bccd_e40.json"  # the demo's settings over 3 seeds
MATCHED_SETTINGS = ("epochs", "img", "batch", "close_mosaic")  # a record holds for the demo when these agree


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs/demo", help="the demo's runs folder")
    parser.add_argument("--img", type=int, default=256, help="image size the demo used")
    parser.add_argument("--record", default=str(SEED_RECORD),
                        help="the distillation benchmark's results JSON at the demo's settings (3 seeds)")
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


def seed_spread_line(record: Path, runs: Path, gain: float) -> str:
    """This run's gain against the spread of one run at the same settings, from the benchmark's record
    (``benchmarks.distill_gain`` over 3 seeds): the std over seeds of one run's val mAP50-95, and the
    paired gain per seed. Says so when the record is missing or measured another setting or teacher."""
    try:
        payload = json.loads(record.read_text())
        ckpt = load_checkpoint(runs / "student-distill" / "weights" / "last.pt")
        opt = ckpt.get("opt") or {}
        teacher = ((ckpt.get("extra") or {}).get("teacher") or {}).get("sha256")
    except (OSError, ValueError, UserError):
        return f"No 3-seed record to compare with ({record} or the run's last.pt is missing)."
    settings = payload.get("settings") or {}
    differ = [k for k in MATCHED_SETTINGS if settings.get(k) != opt.get(k)]
    by_method: dict[str, dict[int, float]] = {}
    for run in payload.get("runs", []):
        by_method.setdefault(run.get("method"), {})[run.get("seed")] = run.get("val_map")
    default = by_method.get("default", {})
    if not differ and teacher not in {r.get("teacher_sha256") for r in payload.get("runs", [])}:
        differ = ["teacher"]
    if differ or len(default) < 3:
        what = ", ".join(differ) if differ else f"{len(default)} seeds"
        return f"No 3-seed record at the demo's settings in {record.name} ({what} differ): no spread to compare with."
    scratch = by_method.get("scratch", {})
    seeds = sorted(set(default) & set(scratch))
    spread = max(mean_spread([scratch[s] for s in seeds])[1], mean_spread([default[s] for s in seeds])[1])
    gains = [100 * (default[s] - scratch[s]) for s in seeds]
    verdict = "above" if 100 * gain > 100 * spread else "within"
    return (f"At these settings over {len(seeds)} seeds ({record.name}): val mAP50-95 scratch "
            f"{mean_spread([scratch[s] for s in seeds])[0]:.3f}, distilled {mean_spread([default[s] for s in seeds])[0]:.3f}, "
            f"paired gain {sum(gains) / len(gains):+.1f} points ({', '.join(f'{g:+.1f}' for g in gains)}); one run "
            f"moves by about {100 * spread:.1f} points (std over seeds), so this run's {100 * gain:+.1f} is {verdict} "
            f"the spread of one run.")


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
          f"(same epochs, same seed, one run each).")
    print(seed_spread_line(Path(opt.record), runs, distilled - scratch))
    print(training_time_line(runs))
    print(f"\nWhere to look:\n"
          f"  curves:              {runs}/<run>/results.png (and TensorBoard: tensorboard --logdir {runs})\n"
          f"  PR curve, confusion: {runs}/val-student-distill/PR_curve.png, confusion_matrix.png\n"
          f"  predictions:         {runs}/val-student-distill/val_batch0_pred.jpg\n"
          f"  detections (ONNX):   {runs}/detect/\n"
          f"  training batches:    {runs}/student-distill/train_batch0.jpg")


if __name__ == "__main__":
    main(sys.argv[1:])
