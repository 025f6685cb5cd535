"""Find the images of a split, verify images and YOLO label files, cache the result.

Bad input is normal input here: a corrupt image is skipped, a bad label line is dropped (or
clipped when it is only slightly out of the image), and every problem is reported once with its
file and line and counted in one summary line. Only a split without any usable image is fatal.

Label files follow the images -> labels path rule: ``.../images/a/b.jpg`` is labelled by
``.../labels/a/b.txt`` (the last ``images`` folder of the path is replaced); an image path with
no ``images`` folder is labelled by the ``.txt`` next to it. A row is ``class cx cy w h``
normalised to [0, 1]; a polygon row ``class x1 y1 x2 y2 x3 y3 ...`` becomes its bounding box.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from utils.core.atomic import atomic_write
from utils.core.errors import UserError
from utils.core.log import LOGGER

IMG_FORMATS = frozenset({"bmp", "jpg", "jpeg", "png", "tif", "tiff", "webp", "mpo"})
CACHE_VERSION = 1
CACHE_SUFFIX = ".cache"
MIN_IMAGE_PX = 10  # smaller images are treated as corrupt
COORD_TOLERANCE = 0.05  # corners this far outside [0, 1] are clipped; further out is nonsense
MIN_LABEL_PX = 1.0  # a box narrower or lower than one pixel is degenerate
SILENT_CLIP_PX = 1.0  # a box less than a pixel outside the image is clipped without a report
JPEG_START = b"\xff\xd8"
JPEG_END = b"\xff\xd9"
EXIF_ORIENTATION = 0x0112
TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height
BOX_COLUMNS = 5
MAX_CHECK_THREADS = 8

# Reasons a label row is dropped, in the order the summary lists them.
DROP_REASONS = ("malformed", "out of range", "bad class", "degenerate", "duplicate")


@dataclass
class LabelSet:
    """Verified images of one split and their labels.

    ``im_files`` usable images; ``shapes`` ``int ndarray[n, 2]`` (height, width) as decoded;
    ``labels`` per image ``float32 ndarray[k, 5]`` (class, cx, cy, w, h normalised);
    ``messages`` one line per problem; ``counts`` the numbers of the summary line.
    """

    im_files: list[str]
    shapes: np.ndarray
    labels: list[np.ndarray]
    messages: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)


def list_image_files(source: str | Path | list) -> list[str]:
    """All image paths of ``source``: a folder (searched recursively), a ``.txt`` list of image
    paths (relative ones resolve against the list's folder), one image, or a list of these.
    Returns sorted absolute paths without duplicates; raises ``UserError`` for a missing path."""
    sources = source if isinstance(source, (list, tuple)) else [source]
    files: list[str] = []
    for src in sources:
        p = Path(src).expanduser()
        if p.is_dir():
            files += [str(f.absolute()) for f in p.rglob("*")
                      if f.suffix[1:].lower() in IMG_FORMATS and f.is_file()]
        elif p.is_file() and p.suffix.lower() == ".txt":
            for line in p.read_text(errors="replace").splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    f = Path(line).expanduser()
                    files.append(str(f if f.is_absolute() else (p.parent / f).absolute()))
        elif p.is_file() and p.suffix[1:].lower() in IMG_FORMATS:
            files.append(str(p.absolute()))
        else:
            raise UserError(f"image source '{src}' is neither a folder, an image list .txt nor an image")
    files = sorted({os.path.normpath(f) for f in files if f.rsplit(".", 1)[-1].lower() in IMG_FORMATS})
    return files


def img2label_path(im_file: str) -> str:
    """The label file of an image by the images -> labels rule (see the module docstring)."""
    parts = list(Path(im_file).parts)
    for k in range(len(parts) - 2, -1, -1):
        if parts[k] == "images":
            parts[k] = "labels"
            break
    return str(Path(*parts).with_suffix(".txt"))


def cache_path_for(label_files: list[str]) -> Path:
    """``<common label folder>.cache``, next to the labels (e.g. ``labels/train.cache``)."""
    common = Path(os.path.commonpath([os.path.dirname(f) for f in label_files]))
    return common.with_name(common.name + CACHE_SUFFIX)


def files_hash(im_files: list[str], label_files: list[str], nc: int | None) -> str:
    """Hash of the paths, sizes and modification times of all files, plus ``nc``."""
    digest = hashlib.sha256(f"v{CACHE_VERSION} nc={nc}".encode())
    for f in (*im_files, *label_files):
        try:
            st = os.stat(f)
            digest.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{f}\0missing\n".encode())
    return digest.hexdigest()


def verify_image(im_file: str) -> tuple[tuple[int, int] | None, str]:
    """Check that an image can be read; returns ((height, width) as decoded, '') or (None, why).

    Reads headers only (cheap), except for a JPEG that does not end with its end marker: that
    one is decoded in full, so that a file with trailing data passes and a truncated one does not.
    """
    try:
        with open(im_file, "rb") as fh:
            if fh.read(len(JPEG_START)) == JPEG_START:
                fh.seek(-len(JPEG_END), os.SEEK_END)
                if fh.read() != JPEG_END and not _decodes(im_file):
                    return None, "truncated JPEG (no end marker)"
        with Image.open(im_file) as im:
            width, height = im.size
            fmt = (im.format or "").lower()
            orientation = im.getexif().get(EXIF_ORIENTATION, 1)
        if fmt not in IMG_FORMATS:
            return None, f"unsupported image format '{fmt}'"
        with Image.open(im_file) as im:
            im.verify()
    except UnidentifiedImageError:
        return None, "not an image file (unknown format)"
    except (OSError, SyntaxError, ValueError) as exc:
        return None, f"unreadable image ({type(exc).__name__}: {exc})"
    if width < MIN_IMAGE_PX or height < MIN_IMAGE_PX:
        return None, f"image too small ({width}x{height} px)"
    if orientation in TRANSPOSED_ORIENTATIONS:  # OpenCV applies the EXIF rotation on decode
        width, height = height, width
    return (height, width), ""


def _decodes(im_file: str) -> bool:
    """Whether PIL decodes every pixel of the file (it raises on truncated data)."""
    try:
        with Image.open(im_file) as im:
            im.load()
        return True
    except (OSError, SyntaxError, ValueError):
        return False


def _parse_row(values: list[str]) -> np.ndarray | None:
    """(class, x1, y1, x2, y2) normalised from one row's fields, or None if malformed."""
    try:
        nums = [float(v) for v in values]
    except ValueError:
        return None
    if len(nums) == BOX_COLUMNS:
        cls, cx, cy, w, h = nums
        return np.array([cls, cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
    coords = nums[1:]
    if len(coords) >= 6 and len(coords) % 2 == 0:  # polygon (segment) label
        xs, ys = coords[0::2], coords[1::2]
        return np.array([nums[0], min(xs), min(ys), max(xs), max(ys)])
    return None


def parse_label_file(label_file: str, shape: tuple[int, int], nc: int | None
                     ) -> tuple[np.ndarray, list[str], dict[str, int]]:
    """Read one label file of an image of ``shape`` (height, width).

    Returns ``float32 ndarray[k, 5]`` (class, cx, cy, w, h normalised) of the good rows, one
    message per problem (``file:line: what, dropped``) and the counts per reason (plus
    ``clipped``).
    """
    messages: list[str] = []
    counts = dict.fromkeys((*DROP_REASONS, "clipped"), 0)
    height, width = shape
    rows: list[np.ndarray] = []
    line_numbers: list[int] = []
    with open(label_file, errors="replace") as fh:
        lines = fh.read().splitlines()

    def drop(line_no: int, reason: str, detail: str) -> None:
        counts[reason] += 1
        messages.append(f"{label_file}:{line_no}: {detail}, dropped")

    for line_no, line in enumerate(lines, 1):
        values = line.split()
        if not values:
            continue
        row = _parse_row(values)
        if row is None:
            drop(line_no, "malformed", f"malformed row '{line.strip()[:60]}' (want: class cx cy w h)")
            continue
        cls = row[0]
        if not np.isfinite(cls) or cls != int(cls):
            drop(line_no, "bad class", f"class '{values[0]}' is not an integer")
            continue
        if cls < 0 or (nc is not None and cls >= nc):
            limit = f"[0, {nc - 1}]" if nc is not None else ">= 0"
            drop(line_no, "bad class", f"class {int(cls)} out of range {limit}")
            continue
        box = row[1:]
        if not np.isfinite(box).all() or (box < -COORD_TOLERANCE).any() or (box > 1 + COORD_TOLERANCE).any():
            drop(line_no, "out of range", "coordinates outside the image")
            continue
        clipped = box.clip(0.0, 1.0)  # clipping never widens a box, so checking it is enough
        if (clipped[2] - clipped[0]) * width < MIN_LABEL_PX or (clipped[3] - clipped[1]) * height < MIN_LABEL_PX:
            drop(line_no, "degenerate", "degenerate box (zero width or height)")
            continue
        excess_px = np.abs(clipped - box) * (width, height, width, height)
        if excess_px.max() >= SILENT_CLIP_PX:  # less is rounding in the label file, not worth a line
            counts["clipped"] += 1
            messages.append(f"{label_file}:{line_no}: box up to {excess_px.max():.0f} px outside the image, "
                            "clipped")
        rows.append(np.concatenate(([cls], clipped)))
        line_numbers.append(line_no)

    if not rows:
        return np.zeros((0, BOX_COLUMNS), np.float32), messages, counts
    xyxy = np.stack(rows)
    _, first = np.unique(xyxy, axis=0, return_index=True)
    keep = np.zeros(len(xyxy), bool)
    keep[first] = True
    for k in np.flatnonzero(~keep):
        original = line_numbers[next(j for j in range(k) if (xyxy[j] == xyxy[k]).all())]
        drop(line_numbers[k], "duplicate", f"duplicate of line {original}")
    xyxy = xyxy[keep]
    out = np.empty_like(xyxy)
    out[:, 0] = xyxy[:, 0]
    out[:, 1] = (xyxy[:, 1] + xyxy[:, 3]) / 2
    out[:, 2] = (xyxy[:, 2] + xyxy[:, 4]) / 2
    out[:, 3] = xyxy[:, 3] - xyxy[:, 1]
    out[:, 4] = xyxy[:, 4] - xyxy[:, 2]
    return out.astype(np.float32), messages, counts


def _check_one(args: tuple[str, str, int | None]) -> tuple:
    """Verify one image and its label file (run in a thread pool)."""
    im_file, label_file, nc = args
    shape, why = verify_image(im_file)
    if shape is None:
        return im_file, None, None, [f"{im_file}: {why}, skipped"], {"corrupt": 1}
    if not os.path.isfile(label_file):
        return im_file, shape, np.zeros((0, BOX_COLUMNS), np.float32), [], {"missing": 1}
    try:
        labels, messages, counts = parse_label_file(label_file, shape, nc)
    except OSError as exc:
        return im_file, shape, np.zeros((0, BOX_COLUMNS), np.float32), \
            [f"{label_file}: unreadable label file ({exc}), image used as background"], {"missing": 1}
    return im_file, shape, labels, messages, counts


def check_dataset(im_files: list[str], nc: int | None, workers: int = MAX_CHECK_THREADS) -> LabelSet:
    """Verify every image and label file (no cache)."""
    label_files = [img2label_path(f) for f in im_files]
    totals: dict[str, int] = {}
    good, shapes, labels, messages = [], [], [], []
    threads = max(1, min(workers, MAX_CHECK_THREADS))
    jobs = [(f, lf, nc) for f, lf in zip(im_files, label_files)]
    if threads > 1:
        with ThreadPoolExecutor(threads) as pool:
            results = list(pool.map(_check_one, jobs, chunksize=64))
    else:
        results = [_check_one(job) for job in jobs]
    for im_file, shape, lab, msgs, counts in results:
        messages += msgs
        for key, value in counts.items():
            totals[key] = totals.get(key, 0) + value
        if shape is not None:
            good.append(im_file)
            shapes.append(shape)
            labels.append(lab)
            totals["backgrounds"] = totals.get("backgrounds", 0) + (len(lab) == 0)
    totals["images"] = len(good)
    shape_array = np.array(shapes, dtype=np.int64).reshape(-1, 2)
    return LabelSet(good, shape_array, labels, messages, totals)


def _save_cache(path: Path, digest: str, result: LabelSet) -> None:
    """Write the cache atomically; a folder we may not write to only costs a warning."""
    counts = np.array([len(lab) for lab in result.labels], dtype=np.int64)
    flat = np.concatenate(result.labels, 0) if result.labels else np.zeros((0, BOX_COLUMNS), np.float32)
    arrays = dict(version=np.array(CACHE_VERSION), hash=np.array(digest),
                  im_files=np.array(result.im_files, dtype=str), shapes=result.shapes,
                  label_counts=counts, labels=flat.astype(np.float32),
                  messages=np.array(result.messages, dtype=str), counts=np.array(json.dumps(result.counts)))
    try:
        atomic_write(path, lambda fh: np.savez(fh, **arrays))
    except OSError as exc:
        LOGGER.warning(f"label cache not written to {path} ({exc.strerror or exc}); "
                       "labels will be checked again next time")


def _load_cache(path: Path, digest: str) -> LabelSet | None:
    """The cached result if the file exists and its hash matches, else None."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if int(data["version"]) != CACHE_VERSION or str(data["hash"]) != digest:
                return None
            splits = np.cumsum(data["label_counts"])[:-1]
            labels = np.split(data["labels"], splits) if len(data["label_counts"]) else []
            return LabelSet(data["im_files"].tolist(), data["shapes"], labels,
                            data["messages"].tolist(), json.loads(str(data["counts"])))
    except (OSError, ValueError, KeyError, EOFError):
        return None


def load_labels(im_files: list[str], nc: int | None, prefix: str = "", workers: int = MAX_CHECK_THREADS,
                use_cache: bool = True) -> LabelSet:
    """Verified images and labels of ``im_files``, from the cache when it is still valid.

    Reports each problem once (``LOGGER.warning``) and one summary line; raises ``UserError``
    when no image is usable.
    """
    label_files = [img2label_path(f) for f in im_files]
    cache_file = cache_path_for(label_files) if im_files else None
    digest = files_hash(im_files, label_files, nc)
    result = _load_cache(cache_file, digest) if use_cache and cache_file else None
    from_cache = result is not None
    if result is None:
        result = check_dataset(im_files, nc, workers)
        if use_cache and cache_file and result.im_files:
            _save_cache(cache_file, digest, result)
    for message in result.messages:
        LOGGER.warning(f"{prefix}{message}")
    LOGGER.info(summary_line(result.counts, prefix, from_cache))
    if not result.im_files:
        where = os.path.commonpath(im_files) if im_files else "the data source"
        raise UserError(f"{prefix}no usable image in {where} ({len(im_files)} files, all corrupt)")
    return result


def summary_line(counts: dict[str, int], prefix: str = "", from_cache: bool = False) -> str:
    """One line such as ``train: 200 images, 3 corrupt skipped, 12 labels dropped (5 out of range,
    4 bad class, 3 duplicate), 7 backgrounds (5 without label file)``."""
    dropped = {r: counts.get(r, 0) for r in DROP_REASONS if counts.get(r, 0)}
    parts = [f"{counts.get('images', 0)} images", f"{counts.get('corrupt', 0)} corrupt skipped"]
    detail = f" ({', '.join(f'{n} {r}' for r, n in dropped.items())})" if dropped else ""
    parts.append(f"{sum(dropped.values())} labels dropped{detail}")
    if counts.get("clipped"):
        parts.append(f"{counts['clipped']} boxes clipped")
    backgrounds = f"{counts.get('backgrounds', 0)} backgrounds"
    if counts.get("missing"):
        backgrounds += f" ({counts['missing']} without label file)"
    parts.append(backgrounds)
    source = " (from cache)" if from_cache else ""
    return f"{prefix}{', '.join(parts)}{source}"
