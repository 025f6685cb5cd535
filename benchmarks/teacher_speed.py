"""How long the frozen teacher's forward pass takes per training batch, in the forms it can run in.

A distillation step runs the teacher on every batch, so on a CPU its forward pass is most of what
distillation costs over scratch training. Timed here, on the same random batch and with the feature
maps feature KD reads, round-robin so that a change in machine load hits every form alike:

- ``as trained``: the checkpoint as ``load_model`` returns it (Conv + BN, RepConvN branches), NCHW;
- ``folded``: ``model.fuse()`` (the same function, fewer operations);
- ``folded, channels-last``: what ``load_teacher`` gives on the CPU (``distill_teacher_dtype: fp32``);
- ``folded, channels-last, bf16``: the same in bfloat16 (``distill_teacher_dtype: bf16``, what ``auto``
  picks on a CPU with bf16 hardware). It changes the teacher's outputs a little: the largest logit
  difference is reported, and with ``--data`` each form's val and test mAP50-95 (what a student is
  taught from).

    python -m benchmarks.teacher_speed --teacher weights/gelan-s-bccd256-e160.pt --img 256 --batch 16 \
        --threads 1 --data data/bccd.yaml
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch

from benchmarks.harness.commands import command_line
from benchmarks.harness.machine import machine_info
from benchmarks.harness.results import fmt, markdown_table, report_header, write_results
from benchmarks.harness.timer import round_robin
from utils.checkpoint.ours import load_model
from utils.core.errors import ArgumentParser, UserError, cli_main
from utils.core.log import LOGGER, setup_logging
from utils.engine.setup import load_teacher

MS = 1e3
FP32 = "folded, channels-last (train_distill.py, fp32)"
BF16 = "folded, channels-last, bf16 (train_distill.py, bf16)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--teacher", default="weights/gelan-s-bccd256-e160.pt", help="teacher checkpoint")
    add("--img", type=int, default=256, help="square input size")
    add("--batch", type=int, default=16, help="batch size (a training batch)")
    add("--threads", type=int, default=1, help="CPU threads (the distillation benchmark gives each run one)")
    add("--warmup", type=int, default=2, help="untimed passes per form")
    add("--runs", type=int, default=10, help="timed passes per form")
    add("--data", default="", help="also score each form's val and test mAP50-95 on this data yaml")
    add("--out", default="benchmarks/results/teacher_speed.json", help="results JSON (a .md is written beside it)")
    return parser.parse_args(argv)


def teacher_forms(path: str) -> dict[str, tuple[torch.nn.Module, torch.dtype, torch.memory_format]]:
    """Each form's model, input dtype and input layout."""
    trained = load_model(path).float().eval().requires_grad_(False)
    names = list(trained.names.values()) if isinstance(trained.names, dict) else list(trained.names)
    cpu = torch.device("cpu")
    runs = load_teacher(path, names, cpu)
    folded = copy.deepcopy(trained).fuse()
    bf16 = load_teacher(path, names, cpu, torch.bfloat16)
    last = torch.channels_last
    return {"as trained": (trained, torch.float32, torch.contiguous_format),
            "folded": (folded, torch.float32, torch.contiguous_format),
            FP32: (runs, torch.float32, last),
            BF16: (bf16, torch.bfloat16, last)}


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
    diffs = {}
    for name, (model, _, _) in forms.items():
        for _ in range(opt.warmup):
            maps = forward(model, inputs[name])
        diffs[name] = max(float((a - b).abs().max()) for a, b in zip(maps, reference))
    calls = [lambda m=model, x=inputs[name]: forward(m, x) for name, (model, _, _) in forms.items()]
    times = dict(zip(forms, round_robin(calls, 0, opt.runs)))  # warmed up above, where the diffs are taken
    base = statistics.median(times["as trained"])
    results = {name: {"median_ms": statistics.median(t) * MS, "vs_trained": statistics.median(t) / base,
                      "max_logit_diff": diffs[name]} for name, t in times.items()}
    if opt.data:
        for name in (FP32, BF16):
            results[name].update(score(forms[name][0], opt.data, opt.img))
    return results


def score(model: torch.nn.Module, data_yaml: str, img: int) -> dict[str, float]:
    """``{'val_map': .., 'test_map': ..}``: mAP50-95 of ``model`` (in its own dtype) on the data's splits."""
    from utils.data.config import load_data_config
    from utils.data.dataset import LoaderOptions, create_dataloader
    from utils.eval.evaluator import evaluate

    data = load_data_config(data_yaml)
    out = {}
    for split in ("val", "test"):
        if data.get(split):
            loader, _ = create_dataloader(data[split], LoaderOptions(img, 16, 32, rect=True, workers=0,
                                                                     nc=len(data["names"])))
            out[f"{split}_map"] = evaluate(model, loader, data["names"], progress=False)["map"]
    return out


def report(opt: argparse.Namespace, results: dict, info: dict, command: str) -> str:
    rows = [[name, fmt(r["median_ms"], 0), f"{r['vs_trained']:.2f}x", f"{r['max_logit_diff']:.1e}",
             fmt(r.get("val_map"), 4), fmt(r.get("test_map"), 4)] for name, r in results.items()]
    text = report_header(f"Teacher forward pass per training batch ({Path(opt.teacher).name}, batch {opt.batch}, "
                         f"{opt.img} px, {opt.threads} thread(s))", info, command, dry_run=False)
    head = ["form", "median ms per batch", "vs as trained", "largest logit difference", "val mAP50-95",
            "test mAP50-95"]
    return text + "\n" + markdown_table(head, rows) + "\n"


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
