"""CPU image augmentation that moves the boxes with the pixels.

Every function works on one ``uint8`` BGR image ``ndarray[H, W, 3]`` (as decoded by OpenCV) and
its labels ``ndarray[n, 5]`` = (class, x1, y1, x2, y2) in *pixels* of that image, and takes a
``numpy.random.Generator`` so that a seeded data loader reproduces its batches. The box
arithmetic is vectorised (no per-box Python loop).
"""

from __future__ import annotations

import math

import cv2
import numpy as np

PAD_VALUE = 114  # grey of the letterbox / mosaic / affine borders (the YOLO convention)
PAD_COLOR = (PAD_VALUE, PAD_VALUE, PAD_VALUE)

# Candidate filter: a box survives a transform when it is still at least this many pixels wide
# and high, keeps this fraction of its (scaled) area, and is not thinner than this aspect ratio.
MIN_BOX_PX = 2.0
MIN_AREA_FRACTION = 0.1
MAX_ASPECT_RATIO = 100.0

MIXUP_BETA = 32.0  # Beta(32, 32): mixing ratios concentrated around 0.5

# Random erasing: one rectangle covering this fraction range of the image, with aspect ratios in
# [1 / ERASE_MAX_ASPECT, ERASE_MAX_ASPECT]; boxes more hidden than ERASE_HIDE_FRACTION are dropped.
ERASE_AREA_RANGE = (0.02, 0.2)
ERASE_MAX_ASPECT = 3.0
ERASE_HIDE_FRACTION = 0.6

HUE_RANGE = 180  # OpenCV stores 8-bit hue as degrees / 2
HALF_PIXEL = 0.5  # box edges sit on pixel boundaries, OpenCV coordinates on pixel centres


def letterbox(img: np.ndarray, new_shape: int | tuple[int, int], auto: bool = False,
              scaleup: bool = True, stride: int = 32
              ) -> tuple[np.ndarray, tuple[float, float], tuple[float, float]]:
    """Resize ``img [H, W, 3]`` keeping its aspect ratio and pad it (grey) to ``new_shape``.

    ``new_shape`` is ``(height, width)`` or one side for a square. With ``auto`` the padding is
    reduced to the smallest multiple of ``stride`` (minimal rectangle). Returns the image,
    ``(ratio_w, ratio_h)`` (new size / old size per axis) and ``(pad_w, pad_h)``: the left and top
    padding in pixels, so that ``x_new = x_old * ratio_w + pad_w``.
    """
    if isinstance(new_shape, int):
        new_shape = (new_shape, new_shape)
    h0, w0 = img.shape[:2]
    gain = min(new_shape[0] / h0, new_shape[1] / w0)
    if not scaleup:
        gain = min(gain, 1.0)
    w1, h1 = max(1, round(w0 * gain)), max(1, round(h0 * gain))
    pad_w, pad_h = new_shape[1] - w1, new_shape[0] - h1
    if auto:
        pad_w, pad_h = pad_w % stride, pad_h % stride
    if (w1, h1) != (w0, h0):
        interp = cv2.INTER_AREA if gain < 1 else cv2.INTER_LINEAR
        img = cv2.resize(img, (w1, h1), interpolation=interp)
    left, top = pad_w // 2, pad_h // 2
    if pad_w or pad_h:
        img = cv2.copyMakeBorder(img, top, pad_h - top, left, pad_w - left, cv2.BORDER_CONSTANT,
                                 value=PAD_COLOR)
    return img, (w1 / w0, h1 / h0), (float(left), float(top))


def box_candidates(before: np.ndarray, after: np.ndarray, min_px: float = MIN_BOX_PX,
                   min_area: float = MIN_AREA_FRACTION, max_aspect: float = MAX_ASPECT_RATIO,
                   eps: float = 1e-16) -> np.ndarray:
    """Boolean mask ``[n]`` of boxes worth keeping after a transform.

    ``before`` and ``after`` are xyxy ``[n, 4]`` pixels; ``before`` already multiplied by the
    scale of the transform so that the areas compare. Drops slivers, boxes that lost most of
    their area to the image border, and needle-thin boxes.
    """
    w0, h0 = before[:, 2] - before[:, 0], before[:, 3] - before[:, 1]
    w1, h1 = after[:, 2] - after[:, 0], after[:, 3] - after[:, 1]
    aspect = np.maximum(w1 / (h1 + eps), h1 / (w1 + eps))
    return (w1 > min_px) & (h1 > min_px) & (w1 * h1 / (w0 * h0 + eps) > min_area) & (aspect < max_aspect)


def _affine_matrix(height: int, width: int, out_h: int, out_w: int, degrees: float,
                   translate: float, scale: float, shear: float, perspective: float,
                   rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """3x3 matrix mapping input pixels to output pixels, and the isotropic scale it applies."""
    to_origin = np.eye(3)
    to_origin[0, 2], to_origin[1, 2] = -width / 2, -height / 2

    persp = np.eye(3)
    persp[2, 0], persp[2, 1] = rng.uniform(-perspective, perspective, 2)

    angle = rng.uniform(-degrees, degrees)
    s = rng.uniform(1 - scale, 1 + scale)
    rot = np.eye(3)
    rot[:2] = cv2.getRotationMatrix2D((0.0, 0.0), angle, s)

    shr = np.eye(3)
    shr[0, 1], shr[1, 0] = np.tan(np.deg2rad(rng.uniform(-shear, shear, 2)))

    # The centre of the input lands at the centre of the output, shifted by the translation.
    move = np.eye(3)
    move[0, 2] = rng.uniform(0.5 - translate, 0.5 + translate) * out_w
    move[1, 2] = rng.uniform(0.5 - translate, 0.5 + translate) * out_h
    return move @ shr @ rot @ persp @ to_origin, s


def transform_boxes(boxes: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Map xyxy ``boxes [n, 4]`` through a 3x3 ``matrix``; returns the enclosing xyxy ``[n, 4]``."""
    n = len(boxes)
    corners = np.ones((n * 4, 3))
    # Corners in the order (x1,y1) (x2,y2) (x1,y2) (x2,y1), four rows per box.
    corners[:, :2] = boxes[:, [0, 1, 2, 3, 0, 3, 2, 1]].reshape(n * 4, 2)
    mapped = corners @ matrix.T
    if not np.allclose(matrix[2], (0, 0, 1)):
        mapped[:, :2] /= mapped[:, 2:3]
    xs, ys = mapped[:, 0].reshape(n, 4), mapped[:, 1].reshape(n, 4)
    return np.stack((xs.min(1), ys.min(1), xs.max(1), ys.max(1)), 1)


def random_perspective(img: np.ndarray, labels: np.ndarray, degrees: float = 0.0,
                       translate: float = 0.0, scale: float = 0.0, shear: float = 0.0,
                       perspective: float = 0.0, out_shape: tuple[int, int] | None = None,
                       rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Random rotation, scale, shear, translation and perspective of ``img`` and its boxes.

    ``labels [n, 5]`` = (class, x1, y1, x2, y2) pixels. ``out_shape`` = (height, width) of the
    result (default: the input size); a mosaic passes half its canvas to crop around the centre.
    Boxes are mapped by their corners, clipped to the output and filtered by
    :func:`box_candidates`. Returns the warped image and the surviving labels.
    """
    rng = rng if rng is not None else np.random.default_rng()
    height, width = img.shape[:2]
    out_h, out_w = out_shape if out_shape is not None else (height, width)
    matrix, s = _affine_matrix(height, width, out_h, out_w, degrees, translate, scale, shear,
                               perspective, rng)
    if perspective:
        img = cv2.warpPerspective(img, matrix, dsize=(out_w, out_h), borderValue=PAD_COLOR)
    else:
        img = cv2.warpAffine(img, matrix[:2], dsize=(out_w, out_h), borderValue=PAD_COLOR)
    if len(labels):
        # Box edges lie on pixel boundaries, OpenCV's warp maps pixel centres: shift by half a
        # pixel into OpenCV's frame and back so that boxes and pixels move exactly together.
        boxes = transform_boxes(labels[:, 1:5] - HALF_PIXEL, matrix) + HALF_PIXEL
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, out_w)
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, out_h)
        keep = box_candidates(labels[:, 1:5] * s, boxes)
        labels = np.concatenate((labels[keep, :1], boxes[keep]), 1)
    return img, labels


def augment_hsv(img: np.ndarray, hgain: float = 0.5, sgain: float = 0.5, vgain: float = 0.5,
                rng: np.random.Generator | None = None) -> np.ndarray:
    """Random hue / saturation / value gains on a BGR ``uint8`` image, in place (also returned).

    Each gain is drawn in ``[1 - g, 1 + g]``; hue wraps around, saturation and value saturate.
    Boxes do not change.
    """
    if not (hgain or sgain or vgain):
        return img
    rng = rng if rng is not None else np.random.default_rng()
    gains = rng.uniform(-1, 1, 3) * (hgain, sgain, vgain) + 1
    hue, sat, val = cv2.split(cv2.cvtColor(img, cv2.COLOR_BGR2HSV))
    levels = np.arange(256, dtype=np.float32)
    lut_h = ((levels * gains[0]) % HUE_RANGE).astype(np.uint8)
    lut_s = np.clip(levels * gains[1], 0, 255).astype(np.uint8)
    lut_v = np.clip(levels * gains[2], 0, 255).astype(np.uint8)
    hsv = cv2.merge((cv2.LUT(hue, lut_h), cv2.LUT(sat, lut_s), cv2.LUT(val, lut_v)))
    cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR, dst=img)
    return img


def flip_lr(img: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mirror left-right; ``labels [n, 5]`` (class, x1, y1, x2, y2) pixels follow."""
    width = img.shape[1]
    labels = labels.copy()
    labels[:, [1, 3]] = width - labels[:, [3, 1]]
    return np.ascontiguousarray(img[:, ::-1]), labels


def flip_ud(img: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mirror top-bottom; ``labels [n, 5]`` (class, x1, y1, x2, y2) pixels follow."""
    height = img.shape[0]
    labels = labels.copy()
    labels[:, [2, 4]] = height - labels[:, [4, 2]]
    return np.ascontiguousarray(img[::-1]), labels


def mixup(img1: np.ndarray, labels1: np.ndarray, img2: np.ndarray, labels2: np.ndarray,
          rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Blend two same-sized images with a Beta(32, 32) ratio and keep the boxes of both."""
    rng = rng if rng is not None else np.random.default_rng()
    ratio = rng.beta(MIXUP_BETA, MIXUP_BETA)
    img = cv2.addWeighted(img1, ratio, img2, 1 - ratio, 0.0)
    return img, np.concatenate((labels1, labels2), 0)


def random_erasing(img: np.ndarray, labels: np.ndarray, rng: np.random.Generator | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Fill one random rectangle with noise (cutout); drop boxes it hides by more than 60 %.

    Works in place on ``img``; returns it and the kept ``labels [n, 5]`` (class, xyxy pixels).
    """
    rng = rng if rng is not None else np.random.default_rng()
    height, width = img.shape[:2]
    area = rng.uniform(*ERASE_AREA_RANGE) * height * width
    aspect = math.exp(rng.uniform(-math.log(ERASE_MAX_ASPECT), math.log(ERASE_MAX_ASPECT)))
    eh = int(min(height, round(math.sqrt(area / aspect))))
    ew = int(min(width, round(math.sqrt(area * aspect))))
    if eh < 1 or ew < 1:
        return img, labels
    y1 = int(rng.integers(0, height - eh + 1))
    x1 = int(rng.integers(0, width - ew + 1))
    img[y1:y1 + eh, x1:x1 + ew] = rng.integers(0, 256, (eh, ew, img.shape[2]), dtype=np.uint8)
    if len(labels):
        hidden = box_overlap_fraction(labels[:, 1:5], np.array([x1, y1, x1 + ew, y1 + eh], float))
        labels = labels[hidden < ERASE_HIDE_FRACTION]
    return img, labels


def box_overlap_fraction(boxes: np.ndarray, region: np.ndarray, eps: float = 1e-9) -> np.ndarray:
    """Fraction ``[n]`` of each xyxy box in ``boxes [n, 4]`` covered by one xyxy ``region [4]``."""
    inter_w = (np.minimum(boxes[:, 2], region[2]) - np.maximum(boxes[:, 0], region[0])).clip(0)
    inter_h = (np.minimum(boxes[:, 3], region[3]) - np.maximum(boxes[:, 1], region[1])).clip(0)
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter_w * inter_h / (areas + eps)


def mosaic4(images: list[np.ndarray], labels: list[np.ndarray], size: int,
            rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Tile four images around a random centre of a ``2 * size`` square grey canvas.

    ``images`` are BGR ``[h_i, w_i, 3]`` (at most ``size`` on their long side), ``labels`` their
    ``[n_i, 5]`` (class, x1, y1, x2, y2) pixels. Image 0 goes top-left, 1 top-right, 2
    bottom-left, 3 bottom-right, each touching the centre; what falls off the canvas is cut and
    boxes that lose most of their area are dropped. Returns the ``[2 * size, 2 * size, 3]`` canvas
    and its labels; :func:`random_perspective` with ``out_shape=(size, size)`` then crops it.
    """
    rng = rng if rng is not None else np.random.default_rng()
    canvas_size = 2 * size
    xc, yc = (int(v) for v in rng.uniform(size / 2, 3 * size / 2, 2))
    canvas = np.full((canvas_size, canvas_size, images[0].shape[2]), PAD_VALUE, dtype=np.uint8)
    placed = []
    for k, (img, lab) in enumerate(zip(images, labels)):
        h, w = img.shape[:2]
        # Top-left corner of the tile on the canvas (may be negative: the tile is then cut).
        x0 = xc - w if k in (0, 2) else xc
        y0 = yc - h if k in (0, 1) else yc
        cx1, cy1 = max(x0, 0), max(y0, 0)
        cx2, cy2 = min(x0 + w, canvas_size), min(y0 + h, canvas_size)
        canvas[cy1:cy2, cx1:cx2] = img[cy1 - y0:cy2 - y0, cx1 - x0:cx2 - x0]
        if len(lab):
            shifted = lab.copy()
            shifted[:, [1, 3]] += x0
            shifted[:, [2, 4]] += y0
            placed.append(shifted)
    if not placed:
        return canvas, np.zeros((0, 5), dtype=np.float32)
    out = np.concatenate(placed, 0)
    clipped = out[:, 1:5].copy()
    clipped[:, [0, 2]] = clipped[:, [0, 2]].clip(0, canvas_size)
    clipped[:, [1, 3]] = clipped[:, [1, 3]].clip(0, canvas_size)
    keep = box_candidates(out[:, 1:5], clipped)
    return canvas, np.concatenate((out[keep, :1], clipped[keep]), 1)
