"""What distillation buys on a data set: the student distilled from a teacher against the same student
trained from scratch, on every seed, and at what cost. Any data set (``--data``); BCCD by default.

1. The teacher is trained once by train.py and given with ``--teacher`` (README has its command), or
   trained here (``--teacher-models``, with ``--teacher-hyp`` and the same ``--hyp-set`` as the students).
   It is scored on val and test; it must lead the scratch student by ``--min-lead`` (3 points) val
   mAP50-95, else the report says so and claims nothing.
2. Per seed, the student (``--student``) is trained by train.py from scratch and by
   train_distill.py with each method, all with the same epochs, batch, size and seed, and with the
   plain hyp files a user would give (nbs and the weight average chosen by the tool):
   - ``default``: the recipe ``--recipe`` (hyp/hyp.distill.yaml);
   - ``classic``: hyp/hyp.distill-classic.yaml, as published;
   - variations of the default: ``crosskd`` (class/box KD through the teacher's final convs),
     ``pkd`` (+ Pearson feature KD on the neck outputs, weight 4), ``teacher-fp32`` (the teacher in
     fp32 where ``auto`` picks bf16), ``kd-constant`` (KD also in the close-mosaic epochs),
     ``warmup-300`` (the KD weight ramps in over 300 nominal optimizer steps), ``kd-half`` / ``kd-x2``
     (every KD weight halved / doubled), ``ld-t1`` (LD at temperature 1 instead of 10), ``lad`` (+ label
     assignment distillation: the detection loss's targets from the teacher's predictions);
   - controls, on the first seed only: ``kd-off`` (all KD weights 0: must reproduce scratch) and
     ``random-teacher`` (the default recipe from an untrained teacher: must not help).
   ``--hyp-set KEY=VALUE`` changes every run's hyp alike, the teacher's included.
3. best.pt is chosen on val (every epoch) and scored on test. Reported per seed and as mean +- std:
   test and val mAP50-95 / mAP50, the paired difference to scratch (same seed), the gap closed
   (distilled - scratch) / (teacher - scratch), per-class test AP, training images/s against
   scratch. A gain is claimed only if it is positive on every seed (at least 3) and its mean exceeds
   twice its std. Beside it, each run's final weights (last.pt, no choice on val) are scored on val and
   test (a second protocol, reported apart, never mixed).
4. ``--cost-batches N`` measures the training cost alone: each method for N batches (after one
   warm-up epoch of N batches), one run at a time, images/s against scratch.

    python -m benchmarks.distill_gain --data my.yaml --teacher runs/train/teacher/weights/best.pt \
        --epochs 80 --img 640 --reuse                                   # what KD buys on my data
    python -m benchmarks.distill_gain --dry-run                          # CPU check, synthetic set
Results (JSON and a markdown table) are written after every run; ``--reuse`` continues an
interrupted benchmark, keeping every finished run that trained the same thing (command, hyp values
after the tool's automatic choices, and teacher bytes; see ``recorded_run``).
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import shlex
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from benchmarks.harness.cli import DRY, apply_dry_run, check_positive, hyp_file, model_cfg, training_parser
from benchmarks.harness.commands import command_line, display
from benchmarks.harness.data import resolve_data
from benchmarks.harness.machine import cpu_name, machine_info
from benchmarks.harness.results import (fmt, fmt_spread, markdown_table, mean_spread, report_header, results_path,
                                        write_results)
from benchmarks.harness.runner import Runner, TrainSettings, read_results_csv, train_rate
from utils.core.atomic import atomic_write_text
from utils.core.errors import UserError, cli_main
from utils.core.log import LOGGER, setup_logging

EPOCHS = 40
TEACHER_EPOCHS = 60
CLOSE_MOSAIC = 10
DEFAULT_SEEDS = (0, 1, 2)
SCRATCH = "scratch"
DEFAULT = "default"
RANDOM_TEACHER = "random-teacher"
KD_WEIGHTS = ("distill_cls", "distill_box", "distill_feat")
NO_KD = dict.fromkeys(KD_WEIGHTS, 0.0)
KD_SCALE = "kd_scale"  # a METHODS change: multiply the recipe's KD weights by this
# method -> (recipe: None = --recipe, else a file in hyp/), hyp overrides
METHODS: dict[str, tuple[str | None, dict]] = {
    DEFAULT: (None, {}),
    "classic": ("hyp.distill-classic.yaml", {}),
    "crosskd": (None, {"distill_crosskd": True}),
    "pkd": (None, {"distill_feat": 4.0}),  # + PKD on the P3-P5 neck outputs
    "teacher-fp32": (None, {"distill_teacher_dtype": "fp32"}),
    "kd-constant": (None, {"distill_stop_epoch": -1}),  # KD also after mosaic closes
    "warmup-300": (None, {"distill_warmup_steps": 300}),  # the KD weight ramps in over 300 nominal steps
    "kd-half": (None, {KD_SCALE: 0.5}),  # every KD weight of the recipe halved
    "kd-x2": (None, {KD_SCALE: 2.0}),  # every KD weight of the recipe doubled
    "ld-t1": (None, {"distill_box_temperature": 1.0}),
    "lad": (None, {"distill_assign": "teacher"}),  # + the teacher's label assignment (LAD)
    "kd-off": (None, NO_KD),
    RANDOM_TEACHER: (None, {}),
}
FIRST = (SCRATCH, DEFAULT)  # run for every seed before the other methods: the headline comparison
CONTROLS = ("kd-off", RANDOM_TEACHER)  # sanity checks: run on the first seed only
MIN_LEAD = 0.03  # the teacher must beat the scratch student by this much val mAP50-95
UNTRAINED_DATE = "1970-01-01T00:00:00+00:00"  # the random teacher's checkpoint date: no clock in its bytes
CLAIM_SIGMAS = 2.0  # a gain is claimed when positive on every seed and mean > 2 std
CLAIM_SEEDS = 3  # ... over at least this many seeds (two agree by chance too often)
LAST_FOLDER = "last"  # <run>/last/val-<task>: the scores of the run's last.pt
VAL_MAP_COLUMN = "metrics/mAP_0.5:0.95"  # results.csv column of the per-epoch val mAP50-95
VAL_MAP50_COLUMN = "metrics/mAP_0.5"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = training_parser(__doc__, EPOCHS, "distill_gain")
    add = parser.add_argument
    add("--teacher", default="", help="a trained teacher checkpoint (else one is trained here)")
    add("--teacher-models", nargs="+", default=["gelan-t"], help="teacher to train when --teacher is not given")
    add("--teacher-epochs", type=int, default=TEACHER_EPOCHS, help="epochs of a teacher trained here")
    add("--teacher-hyp", default="hyp.scratch-high.yaml", help="hyp of a teacher trained here")
    add("--student", default="yolov9-tiny", help="student model name or yaml path")
    add("--seeds", nargs="+", type=int, default=list(DEFAULT_SEEDS), help="seeds (one run per method and seed)")
    add("--methods", nargs="+", default=[SCRATCH, DEFAULT], help=f"methods to run: {SCRATCH} {' '.join(METHODS)}")
    add("--recipe", default="hyp.distill.yaml", help="the distillation recipe of 'default' and the ablations")
    add("--scratch-hyp", default="hyp.scratch-high.yaml", help="hyp of the students trained from scratch")
    add("--hyp-set", nargs="*", default=[], metavar="KEY=VALUE", help="set a hyp key in every run (yaml value)")
    add("--close-mosaic", type=int, default=CLOSE_MOSAIC, help="mosaic off for the last N epochs of every run")
    add("--jobs", type=int, default=1, help="runs at once (each gets cpus / jobs threads)")
    add("--min-lead", type=float, default=MIN_LEAD, help="val mAP50-95 lead the teacher needs over scratch")
    add("--cost-batches", type=int, default=0, help="also time each method alone for N batches (0 = skip)")
    add("--reuse-from", nargs="*", default=[], metavar="JSON",
        help="results JSONs of calls with another --work: their runs with the same command (work folder aside), "
             "hyp bytes and teacher bytes are kept (e.g. the scratch runs when only the teacher changes)")
    return parser.parse_args(argv)


def parse_hyp_set(items: list[str]) -> dict:
    """``['ema_epochs=3', 'lr0=0.02']`` -> ``{'ema_epochs': 3, 'lr0': 0.02}`` (values read as yaml)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--hyp-set {item}: give KEY=VALUE")
        out[key] = yaml.safe_load(value)
    return out


def write_hyp(folder: Path, name: str, source: Path, changes: dict) -> Path:
    """``source`` with ``changes`` applied, written as ``folder/name.yaml`` (unchanged content keeps its path)."""
    from utils.engine.setup import load_hyp

    base = load_hyp(source)
    changes = dict(changes)
    scale = changes.pop(KD_SCALE, None)
    if scale is not None:
        changes = {**{k: base[k] * scale for k in KD_WEIGHTS}, **changes}
    hyp = {**base, **changes}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    described = ", ".join(f"{k}={v}" for k, v in changes.items()) or "unchanged"
    text = f"# {source.name} with {described} (benchmarks/distill_gain.py)\n" + yaml.safe_dump(hyp, sort_keys=False)
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)
    return path


def method_hyps(opt: argparse.Namespace, folder: Path) -> dict[str, Path]:
    """The hyp file of every method in ``opt.methods`` (written into ``folder``)."""
    common = parse_hyp_set(opt.hyp_set)
    recipe = hyp_file(opt.recipe, "--recipe")
    hyps = {}
    for method in opt.methods:
        if method == SCRATCH:
            hyps[method] = write_hyp(folder, method, hyp_file(opt.scratch_hyp, "--scratch-hyp"), common)
            continue
        if method not in METHODS:
            raise UserError(f"--methods {method}: unknown; choose from {SCRATCH} {' '.join(METHODS)}")
        source, changes = METHODS[method]
        base = hyp_file(source) if source else recipe
        hyps[method] = write_hyp(folder, method, base, {**changes, **common})
    return hyps


def random_teacher(trained: Path, out: Path) -> Path:
    """An untrained model of the teacher's architecture and classes (seed 0), as our checkpoint.

    The file's bytes depend only on the teacher's architecture and classes (a fixed date, no clock), so
    its hash - part of a run's identity - is the same in every session and ``--reuse`` keeps the run.
    """
    import torch

    from models.yolo import DetectionModel
    from utils.checkpoint.ours import load_model, make_checkpoint, save_checkpoint

    if out.is_file():
        return out
    template = load_model(trained)
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    model = DetectionModel(template.yaml, nc=int(template.nc))
    torch.random.set_rng_state(state)
    model.names = list(template.names.values()) if isinstance(template.names, dict) else list(template.names)
    out.parent.mkdir(parents=True, exist_ok=True)
    ckpt = make_checkpoint(model, epoch=-1, extra={"random_init_seed": 0})
    ckpt["date"] = UNTRAINED_DATE
    save_checkpoint(ckpt, out)
    return out


def prepare_teacher(runner: Runner, opt: argparse.Namespace, settings: TrainSettings) -> dict:
    """Train (or take) the teacher and score it on val and test."""
    if opt.teacher:
        path = Path(opt.teacher)
        if not path.is_file():
            raise UserError(f"--teacher {path} does not exist")
        run_file = path.stem in ("best", "last") and path.parent.name == "weights"  # runs/<name>/weights/best.pt
        label = path.resolve().parent.parent.name if run_file else path.stem
        teacher = {"label": label, "best": str(path.resolve()), "dir": str(runner.work / "teachers" / label),
                   "trained_here": False}
    else:
        model = opt.teacher_models[0]
        teacher_settings = TrainSettings(**{**vars(settings), "epochs": opt.teacher_epochs})
        hyp = write_hyp(runner.work / "hyp", "teacher", hyp_file(opt.teacher_hyp, "--teacher-hyp"),
                        parse_hyp_set(opt.hyp_set))  # the students' --hyp-set, so the rules are the same
        run = runner.train(f"teacher-{Path(model).stem}-s{opt.seeds[0]}", model_cfg(model), hyp, opt.seeds[0],
                           teacher_settings)
        teacher = {"label": Path(model).stem, **run, "trained_here": True, "images_s": train_rate(run["dir"])}
    for task in ("val", "test"):
        metrics = runner.validate(teacher["best"], settings, task, Path(teacher["dir"]))
        teacher.update({f"{task}_map50": metrics["map50"], f"{task}_map": metrics["map"],
                        f"{task}_per_class": _per_class(metrics)})
    LOGGER.info(f"teacher {teacher['label']}: val mAP50-95 {teacher['val_map']:.4f}, test {teacher['test_map']:.4f}")
    return teacher


def _per_class(metrics: dict) -> dict[str, float]:
    return {row["name"]: row["map"] for row in metrics.get("per_class", [])}


def run_name(opt: argparse.Namespace, method: str, seed: int) -> str:
    return f"{Path(opt.student).stem}-{method}-s{seed}"


def run_identity(runner: Runner, opt: argparse.Namespace, settings: TrainSettings, method: str, seed: int,
                 hyp: Path, teacher: Path | None) -> dict:
    """What makes two student runs the same: the command and the bytes of its hyp file and teacher
    (plus the hyp's values, so that a method renamed or a recipe re-expressed still finds its runs)."""
    from utils.engine.setup import file_sha256

    command = runner.train_command(run_name(opt, method, seed), model_cfg(opt.student, "--student"), hyp, seed,
                                   settings, teacher)
    images = train_images(settings.data)
    return {"command": command, "hyp_sha256": file_sha256(hyp),
            "hyp_values_sha256": hyp_values_sha256(hyp, images, settings.batch),
            "teacher_sha256": file_sha256(teacher) if teacher is not None else None}


@functools.lru_cache(maxsize=None)
def train_images(data: str | Path) -> int:
    """The number of training images of a data.yaml (what the tool's automatic settings depend on);
    read once per data set, not once per method and seed."""
    from utils.data.config import load_data_config
    from utils.data.dataset import image_files

    return len(image_files(load_data_config(data)["train"]))


def resolved_hyp(hyp: dict, images: int | None = None, batch: int | None = None) -> dict:
    """``hyp`` with the tool's automatic choices written out the way a user would write them: ``nbs``
    as a number and the weight average as ``ema_epochs: 3`` or YOLO's ``ema_decay`` / ``ema_tau``
    (utils.engine.optim.auto_nominal_batch, utils.engine.ema.ema_choice). Two hyp files that train alike resolve alike,
    so a run recorded with ``nbs: 16, ema_epochs: 3`` is the one a plain hyp file trains on BCCD."""
    import math

    from utils.engine.ema import AUTO_SMALL_EPOCHS, DEFAULT_DECAY, DEFAULT_TAU, ema_choice
    from utils.engine.optim import AUTO, accumulate_steps, nominal_batch

    if images is None or batch is None:
        return dict(hyp)
    out = dict(hyp)
    if out.get("nbs", AUTO) in (AUTO, None):
        out["nbs"] = nominal_batch(out, images, batch)
    if out.get("ema_epochs", AUTO) in (AUTO, None) and not ("ema_decay" in out or "ema_tau" in out):
        updates = math.ceil(images / batch) / accumulate_steps(batch, out["nbs"])
        decay, tau, _ = ema_choice(out, updates)
        out.pop("ema_epochs", None)
        if (decay, tau) == (DEFAULT_DECAY, DEFAULT_TAU):
            out.update(ema_decay=DEFAULT_DECAY, ema_tau=DEFAULT_TAU)  # as YOLO's hyp files spell them
        else:  # the small-set choice: about the last epochs
            out["ema_epochs"] = AUTO_SMALL_EPOCHS
    return out


def hyp_values_sha256(path: str | Path, images: int | None = None, batch: int | None = None) -> str:
    """Hex SHA-256 of a hyp file's values (comments, key order and number spelling aside), after the
    automatic choices for ``images`` training images at ``batch`` (see :func:`resolved_hyp`)."""
    import hashlib
    import json

    from utils.engine.setup import load_hyp

    values = resolved_hyp(load_hyp(path), images, batch)
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()


LABEL_FLAGS = ("--name", "--hyp")  # where a run is written and what its hyp file is called: not what it trains


def trained_command(command: str) -> list[str]:
    """``command`` without the values of LABEL_FLAGS (the hyp's content is compared on its own)."""
    words = shlex.split(command)
    return [w for i, w in enumerate(words) if w not in LABEL_FLAGS and (i == 0 or words[i - 1] not in LABEL_FLAGS)]


def _recorded_hyp_values(record: dict) -> str | None:
    """The values hash of a record's hyp file while that file still holds the bytes the run used."""
    from utils.engine.setup import file_sha256

    path = Path(record["hyp"]) if isinstance(record.get("hyp"), str) else None
    if path is None or not path.is_file() or file_sha256(path) != record.get("hyp_sha256"):
        return None
    return hyp_values_sha256(path)


def recorded_run(earlier: list[dict], identity: dict) -> dict | None:
    """A run of an earlier call (its results JSON) that trained the same thing: ``--reuse`` keeps it even
    when the run folder is gone (a new checkout keeps the committed results, not runs/). The same thing:
    the same teacher bytes and command (its run name and hyp path aside), and a hyp file with the same
    bytes or the same values (``main`` fills in a record's values hash from its hyp file while that
    still holds the bytes the run used)."""
    for record in earlier:
        if record.get("teacher_sha256") != identity["teacher_sha256"] or not isinstance(record.get("command"), str):
            continue
        if trained_command(record["command"]) != trained_command(identity["command"]):
            continue
        if record.get("hyp_sha256") == identity["hyp_sha256"]:
            return record
        if record.get("hyp_values_sha256") == identity["hyp_values_sha256"]:
            return record
    return None


def student_run(runner: Runner, opt: argparse.Namespace, settings: TrainSettings, method: str, seed: int,
                hyp: Path, teacher: Path | None, identity: dict) -> dict:
    """One student run: train (or distil), score best.pt (and last.pt) on val and test, read its speed."""
    run = runner.train(run_name(opt, method, seed), model_cfg(opt.student, "--student"), hyp, seed, settings,
                       teacher=teacher)
    val = runner.validate(run["best"], settings, "val", Path(run["dir"]))
    test = runner.validate(run["best"], settings, "test", Path(run["dir"]))
    record = {"method": method, "seed": seed, "hyp": str(hyp), "val_map50": val["map50"], "val_map": val["map"],
              "test_map50": test["map50"], "test_map": test["map"], "test_per_class": _per_class(test),
              "images_s": train_rate(run["dir"]), "wall_s": run["wall_s"], "run_dir": run["dir"], **identity,
              "command": run["command"], "cpu": cpu_name()}
    return {**record, **final_weights(runner, settings, run["dir"])}


def best_epoch(curve50: list[float], curve: list[float]) -> int:
    """The 0-based epoch whose weights best.pt holds: the last maximum of the engine's fitness
    (``utils.eval.metrics.fitness``: 0.1 mAP50 + 0.9 mAP50-95; a tie replaces best.pt)."""
    from utils.eval.metrics import fitness

    scores = [fitness({"map50": m50, "map": m}) for m50, m in zip(curve50, curve)]
    return max(range(len(scores)), key=lambda i: (scores[i], i))


def final_weights(runner: Runner, settings: TrainSettings, run_dir: str | Path) -> dict:
    """``last_val_map``, ``last_test_map``, ``last_test_map50`` (last.pt scored on val and test), the
    per-epoch ``val_curve`` (mAP50-95) and ``best_epoch``; empty when the run folder or last.pt is gone
    (a record kept from another checkout)."""
    run_dir = Path(run_dir)
    last = run_dir / "weights" / "last.pt"
    if not (last.is_file() and (run_dir / "results.csv").is_file()):
        return {}
    rows = read_results_csv(run_dir)
    curve = [row.get(VAL_MAP_COLUMN, math.nan) for row in rows]
    curve50 = [row.get(VAL_MAP50_COLUMN, math.nan) for row in rows]
    val = runner.validate(last, settings, "val", run_dir / LAST_FOLDER)
    test = runner.validate(last, settings, "test", run_dir / LAST_FOLDER)
    return {"last_val_map": val["map"], "last_test_map": test["map"], "last_test_map50": test["map50"],
            "val_curve": [round(v, 5) for v in curve], "best_epoch": best_epoch(curve50, curve)}


def trained_on(record: dict, payload: dict) -> str:
    """The CPU a recorded run trained on: its own ``cpu``; for an older record, the machine of the
    results JSON that first recorded it (``recorded_in``) or else of ``payload``, the JSON it is in.
    The same command and seed give other weights on another CPU (other kernels, other rounding), so a
    pair of runs from two machines is two samples, not a pair."""
    import json

    if record.get("cpu"):
        return record["cpu"]
    source = record.get("recorded_in")
    if source:
        try:
            payload = json.loads(Path(source).read_text())
        except (OSError, ValueError):
            return "not recorded"
    machine = payload.get("machine") if isinstance(payload, dict) else None
    return (machine or {}).get("cpu") or "not recorded"


def earlier_runs(out: Path) -> list[dict]:
    """The run records of the results JSON an earlier call wrote (none when it is absent or unreadable)."""
    import json

    try:
        payload = json.loads(out.read_text())
        runs = payload.get("runs", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [{**r, "cpu": trained_on(r, payload)} for r in runs if isinstance(r, dict)]


def moved_runs(path: Path, work: Path) -> list[dict]:
    """The run records of another call's results JSON (``--reuse-from``), their commands written as if
    that call's ``--work`` had been ``work``: where a run lives does not change what it is."""
    import json

    try:
        payload = json.loads(path.read_text())
        other = display([str(Path(payload["settings"]["work"]).resolve())])
        runs = [r for r in payload.get("runs", []) if isinstance(r, dict) and isinstance(r.get("command"), str)]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"--reuse-from {path}: not a results JSON of this benchmark ({exc})") from None
    here = display([str(Path(work).resolve())])
    return [{**r, "command": r["command"].replace(other + "/", here + "/"), "cpu": trained_on(r, payload),
             "recorded_in": r.get("recorded_in", str(path))} for r in runs]


def gap_closed(distilled: float, scratch: float, teacher: float) -> float:
    """Share of the teacher's lead over the scratch student that distillation recovers (NaN when
    the teacher is not ahead: there is no gap to close)."""
    lead = teacher - scratch
    return (distilled - scratch) / lead if lead > 0 else math.nan


def summarize(runs: list[dict], teacher: dict, costs: dict | None = None) -> list[dict]:
    """One row per method: means over seeds, paired differences to scratch, gap closed, cost.

    The time ratio comes from ``costs`` (each method timed alone, ``--cost-batches``) where it has
    the method and scratch, else from the runs' own images/s (which may have trained under other loads).
    """
    costs = costs or {}
    by_method: dict[str, dict[int, dict]] = {}
    for run in runs:
        by_method.setdefault(run["method"], {})[run["seed"]] = run
    scratch = by_method.get(SCRATCH, {})
    rows = []
    for method, seeds in by_method.items():
        group = [seeds[s] for s in sorted(seeds)]
        row = {"method": method, "seeds": sorted(seeds)}
        for key in ("test_map", "test_map50", "val_map", "val_map50"):
            row[key] = [r[key] for r in group]
        row["images_s"] = mean_spread([r["images_s"] for r in group])[0]
        classes = sorted({name for r in group for name in r.get("test_per_class", {})})
        row["test_per_class"] = {c: mean_spread([r["test_per_class"].get(c, math.nan) for r in group])[0]
                                 for c in classes}
        paired = _paired(seeds, scratch, "test_map")
        row["paired_diff"] = paired if method != SCRATCH else []
        mean, std = mean_spread(paired) if row["paired_diff"] else (math.nan, math.nan)
        row["claimed"] = bool(len(paired) >= CLAIM_SEEDS and all(d > 0 for d in paired) and mean > CLAIM_SIGMAS * std)
        scratch_maps = [scratch[s]["test_map"] for s in sorted(seeds) if s in scratch]
        row["gap_closed"] = (gap_closed(mean_spread(row["test_map"])[0], mean_spread(scratch_maps)[0],
                                        teacher["test_map"]) if scratch_maps and method != SCRATCH else math.nan)
        row["last_test_map"] = [r["last_test_map"] for r in group if "last_test_map" in r]
        row["last_paired_diff"] = _paired(seeds, scratch, "last_test_map") if method != SCRATCH else []
        if costs.get(method) and costs.get(SCRATCH):
            row["time_vs_scratch"], row["time_from"] = costs[SCRATCH] / costs[method], "cost runs"
        else:
            scratch_rate = mean_spread([r["images_s"] for r in scratch.values()])[0] if scratch else math.nan
            row["time_vs_scratch"] = scratch_rate / row["images_s"] if row["images_s"] else math.nan
            row["time_from"] = "runs"
        rows.append(row)
    order = [SCRATCH, *METHODS]
    return sorted(rows, key=lambda r: order.index(r["method"]) if r["method"] in order else len(order))


def _paired(seeds: dict[int, dict], scratch: dict[int, dict], key: str) -> list[float]:
    """``key`` of each seed's run minus scratch's, over the seeds where both runs have it."""
    return [seeds[s][key] - scratch[s][key] for s in sorted(seeds) if s in scratch and key in seeds[s]
            and key in scratch[s]]


def _signed(values: list[float]) -> str:
    if not values:
        return "-"
    mean, std = mean_spread(values)
    text = f"{mean * 100:+.1f}" + (f" ± {std * 100:.1f}" if len(values) > 1 else "")
    return text + " (" + ", ".join(f"{v * 100:+.1f}" for v in values) + ")"


def tables(summary: list[dict], runs: list[dict], teacher: dict, lead_ok: bool | None, costs: dict) -> str:
    """The teacher line, the summary, per-class AP, the cost table and the per-run table."""
    lines = [f"Teacher {teacher['label']}: val mAP50-95 {fmt(teacher['val_map'])}, test mAP50-95 "
             f"{fmt(teacher['test_map'])} (mAP50 {fmt(teacher['test_map50'])})."]
    if lead_ok is False:
        lines.append("**The teacher does not lead the scratch student by the required margin: this run claims "
                     "nothing about distillation.**")
    headers = ["method", "seeds", "test mAP50-95", "test mAP50", "val mAP50-95", "val mAP50",
               "vs scratch, test mAP50-95 points (per seed)", "gap closed", "claimed", "train time vs scratch"]
    cells = [[r["method"], len(r["seeds"]), fmt_spread(r["test_map"]), fmt_spread(r["test_map50"]),
              fmt_spread(r["val_map"]), fmt_spread(r["val_map50"]), _signed(r["paired_diff"]),
              "-" if math.isnan(r["gap_closed"]) else f"{r['gap_closed'] * 100:.0f}%",
              "yes" if r["claimed"] else "no" if r["paired_diff"] else "-",
              "-" if math.isnan(r["time_vs_scratch"]) else f"{r['time_vs_scratch']:.2f}x"] for r in summary]
    lines += ["", markdown_table(headers, cells)]
    if any(r.get("time_from") == "cost runs" for r in summary):
        lines += ["", "Train time vs scratch: from the cost runs below (each method timed alone)."]
    classes = sorted({c for r in summary for c in r["test_per_class"]})
    if classes:
        per_class = [[teacher["label"] + " (teacher)", *[fmt(teacher.get("test_per_class", {}).get(c)) for c in classes]]]
        per_class += [[r["method"], *[fmt(r["test_per_class"].get(c)) for c in classes]] for r in summary]
        lines += ["", "Per-class test AP50-95 (mean over seeds):", "",
                  markdown_table(["method", *classes], per_class)]
    if costs:
        base = costs.get(SCRATCH)
        cost_cells = [[m, fmt(v, 1), "-" if not base else f"{base / v:.2f}x"] for m, v in costs.items()]
        lines += ["", "Training cost, each method alone (images/s after a warm-up epoch):", "",
                  markdown_table(["method", "train images/s", "time vs scratch"], cost_cells)]
    last_rows = [r for r in summary if r["last_test_map"]]
    if last_rows:
        last_cells = [[r["method"], len(r["last_test_map"]), fmt_spread(r["last_test_map"]), _signed(r["last_paired_diff"])]
                      for r in last_rows]
        lines += ["", "The final weights (last.pt: no choice on val), scored on test, where the run folders were "
                      "there to score them:", "",
                  markdown_table(["method", "seeds", "test mAP50-95 (last.pt)",
                                  "vs scratch, points (per seed)"], last_cells)]
    cpus = sorted({r.get("cpu") or "not recorded" for r in runs})
    if len(cpus) > 1:
        lines += ["", f"**These runs trained on {len(cpus)} CPUs ({'; '.join(cpus)}): the same command and seed give "
                      "other weights on another CPU, so a pair across machines is two samples, not a pair.**"]
    per_run = [[r["method"], r["seed"], fmt(r["val_map"]), fmt(r["test_map50"]), fmt(r["test_map"]),
                "-" if r.get("best_epoch") is None else r["best_epoch"] + 1, fmt(r.get("last_val_map")),
                fmt(r.get("last_test_map")), fmt(r["images_s"], 1), fmt(r["wall_s"], 0),
                r.get("cpu") or "not recorded"]
               for r in sorted(runs, key=lambda r: (r["seed"], r["method"]))]
    lines += ["", "Per run (best.pt chosen on val, scored on test; its epoch, 1-based; last.pt on val and test):", "",
              markdown_table(["method", "seed", "val mAP50-95", "test mAP50", "test mAP50-95", "best epoch",
                              "last.pt val", "last.pt test", "train images/s", "wall time (s)", "CPU"], per_run)]
    return "\n".join(lines)


def measure_costs(runner: Runner, opt: argparse.Namespace, settings: TrainSettings, hyps: dict[str, Path],
                  teacher: Path) -> dict[str, float]:
    """Images/s of each method run alone: 2 epochs of ``--cost-batches`` batches, the second timed."""
    timing = TrainSettings(**{**vars(settings), "epochs": 2, "max_batches": opt.cost_batches, "noval": True,
                              "close_mosaic": 0})
    rates = {}
    for method, hyp in hyps.items():
        if method in ("kd-off", RANDOM_TEACHER):  # same cost as scratch / default
            continue
        run = runner.train(f"cost-{method}", model_cfg(opt.student, "--student"), hyp, opt.seeds[0], timing,
                           teacher=None if method == SCRATCH else teacher)
        rates[method] = train_rate(run["dir"])
    return rates


@cli_main
def main(argv: list[str] | None = None) -> dict:
    setup_logging()
    opt = parse_args(argv)
    check_positive(opt, ("epochs", "batch", "img", "teacher_epochs", "jobs"))
    apply_dry_run(opt)
    if opt.dry_run:
        opt.seeds, opt.teacher_epochs, opt.jobs = opt.seeds[:1], 1, 1
        opt.close_mosaic = min(opt.close_mosaic, 1)
        opt.cost_batches = min(opt.cost_batches, DRY.max_batches)
    model_cfg(opt.student, "--student")  # a bad name fails here, before any training
    work = Path(opt.work)
    out = results_path(opt)
    earlier = earlier_runs(out) if opt.reuse else []
    earlier += [r for path in opt.reuse_from for r in moved_runs(Path(path), work)]  # checked before any run
    # the values of the hyp files the earlier runs used, read before this call rewrites those files
    earlier = [{**r, "hyp_values_sha256": r.get("hyp_values_sha256") or _recorded_hyp_values(r)} for r in earlier]
    hyps = method_hyps(opt, work / "hyp")
    data = resolve_data(opt)
    settings = TrainSettings.from_args(opt, data, close_mosaic=opt.close_mosaic)
    threads = DRY.threads if opt.dry_run else (max(1, (os.cpu_count() or 1) // opt.jobs) if opt.jobs > 1 else 0)
    runner = Runner(work, reuse=opt.reuse, in_process=opt.in_process and opt.jobs == 1, threads=threads)
    command = command_line("distill_gain", argv)
    info = machine_info(opt.device)
    payload = {"benchmark": "distill_gain", "dry_run": opt.dry_run, "command": command, "machine": info,
               "settings": {**vars(opt), "data": str(data), "hyps": {k: str(v) for k, v in hyps.items()}},
               "teacher": None, "runs": [], "summary": [], "costs": {}}
    teacher = payload["teacher"] = prepare_teacher(runner, opt, settings)
    teacher_path = Path(teacher["best"])
    untrained = random_teacher(teacher_path, work / "teachers" / "random-teacher.pt")
    lock = threading.Lock()
    title = (f"Distillation on {'the dry-run synthetic set' if opt.dry_run else display([str(data)])}: student "
             f"{Path(opt.student).stem}, {opt.epochs} epochs, batch {opt.batch}, {opt.img} px, close-mosaic "
             f"{opt.close_mosaic}, seeds {' '.join(map(str, opt.seeds))}, hyp changes {opt.hyp_set or 'none'}")

    def publish() -> None:
        payload["summary"] = summary = summarize(payload["runs"], teacher, payload["costs"])
        scratch = next((r for r in summary if r["method"] == SCRATCH), None)
        lead_ok = None if scratch is None else teacher["val_map"] - mean_spread(scratch["val_map"])[0] >= opt.min_lead
        payload["teacher_leads"] = lead_ok
        report = report_header(title, info, command, opt.dry_run) + tables(summary, payload["runs"], teacher,
                                                                           lead_ok, payload["costs"])
        payload["table"] = report
        write_results(out, payload)
        atomic_write_text(out.with_suffix(".md"), report + "\n")


    def task(method: str, seed: int) -> None:
        chosen = None if method == SCRATCH else untrained if method == RANDOM_TEACHER else teacher_path
        identity = run_identity(runner, opt, settings, method, seed, hyps[method], chosen)
        result = recorded_run(earlier, identity)
        if result is not None:
            was = "" if result.get("method") == method else f" as {result.get('method')}"
            LOGGER.info(f"reusing {method} seed {seed}: recorded{was} in {result.get('recorded_in', out)} "
                        f"(same command, hyp values and teacher)")
            if was:  # the same training under another method name (e.g. the recipe's weights became the default)
                result = {**result, "method": method, "recorded_as": result.get("recorded_as", result["method"]),
                          **identity}
            if "last_test_map" not in result and result.get("run_dir"):  # recorded before last.pt was scored
                result = {**result, **final_weights(runner, settings, result["run_dir"])}
        else:
            result = student_run(runner, opt, settings, method, seed, hyps[method], chosen, identity)
        with lock:
            payload["runs"].append(result)
            publish()

    first = [(m, s) for s in opt.seeds for m in FIRST if m in hyps]
    # then method by method (in --methods order), so that each method's row is whole as early as possible
    rest = [(m, s) for m in hyps for s in opt.seeds if m not in FIRST and (m not in CONTROLS or s == opt.seeds[0])]
    with ThreadPoolExecutor(max_workers=opt.jobs) as pool:
        for future in [pool.submit(task, m, s) for m, s in first + rest]:
            future.result()
    if opt.cost_batches:
        runner.threads = DRY.threads if opt.dry_run else 0
        payload["costs"] = measure_costs(runner, opt, settings, hyps, teacher_path)
    publish()
    payload["commands"] = runner.commands
    write_results(out, payload)
    print(payload["table"])
    print(f"\nresults: {out} and {out.with_suffix('.md')}")
    return payload


if __name__ == "__main__":
    main(sys.argv[1:])
