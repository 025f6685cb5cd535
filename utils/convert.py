"""Convert Pascal VOC XML and COCO JSON data sets to YOLO txt labels plus a data.yaml.

    python -m utils.convert voc SRC DST [--copy] [--names A,B,C] [--skip-difficult]
    python -m utils.convert coco SRC_JSON IMAGES_DIR DST [--copy] [--split train]

The result is ``DST/images/<split>/`` (symlinks to the source images, or copies with ``--copy``),
``DST/labels/<split>/*.txt`` (``class cx cy w h`` normalised) and ``DST/data.yaml``. Boxes with
zero or negative width or height are reported (file and object) and dropped; boxes reaching out
of the image are clipped to it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from PIL import Image

from utils.errors import UserError, cli_main
from utils.label_check import IMG_FORMATS
from utils.log import LOGGER, setup_logging

SPLITS = ("train", "val", "test")
YAML_HEADER = "# Written by utils.convert"
CLIP_SLACK_PX = 1.0  # VOC corners one pixel past the border are normal (1-based); no report
DEFAULT_VAL_FRACTION = 0.2


@dataclass
class ConversionResult:
    """What a conversion wrote: the data.yaml, images per split, boxes, classes and problems."""

    yaml_file: Path
    images: dict[str, int]
    boxes: int
    names: list[str]
    problems: list[str] = field(default_factory=list)


@dataclass
class _Item:
    """One image to write: its source, the name under images/<split>/ and its YOLO rows."""

    image: Path
    name: str
    rows: list[tuple[int, float, float, float, float]]


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


def _prepare(dst: Path, splits: list[str]) -> None:
    """Empty the split folders of an earlier conversion; refuse to touch anything else."""
    ours = (dst / "data.yaml").is_file() and (dst / "data.yaml").read_text().startswith(YAML_HEADER)
    for split in splits:
        for sub in (dst / "images" / split, dst / "labels" / split):
            if sub.exists() and any(sub.iterdir()):
                if not ours:
                    raise UserError(f"{sub} is not empty and was not written by utils.convert; choose an empty DST")
                shutil.rmtree(sub)
        (dst / "labels" / f"{split}.cache").unlink(missing_ok=True)


def _to_yolo_row(cls: int, box: list[float], width: float, height: float
                 ) -> tuple[int, float, float, float, float]:
    x1, y1, x2, y2 = box
    return cls, (x1 + x2) / 2 / width, (y1 + y2) / 2 / height, (x2 - x1) / width, (y2 - y1) / height


def _check_box(box: list[float], width: float, height: float, where: str, problems: list[str]
               ) -> list[float] | None:
    """Drop a degenerate xyxy box (reported), clip one that leaves the image."""
    x1, y1, x2, y2 = box
    if not (x2 > x1 and y2 > y1):
        problems.append(f"{where}: degenerate box (x1={x1:g}, y1={y1:g}, x2={x2:g}, y2={y2:g}), dropped")
        return None
    clipped = [min(max(x1, 0.0), width), min(max(y1, 0.0), height),
               min(max(x2, 0.0), width), min(max(y2, 0.0), height)]
    if max(abs(a - b) for a, b in zip(box, clipped)) > CLIP_SLACK_PX:
        problems.append(f"{where}: box (x1={x1:g}, y1={y1:g}, x2={x2:g}, y2={y2:g}) outside the "
                        f"{width:g}x{height:g} image, clipped")
    if not (clipped[2] > clipped[0] and clipped[3] > clipped[1]):
        problems.append(f"{where}: box lies outside the image, dropped")
        return None
    return clipped


def _write(dst: Path, splits: dict[str, list[_Item]], names: list[str], copy: bool, command: str,
           problems: list[str]) -> ConversionResult:
    """Write images, label files and data.yaml (merging splits of an earlier conversion)."""
    _prepare(dst, list(splits))
    config: dict = {}
    yaml_file = dst / "data.yaml"
    if yaml_file.is_file() and yaml_file.read_text().startswith(YAML_HEADER):
        old = yaml.safe_load(yaml_file.read_text()) or {}
        if old.get("names") == names:
            config = {k: old[k] for k in SPLITS if old.get(k) and k not in splits}
    boxes = 0
    for split, items in splits.items():
        for item in items:
            _place_image(item.image, dst / "images" / split / item.name, copy)
            label = (dst / "labels" / split / item.name).with_suffix(".txt")
            label.parent.mkdir(parents=True, exist_ok=True)
            label.write_text("".join(f"{c} {x:.6f} {y:.6f} {w:.6f} {h:.6f}\n" for c, x, y, w, h in item.rows))
            boxes += len(item.rows)
        if items:
            config[split] = f"images/{split}"
        else:
            problems.append(f"split '{split}' has no usable image; left out of {yaml_file}")
    ordered = {"path": "."}
    ordered.update({k: config[k] for k in SPLITS if k in config})
    ordered.update(nc=len(names), names=names)
    dst.mkdir(parents=True, exist_ok=True)
    yaml_file.write_text(f"{YAML_HEADER} ({command})\n" + yaml.safe_dump(ordered, sort_keys=False))
    for message in problems:
        LOGGER.warning(message)
    counts = {split: len(items) for split, items in splits.items()}
    LOGGER.info(f"wrote {', '.join(f'{n} {s}' for s, n in counts.items())} images, {len(names)} classes "
                f"({', '.join(names)}), {boxes} boxes, {len(problems)} problems reported; {yaml_file}")
    return ConversionResult(yaml_file, counts, boxes, names, problems)


def _parse_names(names: str | None) -> list[str] | None:
    """``--names``: a comma-separated list or a text file with one name per line."""
    if not names:
        return None
    if Path(names).is_file():
        return [n.strip() for n in Path(names).read_text().splitlines() if n.strip()]
    return [n.strip() for n in names.split(",") if n.strip()]


def _image_size(path: Path) -> tuple[float, float]:
    with Image.open(path) as im:
        return float(im.size[0]), float(im.size[1])


def _read_voc_xml(xml_file: Path) -> tuple[str | None, float, float, list[tuple[str, bool, list[float]]]]:
    """(filename tag, width, height, [(name, difficult, [x1, y1, x2, y2])]) of one annotation."""
    root = ET.parse(xml_file).getroot()

    def number(node: ET.Element | None, tag: str) -> float:
        text = node.findtext(tag) if node is not None else None
        return float(text) if text not in (None, "") else 0.0

    size = root.find("size")
    objects = []
    for obj in root.iter("object"):
        box = obj.find("bndbox")
        if box is None:
            raise ValueError("an <object> without <bndbox>")
        coords = [number(box, t) for t in ("xmin", "ymin", "xmax", "ymax")]
        difficult = obj.findtext("difficult", "0").strip() == "1"
        objects.append(((obj.findtext("name") or "").strip(), difficult, coords))
    return root.findtext("filename"), number(size, "width"), number(size, "height"), objects


def _voc_splits(src: Path, stems: list[str], val_fraction: float) -> dict[str, list[str]]:
    """Image ids per split from ImageSets/Main, or a deterministic split of all ids."""
    sets = src / "ImageSets" / "Main"
    found = {s: (sets / f"{s}.txt").read_text().split() for s in SPLITS if (sets / f"{s}.txt").is_file()}
    if "train" not in found and (sets / "trainval.txt").is_file():
        found["train"] = (sets / "trainval.txt").read_text().split()
    if found:
        return found
    step = max(2, round(1 / val_fraction))
    LOGGER.warning(f"{sets}: no split files; one image in {step} goes to val")
    return {"train": [s for k, s in enumerate(stems) if k % step], "val": stems[::step]}


def _find_voc_image(src: Path, stem: str, tag: str | None) -> Path | None:
    """The image of annotation ``stem``: JPEGImages/<stem>.<ext>, else the <filename> tag."""
    folder = src / "JPEGImages"
    for ext in sorted(IMG_FORMATS):
        for candidate in (folder / f"{stem}.{ext}", folder / f"{stem}.{ext.upper()}"):
            if candidate.is_file():
                return candidate
    if tag and (folder / Path(tag).name).is_file():
        return folder / Path(tag).name
    return None


def convert_voc(src: str | Path, dst: str | Path, copy: bool = False, names: list[str] | None = None,
                skip_difficult: bool = False, val_fraction: float = DEFAULT_VAL_FRACTION) -> ConversionResult:
    """Convert a Pascal VOC folder (``Annotations/``, ``JPEGImages/``, optional
    ``ImageSets/Main/{train,val,test}.txt``) into YOLO labels under ``dst``.

    Class order: ``names`` when given (other classes are reported and dropped), else by
    descending box count (ties alphabetically), which gives RBC, WBC, Platelets for BCCD.
    """
    src, dst = Path(src), Path(dst)
    ann_dir = src / "Annotations"
    if not ann_dir.is_dir():
        raise UserError(f"{src} is not a Pascal VOC folder: {ann_dir} not found")
    stems = sorted(p.stem for p in ann_dir.glob("*.xml"))
    if not stems:
        raise UserError(f"{ann_dir} holds no .xml annotation")
    problems: list[str] = []
    parsed: dict[str, tuple] = {}
    split_ids = _voc_splits(src, stems, val_fraction)
    for split, ids in split_ids.items():
        for stem in ids:
            if stem in parsed:
                continue
            xml_file = ann_dir / f"{stem}.xml"
            if not xml_file.is_file():
                split_file = src / "ImageSets" / "Main" / f"{split}.txt"
                problems.append(f"{split_file}: '{stem}' has no {xml_file.name}, skipped")
                parsed[stem] = None
                continue
            try:
                parsed[stem] = (xml_file, *_read_voc_xml(xml_file))
            except (ET.ParseError, ValueError) as exc:
                problems.append(f"{xml_file}: unreadable annotation ({exc}), skipped")
                parsed[stem] = None
    if names is None:
        counts = Counter(o[0] for p in parsed.values() if p for o in p[4] if not (skip_difficult and o[1]))
        names = sorted(counts, key=lambda n: (-counts[n], n))
    index = {n: k for k, n in enumerate(names)}

    splits: dict[str, list[_Item]] = {}
    for split, ids in split_ids.items():
        items = splits.setdefault(split, [])
        for stem in ids:
            if parsed.get(stem) is None:
                continue
            xml_file, tag, width, height, objects = parsed[stem]
            image = _find_voc_image(src, stem, tag)
            if image is None:
                problems.append(f"{xml_file}: image '{tag or stem}' not found in {src / 'JPEGImages'}, skipped")
                continue
            if width <= 0 or height <= 0:
                width, height = _image_size(image)
            rows = []
            for k, (name, difficult, box) in enumerate(objects, 1):
                where = f"{xml_file}: object {k} ({name})"
                if skip_difficult and difficult:
                    continue
                if name not in index:
                    problems.append(f"{where}: class not in --names, dropped")
                    continue
                clipped = _check_box(box, width, height, where, problems)
                if clipped is not None:
                    rows.append(_to_yolo_row(index[name], clipped, width, height))
            items.append(_Item(image, image.name, rows))
    command = f"voc {src} {dst}"
    return _write(dst, splits, names, copy, command, problems)


def _guess_split(json_file: Path) -> str:
    name = json_file.stem.lower()
    return next((s for s in ("train", "val", "test") if s in name), "train")


def convert_coco(json_file: str | Path, images_dir: str | Path, dst: str | Path, copy: bool = False,
                 split: str | None = None) -> ConversionResult:
    """Convert one COCO detection JSON (one split) into YOLO labels under ``dst``.

    Categories are numbered 0.. in order of their COCO id (COCO's 1..90 with gaps become
    0..79). Crowd annotations are skipped. ``split`` defaults to train / val / test as found in
    the file name. Converting a second JSON into the same ``dst`` adds its split to data.yaml.
    """
    json_file, images_dir, dst = Path(json_file), Path(images_dir), Path(dst)
    if not json_file.is_file():
        raise UserError(f"COCO annotation file {json_file} not found")
    if not images_dir.is_dir():
        raise UserError(f"COCO images folder {images_dir} not found")
    try:
        data = json.loads(json_file.read_text())
        categories = sorted(data["categories"], key=lambda c: c["id"])
        images, annotations = data["images"], data.get("annotations", [])
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{json_file} is not a COCO detection file ({type(exc).__name__}: {exc})") from None
    split = split or _guess_split(json_file)
    names = [str(c["name"]) for c in categories]
    cat_index = {c["id"]: k for k, c in enumerate(categories)}
    per_image: dict = {}
    for ann in annotations:
        per_image.setdefault(ann.get("image_id"), []).append(ann)

    problems: list[str] = []
    crowd = 0
    items = []
    for info in images:
        image = images_dir / info["file_name"]
        if not image.is_file():
            problems.append(f"{json_file}: image {info['file_name']} (id {info['id']}) not found in "
                            f"{images_dir}, skipped")
            continue
        width, height = float(info.get("width") or 0), float(info.get("height") or 0)
        if width <= 0 or height <= 0:
            width, height = _image_size(image)
        rows = []
        for ann in per_image.get(info["id"], []):
            where = f"{json_file}: annotation {ann.get('id')} of {info['file_name']}"
            if ann.get("iscrowd"):
                crowd += 1
                continue
            if ann.get("category_id") not in cat_index:
                problems.append(f"{where}: unknown category {ann.get('category_id')}, dropped")
                continue
            x, y, w, h = (float(v) for v in ann["bbox"])
            clipped = _check_box([x, y, x + w, y + h], width, height, where, problems)
            if clipped is not None:
                rows.append(_to_yolo_row(cat_index[ann["category_id"]], clipped, width, height))
        relative = Path(info["file_name"])
        safe = not relative.is_absolute() and ".." not in relative.parts  # stay inside DST
        items.append(_Item(image, str(relative) if safe else relative.name, rows))
    if crowd:
        LOGGER.info(f"{json_file}: {crowd} crowd annotations skipped")
    command = f"coco {json_file} {images_dir} {dst}"
    return _write(dst, {split: items}, names, copy, command, problems)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m utils.convert",
                                     description="Convert VOC XML or COCO JSON labels to YOLO txt + data.yaml.")
    sub = parser.add_subparsers(dest="format", required=True)
    voc = sub.add_parser("voc", help="Pascal VOC folder (Annotations/, JPEGImages/, ImageSets/Main/)")
    voc.add_argument("src", help="VOC folder")
    voc.add_argument("dst", help="output folder")
    voc.add_argument("--names", help="class order: A,B,C or a file with one name per line "
                                     "(default: by descending box count)")
    voc.add_argument("--skip-difficult", action="store_true", help="drop objects marked difficult")
    voc.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION,
                     help="share of images put in val when there are no ImageSets split files")
    coco = sub.add_parser("coco", help="COCO detection JSON (one split)")
    coco.add_argument("json", help="COCO annotation file")
    coco.add_argument("images", help="folder the JSON's file_name entries are relative to")
    coco.add_argument("dst", help="output folder")
    coco.add_argument("--split", choices=SPLITS, help="split name (default: from the JSON file name)")
    for p in (voc, coco):
        p.add_argument("--copy", action="store_true", help="copy the images instead of symlinking them")
    return parser.parse_args(argv)


@cli_main
def main(argv: list[str] | None = None) -> ConversionResult:
    setup_logging()
    opt = parse_args(argv)
    if opt.format == "voc":
        if not 0 < opt.val_fraction < 1:
            raise UserError(f"--val-fraction {opt.val_fraction} must be between 0 and 1")
        return convert_voc(opt.src, opt.dst, opt.copy, _parse_names(opt.names), opt.skip_difficult,
                           opt.val_fraction)
    return convert_coco(opt.json, opt.images, opt.dst, opt.copy, opt.split)


if __name__ == "__main__":
    main(sys.argv[1:])
