"""The detection Dataset and its DataLoader (the batch contract of docs/internals.md, "Data").

A batch is ``(imgs, targets, paths, shapes)``:
- ``imgs``: ``uint8 Tensor[B, 3, H, W]``, RGB;
- ``targets``: ``float Tensor[N, 6]`` = (image index in the batch, class, cx, cy, w, h),
  normalised to the batch image size (W, H);
- ``paths``: ``list[str]`` image files;
- ``shapes``: per image ``((h0, w0), ((ratio_w, ratio_h), (pad_w, pad_h)))``, the letterbox that
  maps original pixels to batch pixels (``x = x0 * ratio_w + pad_w``) for
  ``utils.ops.boxes.scale_boxes``. A mosaic has no original image: it reports its own size and the
  identity.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from utils.core.errors import UserError
from utils.core.log import LOGGER
from utils.data import augment as aug
from utils.data.labels import list_image_files, load_labels
from utils.ops.boxes import xywhn2xyxy, xyxy2xywhn

# Augmentation keys read from the hyp dict; a missing key means "off".
AUG_KEYS = ("hsv_h", "hsv_s", "hsv_v", "degrees", "translate", "scale", "shear", "perspective",
            "flipud", "fliplr", "mosaic", "mixup", "erasing")
MAX_CACHE_THREADS = 8
SEED_MODULUS = 1 << 64  # numpy seeds must not be negative
# Decode-time downscaling of OpenCV (JPEG DCT scaling), largest factor first.
REDUCED_DECODE = {8: cv2.IMREAD_REDUCED_COLOR_8, 4: cv2.IMREAD_REDUCED_COLOR_4, 2: cv2.IMREAD_REDUCED_COLOR_2}
BYTES_PER_GB = 1e9

Shape = tuple[tuple[int, int], tuple[tuple[float, float], tuple[float, float]]]


def _resolve_cache(cache: Any) -> bool:
    """True for a RAM cache (``'ram'`` or ``True``), False for none; anything else is an error."""
    if cache in (None, False, "", "none", "no"):
        return False
    if cache is True or cache == "ram":
        return True
    raise UserError(f"--cache {cache!r} is not supported: use 'ram' or leave it out")


@dataclass(frozen=True)
class LoaderOptions:
    """How to load one split: what :func:`create_dataloader` and :class:`DetectionDataset` read.

    ``img_size``: long side of a letterboxed image (px). ``batch_size``: images per batch (capped at the
    split's size). ``stride``: rect batch shapes are multiples of it. ``hyp``: augmentation keys of a hyp
    file (missing keys are off). ``augment``: CPU augmentation. ``cache``: ``'ram'`` (or True) keeps
    decoded images in memory. ``rect``: rectangular batches (validation; not shuffled). ``workers``:
    loader processes (capped at the cores less one). ``shuffle`` / ``seed``: sample order and every
    sample's randomness (see :class:`EpochSampler`). ``nc``: labels with a class id outside [0, nc) are
    dropped. ``gpu_augment``: letterbox only; ``utils.data.gpu_augment.GPUAugment`` does the rest.
    ``distributed``: this process's share of each epoch (``torch.distributed`` initialised).
    ``prefix``: start of the log lines (None: the source's folder name).
    """

    img_size: int = 640
    batch_size: int = 16
    stride: int = 32
    hyp: dict | None = None
    augment: bool = False
    cache: Any = None
    rect: bool = False
    workers: int = 8
    shuffle: bool = False
    seed: int = 0
    nc: int | None = None
    gpu_augment: bool = False
    distributed: bool = False
    prefix: str | None = None


class DetectionDataset(Dataset):
    """Images and YOLO labels of one split, letterboxed or augmented on the CPU.

    Attributes: ``im_files`` (usable images), ``labels`` (per image ``float32 ndarray[n, 5]`` =
    class, cx, cy, w, h normalised to the original image), ``shapes`` (``ndarray[N, 2]`` original
    height, width), ``batch_shapes`` (rect mode: ``ndarray[n_batches, 2]`` height, width),
    ``counts`` (the numbers of the summary line).

    ``gpu_augment=True``: only the letterbox to ``img_size`` happens here; mosaic, affine, HSV
    and flips are left to ``utils.data.gpu_augment.GPUAugment``.
    """

    def __init__(self, source: str | list[str], options: LoaderOptions) -> None:
        """``options.workers`` here is the number of threads that check labels and fill the RAM cache;
        ``options.prefix`` of None logs without a prefix."""
        prefix = options.prefix or ""
        workers, rect = options.workers, options.rect
        self.img_size = int(options.img_size)
        self.stride = int(options.stride)
        self.hyp = {k: float((options.hyp or {}).get(k, 0.0)) for k in AUG_KEYS}
        self.gpu_augment = options.gpu_augment
        self.augment = options.augment and not options.gpu_augment
        self.rect = rect
        self.seed = int(options.seed) % SEED_MODULUS
        # Shared memory, so that close_mosaic() also reaches persistent worker processes.
        mosaic_on = self.augment and not rect and self.hyp["mosaic"] > 0
        self._mosaic_on = multiprocessing.RawValue("b", int(mosaic_on))

        found = list_image_files(source)
        if not found:
            raise UserError(f"{prefix}no images found in {source}")
        checked = load_labels(found, options.nc, prefix=prefix, workers=workers)
        self.im_files = checked.im_files
        self.labels = checked.labels
        self.shapes = np.asarray(checked.shapes, dtype=np.int64).reshape(-1, 2)
        self.counts = checked.counts
        self._warned: set[str] = set()

        self.batch_shapes = None
        self.batch_index = None
        if rect:
            self._init_rect(options.batch_size)
        self.ims: list[np.ndarray | None] = [None] * len(self.im_files)
        if _resolve_cache(options.cache):
            self._cache_ram(workers, prefix)

    def _init_rect(self, batch_size: int) -> None:
        """Sort by aspect ratio and give each batch the smallest stride-multiple (h, w) fitting all."""
        order = np.argsort(self.shapes[:, 0] / self.shapes[:, 1], kind="stable")
        self.im_files = [self.im_files[k] for k in order]
        self.labels = [self.labels[k] for k in order]
        self.shapes = self.shapes[order]
        n = len(self.im_files)
        self.batch_index = np.arange(n) // batch_size
        long_side = self.shapes.max(1, keepdims=True)
        fitted = self.shapes / long_side * self.img_size  # (h, w) after load_image
        shapes = np.zeros((int(self.batch_index[-1]) + 1, 2))
        np.maximum.at(shapes, self.batch_index, fitted)
        self.batch_shapes = (np.ceil(shapes / self.stride) * self.stride).astype(np.int64)

    def _cache_ram(self, workers: int, prefix: str) -> None:
        """Decode and resize every image once; workers then read them from memory."""
        gain = self.img_size / self.shapes.max(1)
        nbytes = float((self.shapes[:, 0] * gain * self.shapes[:, 1] * gain * 3).sum())
        LOGGER.info(f"{prefix}caching {len(self.ims)} images in RAM ({nbytes / BYTES_PER_GB:.2f} GB)")
        threads = max(1, min(workers, MAX_CACHE_THREADS))
        with ThreadPoolExecutor(threads) as pool:
            for k, (img, _, _) in enumerate(pool.map(self._read_resized, range(len(self.ims)))):
                img.flags.writeable = False  # every transform makes a new array; keep it that way
                self.ims[k] = img

    def set_mosaic(self, on: bool) -> None:
        """Switch mosaic (and mixup, which needs it) on or off, in every worker process too."""
        self._mosaic_on.value = int(bool(on) and self.augment and not self.rect and self.hyp["mosaic"] > 0)

    @property
    def mosaic(self) -> bool:
        """Whether mosaic is currently on."""
        return bool(self._mosaic_on.value)

    def __len__(self) -> int:
        return len(self.im_files)

    def _read_resized(self, i: int) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
        """Decode image ``i`` (BGR) and resize its long side to ``img_size``.

        Large JPEGs are decoded at 1/2, 1/4 or 1/8 size when that still leaves at least
        ``img_size`` pixels: the decoder then skips most of its work.
        """
        h0, w0 = (int(v) for v in self.shapes[i])
        gain = self.img_size / max(h0, w0)
        factor = next((f for f in REDUCED_DECODE if gain * f <= 1), 1)
        img = cv2.imread(self.im_files[i], REDUCED_DECODE.get(factor, cv2.IMREAD_COLOR))
        if img is None:
            # Verified headers but undecodable data: train on a grey background image instead.
            if self.im_files[i] not in self._warned:
                self._warned.add(self.im_files[i])
                LOGGER.warning(f"{self.im_files[i]}: image could not be decoded, used as an empty grey image")
            img = np.full((max(1, h0 // factor), max(1, w0 // factor), 3), aug.PAD_VALUE, np.uint8)
            self.labels[i] = np.zeros((0, 5), np.float32)
        h, w = img.shape[:2]
        if abs(h * factor - h0) > factor or abs(w * factor - w0) > factor:
            h0, w0 = h * factor, w * factor  # the header did not tell the decoded size; trust the pixels
            gain = self.img_size / max(h0, w0)
        size = (max(1, round(w0 * gain)), max(1, round(h0 * gain)))
        if size != (w, h):
            interp = cv2.INTER_LINEAR if (self.augment or size[0] > w) else cv2.INTER_AREA
            img = cv2.resize(img, size, interpolation=interp)
        return img, (h0, w0), img.shape[:2]

    def load_image(self, i: int) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
        """Image ``i`` as BGR ``uint8 [h, w, 3]`` with its long side ``img_size``, its original
        (h0, w0) and its resized (h, w); from the RAM cache (read-only) when there is one."""
        if self.ims[i] is not None:
            img = self.ims[i]
            return img, (int(self.shapes[i][0]), int(self.shapes[i][1])), img.shape[:2]
        return self._read_resized(i)

    def _pixel_labels(self, i: int, width: float, height: float, pad_w: float = 0.0,
                      pad_h: float = 0.0) -> np.ndarray:
        """Labels of image ``i`` as (class, x1, y1, x2, y2) pixels of a ``width x height`` image."""
        lab = self.labels[i]
        out = np.zeros((len(lab), 5), np.float64)
        if len(lab):
            out[:, 0] = lab[:, 0]
            out[:, 1:] = xywhn2xyxy(lab[:, 1:].astype(np.float64), width, height, pad_w, pad_h)
        return out

    def _load_letterboxed(self, i: int) -> tuple[np.ndarray, np.ndarray, Shape]:
        """Image ``i`` letterboxed to its batch shape (rect) or to ``img_size`` squared."""
        img, (h0, w0), (h, w) = self.load_image(i)
        target = tuple(self.batch_shapes[self.batch_index[i]]) if self.rect else (self.img_size, self.img_size)
        img, (rw, rh), (pad_w, pad_h) = aug.letterbox(img, target, auto=False, scaleup=self.augment)
        labels = self._pixel_labels(i, w * rw, h * rh, pad_w, pad_h)
        ratio = (w * rw / w0, h * rh / h0)  # both resizes together
        return img, labels, ((h0, w0), (ratio, (pad_w, pad_h)))

    def _load_mosaic(self, i: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """A 4-image mosaic around image ``i``, cropped and warped to ``img_size`` squared."""
        picks = [i, *rng.integers(0, len(self), 3).tolist()]
        images, labels = [], []
        for k in picks:
            img, _, (h, w) = self.load_image(k)
            images.append(img)
            labels.append(self._pixel_labels(k, w, h))
        canvas, lab = aug.mosaic4(images, labels, self.img_size, rng)
        return aug.random_perspective(canvas, lab, self.hyp["degrees"], self.hyp["translate"],
                                      self.hyp["scale"], self.hyp["shear"], self.hyp["perspective"],
                                      out_shape=(self.img_size, self.img_size), rng=rng)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, str, Shape]:
        """One sample: ``uint8 Tensor[3, H, W]`` RGB, ``Tensor[n, 6]`` (0, class, cx, cy, w, h
        normalised), the image path and its letterbox shape (see the module docstring).

        ``item`` is an index or an ``(epoch, index)`` pair from :class:`EpochSampler`. The random
        draws come from a generator seeded with (seed, epoch, index): the same sample looks the
        same for any number of workers and after a resume.
        """
        epoch, index = item if isinstance(item, tuple) else (0, item)
        hyp = self.hyp
        rng = np.random.default_rng([self.seed, int(epoch), int(index)])
        if self.mosaic and rng.random() < hyp["mosaic"]:
            img, labels = self._load_mosaic(index, rng)
            if rng.random() < hyp["mixup"]:
                img2, labels2 = self._load_mosaic(int(rng.integers(0, len(self))), rng)
                img, labels = aug.mixup(img, labels, img2, labels2, rng)
            size = self.img_size
            shape: Shape = ((size, size), ((1.0, 1.0), (0.0, 0.0)))
        else:
            img, labels, shape = self._load_letterboxed(index)
            if self.augment:
                img, labels = aug.random_perspective(img, labels, hyp["degrees"], hyp["translate"],
                                                     hyp["scale"], hyp["shear"], hyp["perspective"],
                                                     rng=rng)
        if self.augment:
            aug.augment_hsv(img, hyp["hsv_h"], hyp["hsv_s"], hyp["hsv_v"], rng)
            if rng.random() < hyp["flipud"]:
                img, labels = aug.flip_ud(img, labels)
            if rng.random() < hyp["fliplr"]:
                img, labels = aug.flip_lr(img, labels)
            if rng.random() < hyp["erasing"]:
                img, labels = aug.random_erasing(img, labels, rng)

        height, width = img.shape[:2]
        targets = torch.zeros((len(labels), 6))
        if len(labels):
            targets[:, 1] = torch.from_numpy(labels[:, 0].astype(np.float32))
            targets[:, 2:] = torch.from_numpy(xyxy2xywhn(labels[:, 1:5], width, height).astype(np.float32))
        chw = np.ascontiguousarray(img[:, :, ::-1].transpose(2, 0, 1))  # BGR HWC -> RGB CHW
        return torch.from_numpy(chw), targets, self.im_files[index], shape

    @staticmethod
    def collate_fn(batch: list) -> tuple[torch.Tensor, torch.Tensor, list[str], list[Shape]]:
        """Stack samples into the batch contract; targets get their image index in column 0."""
        imgs, targets, paths, shapes = zip(*batch)
        for k, t in enumerate(targets):
            t[:, 0] = k
        return torch.stack(imgs, 0), torch.cat(targets, 0), list(paths), list(shapes)


class EpochSampler(Sampler):
    """The order of one epoch as a pure function of (seed, epoch), so that a resumed run repeats it.

    Yields ``(epoch, index)`` pairs (the dataset seeds each sample's augmentation with them).
    ``set_epoch(e)`` pins the next epoch (the engine calls it); without it every new iteration
    counts one epoch on. With ``num_replicas > 1`` (distributed) all processes shuffle alike and
    each takes every ``num_replicas``-th index, padded so that all get the same number.
    """

    def __init__(self, length: int, shuffle: bool = False, seed: int = 0, rank: int = 0, num_replicas: int = 1):
        self.length, self.shuffle, self.seed = length, shuffle, int(seed) % SEED_MODULUS
        self.rank, self.num_replicas = rank, num_replicas
        self.epoch, self._pinned, self._started = 0, False, False

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self._pinned = int(epoch), True

    def __len__(self) -> int:
        return -(-self.length // self.num_replicas)

    def __iter__(self):
        if self._started and not self._pinned:
            self.epoch += 1
        self._started, self._pinned = True, False
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.length)
        else:
            order = np.arange(self.length)
        if self.num_replicas > 1:
            order = np.resize(order, len(self) * self.num_replicas)[self.rank::self.num_replicas]
        epoch = self.epoch
        return iter([(epoch, int(k)) for k in order])


def create_dataloader(source: str | list[str], options: LoaderOptions) -> tuple[DataLoader, DetectionDataset]:
    """Build a :class:`DetectionDataset` and its DataLoader (persistent workers, seeded order and
    augmentation: see :class:`EpochSampler`) as ``options`` say (:class:`LoaderOptions`).

    ``source``: folder(s) / list file(s) of images (as in data.yaml). Returns ``(loader, dataset)``.
    """
    prefix = options.prefix
    if prefix is None:
        first = source[0] if isinstance(source, (list, tuple)) and source else source
        prefix = f"{Path(str(first)).stem}: "
    if options.rect and options.distributed:
        raise UserError("rect batches need the whole split in order: validate on one process, not distributed")
    shuffle = options.shuffle
    if options.rect and shuffle:
        LOGGER.warning(f"{prefix}rect batches cannot be shuffled; shuffle turned off")
        shuffle = False
    # leave one core to the training process: its compute threads stall when workers take every core
    # (measured 8x slower epochs with 2 workers on 2 cores)
    workers = max(0, min(int(options.workers), (os.cpu_count() or 1) - 1))
    if workers:
        # workers inherit this before they fork: one OpenCV thread each instead of a pool per worker.
        # (Calling it inside a forked worker can deadlock, so it is set here.)
        cv2.setNumThreads(0)
    rank, replicas = 0, 1
    if options.distributed:
        if not torch.distributed.is_initialized():
            raise RuntimeError("create_dataloader(distributed=True) needs torch.distributed initialised first")
        rank, replicas = torch.distributed.get_rank(), torch.distributed.get_world_size()
    dataset = DetectionDataset(source, dataclasses.replace(options, shuffle=shuffle, workers=workers, prefix=prefix))
    batch_size = min(options.batch_size, len(dataset))
    sampler = EpochSampler(len(dataset), shuffle, options.seed, rank, replicas)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                        pin_memory=torch.cuda.is_available(), collate_fn=DetectionDataset.collate_fn,
                        persistent_workers=workers > 0, worker_init_fn=_single_thread_worker)
    return loader, dataset


def _single_thread_worker(worker_id: int) -> None:
    """One torch thread per loader worker: the default pool would compete with the training step's
    threads for the same cores (measured 8x slower epochs on 2 cores)."""
    torch.set_num_threads(1)


def close_mosaic(loader: DataLoader) -> DataLoader:
    """Switch mosaic and mixup off from the next iterator on, inside persistent workers too."""
    loader.dataset.set_mosaic(False)
    return loader


def image_files(source: str | list[str]) -> list[str]:
    """Sorted absolute image paths of a data.yaml split (folder, list file or a list of these)."""
    return list_image_files(source)
