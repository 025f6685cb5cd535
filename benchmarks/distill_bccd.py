"""The distillation proof on BCCD: does a teacher make the student better, and at what cost?

1. Teacher(s): gelan-s trained by train.py (``--teacher-models gelan-s yolov9-s`` adds a second
   one), or given with ``--teacher a.pt [b.pt]``; each is scored on the test split.
2. Per seed, per student (yolov9-tiny, gelan-t): trained from scratch by train.py
   (``--scratch-hyp``), and distilled by train_distill.py from every teacher with every recipe
   (``--recipes`` hyp files; ``--ablation`` instead derives cls-only, cls+box and cls+box+feat
   variants of ``--ablation-base`` by zeroing weights), all with the same epochs, batch and seed.
3. Every run validates on the val split each epoch to pick best.pt; best.pt is scored on the
   test split. Reported per student and method: test mAP50 and mAP50-95 (mean ± std over
   seeds), the gap closed = (distilled - scratch) / (teacher - scratch) in test mAP50-95, and the
   cost: training images/s (results.csv, epochs after the first) of distillation against scratch
   training of the same student (target: at most 35% slower).

    python -m benchmarks.distill_bccd                                 # 100 epochs, 3 seeds
    python -m benchmarks.distill_bccd --epochs 30 --seeds 0           # short schedule
    python -m benchmarks.distill_bccd --teacher runs/train/gelan-s/weights/best.pt --ablation
    python -m benchmarks.distill_bccd --dry-run                       # CPU check, synthetic set
Results are written after every run; ``--reuse`` continues an interrupted benchmark.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

if __package__ in (None, ""):  # started as `python benchmarks/distill_bccd.py`: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml

from benchmarks.common import (DRY, Runner, TrainSettings, apply_dry_run, check_positive, command_line, fmt,
                               fmt_spread, hyp_file, machine_info, markdown_table, mean_spread, model_cfg,
                               report_header, resolve_data, results_path, train_rate, training_parser, write_results)
from utils.errors import UserError, cli_main
from utils.log import LOGGER, setup_logging

EPOCHS = 100
TEACHER_EPOCHS = 100
CLOSE_MOSAIC = 10
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_TEACHERS = ("gelan-s",)
DEFAULT_STUDENTS = ("yolov9-tiny", "gelan-t")
DEFAULT_RECIPES = ("hyp.distill.yaml", "hyp.distill-classic.yaml")
SCRATCH = "scratch"
# ablation variants of the base recipe: the distillation weights set to zero in each
ABLATION = {"cls": {"distill_box": 0.0, "distill_feat": 0.0}, "cls+box": {"distill_feat": 0.0}, "cls+box+feat": {}}
MAX_SLOWDOWN = 0.35  # distillation may train at most this much slower than scratch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = training_parser(__doc__, EPOCHS, "distill_bccd")
    add = parser.add_argument
    add("--teacher", nargs="+", default=[], help="trained teacher checkpoint(s); no teacher is trained then")
    add("--teacher-models", nargs="+", default=list(DEFAULT_TEACHERS),
        help="teachers to train when --teacher is not given")
    add("--teacher-epochs", type=int, default=TEACHER_EPOCHS, help="epochs of a teacher trained here")
    add("--teacher-hyp", default="hyp.scratch-high.yaml", help="hyp of a teacher trained here")
    add("--students", nargs="+", default=list(DEFAULT_STUDENTS), help="student model names or yaml paths")
    add("--seeds", nargs="+", type=int, default=list(DEFAULT_SEEDS),
        help="one scratch and one distilled run per seed")
    add("--recipes", nargs="+", default=list(DEFAULT_RECIPES), help="distillation hyp files (paths or names in hyp/)")
    add("--ablation", action="store_true",
        help="instead of --recipes: cls only, +box, +feat variants of --ablation-base")
    add("--ablation-base", default="hyp.distill.yaml", help="the recipe the ablation variants come from")
    add("--scratch-hyp", default="hyp.scratch-high.yaml", help="hyp of the students trained from scratch")
    add("--close-mosaic", type=int, default=CLOSE_MOSAIC, help="mosaic off for the last N epochs of every run")
    return parser.parse_args(argv)


def method_name(recipe: Path) -> str:
    """A short label of a recipe file: hyp.distill-classic.yaml -> distill-classic."""
    stem = recipe.stem
    return stem[len("hyp."):] if stem.startswith("hyp.") else stem


def ablation_recipes(base: Path, folder: Path) -> list[Path]:
    """Write the ablation variants of ``base`` into ``folder``; returns their paths (cls, +box, +feat)."""
    hyp = yaml.safe_load(base.read_text())
    if not isinstance(hyp, dict):
        raise UserError(f"--ablation-base {base} is not a yaml mapping of hyper-parameters")
    needed = sorted({key for zeroed in ABLATION.values() for key in zeroed} | {"distill_cls"})
    missing = [key for key in needed if key not in hyp]
    if missing:
        raise UserError(f"--ablation-base {base} has no {', '.join(missing)}: is it a distillation recipe?")
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for variant, zeroed in ABLATION.items():
        path = folder / f"ablation-{variant.replace('+', '-')}.yaml"
        changes = ", ".join(f"{k}={v}" for k, v in zeroed.items()) or "unchanged"
        path.write_text(f"# {base.name} with {changes} (written by benchmarks/distill_bccd.py --ablation)\n"
                        + yaml.safe_dump({**hyp, **zeroed}, sort_keys=False))
        paths.append(path)
    return paths


def teacher_label(path: Path) -> str:
    """runs/x/gelan-s/weights/best.pt -> gelan-s; other files by their stem."""
    return path.parent.parent.name if path.parent.name == "weights" else path.stem


def prepare_teachers(runner: Runner, opt: argparse.Namespace, settings: TrainSettings) -> list[dict]:
    """Train (or take) the teachers and score each on the test split."""
    if opt.teacher:
        found = [Path(t) for t in opt.teacher]
        for path in found:
            if not path.is_file():
                raise UserError(f"--teacher {path} does not exist")
        teachers = [{"label": teacher_label(p), "best": str(p.resolve()), "dir": str(runner.work / "teachers" /
                     teacher_label(p)), "trained_here": False} for p in found]
    else:
        teacher_settings = TrainSettings(**{**vars(settings), "epochs": opt.teacher_epochs})
        teachers = []
        for model in opt.teacher_models:
            run = runner.train(f"teacher-{Path(model).stem}-s{opt.seeds[0]}", model_cfg(model),
                               hyp_file(opt.teacher_hyp), opt.seeds[0], teacher_settings)
            teachers.append({"label": Path(model).stem, **run, "trained_here": True,
                             "images_s": train_rate(run["dir"])})
    labels = [t["label"] for t in teachers]
    if len(set(labels)) != len(labels):
        raise UserError(f"--teacher: two teachers share a name ({', '.join(labels)}); give distinct files")
    for teacher in teachers:
        test = runner.validate(teacher["best"], settings, "test", Path(teacher["dir"]))
        teacher.update(test_map50=test["map50"], test_map=test["map"])
        LOGGER.info(f"teacher {teacher['label']}: test mAP50 {test['map50']:.4f}, mAP50-95 {test['map']:.4f}")
    return teachers


def student_run(runner: Runner, student: str, seed: int, settings: TrainSettings, hyp: Path,
                method: str, teacher: dict | None) -> dict:
    """One student run (scratch when ``teacher`` is None): train, score best.pt, read its speed."""
    suffix = method if teacher is None else f"{method}-from-{teacher['label']}"
    run = runner.train(f"{Path(student).stem}-{suffix}-s{seed}", model_cfg(student), hyp, seed, settings,
                       teacher=None if teacher is None else Path(teacher["best"]))
    val = runner.validate(run["best"], settings, "val", Path(run["dir"]))
    test = runner.validate(run["best"], settings, "test", Path(run["dir"]))
    return {"student": Path(student).stem, "method": method, "teacher": teacher["label"] if teacher else None,
            "seed": seed, "hyp": str(hyp), "val_map50": val["map50"], "val_map": val["map"],
            "test_map50": test["map50"], "test_map": test["map"], "images_s": train_rate(run["dir"]),
            "wall_s": run["wall_s"], "run_dir": run["dir"], "command": run["command"]}


def gap_closed(distilled: float, scratch: float, teacher: float) -> float:
    """Share of the teacher's lead over the scratch student that distillation recovers (NaN when
    the teacher is not ahead: there is no gap to close)."""
    lead = teacher - scratch
    return (distilled - scratch) / lead if lead > 0 else math.nan


def summarize(runs: list[dict], teachers: list[dict]) -> list[dict]:
    """One row per (student, method, teacher): means over seeds, gap closed and cost vs scratch."""
    teacher_map = {t["label"]: t["test_map"] for t in teachers}
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((run["student"], run["method"], run["teacher"]), []).append(run)
    rows = []
    for (student, method, teacher), group in groups.items():
        scratch = groups.get((student, SCRATCH, None), [])
        row = {"student": student, "method": method, "teacher": teacher, "seeds": [r["seed"] for r in group],
               "test_map50": [r["test_map50"] for r in group], "test_map": [r["test_map"] for r in group],
               "images_s": mean_spread([r["images_s"] for r in group])[0], "gap_closed": math.nan,
               "slowdown": math.nan}
        if teacher is not None and scratch:
            scratch_map = mean_spread([r["test_map"] for r in scratch])[0]
            row["gap_closed"] = gap_closed(mean_spread(row["test_map"])[0], scratch_map, teacher_map[teacher])
            row["slowdown"] = 1 - row["images_s"] / mean_spread([r["images_s"] for r in scratch])[0]
        rows.append(row)
    return rows


def _percent(value: float) -> str:
    return "-" if math.isnan(value) else f"{value * 100:.0f}%"


def tables(summary: list[dict], runs: list[dict], teachers: list[dict]) -> str:
    """The summary (teachers first) and the per-run table."""
    headers = ["student", "method", "teacher", "seeds", "test mAP50", "test mAP50-95", "gap closed",
               "train images/s", f"slower than scratch (target <= {MAX_SLOWDOWN:.0%})"]
    cells = [[t["label"] + " (teacher)", "trained here" if t["trained_here"] else "given", "-", "-",
              fmt(t["test_map50"]), fmt(t["test_map"]), "-", fmt(t.get("images_s"), 1), "-"] for t in teachers]
    cells += [[r["student"], r["method"], r["teacher"] or "-", len(r["seeds"]), fmt_spread(r["test_map50"]),
               fmt_spread(r["test_map"]), _percent(r["gap_closed"]), fmt(r["images_s"], 1), _percent(r["slowdown"])]
              for r in summary]
    per_run = [[r["student"], r["method"], r["teacher"] or "-", r["seed"], fmt(r["val_map"]), fmt(r["test_map50"]),
                fmt(r["test_map"]), fmt(r["images_s"], 1), fmt(r["wall_s"], 0)] for r in runs]
    return (markdown_table(headers, cells) + "\n\nPer run (best.pt chosen on val, scored on test):\n\n"
            + markdown_table(["student", "method", "teacher", "seed", "val mAP50-95", "test mAP50", "test mAP50-95",
                              "train images/s", "wall time (s)"], per_run))


@cli_main
def main(argv: list[str] | None = None) -> dict:
    setup_logging()
    opt = parse_args(argv)
    check_positive(opt, ("epochs", "batch", "img", "teacher_epochs"))
    apply_dry_run(opt)
    if opt.dry_run:
        opt.seeds, opt.teacher_epochs = opt.seeds[:1], 1
        opt.close_mosaic = min(opt.close_mosaic, 1)
    for model in opt.students:  # a bad name fails here, before any training
        model_cfg(model, "--students")
    for model in [] if opt.teacher else opt.teacher_models:
        model_cfg(model, "--teacher-models")
    scratch_hyp = hyp_file(opt.scratch_hyp, "--scratch-hyp")
    hyp_file(opt.teacher_hyp, "--teacher-hyp")
    work = Path(opt.work)
    if opt.ablation:
        recipes = ablation_recipes(hyp_file(opt.ablation_base, "--ablation-base"), work / "hyp")
        methods = [f"ablation-{variant}" for variant in ABLATION]
    else:
        recipes = [hyp_file(r, "--recipes") for r in opt.recipes]
        methods = [method_name(r) for r in recipes]
    if len(set(methods)) != len(methods):
        raise UserError(f"--recipes {' '.join(opt.recipes)}: two recipes have the same name")
    data = resolve_data(opt)
    settings = TrainSettings.from_args(opt, data, close_mosaic=opt.close_mosaic)
    runner = Runner(work, reuse=opt.reuse, in_process=opt.in_process, threads=DRY.threads if opt.dry_run else 0)
    command = command_line("distill_bccd", argv)
    info = machine_info(opt.device)
    payload = {"benchmark": "distill_bccd", "dry_run": opt.dry_run, "command": command, "machine": info,
               "settings": {**vars(opt), "data": str(data), "recipes": [str(r) for r in recipes]},
               "teachers": [], "runs": [], "summary": []}
    out = results_path(opt)
    payload["teachers"] = teachers = prepare_teachers(runner, opt, settings)
    write_results(out, payload)
    for seed in opt.seeds:  # seed outermost: an interrupted benchmark still holds complete comparisons
        for student in opt.students:
            LOGGER.info(f"--- {student}, seed {seed}")
            payload["runs"].append(student_run(runner, student, seed, settings, scratch_hyp, SCRATCH, None))
            write_results(out, payload)
            for teacher in teachers:
                for recipe, method in zip(recipes, methods):
                    payload["runs"].append(student_run(runner, student, seed, settings, recipe, method, teacher))
                    payload["summary"] = summarize(payload["runs"], teachers)
                    write_results(out, payload)
    payload["summary"] = summary = summarize(payload["runs"], teachers)
    title = (f"Distillation on {'the dry-run synthetic set' if opt.dry_run else 'BCCD'}: {opt.epochs} epochs, "
             f"batch {opt.batch}, {opt.img} px, close-mosaic {opt.close_mosaic}, "
             f"seeds {' '.join(map(str, opt.seeds))}, scratch hyp {scratch_hyp.name}, test split")
    report = report_header(title, info, command, opt.dry_run) + tables(summary, payload["runs"], teachers)
    payload.update(table=report, commands=runner.commands)
    write_results(out, payload)
    print(report)
    print(f"\nresults: {out}")
    return payload


if __name__ == "__main__":
    main(sys.argv[1:])
