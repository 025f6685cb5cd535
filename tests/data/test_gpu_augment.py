"""GPUAugment: boxes follow the pixels, identity settings are exact, seeds reproduce."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from utils.core.errors import UserError
from utils.data.augment import augment_hsv
from utils.data.gpu_augment import AugmentParams, GPUAugment, perspective_matrix

SIZE = 128
GREY = (114, 114, 114)
# Class k is drawn in COLOURS[k]; saturated and far apart so the nearest colour names a pixel.
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255),
           (255, 255, 255), (0, 0, 0)]
# Two rectangles per image (x1, y1, x2, y2) px in a SIZE image, apart from each other.
RECTS = [(10, 12, 50, 44), (70, 60, 118, 110)]
MIN_IOU = 0.85
MIN_TIGHT_PX = 16  # tightness is only measured on boxes this large (edge pixels are +-0.5 px)
ZERO_HYP = {key: 0.0 for key in ("hsv_h", "hsv_s", "hsv_v", "degrees", "translate", "scale", "shear",
                                  "perspective", "flipud", "fliplr", "mosaic", "mixup")}


def make_batch(batch_size: int = 4, size: int = SIZE) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Grey images with filled rectangles -> (uint8 [B,3,S,S], targets [N,6], {class: (w, h) px})."""
    imgs = torch.tensor(GREY, dtype=torch.uint8).view(1, 3, 1, 1).repeat(batch_size, 1, size, size)
    rows, sizes = [], {}
    for b in range(batch_size):
        for j, (x1, y1, x2, y2) in enumerate(RECTS):
            k = (b * len(RECTS) + j) % len(COLOURS)
            imgs[b, :, y1:y2, x1:x2] = torch.tensor(COLOURS[k], dtype=torch.uint8).view(3, 1, 1)
            rows.append([b, k, (x1 + x2) / 2 / size, (y1 + y2) / 2 / size, (x2 - x1) / size, (y2 - y1) / size])
            sizes[k] = (x2 - x1, y2 - y1)
    return imgs, torch.tensor(rows, dtype=torch.float32), sizes


def colour_labels(out: torch.Tensor) -> torch.Tensor:
    """``[B, S, S]`` long: index into COLOURS of the nearest palette colour, -1 for grey."""
    palette = torch.tensor([GREY] + COLOURS, dtype=torch.float32) / 255
    dist = ((out[:, None] - palette[None, :, :, None, None]) ** 2).sum(2)
    return dist.argmin(1) - 1


def xyxy_px(targets: torch.Tensor, size: int) -> torch.Tensor:
    cx, cy, w, h = (targets[:, 2:6] * size).unbind(1)
    return torch.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), 1)


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    iw = (min(a[2], b[2]) - max(a[0], b[0])).clamp(min=0)
    ih = (min(a[3], b[3]) - max(a[1], b[1])).clamp(min=0)
    inter = iw * ih
    return float(inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter))


def check_boxes(out: torch.Tensor, targets: torch.Tensor, sizes: dict, scale: float = 1.0,
                copies: torch.Tensor | None = None, tight: bool = True) -> int:
    """Every pixel of colour k lies in a box of class k, unless few enough that the candidate
    filter may have dropped it; boxes are tight. ``copies [B, n_classes]`` = how many times each
    rectangle can appear in an output image. Returns the number of boxes checked for tightness."""
    size = out.shape[-1]
    labels = colour_labels(out)
    boxes = xyxy_px(targets, size)
    checked = 0
    for b in range(out.shape[0]):
        for k, (w, h) in sizes.items():
            ys, xs = torch.nonzero(labels[b] == k, as_tuple=True)
            centres_x, centres_y = xs + 0.5, ys + 0.5
            mine = boxes[(targets[:, 0] == b) & (targets[:, 1] == k)]
            inside = torch.zeros(len(xs), dtype=torch.bool)
            for box in mine:
                tol = 1e-3
                hit = ((centres_x >= box[0] - tol) & (centres_x <= box[2] + tol)
                       & (centres_y >= box[1] - tol) & (centres_y <= box[3] + tol))
                inside |= hit
                near = ((centres_x >= box[0] - 1) & (centres_x <= box[2] + 1)
                        & (centres_y >= box[1] - 1) & (centres_y <= box[3] + 1))
                if tight and min(box[2] - box[0], box[3] - box[1]) >= MIN_TIGHT_PX and near.any():
                    pixel_box = torch.stack((xs[near].min(), ys[near].min(), xs[near].max() + 1,
                                             ys[near].max() + 1)).float()
                    assert iou(box, pixel_box) > MIN_IOU, (b, k, box, pixel_box)
                    checked += 1
            # A box the filter dropped leaves at most a sliver or a tenth of its scaled area.
            s = scale
            allowance = max(3 * (max(w, h) * s + 2), 0.1 * w * h * s * s + 2 * (w + h) * s + 4)
            n_copies = 1 if copies is None else int(copies[b, k])
            assert int((~inside).sum()) <= n_copies * allowance, (b, k, int((~inside).sum()))
    return checked


def test_identity_settings_return_the_input_exactly():
    imgs, targets, _ = make_batch()
    for hyp in (ZERO_HYP, {}):
        out, new_targets = GPUAugment(hyp, SIZE)(imgs, targets)
        assert out.dtype == torch.float32 and out.shape == imgs.shape
        assert torch.equal(out, imgs.float() / 255)
        assert torch.equal(new_targets, targets)


def test_flips_move_pixels_and_boxes():
    imgs, targets, sizes = make_batch()
    for key, dim in (("fliplr", 3), ("flipud", 2)):
        out, new_targets = GPUAugment({**ZERO_HYP, key: 1.0}, SIZE)(imgs, targets)
        assert torch.equal(out, imgs.flip(dim).float() / 255)
        col = 2 if key == "fliplr" else 3
        expected = targets.clone()
        expected[:, col] = 1 - targets[:, col]
        assert torch.allclose(new_targets, expected, atol=1e-6)
        assert check_boxes(out, new_targets, sizes) == len(targets)


def test_affine_with_known_parameters():
    imgs, targets, sizes = make_batch(2)
    aug = GPUAugment(ZERO_HYP, SIZE)
    params = AugmentParams.identity(2, SIZE, SIZE)
    scale = torch.tensor([0.75, 1.25], dtype=torch.float64)
    shift = torch.tensor([[0.45, 0.55], [0.6, 0.4]], dtype=torch.float64)
    canvas = torch.full((2, 2), float(SIZE), dtype=torch.float64)
    zeros2 = torch.zeros(2, 2, dtype=torch.float64)
    params.matrix = perspective_matrix(canvas, SIZE, torch.zeros(2, dtype=torch.float64), scale, zeros2,
                                       zeros2, shift)
    params.scale = scale
    out, new_targets = aug.apply(imgs, targets, params)
    # Without rotation a box maps to (corner - S/2) * s + shift * S, clipped to the image.
    before = xyxy_px(targets, SIZE).double()
    img = targets[:, 0].long()
    expected = ((before - SIZE / 2) * scale[img, None] + shift[img].repeat(1, 2) * SIZE).clamp(0, SIZE)
    assert torch.allclose(xyxy_px(new_targets, SIZE).double(), expected, atol=1e-3)
    assert check_boxes(out, new_targets, sizes, scale=0.75) == len(targets)


def _shift_and_scale(batch: int, scale: float, shift_px: tuple[float, float]) -> AugmentParams:
    """Parameters of a plain scale about the image centre plus a shift in pixels."""
    params = AugmentParams.identity(batch, SIZE, SIZE)
    scales = torch.full((batch,), scale, dtype=torch.float64)
    shift = (torch.tensor(shift_px, dtype=torch.float64) / SIZE + 0.5).repeat(batch, 1)
    canvas = torch.full((batch, 2), float(SIZE), dtype=torch.float64)
    zeros2 = torch.zeros(batch, 2, dtype=torch.float64)
    params.matrix = perspective_matrix(canvas, SIZE, torch.zeros(batch, dtype=torch.float64), scales,
                                       zeros2, zeros2, shift)
    params.scale = scales
    return params


def test_pixel_grid_convention_is_exact():
    imgs = torch.randint(0, 256, (1, 3, SIZE, SIZE), dtype=torch.uint8)
    base = imgs.float() / 255
    aug = GPUAugment(ZERO_HYP, SIZE)
    # An integer shift moves pixels without blending them.
    out, _ = aug.apply(imgs, torch.zeros(0, 6), _shift_and_scale(1, 1.0, (3.0, -2.0)))
    assert torch.allclose(out[..., :-2, 3:], base[..., 2:, :-3], atol=1e-5)
    # Half size about the centre: each output pixel centre falls between 2x2 input pixels.
    out, _ = aug.apply(imgs, torch.zeros(0, 6), _shift_and_scale(1, 0.5, (0.0, 0.0)))
    quarter = SIZE // 4
    pooled = torch.nn.functional.avg_pool2d(base, 2)
    assert torch.allclose(out[..., quarter:-quarter, quarter:-quarter], pooled, atol=1e-5)


def test_candidate_filter_drops_boxes_cut_to_slivers():
    imgs, targets, _ = make_batch(1)
    aug = GPUAugment(ZERO_HYP, SIZE)
    # RECTS[0] spans x 10..50: shifted 47 px left only 3 px (7.5 % of it) stay -> dropped.
    _, dropped = aug.apply(imgs, targets, _shift_and_scale(1, 1.0, (-47.0, 0.0)))
    assert len(dropped) == 1 and int(dropped[0, 1]) == 1
    # Shifted 30 px left half of it stays -> kept, clipped at the left edge.
    _, kept = aug.apply(imgs, targets, _shift_and_scale(1, 1.0, (-30.0, 0.0)))
    assert len(kept) == 2
    assert torch.allclose(xyxy_px(kept[:1], SIZE), torch.tensor([[0.0, 12.0, 20.0, 44.0]]), atol=1e-3)


def test_rotation_keeps_rectangles_covered():
    imgs, targets, sizes = make_batch(2)
    aug = GPUAugment(ZERO_HYP, SIZE)
    params = AugmentParams.identity(2, SIZE, SIZE)
    angle = torch.tensor([90.0, 30.0], dtype=torch.float64)
    canvas = torch.full((2, 2), float(SIZE), dtype=torch.float64)
    zeros2 = torch.zeros(2, 2, dtype=torch.float64)
    ones = torch.ones(2, dtype=torch.float64)
    params.matrix = perspective_matrix(canvas, SIZE, angle, ones * 0.8, zeros2, zeros2, zeros2 + 0.5)
    params.scale = ones * 0.8
    out, new_targets = aug.apply(imgs, targets, params)
    # A quarter turn keeps rectangles axis-aligned, so image 0's boxes stay tight; at 30 degrees
    # the enclosing box only has to cover.
    assert check_boxes(out[:1], new_targets[new_targets[:, 0] == 0], sizes, scale=0.8) == 2
    check_boxes(out[1:], new_targets[new_targets[:, 0] == 1] - torch.tensor([1, 0, 0, 0, 0, 0]), sizes,
                scale=0.8, tight=False)
    assert len(new_targets) == len(targets)


def _copies(params: AugmentParams, targets: torch.Tensor, n_classes: int) -> torch.Tensor:
    """How often each class's source image shows in each output image ([B, n_classes])."""
    owner = torch.zeros(n_classes, dtype=torch.long)
    owner[targets[:, 1].long()] = targets[:, 0].long()
    n_tiles = torch.where(params.mosaic, 4, 1)
    copies = torch.zeros(len(params.tiles), n_classes, dtype=torch.long)
    for b in range(len(params.tiles)):
        for q in range(int(n_tiles[b])):
            copies[b] += (owner == params.tiles[b, q]).long()
    return copies


def test_mosaic_boxes_cover_and_are_tight():
    imgs, targets, sizes = make_batch(4)
    hyp = {**ZERO_HYP, "mosaic": 1.0, "translate": 0.1, "scale": 0.25, "fliplr": 0.5}
    aug = GPUAugment(hyp, SIZE, seed=1)
    checked = 0
    for _ in range(3):
        params = aug.sample(4, SIZE, SIZE)
        assert params.mosaic.all()
        out, new_targets = aug.apply(imgs, targets, params)
        assert out.shape == (4, 3, SIZE, SIZE)
        copies = _copies(params, targets, len(COLOURS))
        checked += check_boxes(out, new_targets, sizes, scale=0.75, copies=copies)
    assert checked >= 6  # enough boxes survive the crop to make the tightness test meaningful


def test_mosaic_seams_do_not_show():
    imgs = torch.full((1, 3, SIZE, SIZE), 60, dtype=torch.uint8)
    params = _shift_and_scale(1, 0.8, (0.0, 0.0))
    params.mosaic[:] = True
    params.centre[:] = SIZE * 1.1  # off the canvas centre, so the seams cross the output
    canvas = torch.full((1, 2), 2.0 * SIZE, dtype=torch.float64)
    zeros2 = torch.zeros(1, 2, dtype=torch.float64)
    params.matrix = perspective_matrix(canvas, SIZE, torch.zeros(1, dtype=torch.float64), params.scale,
                                       zeros2, zeros2, zeros2 + 0.5)
    out, _ = GPUAugment(ZERO_HYP, SIZE).apply(imgs, torch.zeros(0, 6), params)
    # The output shows canvas 2S/2 +- 0.5 * S / 0.8, all inside the four tiles: one flat grey.
    assert torch.allclose(out, torch.full_like(out, 60 / 255), atol=1e-6)


def test_full_pipeline_outputs_are_valid_and_seeded():
    imgs, targets, _ = make_batch(4)
    hyp = {**ZERO_HYP, "mosaic": 1.0, "mixup": 0.5, "degrees": 10.0, "translate": 0.1, "scale": 0.5,
           "shear": 2.0, "perspective": 0.0005, "hsv_h": 0.015, "hsv_s": 0.7, "hsv_v": 0.4,
           "fliplr": 0.5, "flipud": 0.5}
    out_a, tgt_a = GPUAugment(hyp, 96, seed=7)(imgs, targets)
    out_b, tgt_b = GPUAugment(hyp, 96, seed=7)(imgs, targets)
    out_c, _ = GPUAugment(hyp, 96, seed=8)(imgs, targets)
    assert torch.equal(out_a, out_b) and torch.equal(tgt_a, tgt_b)
    assert not torch.equal(out_a, out_c)
    assert out_a.dtype == torch.float32 and out_a.shape == (4, 3, 96, 96)
    assert float(out_a.min()) >= 0 and float(out_a.max()) <= 1
    assert tgt_a.dtype == torch.float32 and tgt_a.shape[1] == 6 and len(tgt_a) > 0
    assert torch.all((tgt_a[:, 2:] >= 0) & (tgt_a[:, 2:] <= 1))
    assert torch.all((tgt_a[:, 0] >= 0) & (tgt_a[:, 0] < 4))
    assert torch.equal(tgt_a[:, 0], tgt_a[:, 0].sort().values)
    # Boxes stay inside the image: centre +- half size within [0, 1].
    assert torch.all(tgt_a[:, 2] - tgt_a[:, 4] / 2 >= -1e-6) and torch.all(tgt_a[:, 2] + tgt_a[:, 4] / 2 <= 1 + 1e-6)


def test_mixup_blends_images_and_joins_labels():
    imgs, targets, _ = make_batch(2)
    aug = GPUAugment(ZERO_HYP, SIZE)
    params = AugmentParams.identity(2, SIZE, SIZE)
    params.mix_partner = torch.tensor([1, -1])
    params.mix_ratio = torch.tensor([0.4, 1.0], dtype=torch.float64)
    out, new_targets = aug.apply(imgs, targets, params)
    base = imgs.float() / 255
    assert torch.allclose(out[0], 0.4 * base[0] + 0.6 * base[1], atol=1e-6)
    assert torch.equal(out[1], base[1])
    mixed = new_targets[new_targets[:, 0] == 0, 1:]
    expected = targets[:, 1:]  # image 0 carries its own labels and those of image 1
    assert torch.allclose(mixed.sort(0).values, expected.sort(0).values, atol=1e-6)
    assert torch.allclose(new_targets[new_targets[:, 0] == 1, 1:], targets[targets[:, 0] == 1, 1:], atol=1e-6)


def test_sampled_mixup_adds_partner_labels():
    imgs, targets, _ = make_batch(4)
    aug = GPUAugment({**ZERO_HYP, "mosaic": 1.0, "mixup": 1.0}, SIZE, seed=3)
    params = aug.sample(4, SIZE, SIZE)
    assert torch.all(params.mix_partner >= 0) and torch.all(params.mix_partner != torch.arange(4))
    assert torch.all((params.mix_ratio > 0.2) & (params.mix_ratio < 0.8))  # Beta(32, 32) is narrow
    no_mix = AugmentParams(**{**params.__dict__, "mix_partner": torch.full((4,), -1)})
    _, alone = aug.apply(imgs, targets, no_mix)
    _, joined = aug.apply(imgs, targets, params)
    for b in range(4):
        partner = int(params.mix_partner[b])
        expected = (alone[:, 0] == b).sum() + (alone[:, 0] == partner).sum()
        assert int((joined[:, 0] == b).sum()) == int(expected)


def test_close_mosaic_switches_mosaic_and_mixup_off():
    aug = GPUAugment({**ZERO_HYP, "mosaic": 1.0, "mixup": 1.0}, SIZE)
    assert aug.sample(4, SIZE, SIZE).mosaic.all()
    aug.close_mosaic()
    params = aug.sample(4, SIZE, SIZE)
    assert not params.mosaic.any() and torch.all(params.mix_partner == -1)
    imgs, targets, _ = make_batch(4)
    out, new_targets = aug(imgs, targets)
    assert torch.equal(out, imgs.float() / 255) and torch.equal(new_targets, targets)


def test_hsv_value_gain_scales_rgb():
    imgs = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    params = AugmentParams.identity(2, 32, 32)
    params.hsv_gain = torch.tensor([[1.0, 1.0, 0.6], [1.0, 1.0, 1.5]], dtype=torch.float64)
    out, _ = GPUAugment(ZERO_HYP, 32).apply(imgs, torch.zeros(0, 6), params)
    rgb = imgs.float() / 255
    peak = rgb.amax(1, keepdim=True).clamp(min=1e-6)
    gain = params.hsv_gain[:, 2].float().view(2, 1, 1, 1)
    assert torch.allclose(out, rgb * torch.minimum(gain, 1 / peak), atol=1e-5)


def test_hsv_hue_and_saturation_on_known_colours():
    colours = torch.tensor([[255, 0, 0], [0, 255, 0], [128, 128, 128]], dtype=torch.uint8)
    imgs = colours.t().reshape(1, 3, 3, 1).expand(1, 3, 3, 3).contiguous()  # row r has colour r
    params = AugmentParams.identity(1, 3, 3)
    params.hsv_gain = torch.tensor([[1.5, 0.5, 1.0]], dtype=torch.float64)
    out, _ = GPUAugment(ZERO_HYP, 3).apply(imgs, torch.zeros(0, 6), params)
    # Red: hue 0 stays, half saturation. Green: hue 1/3 -> 1/2 (cyan), half saturation. Grey stays.
    expected = torch.tensor([[1.0, 0.5, 0.5], [0.5, 1.0, 1.0], [128 / 255] * 3])
    assert torch.allclose(out[0, :, :, 0].t(), expected, atol=1e-6)


def test_hsv_matches_the_cpu_path():
    rng = np.random.default_rng(0)
    smooth = cv2.resize(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), (64, 64), interpolation=cv2.INTER_LINEAR)
    hyp = {**ZERO_HYP, "hsv_h": 0.015, "hsv_s": 0.7, "hsv_v": 0.4}
    gains = np.random.default_rng(5).uniform(-1, 1, 3) * (hyp["hsv_h"], hyp["hsv_s"], hyp["hsv_v"]) + 1
    cpu = augment_hsv(smooth[:, :, ::-1].copy(), hyp["hsv_h"], hyp["hsv_s"], hyp["hsv_v"],
                      rng=np.random.default_rng(5))[:, :, ::-1]
    imgs = torch.from_numpy(smooth.copy()).permute(2, 0, 1)[None]
    params = AugmentParams.identity(1, 64, 64)
    params.hsv_gain = torch.from_numpy(gains)[None]
    out, _ = GPUAugment(hyp, 64).apply(imgs, torch.zeros(0, 6), params)
    diff = (out[0].permute(1, 2, 0) * 255 - torch.from_numpy(cpu.copy()).float()).abs()
    # The CPU path quantises H (2-degree steps), S and V to 8 bits; the device path does not.
    assert float(diff.mean()) < 2.0 and float(diff.max()) < 12.0


def test_other_input_size_and_empty_targets():
    imgs = torch.randint(0, 256, (3, 3, 80, 80), dtype=torch.uint8)
    aug = GPUAugment({**ZERO_HYP, "mosaic": 0.5, "scale": 0.5}, 64, seed=2)
    out, new_targets = aug(imgs, torch.zeros(0, 6))
    assert out.shape == (3, 3, 64, 64) and new_targets.shape == (0, 6)
    # A batch of one still makes a mosaic (of itself) but has no mixup partner.
    single, single_targets, _ = make_batch(1)
    lonely = GPUAugment({**ZERO_HYP, "mosaic": 1.0, "mixup": 1.0}, SIZE, seed=2)
    assert torch.all(lonely.sample(1, SIZE, SIZE).mix_partner == -1)
    out, new_targets = lonely(single, single_targets)
    assert out.shape == (1, 3, SIZE, SIZE) and torch.all(new_targets[:, 0] == 0)


def test_bad_settings_raise_user_errors():
    with pytest.raises(UserError, match="mosaic"):
        GPUAugment({"mosaic": 1.5}, SIZE)
    with pytest.raises(UserError, match="scale"):
        GPUAugment({"scale": "big"}, SIZE)
    with pytest.raises(UserError, match="--img"):
        GPUAugment(ZERO_HYP, 0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_and_cuda_agree():
    imgs, targets, _ = make_batch(4)
    hyp = {**ZERO_HYP, "mosaic": 1.0, "mixup": 0.5, "degrees": 10.0, "translate": 0.1, "scale": 0.5,
           "hsv_h": 0.015, "hsv_s": 0.7, "hsv_v": 0.4, "fliplr": 0.5}
    out_cpu, tgt_cpu = GPUAugment(hyp, SIZE, seed=4)(imgs, targets)
    out_gpu, tgt_gpu = GPUAugment(hyp, SIZE, seed=4)(imgs.cuda(), targets.cuda())
    assert out_gpu.is_cuda and tgt_gpu.is_cuda
    assert torch.equal(tgt_cpu, tgt_gpu.cpu())
    diff = (out_cpu - out_gpu.cpu()).abs()
    # Bilinear weights may round differently on the two devices; no pixel may differ visibly.
    assert float((diff > 1e-3).float().mean()) < 1e-4 and float(diff.mean()) < 1e-5
