"""The built-in synthetic detection data set: deterministic, generated in seconds, no download.

Each image has a noisy gradient background with smooth blotches, unlabelled clutter (lines, thin
ellipses, irregular blobs, dots) and 1-8 labelled objects of seven shape classes. Colours and
textures (solid, stripes, checker, noise, gradient) are drawn independently of the class, so a
detector has to learn shapes, not colours. Objects range from 8 px to half the image, may overlap
(the later one occludes) and may be cut by the border.

Every image gets its own generator seeded by (seed, split, index): the same seed gives the same
bytes. ``python -m utils.data.synthetic --out DIR`` writes a set; ``data/synthetic.yaml`` is generated
on first use by :func:`ensure_generated`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import yaml

from utils.core.atomic import swap_in_folder
from utils.core.errors import UserError, cli_main
from utils.core.log import LOGGER, setup_logging

CLASS_NAMES = ("circle", "ring", "triangle", "square", "star", "cross", "hexagon")
SPLIT_CODES = {"train": 0, "val": 1}
DEFAULTS = {"n_train": 400, "n_val": 100, "img_size": 320, "seed": 0}
GENERATOR_VERSION = 2
MARKER = ".generated.json"

MIN_OBJECT_PX = 8
MAX_OBJECTS = 8
MAX_PLACEMENT_TRIES = 20
MAX_OVERLAP = 0.5  # intersection / smaller box area allowed between two objects
MIN_INSIDE = 0.6  # an object keeps at least this fraction of its size inside the image
MIN_DISTRACTORS, MAX_DISTRACTORS = 2, 9
JPEG_QUALITY = 90
SUBPIXEL_BITS = 4  # fixed-point precision of cv2.fillPoly vertices
SUBPIXEL = 1 << SUBPIXEL_BITS
STAR_INNER = 0.45  # inner / outer radius of the five-pointed star
CROSS_ARM = 0.33  # half width of a cross arm / its radius
RING_HOLE = 0.55  # hole radius / ring radius
MAX_SQUASH = 0.25  # objects may be squashed along one axis by up to this fraction
BLOTCH_GRID = 4  # the smooth background blotches come from a 4x4 random field
BLUR_PROBABILITY = 0.3
BLOB_VERTICES = 32
BLOB_HARMONICS = 3  # radial waves 2, 3 and 4 times around a clutter blob
BLOB_MIN_RADIUS = 10  # smaller blobs would render as little polygons, i.e. unlabelled objects


def _regular_polygon(n: int, radius: float = 1.0, phase: float = 0.0) -> np.ndarray:
    angles = phase + np.arange(n) * 2 * math.pi / n
    return radius * np.stack((np.cos(angles), np.sin(angles)), 1)


def _star() -> np.ndarray:
    outer = _regular_polygon(5, 1.0, -math.pi / 2)
    inner = _regular_polygon(5, STAR_INNER, -math.pi / 2 + math.pi / 5)
    return np.stack((outer, inner), 1).reshape(10, 2)


def _cross() -> np.ndarray:
    a = CROSS_ARM
    return np.array([(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1),
                     (-a, a), (-1, a), (-1, -a), (-a, -a)], dtype=float)


# Unit outlines (radius 1 around the origin) of the polygon classes.
OUTLINES = {"triangle": _regular_polygon(3, 1.0, -math.pi / 2), "square": _regular_polygon(4, 1.0, math.pi / 4),
            "star": _star(), "cross": _cross(), "hexagon": _regular_polygon(6)}
CIRCLE_VERTICES = _regular_polygon(48)


def _fill(mask: np.ndarray, points: np.ndarray) -> None:
    cv2.fillPoly(mask, [np.round(points * SUBPIXEL).astype(np.int32)], 255, cv2.LINE_AA, SUBPIXEL_BITS)


def _shape_mask(name: str, radius: float, angle: float, squash: float, size: int) -> np.ndarray:
    """``uint8 [size, size]`` mask of one object centred in a square patch."""
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    scale = np.array([radius, radius * (1 - squash)])
    centre = np.array([size / 2, size / 2])
    mask = np.zeros((size, size), np.uint8)
    outline = CIRCLE_VERTICES if name in ("circle", "ring") else OUTLINES[name]
    _fill(mask, (outline * scale) @ rot.T + centre)
    if name == "ring":
        hole = np.zeros_like(mask)
        _fill(hole, (CIRCLE_VERTICES * scale * RING_HOLE) @ rot.T + centre)
        mask = cv2.subtract(mask, hole)
    return mask


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """``float32 [h, w, 3]`` BGR fill: solid, stripes, checker, noise or a gradient."""
    c1, c2 = rng.uniform(0, 255, (2, 3)).astype(np.float32)
    kind = rng.integers(0, 5)
    if kind == 0:
        return np.broadcast_to(c1, (h, w, 3))
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind in (1, 4):
        theta = rng.uniform(0, math.pi)
        proj = xs * math.cos(theta) + ys * math.sin(theta)
        if kind == 4:
            t = (proj - proj.min()) / max(float(np.ptp(proj)), 1.0)
            return c1 + (c2 - c1) * t[..., None]
        period = rng.uniform(2, max(3.0, min(h, w) / 3))
        on = (proj // period) % 2 == 0
    elif kind == 2:
        period = int(rng.integers(2, max(3, min(h, w) // 3)))
        on = ((xs // period + ys // period) % 2) == 0
    else:
        return c1 + rng.normal(0, 30, (h, w, 3)).astype(np.float32)
    return np.where(on[..., None], c1, c2)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """``float32 [size, size, 3]``: a two-colour gradient, smooth blotches and pixel noise."""
    c1, c2 = rng.uniform(0, 255, (2, 3)).astype(np.float32)
    theta = rng.uniform(0, 2 * math.pi)
    ramp = np.linspace(-0.5, 0.5, size, dtype=np.float32)
    t = np.clip(0.5 + ramp[None, :] * math.cos(theta) + ramp[:, None] * math.sin(theta), 0, 1)
    blotches = rng.uniform(-50, 50, (BLOTCH_GRID, BLOTCH_GRID, 3)).astype(np.float32)
    img = cv2.resize(blotches, (size, size), interpolation=cv2.INTER_LINEAR)
    img += c1
    img += t[..., None] * (c2 - c1)
    noise = rng.standard_normal((size, size, 3), dtype=np.float32)
    noise *= rng.uniform(2, 14)
    img += noise
    return img


def _paste(img: np.ndarray, mask: np.ndarray, tex: np.ndarray, x0: int, y0: int) -> None:
    """Blend ``tex`` into ``img`` through ``mask`` with the patch's top-left at (x0, y0), cut at the border."""
    size = img.shape[0]
    ph, pw = mask.shape
    ix1, iy1, ix2, iy2 = max(x0, 0), max(y0, 0), min(x0 + pw, size), min(y0 + ph, size)
    if ix2 <= ix1 or iy2 <= iy1:
        return
    m = mask[iy1 - y0:iy2 - y0, ix1 - x0:ix2 - x0, None].astype(np.float32) / 255
    t = tex[iy1 - y0:iy2 - y0, ix1 - x0:ix2 - x0]
    img[iy1:iy2, ix1:ix2] = img[iy1:iy2, ix1:ix2] * (1 - m) + t * m


def _clutter(rng: np.random.Generator, img: np.ndarray) -> None:
    """Unlabelled distractors: lines, thin ellipses, irregular blobs and dots."""
    size = img.shape[0]
    for _ in range(int(rng.integers(MIN_DISTRACTORS, MAX_DISTRACTORS))):
        color = tuple(float(c) for c in rng.uniform(0, 255, 3))
        kind = rng.integers(0, 4)
        if kind == 0:
            p1, p2 = rng.integers(0, size, (2, 2))
            cv2.line(img, tuple(int(v) for v in p1), tuple(int(v) for v in p2), color,
                     int(rng.integers(1, 4)), cv2.LINE_AA)
        elif kind == 1:  # far from round, so never mistaken for a circle
            major = int(rng.integers(6, size // 4))
            axes = (major, max(1, int(major / rng.uniform(2.5, 6))))
            centre = tuple(int(v) for v in rng.integers(0, size, 2))
            cv2.ellipse(img, centre, axes, float(rng.uniform(0, 180)), 0, 360, color, -1, cv2.LINE_AA)
        elif kind == 2:  # a lumpy blob: smooth, so never a polygon class, lumpy, so never a circle
            angles = np.linspace(0, 2 * math.pi, BLOB_VERTICES, endpoint=False)
            harmonics = np.arange(2, 2 + BLOB_HARMONICS)[:, None]
            amplitude = rng.uniform(0.12, 0.25, (BLOB_HARMONICS, 1))
            phase = rng.uniform(0, 2 * math.pi, (BLOB_HARMONICS, 1))
            waves = (amplitude * np.cos(harmonics * angles + phase)).sum(0)
            radii = rng.uniform(BLOB_MIN_RADIUS, max(BLOB_MIN_RADIUS, size / 8)) * (1 + waves)
            pts = rng.uniform(0, size, 2) + np.stack((np.cos(angles), np.sin(angles)), 1) * radii[:, None]
            cv2.fillPoly(img, [np.round(pts * SUBPIXEL).astype(np.int32)], color, cv2.LINE_AA, SUBPIXEL_BITS)
        else:
            for x, y in rng.integers(0, size, (int(rng.integers(3, 15)), 2)):
                cv2.circle(img, (int(x), int(y)), int(rng.integers(1, 3)), color, -1, cv2.LINE_AA)


def _overlaps_too_much(box: np.ndarray, boxes: list[np.ndarray]) -> bool:
    area = (box[2] - box[0]) * (box[3] - box[1])
    for other in boxes:
        iw = min(box[2], other[2]) - max(box[0], other[0])
        ih = min(box[3], other[3]) - max(box[1], other[1])
        if iw > 0 and ih > 0:
            smaller = min(area, (other[2] - other[0]) * (other[3] - other[1]))
            if iw * ih > MAX_OVERLAP * smaller:
                return True
    return False


def render_image(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic image: BGR ``uint8 [size, size, 3]`` and labels ``[n, 5]`` (class, cx, cy, w, h
    normalised; boxes are the tight extents of the drawn shapes, cut at the border)."""
    img = _background(rng, size)
    _clutter(rng, img)
    boxes: list[np.ndarray] = []
    classes: list[int] = []
    log_min, log_max = math.log(MIN_OBJECT_PX), math.log(size / 2)
    for _ in range(int(rng.integers(1, MAX_OBJECTS + 1))):
        for _ in range(MAX_PLACEMENT_TRIES):
            cls = int(rng.integers(0, len(CLASS_NAMES)))
            radius = math.exp(rng.uniform(log_min, log_max)) / 2
            patch = int(math.ceil(2 * radius)) + 2
            mask = _shape_mask(CLASS_NAMES[cls], radius, rng.uniform(0, 2 * math.pi),
                               rng.uniform(0, MAX_SQUASH), patch)
            margin = radius * (1 - 2 * (1 - MIN_INSIDE))
            cx, cy = rng.uniform(margin, size - margin, 2)
            x0, y0 = int(round(cx - patch / 2)), int(round(cy - patch / 2))
            ys, xs = np.nonzero(mask)
            if not len(xs):
                continue
            box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], float) + (x0, y0, x0, y0)
            box = box.clip(0, size)
            if min(box[2] - box[0], box[3] - box[1]) < MIN_OBJECT_PX / 2 or _overlaps_too_much(box, boxes):
                continue
            _paste(img, mask, _texture(rng, patch, patch), x0, y0)
            boxes.append(box)
            classes.append(cls)
            break
    if rng.random() < BLUR_PROBABILITY:
        img = cv2.GaussianBlur(img, (3, 3), 0)
    labels = np.zeros((len(boxes), 5))
    if boxes:
        b = np.stack(boxes) / size
        labels[:, 0] = classes
        labels[:, 1:3] = (b[:, :2] + b[:, 2:]) / 2
        labels[:, 3:] = b[:, 2:] - b[:, :2]
    return np.clip(img, 0, 255).astype(np.uint8), labels


def generate(root: str | Path, n_train: int = DEFAULTS["n_train"], n_val: int = DEFAULTS["n_val"],
             img_size: int = DEFAULTS["img_size"], seed: int = DEFAULTS["seed"]) -> Path:
    """Write ``root/images/{train,val}/*.jpg``, ``root/labels/{train,val}/*.txt`` and
    ``root/data.yaml``; returns the yaml path. Same arguments, same bytes."""
    if img_size < 4 * MIN_OBJECT_PX:
        raise UserError(f"--img-size {img_size} is too small for the synthetic set (at least {4 * MIN_OBJECT_PX})")
    root = Path(root)
    encode = [int(cv2.IMWRITE_JPEG_QUALITY), JPEG_QUALITY]
    for split, count in (("train", n_train), ("val", n_val)):
        img_dir, lab_dir = root / "images" / split, root / "labels" / split
        img_dir.mkdir(parents=True, exist_ok=True)
        lab_dir.mkdir(parents=True, exist_ok=True)
        for k in range(count):
            rng = np.random.default_rng([seed, SPLIT_CODES[split], k])
            img, labels = render_image(rng, img_size)
            ok, buf = cv2.imencode(".jpg", img, encode)
            if not ok:
                raise OSError(f"JPEG encoding failed for synthetic image {split}/{k}")
            (img_dir / f"{k:05d}.jpg").write_bytes(buf.tobytes())
            rows = [f"{int(c)} {x:.6f} {y:.6f} {w:.6f} {h:.6f}" for c, x, y, w, h in labels]
            (lab_dir / f"{k:05d}.txt").write_text("".join(r + "\n" for r in rows))
    config = {"path": ".", "train": "images/train", "val": "images/val",
              "nc": len(CLASS_NAMES), "names": list(CLASS_NAMES)}
    yaml_file = root / "data.yaml"
    yaml_file.write_text("# Synthetic detection set written by utils/data/synthetic.py\n"
                         + yaml.safe_dump(config, sort_keys=False))
    return yaml_file


def ensure_generated(root: str | Path, n_train: int = DEFAULTS["n_train"], n_val: int = DEFAULTS["n_val"],
                     img_size: int = DEFAULTS["img_size"], seed: int = DEFAULTS["seed"]) -> Path:
    """Generate the set into ``root`` unless the same settings are already there.

    Safe when several processes start at once: each writes a private folder and the first one to
    rename it into place wins. Returns ``root/data.yaml``.
    """
    root = Path(root)
    settings = {"version": GENERATOR_VERSION, "n_train": n_train, "n_val": n_val, "img_size": img_size,
                "seed": seed}
    marker = root / MARKER
    if marker.is_file():
        try:
            if json.loads(marker.read_text()) == settings:
                return root / "data.yaml"
        except (OSError, ValueError):
            pass
        LOGGER.info(f"synthetic data in {root} has other settings; generating it again")
    elif root.exists() and any(root.iterdir()):
        raise UserError(f"{root} exists and was not written by the synthetic generator; move it away")
    LOGGER.info(f"generating the synthetic data set in {root} ({n_train} train + {n_val} val images, "
                f"{img_size} px, seed {seed})")
    tmp = root.with_name(f".{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    generate(tmp, n_train, n_val, img_size, seed)
    (tmp / MARKER).write_text(json.dumps(settings))
    swap_in_folder(tmp, root, MARKER)  # a reader never sees half a set
    return root / "data.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Write the synthetic detection data set.")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--train", type=int, default=DEFAULTS["n_train"], help="number of train images")
    parser.add_argument("--val", type=int, default=DEFAULTS["n_val"], help="number of val images")
    parser.add_argument("--img-size", "--img", type=int, default=DEFAULTS["img_size"], help="image side in pixels")
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    return parser.parse_args(argv)


@cli_main
def main(argv: list[str] | None = None) -> Path:
    setup_logging()
    opt = parse_args(argv)
    if opt.train < 0 or opt.val < 0:
        raise UserError("--train and --val must not be negative")
    yaml_file = generate(opt.out, opt.train, opt.val, opt.img_size, opt.seed)
    LOGGER.info(f"wrote {opt.train} train and {opt.val} val images; data.yaml: {yaml_file}")
    return yaml_file


if __name__ == "__main__":
    main()
