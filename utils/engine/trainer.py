"""The training engine shared by train.py and train_distill.py.

One :class:`Trainer` runs a whole job: ``setup`` (model, teacher, data, optimiser, resume),
then per epoch ``train_one_epoch`` and ``after_epoch`` (validate, log, save). A teacher is just
an option: with ``opt.teacher`` the loss becomes a DistillationLoss and the teacher runs on the
very same augmented batch under ``torch.no_grad()``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
import yaml
from tqdm import tqdm

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
from utils.engine.setup import (build_model, file_sha256, find_resume_checkpoint, freeze_layers, load_hyp,
                                load_teacher, resolve_amp, resolve_teacher_dtype, resume_options,
                                teacher_memory_format)
from utils.eval.evaluator import evaluate
from utils.eval.metrics import fitness
from utils.loss import DetectionLoss, DistillationLoss

GRAD_CLIP_NORM = 10.0
LOG_INTERVAL = 10  # steps between progress-bar refreshes (each one reads losses back from the device)
MAX_NONFINITE_STEPS = 10  # consecutive skipped optimizer steps before the run is stopped
PLOT_TRAIN_BATCHES = 3


def legacy_resume_hyp(hyp: dict) -> dict:
    """The hyp of a checkpoint to resume. Runs record the nbs and weight average they chose; a checkpoint
    without them trained with YOLO's fixed values (nbs 64, decay 0.9999, ramp 2000), which it keeps, so
    a resumed run goes on as it started instead of switching to the automatic choice."""
    hyp = dict(hyp)
    hyp.setdefault("nbs", NOMINAL_BATCH)
    if not any(key in hyp for key in ("ema_epochs", "ema_decay", "ema_tau")):
        hyp.update(ema_decay=DEFAULT_DECAY, ema_tau=DEFAULT_TAU)
    return hyp


class TrainingDiverged(UserError):
    """Raised after too many consecutive non-finite losses; last.pt keeps the last good epoch."""


class Trainer:
    """Runs a training (or distillation) job described by the parsed command line ``opt``."""

    def __init__(self, opt: argparse.Namespace) -> None:
        self.dist = dist_info()
        self.resume_ckpt: dict | None = None
        if opt.resume:
            opt, self.resume_ckpt = resume_options(find_resume_checkpoint(opt.resume, opt.project), opt)
        self.opt = opt
        self.is_distill = bool(getattr(opt, "teacher", ""))

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
        for flag, path in (("--cfg", opt.cfg), ("--weights", opt.weights), ("--teacher", getattr(opt, "teacher", ""))):
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

        self.teacher = None
        if self.is_distill:
            self.teacher_sha256 = file_sha256(opt.teacher)
            self._check_resumed_teacher()
            teacher_dtype = resolve_teacher_dtype(DistillConfig.from_hyp(self.hyp).teacher_dtype, self.device)
            self.teacher = load_teacher(opt.teacher, self.data["names"], self.device, teacher_dtype)
            LOGGER.info(f"teacher {opt.teacher} in {str(teacher_dtype).removeprefix('torch.')} on {self.device}")
        self._build_data()
        self._resolve_auto_settings()
        self._build_loss()
        self._build_optimizer()
        self.ema = None
        if self.dist.is_main:
            self.ema = ModelEMA(model, decay=self.ema_decay, tau=self.ema_tau)
            with open(self.save_dir / "hyp.yaml", "w") as f:  # with the values auto settings chose
                yaml.safe_dump(self.hyp, f, sort_keys=False)
        self.start_epoch, self.best_fitness, self.stale_epochs = 0, 0.0, 0
        if self.resume_ckpt is not None:
            self._restore(self.resume_ckpt)
        self._wrapped_as: tuple | None = None
        self.train_model = model
        self.logger = (RunLogger(self.save_dir, tensorboard=True, last_epoch=self.start_epoch - 1)
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

    def _check_resumed_teacher(self) -> None:
        """A resumed distillation must go on with the teacher it started with (same bytes)."""
        if self.resume_ckpt is None:
            return
        recorded = ((self.resume_ckpt.get("extra") or {}).get("teacher") or {})
        if recorded.get("sha256") and recorded["sha256"] != self.teacher_sha256:
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

    def _build_loss(self) -> None:
        self.detection_loss = DetectionLoss(self.model, self.hyp)
        self.distill_loss = None
        if self.teacher is not None:
            opt = self.opt
            self.distill_loss = DistillationLoss(self.detection_loss, self.model, self.teacher, self.hyp,
                                                 close_mosaic=opt.close_mosaic, img=opt.img,
                                                 teacher_img=getattr(opt, "teacher_img", 0) or None)
            self.distill_loss.to(self.device)
            self.student_layers = list(self.distill_loss.student_layers)
            self.teacher_layers = list(self.distill_loss.teacher_layers)

    def _build_optimizer(self) -> None:
        opt, hyp = self.opt, self.hyp
        modules = [self.model]
        if self.distill_loss is not None:
            modules += list(self.distill_loss.trainable_modules())
        weight_decay = scaled_weight_decay(hyp["weight_decay"], opt.batch, self.nbs)
        self.optimizer = build_optimizer(modules, opt.optimizer, hyp["lr0"], hyp["momentum"], weight_decay)
        # listed once: clip_grad_norm_ skips parameters without a gradient (e.g. a frozen backbone)
        self.optimized_params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.lf = lr_lambda(opt.epochs, hyp["lrf"], opt.cos_lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda=self.lf)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)

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
        kd_on = self.distill_loss is not None and self.distill_loss.active(epoch, self.opt.epochs)
        state = (kd_on, tuple(p.requires_grad for p in self.model.parameters()))
        if state == self._wrapped_as:
            return
        module: torch.nn.Module = self.model
        if kd_on:
            layers = self.student_layers if self.distill_loss.uses_features else None
            module = DistillStudent(self.model, self.distill_loss.modules_, layers)
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
            self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.ema is not None and ckpt.get("ema") is not None:
            self.ema.ema.load_state_dict({k: v.float() for k, v in ckpt["ema"].items()})
            self.ema.updates = int(ckpt.get("ema_updates", 0))
        extra = ckpt.get("extra") or {}
        if self.distill_loss is not None and extra.get("distill_state"):
            self.distill_loss.load_state_dict(extra["distill_state"])
        if extra.get("scaler"):
            self.scaler.load_state_dict(extra["scaler"])
        if extra.get("rng"):
            set_rng_state(extra["rng"])
        self.start_epoch = int(ckpt["epoch"]) + 1
        self.best_fitness = float(ckpt.get("best_fitness") or 0.0)
        self.stale_epochs = int(extra.get("stale_epochs", 0))
        self.scheduler.last_epoch = self.start_epoch - 1
        LOGGER.info(f"resuming {self.save_dir} from epoch {self.start_epoch}")

    # ------------------------------------------------------------------------------- training
    def train(self) -> dict:
        """Run every epoch; returns the final metrics of the best/last model."""
        self.setup()
        opt = self.opt
        nb = len(self.train_loader) if not opt.max_batches else min(opt.max_batches, len(self.train_loader))
        self.warmup_iters = warmup_iterations(self.hyp, nb)
        self.nonfinite_steps = 0
        self.mosaic_closed = False
        if self.dist.is_main:
            self._describe()
        metrics: dict = {}
        for epoch in range(self.start_epoch, opt.epochs):
            # also right after a resume that starts inside the closing epochs
            if opt.close_mosaic and epoch >= opt.epochs - opt.close_mosaic and not self.mosaic_closed:
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
        self.mosaic_closed = True
        LOGGER.info("closing mosaic: mosaic and mixup off for the remaining epochs")
        self.train_loader = close_mosaic(self.train_loader)
        if self.gpu_augment is not None:
            self.gpu_augment.close_mosaic()

    def _describe(self) -> None:
        opt = self.opt
        what = f"distilling from teacher {opt.teacher}" if self.is_distill else "training"
        LOGGER.info(f"{what}: {opt.cfg or opt.weights}, {opt.epochs} epochs, batch {opt.batch}, img {opt.img}, "
                    f"device {self.device}, amp {self.amp_dtype}, results in {self.save_dir}")
        if not opt.noplots and self.start_epoch == 0:
            try:
                from utils.eval.plots import plot_labels

                plot_labels(self.train_set.labels, self.data["names"], self.save_dir)
            except Exception as exc:  # a plot must never stop training
                LOGGER.warning(f"label plot skipped: {exc}")

    def _forward_loss(self, imgs: torch.Tensor, targets: torch.Tensor, epoch: int, step: float):
        """Loss of one batch; ``step`` is the nominal optimizer steps taken (the KD warm-up's clock)."""
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            if self.distill_loss is None:
                preds = self.train_model(imgs)
                return self.detection_loss(preds, targets)
            epochs = self.opt.epochs
            if not self.distill_loss.active(epoch, epochs):  # no KD this epoch: the teacher is not run
                return self.distill_loss(self.train_model(imgs), None, targets, epoch=epoch, epochs=epochs)
            student = self.train_model(imgs)  # DistillStudent: maps, connected features, CrossKD maps
        teacher_out, teacher_feats = self._teacher_forward(imgs)
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            return self.distill_loss(student.preds, teacher_out, targets, student.feats, teacher_feats,
                                     student.cross, epoch=epoch, epochs=epochs, step=step)

    @torch.no_grad()
    def _teacher_forward(self, imgs: torch.Tensor):
        """The teacher on the same augmented batch (resized to --teacher-img when set), in its own dtype
        (distill_teacher_dtype): outside the student's autocast, which would recast it."""
        teacher_img = getattr(self.opt, "teacher_img", 0)
        if teacher_img and teacher_img != imgs.shape[-1]:
            imgs = F.interpolate(imgs, size=(teacher_img, teacher_img), mode="bilinear", align_corners=False)
        imgs = imgs.to(next(self.teacher.parameters()).dtype, memory_format=teacher_memory_format(self.device))
        with torch.autocast(self.device.type, enabled=False):
            if self.distill_loss.uses_features:
                return self.teacher(imgs, feature_layers=self.teacher_layers)
            return self.teacher(imgs), None

    def train_one_epoch(self, epoch: int, nb: int) -> dict[str, float]:
        """One pass over the training data; returns the mean of each loss term and images/s."""
        opt, device = self.opt, self.device
        if self.distill_loss is not None:
            self.distill_loss.on_epoch_start(self.model, epoch, opt.epochs)
        self._prepare_train_model(epoch)
        self.train_model.train()
        if self.teacher is not None:
            self.teacher.eval()
        if hasattr(self.train_loader, "sampler") and hasattr(self.train_loader.sampler, "set_epoch"):
            self.train_loader.sampler.set_epoch(epoch)
        bar = tqdm(total=nb, desc=f"epoch {epoch + 1}/{opt.epochs}", disable=not self.dist.is_main,
                   bar_format="{l_bar}{bar:20}{r_bar}", leave=True)
        sums: torch.Tensor | None = None
        keys: list[str] = []
        images, last_step, start = 0, -1, time.time()
        self.optimizer.zero_grad(set_to_none=True)
        for i, (imgs, targets, paths, _) in enumerate(self.train_loader):
            if i >= nb:
                break
            ni = i + nb * epoch
            accumulate = warmup_accumulate(ni, self.warmup_iters, opt.batch, self.nbs)
            if ni <= self.warmup_iters:
                apply_warmup(self.optimizer, ni, self.warmup_iters, self.lf(epoch), self.hyp)
            imgs = imgs.to(device, non_blocking=True)
            if self.gpu_augment is not None:
                imgs, targets = self.gpu_augment(imgs, targets)  # CPU targets: no device wait
            else:
                imgs = imgs.float().div_(255)
            if opt.channels_last:
                imgs = imgs.contiguous(memory_format=torch.channels_last)
            if epoch == self.start_epoch and i < PLOT_TRAIN_BATCHES and self.dist.is_main and not opt.noplots:
                self._plot_batch(imgs, targets, paths, i)

            loss, items = self._forward_loss(imgs, targets, epoch, step=ni * opt.batch / self.nbs)
            if self.dist.distributed:
                loss = loss * self.dist.world_size  # DDP averages gradients over processes
            self.scaler.scale(loss).backward()
            if ni - last_step >= accumulate:
                self._optimizer_step()
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

    def _optimizer_step(self) -> None:
        """Unscale, clip, skip the step when gradients are not finite, update EMA."""
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.optimized_params, max_norm=GRAD_CLIP_NORM)
        # one host sync per optimizer step (as GradScaler does): a non-finite step must not be taken
        if torch.isfinite(norm):
            self.scaler.step(self.optimizer)
            self.nonfinite_steps = 0
        else:
            self.nonfinite_steps += 1
            LOGGER.warning(f"non-finite loss or gradient: optimizer step skipped ({self.nonfinite_steps} in a row)")
            if self.nonfinite_steps >= MAX_NONFINITE_STEPS:
                raise TrainingDiverged(f"{MAX_NONFINITE_STEPS} non-finite steps in a row: training stopped; "
                                       f"{self.weights_dir / 'last.pt'} holds the last good epoch")
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)

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
        for index, group in enumerate(self.optimizer.param_groups):
            row[f"lr/pg{index}"] = group["lr"]
        row["time/epoch_s"] = elapsed
        self.logger.log(row)

        current = fitness(metrics) if metrics else None
        improved = current is not None and current >= self.best_fitness
        if improved:
            self.best_fitness, self.stale_epochs = current, 0
        elif current is not None:
            self.stale_epochs += 1
        self._save(epoch, improved)
        stop = bool(opt.patience) and self.stale_epochs >= opt.patience
        if stop:
            LOGGER.info(f"early stop: no improvement for {opt.patience} epochs (best fitness {self.best_fitness:.4f})")
        return metrics, stop

    def _save(self, epoch: int, improved: bool) -> None:
        extra = {"rng": rng_state(), "scaler": self.scaler.state_dict(), "stale_epochs": self.stale_epochs}
        if self.is_distill:
            extra["teacher"] = {"path": str(self.opt.teacher), "sha256": self.teacher_sha256}
            extra["distill_state"] = self.distill_loss.state_dict()
        ckpt = make_checkpoint(unwrap(self.model), ema=self.ema.ema, ema_updates=self.ema.updates,
                               optimizer=self.optimizer, epoch=epoch, best_fitness=self.best_fitness,
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
