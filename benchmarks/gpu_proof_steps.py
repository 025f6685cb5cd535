"""The measurements of benchmarks/gpu_proof.py, one function per step, and each step's table.

A step runs in a process of its own (gpu_proof.py starts it and stops it at its budget). It gets a
:class:`Context` and calls ``ctx.record(result)`` after every measurement, so that what it measured
survives a kill; ``ctx.previous(name)`` reads what an earlier step recorded. In a dry run every
step measures a few iterations of the smallest model on the CPU (a check of the code, not a figure).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import math
import shutil
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from benchmarks.harness.cli import DRY, hyp_file, model_cfg
from benchmarks.harness.commands import ROOT
from benchmarks.harness.data import count_images, resolve_data
from benchmarks.harness.machine import machine_info
from benchmarks.harness.results import fmt, markdown_table
from benchmarks.harness.runner import Runner, TrainSettings, read_results_csv, train_rate
from benchmarks.harness.timer import round_robin
from utils.core.errors import UserError
from utils.core.log import LOGGER

TEACHER, STUDENT = "gelan-s", "yolov9-tiny"
SCRATCH_HYP, DISTILL_HYP = "hyp.scratch-high.yaml", "hyp.distill.yaml"
SPEED_BATCHES = {16: 16, 64: 64}  # label (the public runs' batch) -> batch
DRY_SPEED_BATCHES = {16: 2}  # a dry run checks one batch size (the loop is the same for the other)
PUBLIC_BATCH_IMAGES_S = {16: 43.0, 64: 62.0}  # public train.py, gelan-s; 64: --cache ram, 16 workers
TIMED_IMAGES = 1600  # train_speed/distill_cost: at least this many images in the timed epochs (8 BCCD epochs)
CEILING_STEPS, CEILING_WARMUP = 50, 10
ROW_POLL_S = 0.05  # how often a speed run's results.csv is looked at (an epoch takes a second or more)
MAX_TIME_RATIO = 1.35  # distillation may take at most this many times the scratch training time
PREPARE = "prepare"  # the step that always runs first: every other one reads its data
SEED = 0
IMG = 640  # the public run's image size
BCCD_TRAIN, BCCD_VAL, BCCD_WIDTH = 205, 87, 640  # the stand-in set when BCCD is missing has BCCD's size

ACCURACY_BATCH = 16  # the public run's batch
CLOSE_MOSAIC_FRACTION = 0.1  # the public run: --close-mosaic 10 of 100 epochs
FIT_SAFETY = 0.85  # the accuracy plan counts on epochs this much slower than train_speed measured them
VAL_RESERVE_S = 30.0  # two validations inside train.py and one val.py, each with its start-up
FALLBACK_START_S = 30.0  # start-up and first epoch of a train.py run when train_speed measured none
FALLBACK_EPOCH_OVERHEAD_S = 1.0  # checkpoint save and logging per epoch, likewise
LATENCY_BATCHES = (1, 32)
DRY_LATENCY_BATCHES = (1, 2)
LATENCY_WARMUP, LATENCY_RUNS = 10, 30
DRY_MODEL = "yolov9-tiny"  # the dry run uses the smallest model in every role (a check, not a figure)
MS = 1e3
P90 = 0.9
MILLION = 1e6


@dataclass
class Context:
    """What a step function gets: the options, its folders, its budget, and how to record."""

    opt: argparse.Namespace
    work: Path
    budget_s: float
    deadline: float  # time.time() at which the parent stops this step
    record: Callable[[dict], None]  # write the step's (partial) result; call after every measurement

    def left_s(self) -> float:
        """Seconds until this step is stopped."""
        return self.deadline - time.time()

    def previous(self, name: str) -> dict:
        """The result an earlier step recorded (empty when it recorded nothing)."""
        path = step_file(self.work, name)
        return json.loads(path.read_text()) if path.is_file() else {}

    def runner(self, folder: str) -> Runner:
        """A Runner for this step's train.py / val.py runs under work/FOLDER."""
        # dry run: train.py inside this step's process (each run would otherwise start Python and torch)
        return Runner(self.work / folder, in_process=self.opt.dry_run)


def step_file(work: Path, name: str) -> Path:
    """Where a step records its result."""
    return work / "steps" / f"{name}.json"


def _gpu_or_cpu(opt: argparse.Namespace) -> str:
    return "cpu" if opt.dry_run else opt.device


def role_model(opt: argparse.Namespace, role: str) -> str:
    """The model of a role (speed, teacher, student, accuracy); ``DRY_MODEL`` in a dry run."""
    if opt.dry_run:
        return DRY_MODEL
    return {"speed": TEACHER, "teacher": TEACHER, "student": STUDENT, "accuracy": opt.accuracy_model}[role]


def speed_settings(ctx: Context, data: dict, batch: int, gpu_augment: bool, epochs: int) -> TrainSettings:
    """train.py flags of a speed run: the train-only yaml (no validation), RAM cache, amp auto."""
    opt = ctx.opt
    return TrainSettings(data=Path(data["speed_yaml"]), epochs=epochs, batch=batch, img=DRY.img if opt.dry_run else IMG,
                         device=_gpu_or_cpu(opt), workers=DRY.workers if opt.dry_run else opt.workers,
                         cache="ram", amp="off" if opt.dry_run else "auto", gpu_augment=gpu_augment,
                         max_batches=DRY.max_batches if opt.dry_run else 0, noval=True)


def speed_epochs(opt: argparse.Namespace, train_images: int) -> int:
    """One untimed epoch plus enough epochs for ``TIMED_IMAGES`` (dry run: ``DRY.epochs``)."""
    return DRY.epochs if opt.dry_run else 1 + math.ceil(TIMED_IMAGES / max(train_images, 1))


class RowClock:
    """When a run's results.csv gains its rows (one per epoch, written before the epoch's checkpoint),
    seen from a thread that polls the file: the time from start to the first epoch's end, and the
    whole cycle of a later epoch (training, logging and saving), which results.csv does not hold."""

    def __init__(self, csv_path: Path) -> None:
        self.csv_path, self.times = csv_path, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> "RowClock":
        self.start = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        while not self._stop.wait(ROW_POLL_S):
            try:
                rows = self.csv_path.read_text().count("\n") - 1  # the header is one line
            except OSError:
                continue
            while len(self.times) < rows:
                self.times.append(time.monotonic() - self.start)


def timed_run(runner: Runner, name: str, model: str, hyp: str, settings: TrainSettings, train_images: int,
              teacher: Path | None = None) -> dict:
    """One train.py (or train_distill.py) run: its rate over the epochs after the first, and its
    time to the first epoch's end and per later epoch (what the accuracy step plans with)."""
    run_dir = runner.runs / name
    shutil.rmtree(run_dir, ignore_errors=True)  # the clock must not see an earlier run's rows
    with RowClock(run_dir / "results.csv") as clock:
        run = runner.train(name, model_cfg(model), hyp_file(hyp), SEED, settings, teacher=teacher)
    epochs = read_results_csv(run["dir"])
    per_epoch = min(train_images, settings.max_batches * settings.batch) if settings.max_batches else train_images
    steps_per_epoch = math.ceil(per_epoch / settings.batch)
    timed = max(len(epochs) - 1, 1)
    rows = clock.times
    cycles = [later - earlier for earlier, later in zip(rows, rows[1:])]
    return {"images_s": train_rate(run["dir"]), "epoch_rates": [e["speed/img_per_s"] for e in epochs],
            "epochs": len(epochs), "timed_epochs": timed, "timed_steps": timed * steps_per_epoch,
            "timed_images": timed * per_epoch, "wall_s": run["wall_s"],
            "first_epoch_done_s": rows[0] if rows else math.nan,
            "epoch_cycle_s": statistics.fmean(cycles) if cycles else math.nan,
            "end_s": run["wall_s"] - rows[-1] if rows else math.nan,
            "run_dir": run["dir"], "command": run["command"]}


def step_prepare(ctx: Context) -> None:
    """Machine, packages and the data: BCCD via harness.data.resolve_data, else a synthetic stand-in."""
    import yaml

    from utils.data.config import load_data_config

    opt = ctx.opt
    result: dict = {"machine": machine_info(_gpu_or_cpu(opt)), "environment": environment()}
    ctx.record(result)
    data_opt = argparse.Namespace(dry_run=opt.dry_run, data=opt.data, work=str(ctx.work))
    try:
        yaml_file, kind, note = resolve_data(data_opt), "dry-run synthetic" if opt.dry_run else "BCCD", ""
        if opt.data:
            kind = f"--data {opt.data}"
    except UserError as exc:  # no BCCD here: speed on a stand-in of its size, no accuracy
        if opt.data or opt.dry_run:  # a --data the user gave must work
            raise
        from utils.data.synthetic import generate

        yaml_file = generate(ctx.work / "data" / "synthetic-bccd-size", BCCD_TRAIN, BCCD_VAL, BCCD_WIDTH, SEED)
        kind, note = "synthetic (NOT BCCD)", f"BCCD not found ({exc}); speed steps ran on a synthetic set"
    config = load_data_config(yaml_file)
    speed_yaml = ctx.work / "data" / "speed.yaml"  # train split only: the speed runs validate nothing
    speed_yaml.parent.mkdir(parents=True, exist_ok=True)
    speed_yaml.write_text("# written by benchmarks/gpu_proof.py: train split only (speed runs)\n" + yaml.safe_dump(
        {"path": config["path"], "train": config["train"], "nc": config["nc"], "names": config["names"]},
        sort_keys=False))
    result["data"] = {"kind": kind, "note": note, "yaml": str(yaml_file), "speed_yaml": str(speed_yaml),
                      "nc": config["nc"], "names": config["names"], "train_images": count_images(config["train"]),
                      "val_images": count_images(config["val"]) if config.get("val") else 0}
    ctx.record(result)


def environment() -> dict:
    """Installed version (or None) of every requirements.txt package, and ONNX Runtime's providers."""
    versions = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        name = line.split("#", 1)[0].strip().split(">")[0].split("=")[0].split("<")[0].strip()
        if name:
            versions[name] = _version(name)
    for name in ("torch", "torchvision", "onnxruntime-gpu", "tensorrt"):
        versions[name] = _version(name)
    providers = None
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime

        providers = onnxruntime.get_available_providers()
    return {"packages": versions, "onnxruntime_providers": providers}


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def step_train_speed(ctx: Context) -> None:
    """Per batch: the GPU-only ceiling, then train.py with --gpu-augment and with CPU augmentation."""
    from benchmarks.train_speed import PUBLIC_IMAGES_S, gpu_only_rate

    opt, data = ctx.opt, ctx.previous(PREPARE)["data"]
    runner = ctx.runner("train_speed")
    model = role_model(opt, "speed")
    epochs = speed_epochs(opt, data["train_images"])
    result: dict = {"model": model, "data": data["kind"], "epochs": epochs, "public_images_s": PUBLIC_IMAGES_S,
                    "public_batch_images_s": {str(k): v for k, v in PUBLIC_BATCH_IMAGES_S.items()}, "ceilings": {},
                    "runs": []}
    for label, batch in (DRY_SPEED_BATCHES if opt.dry_run else SPEED_BATCHES).items():
        ceiling_opt = argparse.Namespace(device=_gpu_or_cpu(opt), seed=SEED, channels_last=False, batch=batch,
                                         amp="off" if opt.dry_run else "auto", dry_run=opt.dry_run,
                                         img=DRY.img if opt.dry_run else IMG,
                                         steps=2 if opt.dry_run else CEILING_STEPS,
                                         warmup=1 if opt.dry_run else CEILING_WARMUP)
        LOGGER.info(f"ceiling: {model} training step on random tensors, batch {batch}")
        result["ceilings"][str(label)] = {"batch": batch, **gpu_only_rate(model_cfg(model), hyp_file(SCRATCH_HYP),
                                                                          data["nc"], ceiling_opt)}
        ctx.record(result)
        for gpu_augment in (True, False):
            mode = "gpu" if gpu_augment else "cpu"
            settings = speed_settings(ctx, data, batch, gpu_augment, epochs)
            run = timed_run(runner, f"{model}-b{label}-{mode}", model, SCRATCH_HYP, settings, data["train_images"])
            ceiling = result["ceilings"][str(label)]["images_s"]
            public_same = PUBLIC_BATCH_IMAGES_S[label]
            result["runs"].append({"batch_label": label, "batch": batch, "augment": mode, **run,
                                   "vs_public_43": run["images_s"] / PUBLIC_IMAGES_S,
                                   "vs_public_same_batch": run["images_s"] / public_same,
                                   "vs_ceiling": run["images_s"] / ceiling})
            ctx.record(result)


def step_distill_cost(ctx: Context) -> None:
    """train.py and train_distill.py on the student, same flags (--gpu-augment: the GPU is the limit)."""
    import torch

    from models.yolo import DetectionModel
    from utils.checkpoint.ours import make_checkpoint, save_checkpoint

    opt, data = ctx.opt, ctx.previous(PREPARE)["data"]
    runner = ctx.runner("distill_cost")
    teacher_name, student = role_model(opt, "teacher"), role_model(opt, "student")
    teacher = ctx.work / "distill_cost" / f"{teacher_name}-untrained.pt"
    teacher.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    model = DetectionModel(model_cfg(teacher_name), nc=data["nc"])
    model.names = list(data["names"])  # train_distill.py checks the teacher's classes against the data's
    save_checkpoint(make_checkpoint(model, half=False), teacher)
    epochs = speed_epochs(opt, data["train_images"])
    batch = (DRY_SPEED_BATCHES if opt.dry_run else SPEED_BATCHES)[ACCURACY_BATCH]
    settings = speed_settings(ctx, data, batch, True, epochs)
    result: dict = {"student": student, "teacher": f"{teacher_name} (untrained, made here)", "data": data["kind"],
                    "batch": batch, "augment": "gpu", "epochs": epochs, "goal_time_ratio": MAX_TIME_RATIO}
    result["scratch"] = timed_run(runner, f"{student}-scratch", student, SCRATCH_HYP, settings, data["train_images"])
    ctx.record(result)
    result["distill"] = timed_run(runner, f"{student}-distill", student, DISTILL_HYP, settings, data["train_images"],
                                  teacher=teacher)
    ratio = result["scratch"]["images_s"] / result["distill"]["images_s"]
    result.update(time_ratio=ratio, meets_goal=bool(ratio <= MAX_TIME_RATIO))
    ctx.record(result)


def plan_epochs(budget_s: float, train_images: int, speed: dict, model: str, gpu_augment: bool) -> dict:
    """Epochs that fit ``budget_s``, from the batch-16 run of train_speed with the same model and
    augmentation (its time to the first epoch's end, its later epochs' whole cycle, its finish),
    else from the public 43 images/s (a floor); at most the public run's epochs.

    The planned run takes ``first + (epochs - 1) * cycle / FIT_SAFETY + end + VAL_RESERVE_S``.
    """
    from benchmarks.train_bccd import EPOCHS as PUBLIC_EPOCHS
    from benchmarks.train_speed import PUBLIC_IMAGES_S

    mode = "gpu" if gpu_augment else "cpu"
    runs = [r for r in speed.get("runs", []) if r["batch_label"] == ACCURACY_BATCH and r["augment"] == mode]
    times = (runs[0]["first_epoch_done_s"], runs[0]["epoch_cycle_s"], runs[0]["end_s"]) if runs else ()
    if speed.get("model") == model and times and not any(math.isnan(t) for t in times):
        (first, cycle, end), source = times, f"train_speed, batch {ACCURACY_BATCH}, {mode} augmentation"
    else:
        first, end = FALLBACK_START_S, 0.0
        cycle = train_images / PUBLIC_IMAGES_S + FALLBACK_EPOCH_OVERHEAD_S
        source = f"the public {PUBLIC_IMAGES_S:.0f} images/s (train_speed measured no such run)"
    room = budget_s - first - end - VAL_RESERVE_S
    fit = 1 + int(room * FIT_SAFETY / cycle) if room > 0 else 0
    return {"epochs": max(1, min(PUBLIC_EPOCHS, fit)), "fit_epochs": fit, "first_epoch_done_s": first,
            "epoch_cycle_s": cycle, "end_s": end, "rate_images_s": train_images / cycle, "rate_from": source}


def choose_plan(budget_s: float, train_images: int, speed: dict, model: str) -> tuple[bool, dict]:
    """(gpu_augment, plan): train.py's default CPU augmentation when it fits the public run's epochs,
    else the augmentation mode that fits more epochs."""
    from benchmarks.train_bccd import EPOCHS as PUBLIC_EPOCHS

    cpu = plan_epochs(budget_s, train_images, speed, model, gpu_augment=False)
    gpu = plan_epochs(budget_s, train_images, speed, model, gpu_augment=True)
    if cpu["epochs"] >= PUBLIC_EPOCHS or cpu["epochs"] >= gpu["epochs"]:
        return False, cpu
    return True, gpu


def step_accuracy(ctx: Context) -> None:
    """train.py from scratch for the planned epochs (validation after the last), then val.py."""
    from benchmarks.train_bccd import PUBLIC

    opt, data = ctx.opt, ctx.previous(PREPARE)["data"]
    if "NOT BCCD" in data["kind"]:
        raise UserError(f"accuracy needs BCCD: {data['note']}")
    speed = ctx.previous("train_speed")
    if opt.dry_run:
        gpu_augment = False
        plan = {"epochs": DRY.epochs, "fit_epochs": DRY.epochs, "rate_from": "dry run", "rate_images_s": math.nan}
    else:
        gpu_augment, plan = choose_plan(ctx.left_s(), data["train_images"], speed, role_model(opt, "accuracy"))
    epochs = plan["epochs"]
    close_mosaic = int(epochs * CLOSE_MOSAIC_FRACTION)
    settings = TrainSettings(data=Path(data["yaml"]), epochs=epochs,
                             batch=DRY.batch if opt.dry_run else ACCURACY_BATCH, img=DRY.img if opt.dry_run else IMG,
                             device=_gpu_or_cpu(opt), workers=DRY.workers if opt.dry_run else opt.workers,
                             cache="ram", amp="off" if opt.dry_run else "auto", gpu_augment=gpu_augment,
                             close_mosaic=close_mosaic, max_batches=DRY.max_batches if opt.dry_run else 0, noval=True)
    model_name = role_model(opt, "accuracy")
    model = Path(model_name).stem
    public = PUBLIC.get(model)
    same = public is not None and public["epochs"] == epochs and public["batch"] == settings.batch
    note = (f"same epochs and batch as the public run ({epochs}, {settings.batch})" if same else
            f"no public figure at {epochs} epochs: peer-measurements.md has {model} at {public['epochs']} epochs "
            f"only" if public else f"no public figure for {model}")
    result: dict = {"model": model, "data": data["kind"], "plan": plan, "epochs": epochs, "batch": settings.batch,
                    "close_mosaic": close_mosaic, "augment": "gpu" if gpu_augment else "cpu", "seed": SEED,
                    "budget_s": ctx.budget_s, "planned_with_s": ctx.left_s(), "public": public, "comparison": None,
                    "comparison_note": note}
    ctx.record(result)
    runner = ctx.runner("accuracy")
    run = runner.train(f"{model}-e{epochs}", model_cfg(model_name), hyp_file(SCRATCH_HYP), SEED, settings)
    result.update(train_wall_s=run["wall_s"], run_dir=run["dir"], command=run["command"])
    ctx.record(result)
    val = runner.validate(run["best"], settings, "val", Path(run["dir"]))
    result.update(val_map50=val["map50"], val_map=val["map"], val_per_class=val.get("per_class"))
    if same:
        result["comparison"] = {"public_val_map": public["val_map"], "delta_val_map": val["map"] - public["val_map"],
                                "public_val_map50": public["val_map50"],
                                "delta_val_map50": val["map50"] - public["val_map50"]}
    ctx.record(result)


def step_latency(ctx: Context) -> None:
    """PyTorch fp16 (CUDA) and ONNX Runtime CUDA of each fused model, batch 1 and 32, round-robin."""
    import torch

    from benchmarks.latency import BCCD_CLASSES, STUDENTS, TEACHERS
    from utils.export.model import prepare_model
    from models.yolo import DetectionModel
    from utils.checkpoint.ours import make_checkpoint, save_checkpoint
    from models.info import count_params, gflops

    opt = ctx.opt
    img = DRY.img if opt.dry_run else IMG
    names = (DRY_MODEL,) if opt.dry_run else (*TEACHERS, *STUDENTS)
    batches = DRY_LATENCY_BATCHES if opt.dry_run else LATENCY_BATCHES
    warmup, runs = (1, 2) if opt.dry_run else (LATENCY_WARMUP, LATENCY_RUNS)
    cuda = torch.cuda.is_available() and not opt.dry_run
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    folder = ctx.work / "latency"
    folder.mkdir(parents=True, exist_ok=True)
    ort_device, ort_reason = ort_target(opt.dry_run)
    result: dict = {"img": img, "nc": BCCD_CLASSES, "batches": list(batches), "warmup": warmup, "runs": runs,
                    "torch": "fp16 on CUDA" if cuda else "fp32 on the CPU (no CUDA, or a dry run)", "ort": ort_device,
                    "ort_skipped": ort_reason, "models": []}
    models = []
    for name in names:
        weights = folder / f"{name}.pt"
        save_checkpoint(make_checkpoint(DetectionModel(name, nc=BCCD_CLASSES), half=False), weights)
        model = prepare_model(weights, torch.device("cpu"))
        record = {"model": name, "role": "teacher" if name in TEACHERS else "student",
                  "params": count_params(model), "gflops": gflops(model, img)}
        if ort_device:
            from utils.export.onnx import export_onnx

            record["onnx"] = str(export_onnx(model, folder / f"{name}.onnx", img, dynamic=True,
                                             names=[str(i) for i in range(BCCD_CLASSES)]))
        models.append(model.to(device).half() if cuda else model)
        result["models"].append(record)
    ctx.record(result)
    for batch in batches:
        x = torch.rand(batch, 3, img, img, device=device, dtype=torch.float16 if cuda else torch.float32)
        with torch.inference_mode():
            times = round_robin([lambda m=m: m(x) for m in models], warmup, runs,
                                (lambda: torch.cuda.synchronize(device)) if cuda else None)
        for record, model_times in zip(result["models"], times):
            record[f"torch_b{batch}"] = summary(model_times, batch)
        ctx.record(result)
    if ort_device:
        for batch in batches:
            calls = [ort_call(r["onnx"], batch, img, ort_device) for r in result["models"]]
            for record, model_times in zip(result["models"], round_robin(calls, warmup, runs)):
                record[f"ort_b{batch}"] = summary(model_times, batch)
            ctx.record(result)


def ort_target(dry_run: bool) -> tuple[str | None, str | None]:
    """ONNX Runtime's device for the latency step and, when there is none, why."""
    if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None:
        return None, "onnxruntime or onnx is not installed"
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        return "cuda", None
    if dry_run:
        return "cpu", None  # the dry run checks the ONNX path on the CPU provider
    return None, (f"onnxruntime {onnxruntime.__version__} has no CUDAExecutionProvider (providers: "
                  f"{', '.join(onnxruntime.get_available_providers())}): install onnxruntime-gpu")


def ort_call(onnx_path: str, batch: int, img: int, device: str) -> Callable[[], None]:
    """One inference of the exported fp32 graph; on CUDA with input and output bound on the device
    (IO binding), so that host copies of a 32-image batch are not what is timed."""
    import numpy as np
    import onnxruntime as ort

    from utils.export.onnx import PLAIN_OUTPUT
    from utils.export.ort_session import ort_session

    x = np.random.default_rng(SEED).random((batch, 3, img, img), dtype=np.float32)
    if device == "cpu":
        session = ort_session(onnx_path)
        return lambda: session.run(None, {"images": x})
    session = ort_session(onnx_path, device)
    if session.get_providers()[0] != "CUDAExecutionProvider":
        raise RuntimeError(f"onnxruntime fell back to {session.get_providers()} for {onnx_path}")
    binding = session.io_binding()
    binding.bind_ortvalue_input("images", ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0))
    binding.bind_output(PLAIN_OUTPUT, "cuda")

    def call() -> None:
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()

    return call


def summary(times: list[float], batch: int) -> dict:
    """Median and p90 (ms) of per-run seconds, and images/s at the median."""
    import numpy as np

    median = statistics.median(times)
    return {"median_ms": median * MS, "p90_ms": float(np.quantile(times, P90)) * MS, "images_s": batch / median}


# ---------------------------------------------------------------------------------------- tables
def train_speed_md(result: dict) -> str:
    """Ceiling and train.py runs per batch, with the ratios to the public rate and the ceiling."""
    rows = []
    for label, ceiling in result.get("ceilings", {}).items():
        rows.append([f"GPU-only step, random tensors (ceiling), amp {ceiling['amp']}", ceiling["batch"],
                     f"{ceiling['steps']}", fmt(ceiling["images_s"], 1), "-", "-", "-",
                     fmt(ceiling["images_s"] / result["public_images_s"], 2), "1.00"])
        for run in (r for r in result.get("runs", []) if str(r["batch_label"]) == label):
            rows.append([f"train.py, {run['augment'].upper()} augmentation, --cache ram", run["batch"],
                         f"{run['timed_steps']} ({run['timed_epochs']} epochs)", fmt(run["images_s"], 1),
                         fmt(run["first_epoch_done_s"], 1), fmt(run["epoch_cycle_s"], 2),
                         fmt(run["vs_public_same_batch"], 2), fmt(run["vs_public_43"], 2), fmt(run["vs_ceiling"], 2)])
    note = (f"{result['model']}, {result['data']}, {result['epochs']} epochs per run (the first untimed). Public: "
            + ", ".join(f"{v:.0f} images/s at batch {k}" for k, v in result["public_batch_images_s"].items())
            + " (whole command over 100 epochs, peer-measurements.md); ours are the training loop's per-epoch rates "
            "(results.csv) without the start-up and the checkpoint saved after each epoch, both shown apart "
            "(start-up + 1st epoch; a later epoch's whole cycle). The engine's warm-up (its first 100 iterations) "
            "steps the optimizer more often, so ours are slightly conservative.")
    return markdown_table(["measurement", "batch", "timed steps", "images/s", "start-up + 1st epoch (s)",
                           "s per later epoch", "/ public same batch", "/ public 43", "/ ceiling"],
                          rows) + "\n\n" + note


def distill_md(result: dict) -> str:
    """Scratch and distilled rates of the student, and the time ratio against the goal."""
    rows = [[f"train.py ({SCRATCH_HYP})", result["student"], fmt(result.get("scratch", {}).get("images_s"), 1), "1.00"]]
    if "distill" in result:
        rows.append([f"train_distill.py ({DISTILL_HYP}), teacher {result['teacher']}", result["student"],
                     fmt(result["distill"]["images_s"], 1), fmt(result["time_ratio"], 2)])
    verdict = ("" if "time_ratio" not in result else
               f" Goal: at most {result['goal_time_ratio']:.2f}x the time: "
               f"{'met' if result['meets_goal'] else 'NOT met'}.")
    return (markdown_table(["run", "student", "images/s", "time / scratch"], rows)
            + f"\n\nBatch {result['batch']}, {result['augment'].upper()} augmentation, --cache ram, {result['epochs']} "
            f"epochs (the first untimed), {result['data']}.{verdict}")


def accuracy_md(result: dict) -> str:
    """Our val mAP next to the public run's, with the plan and what the comparison can say."""
    plan = result["plan"]
    rows = []
    if "val_map" in result:
        rows.append(["ours", result["model"], result["epochs"], result["batch"], fmt(result["val_map50"]),
                     fmt(result["val_map"]), fmt(result.get("train_wall_s"), 0)])
    public = result.get("public")
    if public:
        rows.append(["public YOLOv9 (peer-measurements.md)", result["model"], public["epochs"], public["batch"],
                     fmt(public["val_map50"]), fmt(public["val_map"]), fmt(public["wall_s"], 0)])
    comparison = result.get("comparison")
    delta = (f" Difference at the same epochs: mAP50-95 {comparison['delta_val_map']:+.3f}, "
             f"mAP50 {comparison['delta_val_map50']:+.3f} (one seed each)." if comparison else "")
    return (markdown_table(["code", "model", "epochs", "batch", "val mAP50", "val mAP50-95", "train wall (s)"], rows)
            + f"\n\nPlanned {result['epochs']} epochs (at most the public 100) in the "
            f"{result['planned_with_s']:.0f} s left from {plan['rate_from']} "
            f"({fmt(plan.get('epoch_cycle_s'), 2)} s per epoch with its checkpoint, "
            f"{fmt(plan['rate_images_s'], 1)} images/s); close-mosaic {result['close_mosaic']}, "
            f"{result['augment'].upper()} augmentation, seed {result['seed']}, {result['data']}. "
            f"{result['comparison_note']}.{delta}")


def latency_md(result: dict) -> str:
    """Per model and batch: median latency and images/s in PyTorch and ONNX Runtime."""
    batches = result["batches"]
    headers = ["model", "role", "params (M)", "GFLOPs"]
    headers += [f"torch b{b} median ms (images/s)" for b in batches]
    headers += [f"ORT b{b} median ms (images/s)" for b in batches]
    rows = []
    for record in result["models"]:
        row = [record["model"], record["role"], fmt(record["params"] / MILLION, 2), fmt(record["gflops"], 1)]
        for kind in ("torch", "ort"):
            for b in batches:
                cell = record.get(f"{kind}_b{b}")
                row.append(f"{cell['median_ms']:.2f} ({cell['images_s']:.0f})" if cell else "-")
        rows.append(row)
    ort = f"ONNX Runtime on {result['ort']} (fp32 graph, IO binding on CUDA)" if result["ort"] else \
        f"ONNX Runtime skipped: {result['ort_skipped']}"
    return (markdown_table(headers, rows) + f"\n\n{result['img']} px, nc={result['nc']}, fused untrained models "
            f"(latency does not depend on the weights), network only (no NMS); PyTorch {result['torch']}; {ort}; "
            f"{result['warmup']} warm-up + {result['runs']} timed runs per model and batch, round-robin.")


@dataclass(frozen=True)
class Step:
    """One measurement of the proof: its name, nominal time share, the modules it needs, its function
    and its table."""

    name: str
    title: str
    share_s: float  # nominal seconds of the default budget; the actual budget is scaled to what is left
    needs: tuple[str, ...]  # modules it cannot run without
    run: Callable[[Context], None]
    render: Callable[[dict], str] | None  # its markdown table from its (possibly partial) result


TRAIN_NEEDS = ("numpy", "cv2", "yaml", "tqdm", "PIL")
STEPS = (
    Step(PREPARE, "machine, packages, data", 30, ("yaml", "PIL", "numpy", "cv2"), step_prepare, None),
    Step("train_speed", "1. training throughput end to end vs the ceiling and the public 43 images/s", 145,
         TRAIN_NEEDS, step_train_speed, train_speed_md),
    Step("distill_cost", "2. distillation cost: train_distill.py vs train.py, same student", 75, TRAIN_NEEDS,
         step_distill_cost, distill_md),
    Step("accuracy", "3. accuracy parity: val mAP50-95 after the epochs that fit", 180, TRAIN_NEEDS, step_accuracy,
         accuracy_md),
    Step("latency", "4. inference latency: PyTorch fp16 and ONNX Runtime CUDA", 40, ("numpy",), step_latency,
         latency_md),
)
STEP_NAMES = tuple(s.name for s in STEPS)
