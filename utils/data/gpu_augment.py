"""Batched training augmentation on the device: mosaic, random perspective, mixup, HSV, flips.

With ``create_dataloader(..., gpu_augment=True)`` the loader only letterboxes each image and hands
over ``uint8`` batches; :class:`GPUAugment` then augments the whole batch with a few tensor ops on
the images' device, so the CPU stops being the limit of the training loop.

Geometry convention: continuous pixel coordinates, pixel ``i`` covers ``[i, i + 1)`` and its centre
is ``i + 0.5``. Box edges lie on pixel boundaries in the same frame, so one 3x3 matrix moves image
content and box corners alike and a filled rectangle stays inside its transformed box.

Every random number is drawn on the CPU from one ``torch.Generator``: a seed gives the same choices
on any device, and the per-pixel work runs where the images are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from utils.core.errors import UserError
from utils.data.augment import MAX_ASPECT_RATIO, MIN_AREA_FRACTION, MIN_BOX_PX, PAD_VALUE

# The grey border and the candidate-filter thresholds come from the CPU path (utils/data/augment.py)
# so that both paths keep and drop the same boxes.
FILL_VALUE = PAD_VALUE / 255
BOX_EPS = 1e-16
MIXUP_BETA = 32  # mixup ratio ~ Beta(32, 32); an integer so Gamma(32) = sum of 32 Exp(1) draws
PERSPECTIVE_MIN_W = 1e-6  # homogeneous w below this means the point went behind the camera
OUTSIDE = -2.0  # normalised grid coordinate that samples nothing (zeros padding)

GEOMETRY_KEYS = ("degrees", "translate", "scale", "shear", "perspective")
COLOUR_KEYS = ("hsv_h", "hsv_s", "hsv_v")
PROBABILITY_KEYS = ("mosaic", "mixup", "flipud", "fliplr")
AUGMENT_KEYS = GEOMETRY_KEYS + COLOUR_KEYS + PROBABILITY_KEYS

# Columns of the one uniform [0, 1) draw per image, in a fixed order so that seeds reproduce.
_U_MOSAIC, _U_CX, _U_CY, _U_PX, _U_PY, _U_ANGLE, _U_SCALE, _U_SHX, _U_SHY, _U_TX, _U_TY = range(11)
_U_MIX, _U_H, _U_S, _U_V, _U_FLIPUD, _U_FLIPLR = range(11, 17)
_NUM_UNIFORMS = 17


@dataclass
class AugmentParams:
    """The random choices for one batch of ``B`` images (CPU tensors).

    matrix:      ``Tensor[B, 3, 3]`` float64, canvas pixels -> output pixels (homography).
    scale:       ``Tensor[B]`` float64, the scale factor inside ``matrix`` (area-ratio filter).
    mosaic:      ``Tensor[B]`` bool; a mosaic canvas is ``2S x 2S``, otherwise the input image.
    centre:      ``Tensor[B, 2]`` float64 mosaic centre (xc, yc) on the canvas in pixels.
    tiles:       ``Tensor[B, 4]`` long, batch index of the image in each canvas quadrant
                 (top-left, top-right, bottom-left, bottom-right); only [:, 0] is used without mosaic.
    mix_partner: ``Tensor[B]`` long, the batch image blended in by mixup, -1 for none.
    mix_ratio:   ``Tensor[B]`` float64, weight of the image itself in the blend.
    hsv_gain:    ``Tensor[B, 3]`` float64 multiplicative gains on hue, saturation, value.
    flip_lr, flip_ud: ``Tensor[B]`` bool.
    """

    matrix: torch.Tensor
    scale: torch.Tensor
    mosaic: torch.Tensor
    centre: torch.Tensor
    tiles: torch.Tensor
    mix_partner: torch.Tensor
    mix_ratio: torch.Tensor
    hsv_gain: torch.Tensor
    flip_lr: torch.Tensor
    flip_ud: torch.Tensor

    @classmethod
    def identity(cls, batch_size: int, height: int, width: int) -> AugmentParams:
        """Parameters that change nothing (for ``height == width == img_size``); edit to test."""
        b = batch_size
        zeros = torch.zeros(b, dtype=torch.float64)
        return cls(
            matrix=torch.eye(3, dtype=torch.float64).repeat(b, 1, 1),
            scale=torch.ones(b, dtype=torch.float64),
            mosaic=torch.zeros(b, dtype=torch.bool),
            centre=torch.tensor([float(width), float(height)], dtype=torch.float64).repeat(b, 1),
            tiles=torch.arange(b).view(b, 1).repeat(1, 4),
            mix_partner=torch.full((b,), -1, dtype=torch.long),
            mix_ratio=zeros + 1,
            hsv_gain=torch.ones(b, 3, dtype=torch.float64),
            flip_lr=torch.zeros(b, dtype=torch.bool),
            flip_ud=torch.zeros(b, dtype=torch.bool),
        )


def perspective_matrix(canvas_wh: torch.Tensor, out_size: int, angle_deg: torch.Tensor,
                       scale: torch.Tensor, shear_deg: torch.Tensor, perspective: torch.Tensor,
                       translate: torch.Tensor) -> torch.Tensor:
    """Compose the YOLO random-perspective matrix for ``B`` images.

    ``canvas_wh [B, 2]`` canvas size in px; ``angle_deg [B]`` rotation (counter-clockwise on screen);
    ``scale [B]``; ``shear_deg [B, 2]`` (x, y); ``perspective [B, 2]`` (x, y) coefficients;
    ``translate [B, 2]`` where the canvas centre lands, as a fraction of ``out_size``
    (0.5 = centred). Order: centre the canvas, perspective, rotate + scale, shear, translate.
    Returns ``Tensor[B, 3, 3]`` float64 mapping canvas px to output px.
    """
    b = canvas_wh.shape[0]
    eye = torch.eye(3, dtype=torch.float64).repeat(b, 1, 1)
    centre, persp, rot, shear, shift = eye.clone(), eye.clone(), eye.clone(), eye.clone(), eye.clone()
    centre[:, :2, 2] = -canvas_wh.double() / 2
    persp[:, 2, :2] = perspective.double()
    angle = torch.deg2rad(angle_deg.double())
    cos, sin = scale.double() * torch.cos(angle), scale.double() * torch.sin(angle)
    rot[:, 0, 0], rot[:, 0, 1], rot[:, 1, 0], rot[:, 1, 1] = cos, sin, -sin, cos
    tangent = torch.tan(torch.deg2rad(shear_deg.double()))
    shear[:, 0, 1], shear[:, 1, 0] = tangent[:, 0], tangent[:, 1]
    shift[:, :2, 2] = translate.double() * out_size
    return shift @ shear @ rot @ persp @ centre


def rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    """``Tensor[B, 3, H, W]`` RGB in [0, 1] -> HSV in [0, 1] (hue as a fraction of the circle)."""
    red, green, blue = rgb.unbind(1)
    value, argmax = rgb.max(1)
    delta = value - rgb.min(1).values
    safe_delta = torch.where(delta > 0, delta, torch.ones_like(delta))
    sat = torch.where(value > 0, delta / torch.where(value > 0, value, torch.ones_like(value)),
                      torch.zeros_like(value))
    # Hue sector by the dominant channel, in units of 60 degrees.
    hue = torch.where(argmax == 0, torch.remainder((green - blue) / safe_delta, 6),
                      torch.where(argmax == 1, (blue - red) / safe_delta + 2,
                                  (red - green) / safe_delta + 4))
    hue = torch.where(delta > 0, hue / 6, torch.zeros_like(hue))
    return torch.stack((hue, sat, value), 1)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """``Tensor[B, 3, H, W]`` HSV in [0, 1] -> RGB in [0, 1] (branch-free sector formula)."""
    hue, sat, value = hsv.unbind(1)
    channels = []
    for offset in (5.0, 3.0, 1.0):  # the sector offsets of R, G, B
        k = torch.remainder(offset + hue * 6, 6)
        channels.append(value - value * sat * torch.clamp(torch.minimum(k, 4 - k), 0, 1))
    return torch.stack(channels, 1)


def _hyp_value(hyp: dict, key: str) -> float:
    value = hyp.get(key, 0.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"hyp key '{key}' must be a number, got {value!r} (check the --hyp file)")
    if value < 0:
        raise UserError(f"hyp key '{key}' must not be negative, got {value} (check the --hyp file)")
    if key in PROBABILITY_KEYS and value > 1:
        raise UserError(f"hyp key '{key}' is a probability and must be at most 1, got {value} "
                        "(check the --hyp file)")
    return float(value)


class GPUAugment:
    """Augment a letterboxed ``uint8`` batch on its device, like the CPU training pipeline.

    Order as on the CPU: mosaic of 4 batch images around a random centre on a ``2S`` canvas (prob
    ``mosaic``) warped back to ``S`` by one random perspective (``degrees``, ``translate``,
    ``scale``, ``shear``, ``perspective``), mixup with another output image of the batch (prob
    ``mixup``, mosaic images only), HSV gains (``hsv_h``, ``hsv_s``, ``hsv_v``), flips (``flipud``,
    ``fliplr``). Keys use the YOLOv9 hyp names; a missing key means that augmentation is off.

    Args:
        hyp: hyper-parameter dict (e.g. ``hyp/hyp.scratch-high.yaml``).
        img_size: output side ``S`` in pixels.
        seed: seed of the CPU generator that draws every random choice.
    """

    def __init__(self, hyp: dict, img_size: int, seed: int = 0) -> None:
        if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size <= 0:
            raise UserError(f"--img must be a positive integer, got {img_size!r}")
        self.img_size = img_size
        self.gains = {key: _hyp_value(hyp, key) for key in AUGMENT_KEYS}
        self.mosaic_enabled = True
        self.generator = torch.Generator().manual_seed(seed)

    def close_mosaic(self) -> None:
        """Switch mosaic and mixup off for the remaining epochs (the ``--close-mosaic`` phase)."""
        self.mosaic_enabled = False

    def __call__(self, imgs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment a batch.

        Args:
            imgs: ``uint8 Tensor[B, 3, H, W]`` RGB on any device (letterboxed, normally H = W = S).
            targets: ``Tensor[N, 6]`` (batch index, class, cx, cy, w, h) normalised to H, W.

        Returns:
            ``float32 Tensor[B, 3, S, S]`` in [0, 1] on the images' device and ``Tensor[N', 6]``
            in the same layout normalised to S, on the same device, sorted by batch index.
        """
        _check_inputs(imgs, targets)
        params = self.sample(imgs.shape[0], imgs.shape[2], imgs.shape[3])
        return self.apply(imgs, targets, params)

    def sample(self, batch_size: int, height: int, width: int) -> AugmentParams:
        """Draw the random choices for a batch of ``batch_size`` images of ``height x width``."""
        b, s, g = batch_size, self.img_size, self.gains
        gen = self.generator
        u = torch.rand(b, _NUM_UNIFORMS, generator=gen, dtype=torch.float64)
        tile_pick = torch.randint(0, b, (b, 4), generator=gen)
        tile_order = torch.rand(b, 4, generator=gen).argsort(1)
        partner_step = torch.randint(1, max(b, 2), (b,), generator=gen)
        exponentials = -torch.log1p(-torch.rand(b, 2, MIXUP_BETA, generator=gen, dtype=torch.float64))

        def symmetric(col: int, gain: float) -> torch.Tensor:  # uniform in [-gain, gain]
            return (u[:, col] * 2 - 1) * gain

        mosaic_p = g["mosaic"] if self.mosaic_enabled else 0.0
        mosaic = u[:, _U_MOSAIC] < mosaic_p
        # The centre of a mosaic lies in the middle half of the 2S canvas, as on the CPU path.
        centre = torch.stack((u[:, _U_CX], u[:, _U_CY]), 1) * s + s / 2
        own = torch.tensor([float(width), float(height)], dtype=torch.float64)
        centre = torch.where(mosaic[:, None], centre, own)
        canvas = torch.where(mosaic[:, None], torch.full((b, 2), 2.0 * s, dtype=torch.float64), own)

        # The batch image itself takes one of the 4 quadrants at random, 3 random images the rest.
        tile_pick[:, 0] = torch.arange(b)
        tiles = torch.gather(tile_pick, 1, tile_order)
        tiles = torch.where(mosaic[:, None], tiles, torch.arange(b)[:, None].expand(b, 4))

        scale = 1 + symmetric(_U_SCALE, g["scale"])
        matrix = perspective_matrix(
            canvas, s, symmetric(_U_ANGLE, g["degrees"]), scale,
            torch.stack((symmetric(_U_SHX, g["shear"]), symmetric(_U_SHY, g["shear"])), 1),
            torch.stack((symmetric(_U_PX, g["perspective"]), symmetric(_U_PY, g["perspective"])), 1),
            0.5 + torch.stack((symmetric(_U_TX, g["translate"]), symmetric(_U_TY, g["translate"])), 1))

        mixup_p = g["mixup"] if self.mosaic_enabled else 0.0
        mix = mosaic & (u[:, _U_MIX] < mixup_p)
        if b < 2:
            mix[:] = False  # a batch of one has no partner to blend with
        partner = torch.where(mix, (torch.arange(b) + partner_step) % b, torch.full_like(mix, -1, dtype=torch.long))
        gammas = exponentials.sum(2)  # two Gamma(MIXUP_BETA, 1) draws per image
        ratio = torch.where(mix, gammas[:, 0] / gammas.sum(1), torch.ones(b, dtype=torch.float64))

        hsv_gain = torch.stack([symmetric(col, g[key]) for col, key in
                                ((_U_H, "hsv_h"), (_U_S, "hsv_s"), (_U_V, "hsv_v"))], 1) + 1
        return AugmentParams(matrix=matrix, scale=scale, mosaic=mosaic, centre=centre, tiles=tiles,
                             mix_partner=partner, mix_ratio=ratio, hsv_gain=hsv_gain,
                             flip_lr=u[:, _U_FLIPLR] < g["fliplr"], flip_ud=u[:, _U_FLIPUD] < g["flipud"])

    def apply(self, imgs: torch.Tensor, targets: torch.Tensor,
              params: AugmentParams) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply given choices (see :meth:`__call__` for shapes); deterministic."""
        _check_inputs(imgs, targets)
        device = imgs.device
        params = AugmentParams(**{name: value.cpu() for name, value in vars(params).items()})
        columns = _device_columns(params, device)
        out = self._warp(imgs, params, columns)
        boxes, cls, index = transform_boxes(targets.detach().cpu().double(), params, imgs.shape[2],
                                            imgs.shape[3], self.img_size)
        out, boxes, cls, index = _mixup(out, boxes, cls, index, params, columns)
        if not torch.all(params.hsv_gain == 1):
            out = _hsv(out, columns["hsv_gain"])
        out, boxes = _flip(out, boxes, index, params, columns, self.img_size)
        out = out.clamp_(0, 1)
        return out, _copy_to(_to_targets(boxes, cls, index, self.img_size), device)

    def _warp(self, imgs: torch.Tensor, params: AugmentParams, columns: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mosaic + perspective for the whole batch with one ``grid_sample`` -> ``[B, 3, S, S]``."""
        b, _, h, w = imgs.shape
        s = self.img_size
        identity = torch.eye(3, dtype=torch.float64)
        if h == w == s and not params.mosaic.any() and torch.equal(params.matrix, identity.expand_as(params.matrix)):
            return imgs.float().div_(255)  # nothing to resample: keep the input exact
        device = imgs.device
        side = 2 if params.mosaic.any() else 1
        # The 4 tiles of each canvas side by side in one atlas per output image: one grid_sample
        # then serves the whole batch. Fill is 0 after subtracting it, which zeros padding gives.
        shifted = imgs.float().div_(255).sub_(FILL_VALUE)
        tiles = columns["tiles"][:, :side * side].long()
        atlas = shifted[tiles.reshape(-1)].view(b, side, side, 3, h, w)
        atlas = atlas.permute(0, 3, 1, 4, 2, 5).reshape(b, 3, side * h, side * w)

        # Output pixel centres -> canvas px. Element-wise products rather than a matmul, because a
        # matmul may run in TF32 on CUDA and lose half a pixel at 1280 px.
        inverse = columns["inverse"].view(b, 9, 1)
        centres = torch.arange(s, device=device, dtype=torch.float32) + 0.5
        grid_y, grid_x = torch.meshgrid(centres, centres, indexing="ij")
        px, py = grid_x.reshape(1, s * s), grid_y.reshape(1, s * s)
        m = inverse.unbind(1)
        w_h = m[6] * px + m[7] * py + m[8]
        safe_w = torch.where(w_h.abs() > PERSPECTIVE_MIN_W, w_h, torch.ones_like(w_h))
        u = (m[0] * px + m[1] * py + m[2]) / safe_w
        v = (m[3] * px + m[4] * py + m[5]) / safe_w

        centre = columns["centre"]
        mosaic = columns["mosaic"] > 0
        canvas_w = torch.where(mosaic, 2.0 * s, float(w))
        canvas_h = torch.where(mosaic, 2.0 * s, float(h))
        right = (u >= centre[:, :1]).float()
        below = (v >= centre[:, 1:]).float()
        local_x = u - (centre[:, :1] - w + right * w)  # position inside the tile of that quadrant
        local_y = v - (centre[:, 1:] - h + below * h)
        valid = ((w_h > PERSPECTIVE_MIN_W) & (u >= 0) & (v >= 0) & (u < canvas_w) & (v < canvas_h)
                 & (local_x >= 0) & (local_y >= 0) & (local_x <= w) & (local_y <= h))
        # Clamped to the outer pixel centres so that a seam never blends two tiles of the atlas.
        atlas_x = local_x.clamp(0.5, w - 0.5) + right * w
        atlas_y = local_y.clamp(0.5, h - 0.5) + below * h
        grid = torch.stack((atlas_x * (2 / atlas.shape[3]) - 1, atlas_y * (2 / atlas.shape[2]) - 1), -1)
        grid = torch.where(valid[..., None], grid, torch.full_like(grid, OUTSIDE)).view(b, s, s, 2)
        out = F.grid_sample(atlas, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return out.add_(FILL_VALUE)


def transform_boxes(targets: torch.Tensor, params: AugmentParams, height: int, width: int,
                    img_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Move the labels of every tile into its output image and filter them like the CPU path.

    ``targets [N, 6]`` (batch index, class, cx, cy, w, h) normalised to ``height, width``.
    Returns ``boxes [M, 4]`` xyxy output px clipped to ``[0, img_size]``, ``cls [M]`` and the output
    batch index ``[M]`` (all float64 / long on the CPU).
    """
    b = params.tiles.shape[0]
    src = targets[:, 0].long()
    order = torch.argsort(src, stable=True)
    targets, src = targets[order], src[order]
    counts = torch.bincount(src, minlength=b)
    first = torch.cumsum(counts, 0) - counts

    # One slot per (output image, quadrant) that shows a tile; a slot repeats its tile's labels.
    n_tiles = torch.where(params.mosaic, 4, 1)
    slot_img = torch.arange(b).repeat_interleave(4)
    slot_quad = torch.arange(4).repeat(b)
    active = slot_quad < n_tiles.repeat_interleave(4)
    slot_img, slot_quad = slot_img[active], slot_quad[active]
    slot_src = params.tiles[slot_img, slot_quad]
    per_slot = counts[slot_src]
    label_slot = torch.arange(len(slot_img)).repeat_interleave(per_slot)
    slot_start = torch.cumsum(per_slot, 0) - per_slot
    label_idx = first[slot_src[label_slot]] + torch.arange(len(label_slot)) - slot_start[label_slot]
    labels = targets[label_idx]
    out_img = slot_img[label_slot]
    quad = slot_quad[label_slot]

    centre = params.centre[out_img]
    mosaic = params.mosaic[out_img]
    origin_x = centre[:, 0] - width + (quad % 2) * width
    origin_y = centre[:, 1] - height + (quad // 2) * height
    canvas_w = torch.where(mosaic, 2.0 * img_size, float(width))
    canvas_h = torch.where(mosaic, 2.0 * img_size, float(height))
    cx, cy, bw, bh = labels[:, 2] * width, labels[:, 3] * height, labels[:, 4] * width, labels[:, 5] * height
    placed = torch.stack((cx - bw / 2 + origin_x, cy - bh / 2 + origin_y,
                          cx + bw / 2 + origin_x, cy + bh / 2 + origin_y), 1)
    limit = torch.stack((canvas_w, canvas_h, canvas_w, canvas_h), 1)
    clipped = torch.minimum(placed.clamp(min=0), limit)
    # Like the CPU mosaic: a box that the canvas edge cuts down to a sliver is dropped before the warp.
    on_canvas = ~mosaic | _box_candidates(placed, clipped)
    labels, out_img, clipped = labels[on_canvas], out_img[on_canvas], clipped[on_canvas]
    x1, y1, x2, y2 = clipped.unbind(1)

    corners = torch.stack((torch.stack((x1, y1), 1), torch.stack((x2, y1), 1),
                           torch.stack((x1, y2), 1), torch.stack((x2, y2), 1)), 1)  # [M, 4, 2]
    homog = torch.cat((corners, torch.ones_like(corners[..., :1])), -1) @ params.matrix[out_img].transpose(1, 2)
    warped = homog[..., :2] / homog[..., 2:]
    boxes = torch.cat((warped.amin(1), warped.amax(1)), 1).clamp(0, img_size)

    keep = (_box_candidates(clipped * params.scale[out_img, None], boxes)
            & (homog[..., 2] > PERSPECTIVE_MIN_W).all(1))
    return boxes[keep], labels[keep, 1], out_img[keep]


def _box_candidates(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """Mask ``[M]`` of xyxy boxes ``after [M, 4]`` worth keeping; ``before [M, 4]`` already scaled.

    The CPU rule: at least ``MIN_BOX_PX`` wide and high, more than ``MIN_AREA_FRACTION`` of the
    area left, and less elongated than ``MAX_ASPECT_RATIO``.
    """
    old_w, old_h = before[:, 2] - before[:, 0], before[:, 3] - before[:, 1]
    new_w, new_h = after[:, 2] - after[:, 0], after[:, 3] - after[:, 1]
    aspect = torch.maximum(new_w / (new_h + BOX_EPS), new_h / (new_w + BOX_EPS))
    return ((new_w > MIN_BOX_PX) & (new_h > MIN_BOX_PX) & (aspect < MAX_ASPECT_RATIO)
            & (new_w * new_h / (old_w * old_h + BOX_EPS) > MIN_AREA_FRACTION))


def _mixup(out: torch.Tensor, boxes: torch.Tensor, cls: torch.Tensor, index: torch.Tensor,
           params: AugmentParams, columns: dict[str, torch.Tensor]
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Blend each chosen image with its partner's warped image and add the partner's labels."""
    partner = params.mix_partner
    mixed = partner >= 0
    if not mixed.any():
        return out, boxes, cls, index
    ratio = columns["mix_ratio"].view(-1, 1, 1, 1)
    safe_partner = columns["mix_partner"].flatten().long()  # an unmixed image is its own partner
    out = out * ratio + out[safe_partner] * (1 - ratio)  # unmixed images have ratio 1
    # Labels of image p join every image whose partner is p.
    receivers = torch.nonzero(mixed).flatten()
    match = index[None, :] == partner[receivers][:, None]  # [R, M]
    rows, cols = torch.nonzero(match, as_tuple=True)
    return (out, torch.cat((boxes, boxes[cols])), torch.cat((cls, cls[cols])),
            torch.cat((index, receivers[rows])))


def _hsv(out: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    """Scale hue (cyclic), saturation and value per image by ``gain [B, 3]`` -> RGB ``[B, 3, S, S]``."""
    hsv = rgb_to_hsv(out.clamp(0, 1))
    gain = gain.view(-1, 3, 1, 1)
    hue = torch.remainder(hsv[:, 0] * gain[:, 0], 1)
    sat = (hsv[:, 1] * gain[:, 1]).clamp(0, 1)
    value = (hsv[:, 2] * gain[:, 2]).clamp(0, 1)
    return hsv_to_rgb(torch.stack((hue, sat, value), 1))


def _flip(out: torch.Tensor, boxes: torch.Tensor, index: torch.Tensor, params: AugmentParams,
          columns: dict[str, torch.Tensor], img_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Vertical then horizontal flips of the chosen images and of their boxes (xyxy px, ``index``)."""
    for name, dim, x_or_y in (("flip_ud", 2, 1), ("flip_lr", 3, 0)):
        flags = getattr(params, name)
        if not flags.any():
            continue
        out = torch.where(columns[name].view(-1, 1, 1, 1) > 0, out.flip(dim), out)
        hit = flags[index]
        lo, hi = boxes[:, x_or_y].clone(), boxes[:, x_or_y + 2].clone()
        boxes[:, x_or_y] = torch.where(hit, img_size - hi, lo)
        boxes[:, x_or_y + 2] = torch.where(hit, img_size - lo, hi)
    return out, boxes


def _device_columns(params: AugmentParams, device: torch.device) -> dict[str, torch.Tensor]:
    """The per-image numbers the pixel work needs, as float32 ``[B, k]`` tensors on ``device``.

    They travel in one pinned, non-blocking copy: every copy from pageable memory would make the
    host wait for all queued device work (the previous training step) first.
    """
    b = len(params.matrix)
    partner = torch.where(params.mix_partner >= 0, params.mix_partner, torch.arange(b))
    columns = {"inverse": torch.linalg.inv(params.matrix).reshape(b, 9), "centre": params.centre,
               "mosaic": params.mosaic, "tiles": params.tiles, "mix_partner": partner,
               "mix_ratio": params.mix_ratio, "hsv_gain": params.hsv_gain, "flip_ud": params.flip_ud,
               "flip_lr": params.flip_lr}
    flat = [value.reshape(b, -1).double() for value in columns.values()]
    packed = _copy_to(torch.cat(flat, 1).float(), device)
    return dict(zip(columns, packed.split([f.shape[1] for f in flat], 1)))


def _copy_to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` (CPU) on ``device``; through pinned memory and without a host wait for CUDA."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def _to_targets(boxes: torch.Tensor, cls: torch.Tensor, index: torch.Tensor, img_size: int) -> torch.Tensor:
    """xyxy px boxes of output images -> ``float32 Tensor[M, 6]`` sorted by image, normalised."""
    order = torch.argsort(index, stable=True)
    boxes, cls, index = boxes[order], cls[order], index[order]
    xywh = torch.stack(((boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2,
                        boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]), 1) / img_size
    return torch.cat((index[:, None].double(), cls[:, None], xywh.clamp(0, 1)), 1).float()


def _check_inputs(imgs: torch.Tensor, targets: torch.Tensor) -> None:
    if imgs.dtype != torch.uint8 or imgs.ndim != 4 or imgs.shape[1] != 3:
        raise ValueError(f"GPUAugment expects uint8 images [B, 3, H, W], got {imgs.dtype} {tuple(imgs.shape)}")
    if targets.ndim != 2 or targets.shape[1] != 6:
        raise ValueError(f"GPUAugment expects targets [N, 6], got {tuple(targets.shape)}")
