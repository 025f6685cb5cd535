"""Accuracy parity on BCCD: train.py from scratch against the public YOLOv9 code's numbers.

Each model is trained by train.py on BCCD (train split, 640 px, hyp.scratch-high.yaml, batch 16,
100 epochs, --close-mosaic 10, from scratch, one run per seed), then its best.pt is scored by
val.py on the val and the test split. As in the public run (reference/peer-measurements.md),
validation happens only after the last epoch unless --val-each-epoch is given, so best.pt is the
last epoch's EMA model. The table puts our runs next to the public code's (val split only).

    python -m benchmarks.train_bccd                                  # gelan-s and gelan-t, seed 0
    python -m benchmarks.train_bccd --models gelan-t --seeds 0 1 2 --gpu-augment
    python -m benchmarks.train_bccd --dry-run                        # CPU check, synthetic set
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks.harness.cli import DRY, apply_dry_run, check_positive, hyp_file, model_cfg, training_parser
from benchmarks.harness.commands import command_line
from benchmarks.harness.data import resolve_data
from benchmarks.harness.machine import machine_info
from benchmarks.harness.results import fmt, fmt_spread, markdown_table, report_header, results_path, write_results
from benchmarks.harness.runner import Runner, TrainSettings
from utils.core.errors import cli_main
from utils.core.log import LOGGER, setup_logging

DEFAULT_MODELS = ("gelan-s", "gelan-t")
EPOCHS = 100
CLOSE_MOSAIC = 10
PER_EPOCHS = 100  # wall time is also given per this many epochs, the public run's length
PUBLIC = {  # the public YOLOv9 code on one H100, BCCD, 100 epochs, batch 16 (peer-measurements.md)
    "gelan-s": {"params": 7.20e6, "val_map50": 0.896, "val_map": 0.592, "wall_s": 475.0, "epochs": 100, "batch": 16},
    "gelan-t": {"params": 1.91e6, "val_map50": 0.878, "val_map": 0.585, "wall_s": 475.0, "epochs": 100, "batch": 16},
}
MILLION = 1e6


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = training_parser(__doc__, EPOCHS, "train_bccd")
    add = parser.add_argument
    add("--models", nargs="+", default=list(DEFAULT_MODELS), help="model names (models/detect/) or yaml paths")
    add("--seeds", nargs="+", type=int, default=[0], help="one run per seed")
    add("--hyp", default="hyp.scratch-high.yaml", help="hyper-parameter yaml (path or name in hyp/)")
    add("--close-mosaic", type=int, default=CLOSE_MOSAIC, help="mosaic off for the last N epochs")
    add("--val-each-epoch", action="store_true", help="validate every epoch and keep the best (the public run did not)")
    return parser.parse_args(argv)


def train_and_score(runner: Runner, model: str, seed: int, hyp: Path, settings: TrainSettings) -> dict:
    """One model and seed: train, count parameters, validate on val and test; returns the row dict."""
    from utils.checkpoint.ours import load_model
    from models.info import count_params

    run = runner.train(f"{Path(model).stem}-seed{seed}", model_cfg(model), hyp, seed, settings)
    val = runner.validate(run["best"], settings, "val", Path(run["dir"]))
    test = runner.validate(run["best"], settings, "test", Path(run["dir"]))
    return {"model": Path(model).stem, "seed": seed, "params": count_params(load_model(run["best"])),
            "epochs": settings.epochs, "batch": settings.batch, "val_map50": val["map50"], "val_map": val["map"],
            "test_map50": test["map50"], "test_map": test["map"], "val_per_class": val.get("per_class"),
            "wall_s": run["wall_s"], "run_dir": run["dir"], "command": run["command"]}


def table(rows: list[dict]) -> str:
    """Our runs (and their mean over seeds) next to the public code's row for the same model."""
    headers = ["model", "code", "seed", "params (M)", "epochs", "batch", "val mAP50", "val mAP50-95",
               "test mAP50-95", "wall time (s)", f"s per {PER_EPOCHS} epochs"]
    cells = []
    for model in dict.fromkeys(r["model"] for r in rows):
        ours = [r for r in rows if r["model"] == model]
        for r in ours:
            cells.append([model, "ours", r["seed"], fmt(r["params"] / MILLION, 2), r["epochs"], r["batch"],
                          fmt(r["val_map50"]), fmt(r["val_map"]), fmt(r["test_map"]), fmt(r["wall_s"], 0),
                          fmt(r["wall_s"] * PER_EPOCHS / r["epochs"], 0)])
        if len(ours) > 1:
            cells.append([model, f"ours, mean ± std of {len(ours)} seeds", "-", fmt(ours[0]["params"] / MILLION, 2),
                          ours[0]["epochs"], ours[0]["batch"], fmt_spread([r["val_map50"] for r in ours]),
                          fmt_spread([r["val_map"] for r in ours]), fmt_spread([r["test_map"] for r in ours]),
                          fmt_spread([r["wall_s"] for r in ours], 0), "-"])
        public = PUBLIC.get(model)
        if public:
            cells.append([model, "public YOLOv9", 0, fmt(public["params"] / MILLION, 2), public["epochs"],
                          public["batch"], fmt(public["val_map50"]), fmt(public["val_map"]), "-",
                          fmt(public["wall_s"], 0), fmt(public["wall_s"] * PER_EPOCHS / public["epochs"], 0)])
    return markdown_table(headers, cells)


@cli_main
def main(argv: list[str] | None = None) -> dict:
    setup_logging()
    opt = parse_args(argv)
    check_positive(opt, ("epochs", "batch", "img"))
    apply_dry_run(opt)
    if opt.dry_run:
        opt.seeds = opt.seeds[:1]
        opt.close_mosaic = min(opt.close_mosaic, 1)
    hyp = hyp_file(opt.hyp)
    for model in opt.models:  # a bad name fails here, before any training
        model_cfg(model)
    data = resolve_data(opt)
    settings = TrainSettings.from_args(opt, data, close_mosaic=opt.close_mosaic, noval=not opt.val_each_epoch)
    runner = Runner(Path(opt.work), reuse=opt.reuse, in_process=opt.in_process,
                    threads=DRY.threads if opt.dry_run else 0)
    command = command_line("train_bccd", argv)
    info = machine_info(opt.device)
    payload = {"benchmark": "train_bccd", "dry_run": opt.dry_run, "command": command, "machine": info,
               "settings": {**vars(opt), "data": str(data), "hyp": str(hyp)}, "public": PUBLIC, "runs": []}
    for model in opt.models:
        for seed in opt.seeds:
            LOGGER.info(f"--- {model}, seed {seed}")
            payload["runs"].append(train_and_score(runner, model, seed, hyp, settings))
            write_results(results_path(opt), payload)  # partial results survive an interruption
    title = (f"Training parity on {'the dry-run synthetic set' if opt.dry_run else 'BCCD'}: train.py from scratch, "
             f"{settings.img} px, {hyp.name}, close-mosaic {settings.close_mosaic}, "
             f"{'validation every epoch' if opt.val_each_epoch else 'validation after the last epoch'}")
    report = report_header(title, info, command, opt.dry_run) + table(payload["runs"])
    payload["table"] = report
    payload["commands"] = runner.commands
    out = write_results(results_path(opt), payload)
    print(report)
    print(f"\nresults: {out}")
    return payload


if __name__ == "__main__":
    main(sys.argv[1:])
