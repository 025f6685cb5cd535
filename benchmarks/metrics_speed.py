"""Time our mAP (utils.eval.metrics) against faster-coco-eval and pycocotools on the same predictions.

Predictions come from a model (``--weights``, run over the split's images) or, by default, from the
ground truth: every box jittered with noise, some classes flipped, duplicates and random false
positives added, at most ``--max-det`` per image. Each evaluator starts from in-memory predictions
(tensors for ours, COCO dicts for the others) and ends with mAP50-95; the best of ``--repeat`` runs
counts. Prints a markdown table with the ratio, the machine and the date.

    python benchmarks/metrics_speed.py                      # BCCD test split, synthetic predictions
    python benchmarks/metrics_speed.py --weights best.pt --img 640
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import torch

from benchmarks.harness.machine import cpu_name
from utils.core.errors import ArgumentParser, cli_main

ROOT = Path(__file__).resolve().parents[1]
BCCD = ROOT / "data" / "bccd"  # bundled in the repository
BCCD_CLASSES = ["RBC", "WBC", "Platelets"]
EVAL_BATCH = 32  # images per DetectionStats.update, as the validation loop feeds them
JITTER = 0.06  # box-side noise as a fraction of the box size
CLASS_FLIP = 0.05
DUPLICATE = 0.3  # fraction of boxes predicted a second time, lower and looser
FALSE_POSITIVES = 15  # mean random boxes per image


def read_voc_split(root: Path, split: str) -> tuple[list[str], list[tuple[int, int]], list[torch.Tensor]]:
    """Image paths, (h, w) and labels ``[m, 5]`` (cls, x1, y1, x2, y2) of a VOC split; degenerate boxes dropped."""
    ids = (root / "ImageSets" / "Main" / f"{split}.txt").read_text().split()
    paths, shapes, labels = [], [], []
    for image_id in ids:
        tree = ET.parse(root / "Annotations" / f"{image_id}.xml")
        size = tree.find("size")
        shapes.append((int(size.findtext("height")), int(size.findtext("width"))))
        rows = []
        for obj in tree.iter("object"):
            name = obj.findtext("name").strip()
            box = obj.find("bndbox")
            x1, y1, x2, y2 = (float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
            if name in BCCD_CLASSES and x2 > x1 and y2 > y1:
                rows.append([BCCD_CLASSES.index(name), x1, y1, x2, y2])
        labels.append(torch.tensor(rows, dtype=torch.float64).reshape(-1, 5))
        paths.append(str(root / "JPEGImages" / f"{image_id}.jpg"))
    return paths, shapes, labels


def jittered_predictions(shapes, labels, max_det: int, seed: int) -> list[torch.Tensor]:
    """Per image ``[n, 6]`` (x1, y1, x2, y2, conf, cls) made from the labels, sorted by confidence."""
    rng = np.random.default_rng(seed)
    out = []
    for (h, w), lab in zip(shapes, labels):
        lab = lab.numpy()
        size = np.concatenate((lab[:, 3:5] - lab[:, 1:3],) * 2, 1)
        boxes = lab[:, 1:] + rng.normal(0, JITTER, size.shape) * size
        cls = lab[:, 0].copy()
        flip = rng.random(len(cls)) < CLASS_FLIP
        cls[flip] = (cls[flip] + rng.integers(1, len(BCCD_CLASSES), flip.sum())) % len(BCCD_CLASSES)
        conf = rng.uniform(0.3, 1.0, len(cls))
        dup = rng.random(len(cls)) < DUPLICATE
        dup_boxes = lab[dup, 1:] + rng.normal(0, 3 * JITTER, (dup.sum(), 4)) * size[dup]
        k = rng.poisson(FALSE_POSITIVES)
        xy = rng.uniform(0, 1, (k, 2)) * (w, h)
        fp = np.concatenate((xy, xy + rng.uniform(10, 120, (k, 2))), 1)
        rows = np.concatenate((
            np.column_stack((boxes, conf, cls)),
            np.column_stack((dup_boxes, conf[dup] * rng.uniform(0.2, 0.9, dup.sum()), lab[dup, 0])),
            np.column_stack((fp, rng.uniform(0.0, 0.6, k), rng.integers(0, len(BCCD_CLASSES), k))),
        ))
        rows[:, [0, 2]] = rows[:, [0, 2]].clip(0, w)
        rows[:, [1, 3]] = rows[:, [1, 3]].clip(0, h)
        rows = rows[np.argsort(-rows[:, 4], kind="stable")][:max_det]
        out.append(torch.from_numpy(rows).float())
    return out


def model_predictions(weights: str, paths, img_size: int, max_det: int) -> list[torch.Tensor]:
    """Run ``weights`` over the images (letterbox, NMS at the validation thresholds), original pixels."""
    from utils.data.augment import letterbox
    from utils.export.backends import load_backend
    from utils.ops.boxes import scale_boxes
    from utils.ops.nms import non_max_suppression
    from utils.data.sources import read_image

    backend = load_backend(weights, "")
    out = []
    for path in paths:
        img = read_image(path)
        boxed, ratio, pad = letterbox(img, backend.img_size or img_size, auto=backend.img_size is None,
                                      stride=backend.stride)
        x = torch.from_numpy(np.ascontiguousarray(boxed[:, :, ::-1].transpose(2, 0, 1)))[None]
        x = x.to(backend.device, torch.float16 if backend.half else torch.float32) / 255
        det = non_max_suppression(backend(x), 0.001, 0.7, multi_label=True, max_det=max_det)[0].cpu()
        scale_boxes(boxed.shape[:2], det[:, :4], img.shape[:2], (ratio, pad))
        out.append(det)
    return out


def time_best(fn, repeat: int) -> tuple[float, dict]:
    best, result = float("inf"), {}
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def ours(dets, labels) -> dict:
    from utils.eval.metrics import DetectionStats

    stats = DetectionStats(len(BCCD_CLASSES))
    for start in range(0, len(dets), EVAL_BATCH):
        stats.update(dets[start:start + EVAL_BATCH], labels[start:start + EVAL_BATCH])
    r = stats.compute()
    return {"map": r.map, "map50": r.map50}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(BCCD), help="BCCD (Pascal VOC layout)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--weights", default="", help="take predictions from this model instead of jittered labels")
    parser.add_argument("--img", type=int, default=640)
    parser.add_argument("--max-det", type=int, default=100, help="predictions per image (COCO counts 100)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (COCO evaluators use one)")
    return parser.parse_args(argv)


@cli_main
def main(argv: list[str] | None = None) -> None:
    opt = parse_args(argv)
    from utils.eval.coco import CocoJsonWriter, coco_evaluate

    torch.set_num_threads(opt.threads)
    paths, shapes, labels = read_voc_split(Path(opt.root), opt.split)
    if opt.weights:
        dets = model_predictions(opt.weights, paths, opt.img, opt.max_det)
    else:
        dets = jittered_predictions(shapes, labels, opt.max_det, opt.seed)
    writer = CocoJsonWriter(BCCD_CLASSES)
    for path, shape, lab, det in zip(paths, shapes, labels, dets):
        writer.add(path, shape, lab, det)
    gt, preds = writer.ground_truth(), writer.predictions

    rows = [("ours (utils.eval.metrics)", *time_best(lambda: ours(dets, labels), opt.repeat))]
    for name in ("faster-coco-eval", "pycocotools"):
        try:
            rows.append((name, *time_best(lambda n=name: coco_evaluate(gt, preds, opt.max_det, evaluator=n),
                                          opt.repeat)))
        except ImportError:
            print(f"{name} is not installed; skipped")

    ours_time = rows[0][1]
    source = f"model {opt.weights}" if opt.weights else "jittered ground truth"
    print(f"BCCD {opt.split} split: {len(paths)} images, {sum(len(x) for x in labels)} boxes, "
          f"{len(preds)} predictions ({source}, max {opt.max_det} per image), best of {opt.repeat}")
    print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs, "
          f"torch threads {opt.threads}, Python {platform.python_version()}, torch {torch.__version__}; "
          f"date {datetime.date.today().isoformat()}")
    print(f"command: python benchmarks/metrics_speed.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print()
    print("| evaluator | time (ms) | time / ours | mAP50-95 | mAP50 |")
    print("|---|---|---|---|---|")
    for name, seconds, result in rows:
        print(f"| {name} | {seconds * 1000:.1f} | {seconds / ours_time:.2f} | {result['map']:.4f} | "
              f"{result['map50']:.4f} |")


if __name__ == "__main__":
    main()
