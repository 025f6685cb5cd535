"""COCO-format JSON for ground truth and predictions, and evaluation with the COCO evaluator.

``faster-coco-eval`` is used when it is installed, ``pycocotools`` otherwise. On the same
predictions our own metric (``utils.eval.metrics``) and the COCO evaluator agree to a few thousandths of
mAP; the known differences are:

- max detections: COCO keeps the ``max_det`` best predictions *per image and class*; our NMS keeps
  ``max_det`` per image over all classes. They are the same when every image has at most
  ``max_det`` predictions in all (evaluate at NMS ``max_det <= 100`` to compare with COCO's 100).
- crowd boxes: we write ``iscrowd = 0`` for every box. COCO lets predictions on crowd boxes go
  unpunished; our metric has no crowd boxes.
- area ranges: we report the "all" range only (area 0 to 1e10). The small/medium/large numbers of
  COCO use the ``area`` field, which we set to the box area w * h in original pixels.
- rounding: the JSON holds box coordinates rounded to 3 decimals and scores to 5, so IoUs and score
  ties can differ in the last digits from the unrounded tensors our metric sees.
- classes without ground truth: both leave them out of the mean.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from utils.core.errors import UserError
from utils.core.log import LOGGER
from utils.ops.boxes import xyxy2xywh

BOX_DECIMALS = 3
SCORE_DECIMALS = 5
COCO_MAX_DETS = (1, 10)  # the two smaller max-detection settings COCO also reports recall for
# the official COCO category ids skip these ten numbers between 1 and 90
COCO91_MISSING_IDS = frozenset({12, 26, 29, 30, 45, 66, 68, 69, 71, 83})
COCO80_FIRST_LAST = ("person", "toothbrush")


def coco80_to_coco91() -> list[int]:
    """The official COCO category id (1..90) of each of the 80 contiguous COCO classes."""
    return [i for i in range(1, 91) if i not in COCO91_MISSING_IDS]


def default_category_ids(names: Sequence[str]) -> list[int]:
    """Category ids to write for ``names``: the official ids for the 80 COCO classes, else 0..nc-1."""
    if len(names) == 80 and (names[0], names[-1]) == COCO80_FIRST_LAST:
        return coco80_to_coco91()
    return list(range(len(names)))


def image_id_from_path(path: str | Path, index: int) -> int:
    """COCO image id: the numeric file stem when there is one (COCO files), else ``index``."""
    stem = Path(path).stem
    return int(stem) if stem.isdigit() else index


def _round(values: Sequence[float], decimals: int) -> list[float]:
    return [round(float(v), decimals) for v in values]


class CocoJsonWriter:
    """Collects images, labels and predictions (original pixels) and writes COCO JSON files."""

    def __init__(self, names: Sequence[str], category_ids: Sequence[int] | None = None) -> None:
        self.names = list(names)
        self.category_ids = list(category_ids) if category_ids is not None else default_category_ids(names)
        self.images: list[dict] = []
        self.annotations: list[dict] = []
        self.predictions: list[dict] = []
        self._used_ids: set[int] = set()

    def add(self, path: str | Path, shape: tuple[int, int], labels: torch.Tensor | np.ndarray,
            detections: torch.Tensor | np.ndarray) -> int:
        """Add one image of ``shape`` (h, w) with ``labels [m, 5]`` (cls, x1, y1, x2, y2) and
        ``detections [n, 6]`` (x1, y1, x2, y2, conf, cls), pixels of the original image.
        Returns the image id used."""
        image_id = image_id_from_path(path, len(self.images))
        if image_id in self._used_ids:  # numeric stems from two folders can collide
            image_id = max(self._used_ids) + 1
        self._used_ids.add(image_id)
        self.images.append({"id": image_id, "file_name": Path(path).name,
                            "height": int(shape[0]), "width": int(shape[1])})
        labels = torch.as_tensor(labels).detach().cpu().double()
        detections = torch.as_tensor(detections).detach().cpu().double()
        for row in labels:
            xywh = xyxy2xywh(row[1:5])
            x, y, w, h = float(xywh[0] - xywh[2] / 2), float(xywh[1] - xywh[3] / 2), float(xywh[2]), float(xywh[3])
            self.annotations.append({"id": len(self.annotations) + 1, "image_id": image_id,
                                     "category_id": self.category_ids[int(row[0])],
                                     "bbox": _round((x, y, w, h), BOX_DECIMALS),
                                     "area": round(w * h, BOX_DECIMALS), "iscrowd": 0})
        for row in detections:
            x1, y1, x2, y2 = (float(v) for v in row[:4])
            self.predictions.append({"image_id": image_id, "category_id": self.category_ids[int(row[5])],
                                     "bbox": _round((x1, y1, x2 - x1, y2 - y1), BOX_DECIMALS),
                                     "score": round(float(row[4]), SCORE_DECIMALS)})
        return image_id

    def ground_truth(self) -> dict:
        """The COCO ground-truth dict (images, annotations, categories)."""
        categories = [{"id": cid, "name": name, "supercategory": "none"}
                      for cid, name in zip(self.category_ids, self.names)]
        return {"info": {"description": "yolo-distill ground truth"}, "images": self.images,
                "annotations": self.annotations, "categories": categories}

    def save(self, save_dir: str | Path, prefix: str = "") -> tuple[Path, Path]:
        """Write ``{prefix}ground_truth.json`` and ``{prefix}predictions.json`` into ``save_dir``."""
        save_dir = Path(save_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
        gt_path, pred_path = save_dir / f"{prefix}ground_truth.json", save_dir / f"{prefix}predictions.json"
        gt_path.write_text(json.dumps(self.ground_truth()))
        pred_path.write_text(json.dumps(self.predictions))
        return gt_path, pred_path


def _load_json(source: str | Path | dict | list, flag: str) -> dict | list:
    if isinstance(source, (dict, list)):
        return source
    path = Path(source)
    if not path.is_file():
        raise UserError(f"{flag}: {path} does not exist")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{flag}: {path} is not valid JSON ({exc})") from None


def _evaluator_classes() -> tuple[type, type, str]:
    """(COCO, COCOeval, name) of the fastest installed COCO evaluator."""
    try:
        from faster_coco_eval import COCO, COCOeval_faster

        return COCO, COCOeval_faster, "faster-coco-eval"
    except ImportError:
        pass
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        return COCO, COCOeval, "pycocotools"
    except ImportError:
        raise UserError("--save-json needs a COCO evaluator: pip install faster-coco-eval "
                        "(or pycocotools)") from None


def coco_evaluate(ground_truth: str | Path | dict, predictions: str | Path | list,
                  max_det: int = 100, evaluator: str = "auto") -> dict:
    """Evaluate COCO ``predictions`` against ``ground_truth`` (files or already-loaded JSON).

    ``evaluator`` is ``auto``, ``faster-coco-eval`` or ``pycocotools``. Returns ``{'map': AP@[.5:.95],
    'map50', 'map75', 'evaluator': name}`` for area "all" at ``max_det`` detections per image and class.
    """
    gt = _load_json(ground_truth, "--save-json ground truth")
    preds = _load_json(predictions, "--save-json predictions")
    if evaluator == "auto":
        coco_cls, eval_cls, name = _evaluator_classes()
    elif evaluator == "faster-coco-eval":
        from faster_coco_eval import COCO as coco_cls, COCOeval_faster as eval_cls
        name = evaluator
    elif evaluator == "pycocotools":
        from pycocotools.coco import COCO as coco_cls
        from pycocotools.cocoeval import COCOeval as eval_cls
        name = evaluator
    else:
        raise ValueError(f"unknown COCO evaluator {evaluator!r}")
    result = {"map": 0.0, "map50": 0.0, "map75": 0.0, "evaluator": name}
    if not preds or not gt.get("annotations"):
        return result  # COCO's loadRes rejects an empty list; nothing predicted scores 0

    # pycocotools prints progress on stdout; keep the caller's output clean
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = coco_cls()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(preds)
        if name == "faster-coco-eval":
            ev = eval_cls(coco_gt, coco_dt, "bbox", print_function=LOGGER.debug)
        else:
            ev = eval_cls(coco_gt, coco_dt, "bbox")
        ev.params.maxDets = [*COCO_MAX_DETS, max_det]
        ev.evaluate()
        ev.accumulate()
    # precision [T, R, K, A, M]: thresholds, recall points, classes, area ranges, max-dets
    precision = np.asarray(ev.eval["precision"])[:, :, :, 0, -1]
    thresholds = np.asarray(ev.params.iouThrs)

    def mean_valid(p: np.ndarray) -> float:
        valid = p[p > -1]
        return float(valid.mean()) if valid.size else 0.0

    result["map"] = mean_valid(precision)
    result["map50"] = mean_valid(precision[np.isclose(thresholds, 0.5)])
    result["map75"] = mean_valid(precision[np.isclose(thresholds, 0.75)])
    return result
