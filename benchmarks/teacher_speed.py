"""How long the frozen teacher's forward pass takes per training batch, in the forms it can run in.

A distillation step runs the teacher on every batch, so on a CPU its forward pass is most of what
distillation costs over scratch training. Timed here, on the same random batch and with the feature
maps feature KD reads, round-robin so that a change in machine load hits every form alike:

- ``as trained``: the checkpoint as ``load_model`` returns it (Conv + BN, RepConvN branches), NCHW;
- ``folded``: ``model.fuse()`` (the same function, fewer operations);
- ``folded, channels-last``: what ``load_teacher`` gives on the CPU (what train_distill.py runs);
- ``folded, channels-last, bf16``: for reference only, the teacher in bfloat16 (not used: it changes
  the teacher's outputs; the largest logit difference is reported).

    python -m benchmarks.teacher_speed --teacher weights/gelan-s-bccd256-e160.pt --img 256 --batch 16 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # started as `python benchmarks/teacher_speed.py`: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.common import command_line, fmt, machine_info, markdown_table, report_header, write_results
from utils.checkpoint import load_model
from utils.errors import UserError, cli_main
from utils.log import LOGGER, setup_logging
from utils.train_setup import load_teacher

MS = 1e3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--teacher", default="weights/gelan-s-bccd256-e160.pt", help="teacher checkpoint")
    add("--img", type=int, default=256, help="square input size")
    add("--batch", type=int, default=16, help="batch size (a training batch)")
    add("--threads", type=int, default=1, help="CPU threads (the distillation benchmark gives each run one)")
    add("--warmup", type=int, default=2, help="untimed passes per form")
    add("--runs", type=int, default=10, help="timed passes per form")
    add("--out", default="benchmarks/results/teacher_speed.json", help="results JSON (a .md is written beside it)")
    return parser.parse_args(argv)


def teacher_forms(path: str) -> dict[str, tuple[torch.nn.Module, torch.dtype, torch.memory_format]]:
    """Each form's model, input dtype and input layout."""
    trained = load_model(path).float().eval().requires_grad_(False)
    names = list(trained.names.values()) if isinstance(trained.names, dict) else list(trained.names)
    cpu = torch.device("cpu")
    runs = load_teacher(path, names, cpu, half=False)
    folded = copy.deepcopy(trained).fuse()
    bf16 = copy.deepcopy(runs).to(torch.bfloat16)
    last = torch.channels_last
    return {"as trained": (trained, torch.float32, torch.contiguous_format),
            "folded": (folded, torch.float32, torch.contiguous_format),
            "folded, channels-last (train_distill.py)": (runs, torch.float32, last),
            "folded, channels-last, bf16 (reference, not used)": (bf16, torch.bfloat16, last)}


def forward(model: torch.nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """The head's raw maps, as the distillation loss reads them (features are computed too)."""
    with torch.no_grad():
        (_, maps), _ = model(images, feature_layers=model.distill_layers)
    return [m.float() for m in maps]


def measure(opt: argparse.Namespace) -> dict:
    if not Path(opt.teacher).is_file():
        raise UserError(f"--teacher {opt.teacher} does not exist")
    torch.set_num_threads(opt.threads)
    forms = teacher_forms(opt.teacher)
    images = torch.rand(opt.batch, 3, opt.img, opt.img, generator=torch.Generator().manual_seed(0))
    inputs = {name: images.to(dtype, memory_format=layout) for name, (_, dtype, layout) in forms.items()}
    reference = forward(forms["as trained"][0], images)
    times: dict[str, list[float]] = {name: [] for name in forms}
    diffs = {}
    for name, (model, _, _) in forms.items():
        for _ in range(opt.warmup):
            maps = forward(model, inputs[name])
        diffs[name] = max(float((a - b).abs().max()) for a, b in zip(maps, reference))
    for _ in range(opt.runs):
        for name, (model, _, _) in forms.items():
            start = time.perf_counter()
            forward(model, inputs[name])
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["as trained"])
    return {name: {"median_ms": statistics.median(t) * MS, "vs_trained": statistics.median(t) / base,
                   "max_logit_diff": diffs[name]} for name, t in times.items()}


def report(opt: argparse.Namespace, results: dict, info: dict, command: str) -> str:
    rows = [[name, fmt(r["median_ms"], 0), f"{r['vs_trained']:.2f}x", f"{r['max_logit_diff']:.1e}"]
            for name, r in results.items()]
    text = report_header(f"Teacher forward pass per training batch ({Path(opt.teacher).name}, batch {opt.batch}, "
                         f"{opt.img} px, {opt.threads} thread(s))", info, command, dry_run=False)
    return text + "\n" + markdown_table(["form", "median ms per batch", "vs as trained", "largest logit difference"],
                                        rows) + "\n"


@cli_main
def main(argv: list[str] | None = None) -> None:
    setup_logging()
    opt = parse_args(argv)
    info = machine_info("cpu")
    command = command_line("teacher_speed", argv)
    results = measure(opt)
    out = write_results(opt.out, {"machine": info, "command": command, "results": results})
    text = report(opt, results, info, command)
    out.with_suffix(".md").write_text(text)
    LOGGER.info(text)


if __name__ == "__main__":
    main(sys.argv[1:])
