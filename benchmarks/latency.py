"""Inference latency of the teachers and the students, as ratios to the teacher, in one run.

Each model is built from its yaml (untrained: latency does not depend on the weights) at ``--nc``
classes, reparameterized (dual heads -> gelan layout), fused and exported to ONNX exactly as
``export.py`` does; then ONNX Runtime runs it on the CPU at batch 1. The timed runs go round-robin
over the models so that a change in machine load hits every model alike. On a CUDA machine the
PyTorch FP16 latency of the same fused models is measured too.

Run from the repository root:
    python -m benchmarks.latency                      # 640 px, 2 threads, the default models
    python -m benchmarks.latency --img 320 --runs 50 --out runs/latency.json
Params and GFLOPs are those of the exported (reparameterized, fused) inference model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from benchmarks.harness.commands import command_line
from benchmarks.harness.machine import NO_GPU, machine_info
from benchmarks.harness.timer import round_robin
from models.info import count_params, gflops
from models.yolo import DetectionModel
from utils.checkpoint.ours import make_checkpoint, save_checkpoint
from utils.core.errors import ArgumentParser, cli_main
from utils.export.model import prepare_model
from utils.export.onnx import export_onnx
from utils.export.ort_session import ort_session

TEACHERS = ("gelan-s", "yolov9-s")
STUDENTS = ("yolov9-tiny", "yolov9-tiny-1.0x", "mobilenetv3-small")
BCCD_CLASSES = 3
P90 = 0.9
MS = 1e3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--models", nargs="+", default=[*TEACHERS, *STUDENTS], help="model yamls; the first is the reference")
    add("--img", type=int, default=640, help="square input size")
    add("--nc", type=int, default=BCCD_CLASSES, help="number of classes (3 = BCCD)")
    add("--threads", type=int, default=2, help="CPU threads for ONNX Runtime and PyTorch")
    add("--warmup", type=int, default=5, help="untimed runs per model")
    add("--runs", type=int, default=30, help="timed runs per model")
    add("--out", default="", help="also write the results as JSON here")
    return parser.parse_args(argv)


def machine_line(info: dict) -> str:
    """The ``Machine:`` line under a latency table (from :func:`benchmarks.harness.machine.machine_info`)."""
    gpu = f", GPU {info['gpu']}" if info["gpu"] != NO_GPU else ""
    return (f"Machine: {info['cpu']}, {info['cpus']} cores{gpu}; onnxruntime {info['onnxruntime']}, "
            f"torch {info['torch']}; {info['date']}.")


def _summary(times: list[float]) -> dict:
    """Median and p90 in milliseconds of per-run times in seconds."""
    ordered = sorted(times)
    return {"median_ms": statistics.median(ordered) * MS,
            "p90_ms": float(np.quantile(np.asarray(ordered), P90)) * MS}


def prepare(names: list[str], img: int, nc: int, folder: Path) -> list[dict]:
    """Build, save, reload through ``export.prepare_model`` and export each model; returns one record each."""
    records = []
    for name in names:
        weights = folder / f"{name}.pt"
        save_checkpoint(make_checkpoint(DetectionModel(name, nc=nc), half=False), weights)
        model = prepare_model(weights, torch.device("cpu"))
        onnx_path = export_onnx(model, folder / f"{name}.onnx", img, names=[str(i) for i in range(nc)])
        records.append({"model": name, "params": count_params(model), "gflops": gflops(model, img),
                        "torch_model": model, "onnx": onnx_path})
    return records


def time_onnxruntime(records: list[dict], img: int, threads: int, warmup: int, runs: int) -> None:
    """Round-robin timed ORT runs; adds ``ort_cpu`` (median_ms, p90_ms) to each record."""
    x = np.random.default_rng(0).random((1, 3, img, img), dtype=np.float32)
    sessions = [ort_session(r["onnx"], threads=threads, inter_op_threads=1, sequential=True) for r in records]
    times = round_robin([lambda s=s: s.run(None, {"images": x}) for s in sessions], warmup, runs)
    for record, model_times in zip(records, times):
        record["ort_cpu"] = _summary(model_times)


def time_torch_fp16(records: list[dict], img: int, warmup: int, runs: int) -> None:
    """PyTorch FP16 on the first CUDA device (CUDA-synchronised per run); adds ``torch_fp16_gpu``."""
    device = torch.device("cuda", 0)
    x = torch.rand(1, 3, img, img, device=device, dtype=torch.float16)
    models = [r["torch_model"].to(device).half() for r in records]
    with torch.inference_mode():
        times = round_robin([lambda m=m: m(x) for m in models], warmup, runs, lambda: torch.cuda.synchronize(device))
    for record, model_times in zip(records, times):
        record["torch_fp16_gpu"] = _summary(model_times)


def markdown(records: list[dict], info: dict, opt: argparse.Namespace, command: str) -> str:
    """The results table (ratios = model median / reference median) with the machine and command."""
    gpu = "torch_fp16_gpu" in records[0]
    head = "| model | params (M) | GFLOPs | ORT CPU median (ms) | p90 (ms) | ratio |"
    rule = "|---|---:|---:|---:|---:|---:|"
    if gpu:
        head += " torch FP16 GPU median (ms) | ratio |"
        rule += "---:|---:|"
    lines = [head, rule]
    reference = records[0]
    for r in records:
        row = (f"| {r['model']} | {r['params'] / 1e6:.2f} | {r['gflops']:.1f} | {r['ort_cpu']['median_ms']:.1f} | "
               f"{r['ort_cpu']['p90_ms']:.1f} | {r['ort_cpu']['median_ms'] / reference['ort_cpu']['median_ms']:.2f} |")
        if gpu:
            g, g0 = r["torch_fp16_gpu"]["median_ms"], reference["torch_fp16_gpu"]["median_ms"]
            row += f" {g:.2f} | {g / g0:.2f} |"
        lines.append(row)
    machine = machine_line(info)
    settings = (f"Batch 1, {opt.img}x{opt.img}, nc={opt.nc}, {opt.threads} threads, {opt.warmup} warm-up + "
                f"{opt.runs} timed runs per model (round-robin); ratio = median / {reference['model']} median.")
    return "\n".join([*lines, "", machine, settings, f"Command: `{command}`"])


@cli_main
def main(argv: list[str] | None = None) -> list[dict]:
    opt = parse_args(argv)
    torch.set_num_threads(opt.threads)
    info = machine_info()
    with tempfile.TemporaryDirectory() as folder:
        records = prepare(opt.models, opt.img, opt.nc, Path(folder))
        time_onnxruntime(records, opt.img, opt.threads, opt.warmup, opt.runs)
        if torch.cuda.is_available():
            time_torch_fp16(records, opt.img, opt.warmup, opt.runs)
    print(markdown(records, info, opt, command_line("latency", argv)))
    results = [{k: v for k, v in r.items() if k not in ("torch_model", "onnx")} for r in records]
    if opt.out:
        out = Path(opt.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"machine": info, "settings": vars(opt), "results": results}, indent=2))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
