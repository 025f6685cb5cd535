"""FP32 vs FP16 vs INT8 ONNX of trained checkpoints on BCCD val: accuracy (ONNX Runtime, CPU) and size.

    python -m benchmarks.quant_bccd --weights runs/teacher/exp/weights/best.pt runs/distill/exp/weights/best.pt \
        --img 320 [--mends auto|all|none] [--calib-images 512]

For every checkpoint: export.py's FP32, FP16 (``--half``) and INT8 Q/DQ (``--int8 --data``, calibrated
on the train split) ONNX files, each validated with ``val.py --weights x.onnx`` on the val split
(mAP50 and mAP50-95 of the same evaluator), with parameters, file size and ONNX Runtime CPU latency.
Goal: FP16 within 0.1 and INT8 within 1.0 mAP50-95 points of FP32. When INT8 loses more (``--mends
auto``) or always (``all``), the known mends are tried and reported: the head's last 1x1 convs kept in
float, entropy and percentile calibration, and fewer calibration images (to show how much the number
of images matters; BCCD's whole train split is already used by default).

Latency: batch 1, one ONNX Runtime thread, the variants of a checkpoint timed in interleaved
rounds, median per variant and the ratio to FP32. ONNX Runtime's CPU provider has no FP16
convolution kernels on x86: it computes the FP16 graph through inserted casts, and the Q/DQ graph as
dequantize + FP32 convolution (it cannot fuse Q/DQ around a conv whose output is not quantized, which
is the placement TensorRT wants). So the CPU latencies say nothing about TensorRT speed, and on a
shared machine they are indicative only; the accuracy is what this benchmark measures.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np

from benchmarks.harness.cli import RUNS_DIR
from benchmarks.harness.commands import command_line
from benchmarks.harness.data import BCCD_DATA
from benchmarks.harness.machine import machine_info
from benchmarks.harness.results import markdown_table, report_header, write_results
from benchmarks.harness.timer import round_robin
from utils.core.errors import ArgumentParser, UserError, cli_main
from utils.core.log import LOGGER, setup_logging

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "quant_bccd"
FP16_GOAL, INT8_GOAL = 0.1, 1.0  # mAP50-95 points below FP32
POINTS = 100.0  # mAP fractions -> points
FEW_CALIB_IMAGES = 64
WARMUP_RUNS = 3


def variants(opt: argparse.Namespace, data: str, with_mends: bool) -> list[tuple[str, list[str]]]:
    """(name, export.py flags) of every ONNX to compare; the mends only ``with_mends``."""
    calib = ["--data", data, "--calib-images", str(opt.calib_images)]
    rows = [("fp32", []), ("fp16", ["--half"]), ("int8", ["--int8", *calib])]
    if with_mends:
        rows += [("int8 head convs float", ["--int8", *calib, "--int8-exclude-head"]),
                 ("int8 entropy", ["--int8", *calib, "--calib-method", "entropy"]),
                 ("int8 percentile", ["--int8", *calib, "--calib-method", "percentile"]),
                 (f"int8 {FEW_CALIB_IMAGES} images", ["--int8", "--data", data, "--calib-images", str(FEW_CALIB_IMAGES)])]
    return rows


def export_variant(weights: Path, folder: Path, name: str, flags: list[str], img: int) -> Path:
    """Run export.py for one variant into ``folder`` (a copy of the checkpoint named after the variant)."""
    import export

    stem = name.replace(" ", "-")
    source = folder / f"{stem}.pt"
    if not source.exists():
        source.write_bytes(weights.read_bytes())
    return export.main(["--weights", str(source), "--img", str(img), "--device", "cpu", "--include", "onnx", *flags])[0]


def validate(onnx_path: Path, data: str, img: int, work: Path) -> dict:
    import val

    metrics = val.run(val.ValOptions(str(onnx_path), data=data, imgsz=img, batch_size=8, device="cpu", workers=0,
                                     noplots=True, project=str(work / "val"), name=onnx_path.stem, exist_ok=True))
    return {"map50": metrics["map50"], "map": metrics["map"]}


def interleaved_latency(paths: dict[str, Path], img: int, rounds: int) -> dict[str, float]:
    """Median ms per ONNX file: one ORT thread, batch 1, the files timed in turn ``rounds`` times."""
    from utils.export.ort_session import ort_session

    sessions = {}
    for name, path in paths.items():
        session = ort_session(path, threads=1, inter_op_threads=1)
        inp = session.get_inputs()[0]
        dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
        sessions[name] = (session, {inp.name: np.random.default_rng(0).random((1, 3, img, img)).astype(dtype)})
    times = round_robin([lambda s=s, f=f: s.run(None, f) for s, f in sessions.values()], WARMUP_RUNS, rounds)
    return {name: statistics.median(t) * 1000 for name, t in zip(sessions, times)}


def run_checkpoint(weights: Path, opt: argparse.Namespace, data: str) -> dict:
    """All variants of one checkpoint: metrics, sizes, latency."""
    from utils.checkpoint.ours import load_model
    from models.info import count_params

    folder = Path(opt.work) / weights.parent.parent.name / weights.stem if weights.parent.name == "weights" \
        else Path(opt.work) / weights.stem
    folder.mkdir(parents=True, exist_ok=True)
    params = count_params(load_model(weights))
    results: dict[str, dict] = {}
    for with_mends in (False, True):
        for name, flags in variants(opt, data, with_mends):
            if name in results:
                continue
            path = export_variant(weights, folder, name, flags, opt.img)
            results[name] = {"onnx": str(path), "mb": path.stat().st_size / 2**20, **validate(path, data, opt.img,
                                                                                               folder)}
            LOGGER.info(f"{weights} {name}: mAP50-95 {results[name]['map']:.4f}")
        loss = (results["fp32"]["map"] - results["int8"]["map"]) * POINTS
        if opt.mends == "none" or (opt.mends == "auto" and loss <= INT8_GOAL):
            break
    latency = interleaved_latency({name: Path(r["onnx"]) for name, r in results.items()}, opt.img, opt.rounds)
    for name, row in results.items():
        row["latency_ms"] = latency[name]
    return {"weights": str(weights), "params": params, "variants": results}


def report(runs: list[dict], info: dict, command: str, img: int) -> str:
    """The markdown table: one row per checkpoint and variant, deltas against FP32 in points."""
    rows = []
    for run in runs:
        base = run["variants"]["fp32"]
        for name, row in run["variants"].items():
            delta = (row["map"] - base["map"]) * POINTS
            goal = FP16_GOAL if name == "fp16" else INT8_GOAL if name.startswith("int8") else None
            verdict = "" if goal is None else ("within goal" if -delta <= goal else f"misses the {goal:g}-point goal")
            rows.append([Path(run["weights"]).as_posix(), name, f"{run['params'] / 1e6:.2f} M", f"{row['mb']:.2f}",
                         f"{row['map50'] * POINTS:.2f}", f"{row['map'] * POINTS:.2f}",
                         "" if name == "fp32" else f"{delta:+.2f} {verdict}".strip(),
                         f"{row['latency_ms']:.1f} ({row['latency_ms'] / base['latency_ms']:.2f}x)"])
    headers = ["checkpoint", "ONNX", "params", "file MB", "mAP50", "mAP50-95", "Δ mAP50-95 vs FP32 (points)",
               "ORT CPU ms (vs FP32)"]
    notes = (f"BCCD val (87 images), {img} px, val.py on each ONNX (ONNX Runtime, CPU). INT8: Q/DQ from "
             "export.py --int8 (symmetric, per-channel weights, per-tensor activations, head decode in FP32), "
             "calibrated on the train split (205 images). Latency: batch 1, 1 thread, interleaved rounds on a "
             "shared machine: indicative only, and ONNX Runtime's CPU provider runs FP16 through casts and Q/DQ "
             "as dequantize + FP32 conv, so these ratios do not predict TensorRT speed.")
    return report_header("FP32 / FP16 / INT8 ONNX on BCCD", info, command, False) + notes + "\n\n" + \
        markdown_table(headers, rows) + "\n"


@cli_main
def main(argv: list[str] | None = None) -> list[dict]:
    setup_logging()
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--weights", nargs="+", required=True, help="trained checkpoints (.pt): a teacher and a distilled student")
    add("--data", default="", help="data.yaml (default: BCCD converted into the benchmark cache)")
    add("--img", type=int, default=320, help="export and val size (px); the checkpoints' training size")
    add("--calib-images", type=int, default=512, help="INT8 calibration images (at most; BCCD train has 205)")
    add("--mends", choices=["auto", "all", "none"], default="auto", help="INT8 mends: when it misses the goal, always, never")
    add("--rounds", type=int, default=30, help="interleaved latency rounds")
    add("--work", default=str(RUNS_DIR / "quant"), help="folder for the exports and val runs")
    add("--out", default=str(RESULTS), help="results path without suffix (.md and .json are written)")
    opt = parser.parse_args(argv)
    paths = [Path(w) for w in opt.weights]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise UserError(f"--weights {' '.join(missing)} does not exist")
    data = opt.data or str(BCCD_DATA)
    info = machine_info("cpu")
    command = command_line("quant_bccd", argv)
    runs = [run_checkpoint(path, opt, data) for path in paths]
    text = report(runs, info, command, opt.img)
    Path(opt.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opt.out).with_suffix(".md").write_text(text)
    write_results(Path(opt.out).with_suffix(".json"), {"machine": info, "command": command, "img": opt.img,
                                                        "runs": runs})
    print(text)
    return runs


if __name__ == "__main__":
    main(sys.argv[1:])
