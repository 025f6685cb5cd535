"""The training engine shared by train.py and train_distill.py.

One :class:`Trainer` runs a whole job: ``setup`` (model, teacher, data, optimiser, resume),
then per epoch ``train_one_epoch`` and ``after_epoch`` (validate, log, save). A teacher is just
an option: with ``opt.teacher`` the trainer holds a :class:`Distillation` (the teacher, its identity,
the DistillationLoss and the layers it compares), and the teacher runs on the very same augmented
batch under ``torch.no_grad()``; without it that object is None. Each batch goes through
``utils.engine.step.train_step``, the step the training-speed benchmark times too.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
import yaml
from torch import nn
from tqdm import tqdm

from models.yolo import DetectionModel
from utils.checkpoint.ours import load_model, make_checkpoint, save_checkpoint, strip_checkpoint
from utils.core.device import dist_info, rng_state, seed_everything, select_device, set_rng_state, unwrap
from utils.core.errors import UserError
from utils.core.log import LOGGER
from utils.core.paths import increment_path
from utils.data.config import load_data_config
from utils.data.dataset import LoaderOptions, close_mosaic, create_dataloader
from utils.distill import DistillConfig, DistillStudent
from utils.engine.ema import DEFAULT_DECAY, DEFAULT_TAU, ModelEMA, ema_choice
from utils.engine.optim import (AUTO, NOMINAL_BATCH, accumulate_steps, apply_warmup, auto_nominal_batch,
                                build_optimizer, lr_lambda, nominal_batch, scaled_weight_decay, warmup_accumulate,
                                warmup_iterations)
from utils.engine.run_logger import RunLogger
from utils.engine.step import Optimization, TrainingDiverged, autocast, detection_forward_loss, train_step
from utils.engine.setup import (build_model, file_sha256, find_resume_checkpoint, freeze_layers, load_hyp,
                                load_teacher, resolve_amp, resolve_teacher_dtype, resume_options,
                                teacher_memory_format)
from utils.eval.evaluator import evaluate
from utils.eval.metrics import fitness
from utils.loss import DetectionLoss, DistillationLoss

LOG_INTERVAL = 10  # steps between progress-bar refreshes (each one reads losses back from the device)
PLOT_TRAIN_BATCHES = 3

__all__ = ["Distillation", "Progress", "Trainer", "TrainingDiverged", "legacy_resume_hyp", "run"]


def legacy_resume_hyp(hyp: dict) -> dict:
    """The hyp of a checkpoint to resume. Runs record the nbs and weight average they chose; a checkpoint
    without them trained with YOLO's fixed values (nbs 64, decay 0.9999, ramp 2000), which it keeps, so
    a resumed run goes on as it started instead of switching to the automatic choice."""
    hyp = dict(hyp)
    hyp.setdefault("nbs", NOMINAL_BATCH)
    if not any(key in hyp for key in ("ema_epochs", "ema_decay", "ema_tau")):
        hyp.update(ema_decay=DEFAULT_DECAY, ema_tau=DEFAULT_TAU)
    return hyp


@dataclass
class Distillation:
    """What a distillation run adds to training (the Trainer holds None when there is no teacher).

    ``teacher`` is frozen, in eval mode and its own dtype; ``teacher_img`` is its input size (0 = the
    student's batch as it is); ``student_layers`` / ``teacher_layers`` are the model layers whose
    outputs the feature terms compare, in pairs.
    """

    teacher: nn.Module
    teacher_path: str
    teacher_sha256: str
    teacher_img: int
    loss: DistillationLoss
    student_layers: list[int]
    teacher_layers: list[int]

    def record(self) -> dict:
        """The teacher's identity and the loss's state, as the student's checkpoint keeps them."""
        return {"teacher": {"path": self.teacher_path, "sha256": self.teacher_sha256},
                "distill_state": self.loss.state_dict()}


@dataclass
class Progress:
    """Where the run stands: what a resume restores and what the epoch loop counts."""

    start_epoch: int = 0
    best_fitness: float = 0.0
    stale_epochs: int = 0  # validated epochs since the fitness last improved (--patience)
    warmup_iters: int = 0  # batches of the learning-rate and momentum warm-up
    mosaic_closed: bool = False


class Trainer:
    """Runs a training (or distillation) job described by the parsed command line ``opt``.

    Every attribute is declared here; ``setup`` builds the parts, ``train`` runs the epochs.
    """

    def __init__(self, opt: argparse.Namespace) -> None:
        self.dist = dist_info()
        self.resume_ckpt: dict | None = None
        if opt.resume:
            opt, self.resume_ckpt = resume_options(find_resume_checkpoint(opt.resume, opt.project), opt)
        self.opt = opt
        self.is_distill = bool(opt.teacher)
        # what the run is and where it writes (setup)
        self.device = torch.device("cpu")
        self.hyp: dict = {}
        self.data: dict = {}
        self.save_dir = Path(opt.project) / opt.name
        self.weights_dir = self.save_dir / "weights"
        self.amp_dtype: torch.dtype | None = None
        # the model, the teacher and the losses
        self.model: DetectionModel | None = None
        self.distill: Distillation | None = None
        self.detection_loss: DetectionLoss | None = None
        # data
        self.train_loader = None
        self.train_set = None
        self.val_loader = None
        self.gpu_augment = None
        # optimisation: the automatic choices, the schedule, the step's parts, the weight average
        self.nbs = NOMINAL_BATCH
        self.ema_decay, self.ema_tau = DEFAULT_DECAY, DEFAULT_TAU
        self.lf = None  # epoch -> learning-rate factor
        self.scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
        self.optim: Optimization | None = None
        self.ema: ModelEMA | None = None
        # the module that trains this epoch (the model, wrapped for KD / DDP / compile) and its state
        self.train_model: nn.Module | None = None
        self._wrapped_as: tuple | None = None
        self.progress = Progress()
        self.logger: RunLogger | None = None

    # ----------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        opt = self.opt
        if self.dist.distributed and not torch_dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() and opt.device != "cpu" else "gloo"
            torch_dist.init_process_group(backend=backend)
        self.device = select_device(opt.device, self.dist.local_rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        seed_everything(opt.seed + self.dist.rank, deterministic=opt.deterministic)
        self.hyp = load_hyp(opt.hyp) if self.resume_ckpt is None else legacy_resume_hyp(self.resume_ckpt["hyp"])
        for flag, path in (("--cfg", opt.cfg), ("--weights", opt.weights), ("--teacher", opt.teacher)):
            if path and not Path(path).is_file():  # before the data set, which may take a while to prepare
                raise UserError(f"{flag} {path} does not exist")
        self.data = load_data_config(opt.data)
        if opt.batch < self.dist.world_size:
            raise UserError(f"--batch {opt.batch} is smaller than the number of processes {self.dist.world_size}")
        if opt.epochs < 1:
            raise UserError("--epochs must be at least 1")
        nominal_batch(self.hyp)  # bad nbs or weight-average keys: one line before the data set is read
        ema_choice(self.hyp, 1)

        if self.resume_ckpt is not None:
            self.save_dir = Path(opt.resume).resolve().parents[1]
        elif self.dist.is_main:
            self.save_dir = increment_path(Path(opt.project) / opt.name, exist_ok=opt.exist_ok)
        else:
            self.save_dir = Path(opt.project) / opt.name
        self.weights_dir = self.save_dir / "weights"
        if self.dist.is_main:
            self.weights_dir.mkdir(parents=True, exist_ok=True)
            with open(self.save_dir / "opt.yaml", "w") as f:
                yaml.safe_dump({k: v for k, v in vars(opt).items()}, f, sort_keys=False)

        self.amp_dtype = resolve_amp(opt.amp, self.device)
        model = build_model(opt, self.data["nc"], self.data["names"])
        if opt.freeze:
            freeze_layers(model, opt.freeze)
        model.hyp = self.hyp
        model.to(self.device)
        if opt.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model

        loaded = self._load_teacher() if self.is_distill else None  # before the data set: a bad one fails fast
        self._build_data()
        self._resolve_auto_settings()
        self.detection_loss = DetectionLoss(self.model, self.hyp)
        if loaded is not None:
            self.distill = self._build_distillation(*loaded)
        self._build_optimizer()
        if self.dist.is_main:
            self.ema = self.optim.ema = ModelEMA(model, decay=self.ema_decay, tau=self.ema_tau)
            with open(self.save_dir / "hyp.yaml", "w") as f:  # with the values auto settings chose
                yaml.safe_dump(self.hyp, f, sort_keys=False)
        if self.resume_ckpt is not None:
            self._restore(self.resume_ckpt)
        self.train_model = model
        self.logger = (RunLogger(self.save_dir, tensorboard=True, last_epoch=self.progress.start_epoch - 1)
                       if self.dist.is_main else None)

    def _build_data(self) -> None:
        opt, world = self.opt, self.dist.world_size
        stride = max(int(self.model.stride.max()), 32)
        self.train_loader, self.train_set = create_dataloader(self.data["train"], LoaderOptions(
            img_size=opt.img, batch_size=opt.batch // world, stride=stride, hyp=self.hyp, augment=True, cache=opt.cache,
            workers=opt.workers, shuffle=True, seed=opt.seed, nc=self.data["nc"], gpu_augment=opt.gpu_augment,
            distributed=self.dist.distributed))
        self.gpu_augment = None
        if opt.gpu_augment:
            from utils.data.gpu_augment import GPUAugment

            self.gpu_augment = GPUAugment(self.hyp, opt.img, seed=opt.seed + self.dist.rank)
        self.val_loader = None
        if self.dist.is_main and self.data.get("val"):
            self.val_loader, _ = create_dataloader(self.data["val"], LoaderOptions(
                img_size=opt.img, batch_size=max(opt.batch // world * 2, 1), stride=stride, hyp=self.hyp, augment=False,
                cache=opt.cache, rect=True, workers=opt.workers, shuffle=False, seed=opt.seed, nc=self.data["nc"]))

    def _load_teacher(self) -> tuple[nn.Module, str]:
        """The frozen teacher of ``--teacher`` in the dtype the hyp asks for, and its file's SHA-256."""
        opt = self.opt
        sha256 = file_sha256(opt.teacher)
        self._check_resumed_teacher(sha256)
        teacher_dtype = resolve_teacher_dtype(DistillConfig.from_hyp(self.hyp).teacher_dtype, self.device)
        teacher = load_teacher(opt.teacher, self.data["names"], self.device, teacher_dtype)
        LOGGER.info(f"teacher {opt.teacher} in {str(teacher_dtype).removeprefix('torch.')} on {self.device}")
        return teacher, sha256

    def _check_resumed_teacher(self, sha256: str) -> None:
        """A resumed distillation must go on with the teacher it started with (same bytes)."""
        if self.resume_ckpt is None:
            return
        recorded = ((self.resume_ckpt.get("extra") or {}).get("teacher") or {})
        if recorded.get("sha256") and recorded["sha256"] != sha256:
            raise UserError(f"--resume: the teacher {self.opt.teacher} is not the one this run started with "
                            f"({recorded.get('path', '?')}, SHA-256 {recorded['sha256'][:12]}...): a different "
                            f"teacher would silently change the run; give the original file or start a new run")

    def _resolve_auto_settings(self) -> None:
        """The nominal batch and the weight average chosen from the training set's size when the hyp
        says ``auto`` or nothing (utils.engine.optim.auto_nominal_batch, utils.engine.ema.ema_choice); logged once
        with the reason, and written into the hyp (hyp.yaml, checkpoints) so a resume repeats them."""
        images, batch = len(self.train_set), self.opt.batch
        if self.hyp.get("nbs", AUTO) in (AUTO, None):
            self.hyp["nbs"], reason = auto_nominal_batch(images, batch)
            LOGGER.info(f"nbs {self.hyp['nbs']} (auto): {reason}")
        self.nbs = nominal_batch(self.hyp)  # images per optimizer step
        auto_ema = self.hyp.get("ema_epochs", AUTO) in (AUTO, None)
        self.ema_decay, self.ema_tau, reason = ema_choice(self.hyp, self._updates_per_epoch())
        if auto_ema and not ("ema_decay" in self.hyp or "ema_tau" in self.hyp):
            self.hyp.pop("ema_epochs", None)
            self.hyp.update(ema_decay=self.ema_decay, ema_tau=self.ema_tau)
            LOGGER.info(f"ema decay {self.ema_decay:.6g}, ramp {self.ema_tau:.6g} updates (auto): {reason}")

    def _build_distillation(self, teacher: nn.Module, sha256: str) -> Distillation:
        """The DistillationLoss around the detection loss, and the layers its feature terms pair."""
        opt = self.opt
        loss = DistillationLoss(self.detection_loss, self.model, teacher, self.hyp, close_mosaic=opt.close_mosaic,
                                img=opt.img, teacher_img=opt.teacher_img or None)
        loss.to(self.device)
        return Distillation(teacher=teacher, teacher_path=str(opt.teacher), teacher_sha256=sha256,
                            teacher_img=opt.teacher_img, loss=loss, student_layers=list(loss.student_layers),
                            teacher_layers=list(loss.teacher_layers))

    def _build_optimizer(self) -> None:
        opt, hyp = self.opt, self.hyp
        modules = [self.model]
        if self.distill is not None:
            modules += list(self.distill.loss.trainable_modules())
        weight_decay = scaled_weight_decay(hyp["weight_decay"], opt.batch, self.nbs)
        optimizer = build_optimizer(modules, opt.optimizer, hyp["lr0"], hyp["momentum"], weight_decay)
        self.optim = Optimization.for_optimizer(self.model, optimizer, self.amp_dtype,
                                                last_good=self.weights_dir / "last.pt")
        self.lf = lr_lambda(opt.epochs, hyp["lrf"], opt.cos_lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=self.lf)

    def _updates_per_epoch(self) -> float:
        batches = len(self.train_loader)
        if self.opt.max_batches:
            batches = min(batches, self.opt.max_batches)
        return batches / accumulate_steps(self.opt.batch, self.nbs)

    def _prepare_train_model(self, epoch: int) -> None:
        """(Re)build the module that trains this epoch: the student, or the student with the
        distillation connectors (one module, so one DDP wrap) while KD is on.

        DistributedDataParallel fixes its parameter set when it is built, so the wrapper is rebuilt
        whenever that set changes: KD switching off (stop epoch) or the backbone (un)freezing.
        """
        kd_on = self.distill is not None and self.distill.loss.active(epoch, self.opt.epochs)
        state = (kd_on, tuple(p.requires_grad for p in self.model.parameters()))
        if state == self._wrapped_as:
            return
        module: torch.nn.Module = self.model
        if kd_on:
            layers = self.distill.student_layers if self.distill.loss.uses_features else None
            module = DistillStudent(self.model, self.distill.loss.modules_, layers)
        self.train_model = self._wrap(module)
        self._wrapped_as = state

    def _wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.dist.distributed:
            if self.opt.sync_bn:
                model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
        if self.opt.compile:
            model = torch.compile(model)
        return model

    def _restore(self, ckpt: dict) -> None:
        self.model.load_state_dict({k: v.float() for k, v in ckpt["state_dict"].items()})
        if ckpt.get("optimizer") is not None:
            self.optim.optimizer.load_state_dict(ckpt["optimizer"])
        if self.ema is not None and ckpt.get("ema") is not None:
            self.ema.ema.load_state_dict({k: v.float() for k, v in ckpt["ema"].items()})
            self.ema.updates = int(ckpt.get("ema_updates", 0))
        extra = ckpt.get("extra") or {}
        if self.distill is not None and extra.get("distill_state"):
            self.distill.loss.load_state_dict(extra["distill_state"])
        if extra.get("scaler"):
            self.optim.scaler.load_state_dict(extra["scaler"])
        if extra.get("rng"):
            set_rng_state(extra["rng"])
        progress = self.progress
        progress.start_epoch = int(ckpt["epoch"]) + 1
        progress.best_fitness = float(ckpt.get("best_fitness") or 0.0)
        progress.stale_epochs = int(extra.get("stale_epochs", 0))
        self.scheduler.last_epoch = progress.start_epoch - 1
        LOGGER.info(f"resuming {self.save_dir} from epoch {progress.start_epoch}")

    # ------------------------------------------------------------------------------- training
    def train(self) -> dict:
        """Run every epoch; returns the final metrics of the best/last model."""
        self.setup()
        opt = self.opt
        nb = len(self.train_loader) if not opt.max_batches else min(opt.max_batches, len(self.train_loader))
        self.progress.warmup_iters = warmup_iterations(self.hyp, nb)
        if self.dist.is_main:
            self._describe()
        metrics: dict = {}
        for epoch in range(self.progress.start_epoch, opt.epochs):
            # also right after a resume that starts inside the closing epochs
            if opt.close_mosaic and epoch >= opt.epochs - opt.close_mosaic and not self.progress.mosaic_closed:
                self._close_mosaic()
            start = time.time()
            train_row = self.train_one_epoch(epoch, nb)
            self.scheduler.step()
            elapsed = time.time() - start
            stop = False
            if self.dist.is_main:
                metrics, stop = self.after_epoch(epoch, train_row, elapsed)
            if self.dist.distributed:
                flag = torch.tensor([int(stop)], device=self.device)
                torch_dist.broadcast(flag, 0)
                stop = bool(flag.item())
            if stop:
                break
        if self.dist.is_main:
            metrics = self._finish() or metrics
        if self.dist.distributed:
            torch_dist.destroy_process_group()
        return metrics

    def _close_mosaic(self) -> None:
        self.progress.mosaic_closed = True
        LOGGER.info("closing mosaic: mosaic and mixup off for the remaining epochs")
        self.train_loader = close_mosaic(self.train_loader)
        if self.gpu_augment is not None:
            self.gpu_augment.close_mosaic()

    def _describe(self) -> None:
        opt = self.opt
        what = f"distilling from teacher {opt.teacher}" if self.is_distill else "training"
        LOGGER.info(f"{what}: {opt.cfg or opt.weights}, {opt.epochs} epochs, batch {opt.batch}, img {opt.img}, "
                    f"device {self.device}, amp {self.amp_dtype}, results in {self.save_dir}")
        if not opt.noplots and self.progress.start_epoch == 0:
            try:
                from utils.eval.plots import plot_labels

                plot_labels(self.train_set.labels, self.data["names"], self.save_dir)
            except Exception as exc:  # a plot must never stop training
                LOGGER.warning(f"label plot skipped: {exc}")

    def _forward_loss(self, imgs: torch.Tensor, targets: torch.Tensor, epoch: int, step: float):
        """Loss of one batch; ``step`` is the nominal optimizer steps taken (the KD warm-up's clock)."""
        if self.distill is None:
            return detection_forward_loss(self.train_model, self.detection_loss, imgs, targets, self.amp_dtype)
        loss, epochs = self.distill.loss, self.opt.epochs
        with autocast(self.device, self.amp_dtype):
            if not loss.active(epoch, epochs):  # no KD this epoch: the teacher is not run
                return loss(self.train_model(imgs), None, targets, epoch=epoch, epochs=epochs)
            student = self.train_model(imgs)  # DistillStudent: maps, connected features, CrossKD maps
        teacher_out, teacher_feats = self._teacher_forward(imgs)
        with autocast(self.device, self.amp_dtype):
            return loss(student.preds, teacher_out, targets, student.feats, teacher_feats, student.cross,
                        epoch=epoch, epochs=epochs, step=step)

    @torch.no_grad()
    def _teacher_forward(self, imgs: torch.Tensor):
        """The teacher on the same augmented batch (resized to --teacher-img when set), in its own dtype
        (distill_teacher_dtype): outside the student's autocast, which would recast it."""
        distill = self.distill
        size = distill.teacher_img
        if size and size != imgs.shape[-1]:
            imgs = F.interpolate(imgs, size=(size, size), mode="bilinear", align_corners=False)
        imgs = imgs.to(next(distill.teacher.parameters()).dtype, memory_format=teacher_memory_format(self.device))
        with torch.autocast(self.device.type, enabled=False):
            if distill.loss.uses_features:
                return distill.teacher(imgs, feature_layers=distill.teacher_layers)
            return distill.teacher(imgs), None

    def train_one_epoch(self, epoch: int, nb: int) -> dict[str, float]:
        """One pass over the training data; returns the mean of each loss term and images/s."""
        opt, device = self.opt, self.device
        if self.distill is not None:
            self.distill.loss.on_epoch_start(self.model, epoch, opt.epochs)
        self._prepare_train_model(epoch)
        self.train_model.train()
        if self.distill is not None:
            self.distill.teacher.eval()
        if hasattr(self.train_loader, "sampler") and hasattr(self.train_loader.sampler, "set_epoch"):
            self.train_loader.sampler.set_epoch(epoch)
        bar = tqdm(total=nb, desc=f"epoch {epoch + 1}/{opt.epochs}", disable=not self.dist.is_main,
                   bar_format="{l_bar}{bar:20}{r_bar}", leave=True)
        sums: torch.Tensor | None = None
        keys: list[str] = []
        images, last_step, start = 0, -1, time.time()
        warmup_iters = self.progress.warmup_iters
        self.optim.optimizer.zero_grad(set_to_none=True)
        for i, (imgs, targets, paths, _) in enumerate(self.train_loader):
            if i >= nb:
                break
            ni = i + nb * epoch
            accumulate = warmup_accumulate(ni, warmup_iters, opt.batch, self.nbs)
            if ni <= warmup_iters:
                apply_warmup(self.optim.optimizer, ni, warmup_iters, self.lf(epoch), self.hyp)
            imgs = imgs.to(device, non_blocking=True)
            if self.gpu_augment is not None:
                imgs, targets = self.gpu_augment(imgs, targets)  # CPU targets: no device wait
            else:
                imgs = imgs.float().div_(255)
            if opt.channels_last:
                imgs = imgs.contiguous(memory_format=torch.channels_last)
            if epoch == self.progress.start_epoch and i < PLOT_TRAIN_BATCHES and self.dist.is_main and not opt.noplots:
                self._plot_batch(imgs, targets, paths, i)

            update = ni - last_step >= accumulate  # the optimizer steps once per nominal batch
            step = ni * opt.batch / self.nbs
            items = train_step(self.optim, lambda: self._forward_loss(imgs, targets, epoch, step), update,
                               loss_scale=self.dist.world_size if self.dist.distributed else 1)
            if update:
                last_step = ni

            if isinstance(items, dict):
                keys = list(items)
                values = torch.stack([items[k].detach().float().reshape(()) for k in keys])
            else:
                keys = ["box", "cls", "dfl"]
                values = items.detach().float()
            sums = values if sums is None else sums + values
            images += imgs.shape[0]
            if self.dist.is_main and (i % LOG_INTERVAL == 0 or i == nb - 1):
                means = (sums / (i + 1)).tolist()
                rate = images / max(time.time() - start, 1e-9)
                postfix = {k.replace("distill/", "kd_"): f"{v:.3g}" for k, v in zip(keys, means)}
                if device.type == "cuda":
                    postfix["mem"] = f"{torch.cuda.memory_reserved(device) / 2**30:.1f}G"
                postfix["img/s"] = f"{rate:.0f}"
                bar.set_postfix(postfix, refresh=False)
            bar.update(1)
        bar.close()
        if sums is None:
            raise UserError("the training loader produced no batch: is the train split empty?")
        means = (sums / min(nb, i + 1)).tolist()
        row = {(f"train/{k}_loss" if "/" not in k else k): v for k, v in zip(keys, means)}
        row["speed/img_per_s"] = images * self.dist.world_size / max(time.time() - start, 1e-9)
        return row

    def _plot_batch(self, imgs: torch.Tensor, targets: torch.Tensor, paths: list[str], index: int) -> None:
        try:
            from utils.eval.plots import plot_images

            plot_images(imgs.detach().float().cpu(), targets.detach().cpu(), paths,
                        self.save_dir / f"train_batch{index}.jpg", self.data["names"])
        except Exception as exc:  # a plot must never stop training
            LOGGER.warning(f"train batch plot skipped: {exc}")

    # ------------------------------------------------------------------------- after an epoch
    def after_epoch(self, epoch: int, train_row: dict, elapsed: float) -> tuple[dict, bool]:
        """Validate, log a results.csv row, save last/best; returns (metrics, stop?)."""
        opt = self.opt
        self.ema.update_attr(self.model)
        final = epoch + 1 == opt.epochs
        metrics = {}
        if self.val_loader is not None and (final or (not opt.noval and (epoch + 1) % opt.val_period == 0)):
            metrics = evaluate(self.ema.ema, self.val_loader, self.data["names"], half=self.amp_dtype is not None,
                               compute_loss=self.detection_loss)
        row = {"epoch": epoch, **train_row}
        row.update({"metrics/precision": metrics.get("precision", float("nan")),
                    "metrics/recall": metrics.get("recall", float("nan")),
                    "metrics/mAP_0.5": metrics.get("map50", float("nan")),
                    "metrics/mAP_0.5:0.95": metrics.get("map", float("nan"))})
        val_loss = metrics.get("loss")
        for index, name in enumerate(("box", "cls", "dfl")):
            row[f"val/{name}_loss"] = float(val_loss[index]) if val_loss is not None else float("nan")
        for index, group in enumerate(self.optim.optimizer.param_groups):
            row[f"lr/pg{index}"] = group["lr"]
        row["time/epoch_s"] = elapsed
        self.logger.log(row)

        progress = self.progress
        current = fitness(metrics) if metrics else None
        improved = current is not None and current >= progress.best_fitness
        if improved:
            progress.best_fitness, progress.stale_epochs = current, 0
        elif current is not None:
            progress.stale_epochs += 1
        self._save(epoch, improved)
        stop = bool(opt.patience) and progress.stale_epochs >= opt.patience
        if stop:
            LOGGER.info(f"early stop: no improvement for {opt.patience} epochs "
                        f"(best fitness {progress.best_fitness:.4f})")
        return metrics, stop

    def _save(self, epoch: int, improved: bool) -> None:
        extra = {"rng": rng_state(), "scaler": self.optim.scaler.state_dict(),
                 "stale_epochs": self.progress.stale_epochs}
        if self.distill is not None:
            extra.update(self.distill.record())
        ckpt = make_checkpoint(unwrap(self.model), ema=self.ema.ema, ema_updates=self.ema.updates,
                               optimizer=self.optim.optimizer, epoch=epoch, best_fitness=self.progress.best_fitness,
                               opt=vars(self.opt), hyp=self.hyp, half=False, extra=extra)
        save_checkpoint(ckpt, self.weights_dir / "last.pt")
        if improved or not (self.weights_dir / "best.pt").exists():
            save_checkpoint(ckpt, self.weights_dir / "best.pt")
        if self.opt.save_period > 0 and (epoch + 1) % self.opt.save_period == 0:
            save_checkpoint(ckpt, self.weights_dir / f"epoch{epoch}.pt")

    def _finish(self) -> dict:
        """Release best.pt (EMA weights, no optimizer, fp16), validate it with plots, draw the curves."""
        best = self.weights_dir / "best.pt"
        strip_checkpoint(best)
        metrics = {}
        if self.val_loader is not None:
            model = load_model(best, device=self.device, fuse=True)
            metrics = evaluate(model, self.val_loader, self.data["names"], half=self.amp_dtype is not None,
                               save_dir=self.save_dir, plots=not self.opt.noplots)
            LOGGER.info(f"best.pt: mAP50 {metrics['map50']:.4f}, mAP50-95 {metrics['map']:.4f}")
        self.logger.close()
        if not self.opt.noplots:
            try:
                from utils.eval.plots import plot_results

                plot_results(self.save_dir / "results.csv")
            except Exception as exc:  # a plot must never fail a finished run
                LOGGER.warning(f"results plot skipped: {exc}")
        LOGGER.info(f"results saved to {self.save_dir}")
        return metrics


def run(opt: argparse.Namespace) -> dict:
    """Train (or distil, when ``opt.teacher`` is set) as described by ``opt``; returns final metrics."""
    return Trainer(opt).train()
