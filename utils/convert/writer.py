"""What every input format shares: box checks, class order, the deterministic split, the problem
report, and writing the YOLO set (``images/<split>/``, ``labels/<split>/*.txt``, ``data.yaml``).

Boxes arrive in pixels as ``[x1, y1, x2, y2]`` and leave as YOLO rows ``(class, cx, cy, w, h)``
normalised to the image size. A box with zero or negative width or height is reported and dropped;
a box reaching out of the image is clipped to it (reported when it leaves by more than a pixel).
"""

from __future__ import annotations

import os
import random
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from PIL import Image

from utils.core.errors import UserError
from utils.core.log import LOGGER
from utils.data.labels import IMG_FORMATS

SPLITS = ("train", "val", "test")
YAML_HEADER = "# Written by utils.convert"
CLIP_SLACK_PX = 1.0  # VOC corners one pixel past the border are normal (1-based); no report
DEFAULT_VAL_FRACTION = 0.2
DEFAULT_TEST_FRACTION = 0.0
DEFAULT_SEED = 0
CLASSES_FILE = "classes.txt"  # one class name per line, in class-id order
SHOWN_PER_KIND = 20  # problem lines logged per kind; the others are only counted
# Folder names of the split-per-folder exports (Roboflow writes train/, valid/, test/).
SPLIT_DIRS = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
              "test": "test", "testing": "test"}

Row = tuple[int, float, float, float, float]


@dataclass
class Item:
    """One image to write: its source file, its path under ``images/<split>/`` and its YOLO rows."""

    image: Path
    name: str
    rows: list[Row]


class Problems:
    """Problems met while converting: one line each, naming the file, counted by kind."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.kinds: list[str] = []

    def add(self, kind: str, message: str) -> None:
        self.kinds.append(kind)
        self.lines.append(message)

    @property
    def counts(self) -> dict[str, int]:
        return dict(Counter(self.kinds))

    def log(self) -> None:
        """Warn with the first lines of each kind and one count line for the rest."""
        shown: Counter = Counter()
        for kind, line in zip(self.kinds, self.lines):
            shown[kind] += 1
            if shown[kind] <= SHOWN_PER_KIND:
                LOGGER.warning(line)
        for kind, n in self.counts.items():
            if n > SHOWN_PER_KIND:
                LOGGER.warning(f"... {n - SHOWN_PER_KIND} more of '{kind}' not shown ({n} in all)")


@dataclass
class ConversionResult:
    """What a conversion wrote: the data.yaml, images per split, boxes, classes and problems.

    ``problems`` holds one line per problem (file named), ``problem_counts`` their number per kind,
    ``notes`` what the log said about the choices made (layout, split, class order).
    """

    yaml_file: Path
    images: dict[str, int]
    boxes: int
    names: list[str]
    problems: list[str] = field(default_factory=list)
    problem_counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def note(notes: list[str], message: str) -> None:
    """Log an informative line and keep it for the result."""
    LOGGER.info(message)
    notes.append(message)


def image_size(path: Path) -> tuple[float, float]:
    """(width, height) from the image header (no decoding)."""
    with Image.open(path) as im:
        return float(im.size[0]), float(im.size[1])


def is_image(path: Path) -> bool:
    return path.suffix[1:].lower() in IMG_FORMATS and path.is_file()


def to_yolo_row(cls: int, box: list[float], width: float, height: float) -> Row:
    x1, y1, x2, y2 = box
    return cls, (x1 + x2) / 2 / width, (y1 + y2) / 2 / height, (x2 - x1) / width, (y2 - y1) / height


def check_box(box: list[float], width: float, height: float, where: str, problems: Problems
              ) -> list[float] | None:
    """Drop a degenerate xyxy box (reported), clip one that leaves the image."""
    x1, y1, x2, y2 = box
    if not (x2 > x1 and y2 > y1):
        problems.add("degenerate box", f"{where}: degenerate box (x1={x1:g}, y1={y1:g}, x2={x2:g}, "
                                       f"y2={y2:g}), dropped")
        return None
    clipped = [min(max(x1, 0.0), width), min(max(y1, 0.0), height),
               min(max(x2, 0.0), width), min(max(y2, 0.0), height)]
    if max(abs(a - b) for a, b in zip(box, clipped)) > CLIP_SLACK_PX:
        problems.add("box outside the image", f"{where}: box (x1={x1:g}, y1={y1:g}, x2={x2:g}, y2={y2:g}) "
                                              f"outside the {width:g}x{height:g} image, clipped")
    if not (clipped[2] > clipped[0] and clipped[3] > clipped[1]):
        problems.add("box outside the image", f"{where}: box lies outside the image, dropped")
        return None
    return clipped


def parse_names(names: str | None) -> list[str] | None:
    """``--names``: a comma-separated list or a text file with one name per line."""
    if not names:
        return None
    if Path(names).is_file():
        return read_names_file(Path(names))
    return [n.strip() for n in names.split(",") if n.strip()]


def read_names_file(path: Path) -> list[str]:
    names = [n.strip() for n in path.read_text().splitlines() if n.strip()]
    if not names:
        raise UserError(f"{path} lists no class name")
    if len(set(names)) != len(names):
        raise UserError(f"{path} lists a class name twice")
    return names


def class_order(given: list[str] | None, src: Path, found: set[str], notes: list[str]) -> list[str]:
    """The class list: ``given`` (``--names``), else ``src/classes.txt``, else the names found, sorted."""
    if given:
        if len(set(given)) != len(given):
            raise UserError(f"--names lists a class twice: {', '.join(given)}")
        note(notes, f"class order as given (--names or the data.yaml): {', '.join(given)}")
        return list(given)
    listed = src / CLASSES_FILE if src.is_dir() else src.parent / CLASSES_FILE
    if listed.is_file():
        names = read_names_file(listed)
        note(notes, f"class order from {listed}: {', '.join(names)}")
        return names
    if not found:
        raise UserError(f"{src}: no labelled object found, and no --names given")
    names = sorted(found)
    note(notes, f"class order: sorted names found ({', '.join(names)}); give --names to choose another")
    return names


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise UserError(f"--val-fraction {val_fraction} and --test-fraction {test_fraction} must each lie in "
                        f"[0, 1) and leave images for train")


def random_split(keys: list[str], val_fraction: float, test_fraction: float, seed: int
                 ) -> dict[str, list[str]]:
    """A deterministic split of ``keys``: sorted, shuffled by ``seed``, then cut into val, test, train.

    ``round(n * fraction)`` images go to val and to test (at least one when the fraction is above
    zero and two or more images remain for train); the same keys and seed give the same split.
    """
    check_fractions(val_fraction, test_fraction)
    order = sorted(keys)
    random.Random(seed).shuffle(order)

    def size(fraction: float) -> int:
        return max(1, round(len(order) * fraction)) if fraction > 0 and len(order) > 2 else 0

    n_val, n_test = size(val_fraction), size(test_fraction)
    if n_val + n_test >= len(order):
        n_val, n_test = min(n_val, len(order) - 1), 0
    split = {"train": order[n_val + n_test:], "val": order[:n_val], "test": order[n_val:n_val + n_test]}
    return {s: sorted(split[s]) for s in SPLITS if split[s] or s == "train"}


def assign_splits(split_of: dict[str, str | None], val_fraction: float, test_fraction: float, seed: int,
                  notes: list[str]) -> dict[str, list[str]]:
    """Keys per split: the layout's split where it gives one, a deterministic split for the rest.

    A layout that gives train but no val (a Roboflow export without a valid/ folder) has val carved
    out of train by ``val_fraction``; every such choice is logged.
    """
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    loose = sorted(k for k, s in split_of.items() if s is None)
    for key, split in split_of.items():
        if split is not None:
            out[split].append(key)
    if loose:
        parts = random_split(loose, val_fraction, test_fraction, seed)
        for split, keys in parts.items():
            out[split] += keys
        note(notes, f"no split files: {len(loose)} images split by seed {seed} into "
                    f"{', '.join(f'{len(parts.get(s, []))} {s}' for s in SPLITS)} "
                    f"(--val-fraction {val_fraction:g}, --test-fraction {test_fraction:g})")
    elif out["train"] and not out["val"] and val_fraction > 0:
        parts = random_split(out["train"], val_fraction, 0.0, seed)
        out["train"], out["val"] = parts["train"], parts.get("val", [])
        note(notes, f"no val split: {len(out['val'])} of the train images moved to val by seed {seed} "
                    f"(--val-fraction {val_fraction:g})")
    return {s: keys for s, keys in out.items() if keys}


def split_keys(images: list[Path], src: Path) -> list[str]:
    """Keys for the deterministic split: the image file names (the split then does not depend on where
    the export lies or how its folders are spelled), paths below ``src`` where two names clash."""
    counts = Counter(p.name for p in images)
    return [p.name if counts[p.name] == 1 else os.path.relpath(p, src) for p in images]


def _place_image(src: Path, dst: Path, copy: bool) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_symlink() or dst.exists():
        dst.unlink()
    if not copy:
        try:
            os.symlink(src.resolve(), dst)
            return
        except OSError as exc:
            LOGGER.warning(f"cannot symlink {dst} ({exc.strerror}); copying instead")
    shutil.copy2(src, dst)


def written_by_us(dst: Path) -> bool:
    yaml_file = dst / "data.yaml"
    return yaml_file.is_file() and yaml_file.read_text().startswith(YAML_HEADER)


def _prepare(dst: Path, splits: list[str]) -> None:
    """Empty the split folders of an earlier conversion; refuse to touch anything else."""
    ours = written_by_us(dst)
    for split in splits:
        for sub in (dst / "images" / split, dst / "labels" / split):
            if sub.exists() and any(sub.iterdir()):
                if not ours:
                    raise UserError(f"{sub} is not empty and was not written by utils.convert; choose an empty DST")
                shutil.rmtree(sub)
        (dst / "labels" / f"{split}.cache").unlink(missing_ok=True)


def _unique_names(items: list[Item], notes: list[str], split: str) -> None:
    """Rename clashing output names (two source folders with the same file name) in place."""
    used: set[str] = set()
    renamed = 0
    for item in items:
        name = item.name
        if name in used:
            base = f"{item.image.parent.name}_{Path(name).name}"
            name, k = str(Path(name).with_name(base)), 1
            while name in used:
                name, k = str(Path(item.name).with_name(f"{Path(base).stem}_{k}{Path(base).suffix}")), k + 1
            item.name, renamed = name, renamed + 1
        used.add(name)
    if renamed:
        note(notes, f"{split}: {renamed} images share a file name with another one; written with their "
                    f"folder's name in front")


def write(dst: Path, splits: dict[str, list[Item]], names: list[str], copy: bool, command: str,
          problems: Problems, notes: list[str] | None = None) -> ConversionResult:
    """Write images, label files and data.yaml (merging splits of an earlier conversion into ``dst``)."""
    notes = [] if notes is None else notes
    _prepare(dst, list(splits))
    config: dict = {}
    yaml_file = dst / "data.yaml"
    if written_by_us(dst):
        old = yaml.safe_load(yaml_file.read_text()) or {}
        if old.get("names") == names:
            config = {k: old[k] for k in SPLITS if old.get(k) and k not in splits}
    boxes = 0
    for split, items in splits.items():
        _unique_names(items, notes, split)
        for item in items:
            _place_image(item.image, dst / "images" / split / item.name, copy)
            label = (dst / "labels" / split / item.name).with_suffix(".txt")
            label.parent.mkdir(parents=True, exist_ok=True)
            label.write_text("".join(f"{c} {x:.6f} {y:.6f} {w:.6f} {h:.6f}\n" for c, x, y, w, h in item.rows))
            boxes += len(item.rows)
        if items:
            config[split] = f"images/{split}"
        else:
            problems.add("empty split", f"split '{split}' has no usable image; left out of {yaml_file}")
    ordered = {"path": "."}
    ordered.update({k: config[k] for k in SPLITS if k in config})
    ordered.update(nc=len(names), names=names)
    dst.mkdir(parents=True, exist_ok=True)
    yaml_file.write_text(f"{YAML_HEADER} ({command})\n" + yaml.safe_dump(ordered, sort_keys=False))
    problems.log()
    counts = {split: len(items) for split, items in splits.items()}
    summary = ", ".join(f"{n} {kind}" for kind, n in problems.counts.items()) or "none"
    LOGGER.info(f"wrote {', '.join(f'{n} {s}' for s, n in counts.items())} images, {len(names)} classes "
                f"({', '.join(names)}), {boxes} boxes; problems: {summary}; {yaml_file}")
    return ConversionResult(yaml_file, counts, boxes, names, list(problems.lines), problems.counts, notes)
