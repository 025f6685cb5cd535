"""Geometry of the CPU augmentations: boxes must follow the pixels.

Each test paints one filled rectangle per box, in a colour unique to its class, on a black image;
after the transform the pixels of that colour must lie inside the transformed box, and the box must
be tight around them (IoU with their bounding box > 0.9 when there is no rotation).
"""

import numpy as np
import pytest

from utils.data import augment as aug

COLORS = np.array([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255),
                   (0, 255, 255), (255, 255, 255), (128, 0, 255)], dtype=np.uint8)
COLOR_TOL = 40  # how far a pixel may be from a shade of its class colour
EDGE_TOL_PX = 1.5  # a blended edge pixel may stick out of the box by this much
MIN_IOU = 0.9


def paint(shape: tuple[int, int], boxes: list[tuple[int, int, int, int]], first_class: int = 0
          ) -> tuple[np.ndarray, np.ndarray]:
    """Black image with one filled rectangle per xyxy box; labels (class, x1, y1, x2, y2)."""
    img = np.zeros((*shape, 3), np.uint8)
    labels = []
    for k, (x1, y1, x2, y2) in enumerate(boxes):
        cls = first_class + k
        img[y1:y2, x1:x2] = COLORS[cls]
        labels.append((cls, x1, y1, x2, y2))
    return img, np.array(labels, dtype=np.float64).reshape(-1, 5)


def color_pixels(img: np.ndarray, cls: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixels at least half covered by the colour of ``cls`` (edges blend it with black)."""
    color = COLORS[cls].astype(float)
    pixels = img.astype(float)
    alpha = pixels @ color / (color @ color)
    residual = np.abs(pixels - alpha[..., None] * color).max(-1)
    ys, xs = np.nonzero((alpha >= 0.5) & (residual < COLOR_TOL))
    return xs, ys


def iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def assert_boxes_follow(img: np.ndarray, labels: np.ndarray, tight: bool = True) -> None:
    assert len(labels), "every box was dropped"
    for cls, x1, y1, x2, y2 in labels:
        xs, ys = color_pixels(img, int(cls))
        assert len(xs), f"class {cls}: no pixels of its colour"
        assert xs.min() >= x1 - EDGE_TOL_PX and xs.max() + 1 <= x2 + EDGE_TOL_PX, (cls, xs.min(), xs.max(), x1, x2)
        assert ys.min() >= y1 - EDGE_TOL_PX and ys.max() + 1 <= y2 + EDGE_TOL_PX, (cls, ys.min(), ys.max(), y1, y2)
        if tight:
            pixel_box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            edges_close = np.abs(np.subtract(pixel_box, (x1, y1, x2, y2))).max() <= EDGE_TOL_PX
            assert edges_close or iou(pixel_box, (x1, y1, x2, y2)) > MIN_IOU, (cls, pixel_box, (x1, y1, x2, y2))


BOXES = [(10, 12, 50, 40), (70, 50, 140, 90), (20, 60, 45, 95)]


@pytest.mark.parametrize("shape,target", [((100, 160), 128), ((160, 100), (96, 128)), ((60, 80), 160)])
def test_letterbox_moves_boxes_with_pixels(shape, target):
    sx, sy = shape[1] / 160, shape[0] / 100
    boxes = [(int(x1 * sx), int(y1 * sy), int(x2 * sx), int(y2 * sy)) for x1, y1, x2, y2 in BOXES]
    img, labels = paint(shape, boxes)
    out, (rw, rh), (pw, ph) = aug.letterbox(img, target)
    expect = (target, target) if isinstance(target, int) else target
    assert out.shape[:2] == expect
    moved = labels.copy()
    moved[:, [1, 3]] = moved[:, [1, 3]] * rw + pw
    moved[:, [2, 4]] = moved[:, [2, 4]] * rh + ph
    assert_boxes_follow(out, moved)
    # The padding is grey and lies outside the resized image.
    if pw >= 1:
        assert (out[:, 0] == aug.PAD_VALUE).all()
    if ph >= 1:
        assert (out[0] == aug.PAD_VALUE).all()


def test_letterbox_auto_pads_to_stride_multiple():
    img = np.zeros((100, 160, 3), np.uint8)
    out, _, _ = aug.letterbox(img, 160, auto=True, stride=32)
    assert out.shape[1] == 160 and out.shape[0] % 32 == 0 and out.shape[0] < 160


@pytest.mark.parametrize("seed", range(4))
def test_affine_without_rotation_is_tight(seed):
    img, labels = paint((128, 160), BOXES)
    out, moved = aug.random_perspective(img, labels, degrees=0, translate=0.1, scale=0.4,
                                        rng=np.random.default_rng(seed))
    assert out.shape == img.shape
    assert_boxes_follow(out, moved)


@pytest.mark.parametrize("seed", range(3))
def test_rotation_shear_perspective_boxes_contain_pixels(seed):
    img, labels = paint((128, 160), BOXES)
    out, moved = aug.random_perspective(img, labels, degrees=30, translate=0.05, scale=0.2, shear=5,
                                        perspective=0.0005, rng=np.random.default_rng(seed))
    assert_boxes_follow(out, moved, tight=False)


def test_affine_drops_boxes_pushed_out_of_the_image():
    box_area = 20 * 20
    drops = 0
    for seed in range(12):
        img, labels = paint((128, 128), [(2, 2, 22, 22), (54, 54, 74, 74)])
        out, moved = aug.random_perspective(img, labels, translate=0.45, rng=np.random.default_rng(seed))
        kept = set(moved[:, 0].astype(int).tolist())
        drops += 2 - len(kept)
        for cls in range(2):
            visible = len(color_pixels(out, cls)[0])
            if visible > 0.5 * box_area:
                assert cls in kept, "a mostly visible box was dropped"
            if visible < 0.05 * box_area:
                assert cls not in kept, "a box pushed out of the image was kept"
        if len(moved):
            assert_boxes_follow(out, moved)
    assert drops > 0


def test_flips_are_exact():
    img, labels = paint((96, 160), BOXES[:2])
    out, moved = aug.flip_lr(img, labels)
    assert_boxes_follow(out, moved)
    assert moved[0, 1] == 160 - 50 and moved[0, 3] == 160 - 10
    out, moved = aug.flip_ud(img, labels)
    assert_boxes_follow(out, moved)
    assert moved[0, 2] == 96 - 40 and moved[0, 4] == 96 - 12


@pytest.mark.parametrize("seed", range(4))
def test_mosaic_then_crop_keeps_boxes_on_their_pixels(seed):
    rng = np.random.default_rng(seed)
    size = 128
    images, labels = [], []
    for k in range(4):
        img, lab = paint((96, 128), [(10 + 5 * k, 10, 60, 50), (70, 40 + 3 * k, 120, 90)], first_class=2 * k)
        images.append(img)
        labels.append(lab)
    canvas, lab = aug.mosaic4(images, labels, size, rng)
    assert canvas.shape == (2 * size, 2 * size, 3)
    assert_boxes_follow(canvas, lab)
    out, moved = aug.random_perspective(canvas, lab, translate=0.1, scale=0.0, out_shape=(size, size), rng=rng)
    assert out.shape == (size, size, 3)
    assert_boxes_follow(out, moved)
    # No colour that is still mostly visible may have lost its label.
    kept = set(moved[:, 0].astype(int).tolist())
    for cls in range(8):
        xs, _ = color_pixels(out, cls)
        if len(xs) > 0.5 * 40 * 40:
            assert cls in kept


def test_mixup_keeps_both_label_sets_and_blends():
    img1, lab1 = paint((64, 64), [(5, 5, 30, 30)])
    img2, lab2 = paint((64, 64), [(35, 35, 60, 60)], first_class=1)
    out, lab = aug.mixup(img1, lab1, img2, lab2, np.random.default_rng(0))
    assert np.array_equal(lab, np.concatenate((lab1, lab2)))
    # Both rectangles are visible at about half strength; the background stays black.
    assert 80 < out[10, 10, 0] < 175 and 80 < out[50, 50, 1] < 175
    assert out[2, 60].max() == 0


def test_random_erasing_drops_hidden_boxes_only():
    for seed in range(10):
        img, labels = paint((96, 96), [(x, y, x + 12, y + 12) for x in (4, 40, 76) for y in (4, 40)])
        labels[:, 0] = 0
        before = img.copy()
        out, kept = aug.random_erasing(img, labels, np.random.default_rng(seed))
        ys, xs = np.nonzero((out != before).any(-1))
        region = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], float)
        hidden = aug.box_overlap_fraction(labels[:, 1:], region)
        # Noise may equal the old pixel at the region's rim: allow a pixel of slack in the estimate.
        for box, frac in zip(labels[:, 1:], hidden):
            is_kept = any(np.array_equal(box, k) for k in kept[:, 1:])
            if frac < aug.ERASE_HIDE_FRACTION - 0.1:
                assert is_kept
            elif frac > aug.ERASE_HIDE_FRACTION + 0.1:
                assert not is_kept


def test_hsv_changes_colours_not_boxes():
    img, _ = paint((32, 32), [(4, 4, 20, 20)])
    img[:] += 60
    original = img.copy()
    aug.augment_hsv(img, 0.0, 0.0, 0.0, np.random.default_rng(0))
    assert np.array_equal(img, original)
    aug.augment_hsv(img, 0.015, 0.7, 0.4, np.random.default_rng(1))
    assert not np.array_equal(img, original)
    assert img.dtype == np.uint8 and img.shape == original.shape


def test_box_candidates_rules():
    before = np.array([[0, 0, 20, 20], [0, 0, 20, 20], [0, 0, 20, 20], [0, 0, 400, 4]], float)
    after = np.array([[0, 0, 20, 20], [0, 0, 20, 1.5], [0, 0, 5, 5], [0, 0, 400, 3]], float)
    assert aug.box_candidates(before, after).tolist() == [True, False, False, False]
