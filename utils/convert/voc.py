"""Pascal VOC XML to YOLO labels, from any layout :mod:`utils.convert.voc_layout` finds.

What the converter decides, file by file:

- The image of an XML, found by name among all the images under the folder the layout gives (the
  export itself, a split folder, a VOC year's ``JPEGImages/``), in any sub-folder: the image with
  the XML's own name (``a.xml`` -> ``a.jpg``, any image extension), else the one ``<filename>`` names
  (with or without its extension), else the file name at the end of ``<path>`` (a path on the
  labeller's machine is never opened as such). An XML whose ``<filename>`` names another file than
  its own is counted in the log.
- The image size: ``<size>`` when its width and height are above zero, else read from the image
  header. A ``<size>`` that disagrees with the image is reported; the boxes are normalised by
  ``<size>``, the frame they were drawn in.
- ``difficult`` objects are kept as ordinary boxes (the YOLO convention: they are trained on and
  evaluated as objects); ``--skip-difficult`` drops them, so those objects become background.
  ``truncated`` objects are kept (the box covers the visible part); both are counted in the log.
- Reported with the file, skipped and counted: a malformed XML (or one that is no
  ``<annotation>``), an XML without image, an image without XML (layouts without split files), an
  object without name or box, an object of a class outside ``--names`` / ``classes.txt``.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from utils.convert.voc_layout import ImageIndex, VocFolder, basename, find_layout, split_ids
from utils.convert.writer import (DEFAULT_SEED, DEFAULT_TEST_FRACTION, DEFAULT_VAL_FRACTION,
                                  ConversionResult, Item, Problems, assign_splits, check_box,
                                  check_fractions, class_order, image_size, note, split_keys, to_yolo_row,
                                  write)
from utils.core.errors import UserError

BOX_TAGS = ("xmin", "ymin", "xmax", "ymax")


@dataclass
class VocObject:
    """One ``<object>``: class name, ``[x1, y1, x2, y2]`` in pixels (``None`` when unusable, ``error`` says why)."""

    name: str
    box: list[float] | None
    difficult: bool
    truncated: bool
    error: str = ""


@dataclass
class VocAnnotation:
    """One XML file: the ``<filename>`` and ``<path>`` tags, ``<size>`` (0 when absent) and its objects."""

    filename: str | None
    path: str | None
    width: float
    height: float
    objects: list[VocObject]


def _number(text: str | None) -> float:
    """A coordinate or size; raises ``ValueError`` for a missing or non-numeric value."""
    if text is None or not text.strip():
        raise ValueError("missing")
    return float(text)


def _flag(node: ET.Element, tag: str) -> bool:
    return (node.findtext(tag) or "0").strip() in ("1", "true", "True")


def read_voc_xml(xml_file: Path) -> VocAnnotation:
    """Parse one VOC annotation; raises ``ET.ParseError`` / ``ValueError`` for a file that is none."""
    root = ET.parse(xml_file).getroot()
    if root.tag != "annotation":
        raise ValueError(f"its root element is <{root.tag}>, not <annotation>")
    size = root.find("size")
    try:
        width, height = (_number(size.findtext(t)) for t in ("width", "height")) if size is not None else (0, 0)
    except ValueError:
        width = height = 0.0
    objects = []
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        box, error = None, ""
        node = obj.find("bndbox")
        if not name:
            error = "no <name>"
        elif node is None:
            error = "no <bndbox>"
        else:
            try:
                box = [_number(node.findtext(t)) for t in BOX_TAGS]
            except ValueError:
                error = "<bndbox> without four numbers xmin, ymin, xmax, ymax"
        objects.append(VocObject(name, box, _flag(obj, "difficult"), _flag(obj, "truncated"), error))
    return VocAnnotation(root.findtext("filename"), root.findtext("path"), float(width), float(height), objects)


@dataclass
class _Entry:
    xml: Path
    folder: VocFolder
    split: str | None
    annotation: VocAnnotation | None = None
    image: Path | None = None


def _entries(folders: list[VocFolder], problems: Problems, notes: list[str]) -> list[_Entry]:
    """The XML files to convert with the split each belongs to (``None``: not given by the layout)."""
    entries: list[_Entry] = []
    seen: dict[Path, str] = {}
    for folder in folders:
        ids = split_ids(folder)
        if not ids:
            entries += [_Entry(p, folder, folder.split) for p in sorted(folder.annotations.iterdir())
                        if p.suffix.lower() == ".xml" and p.is_file()]
            continue
        for split, stems in ids.items():
            for stem in stems:
                xml = folder.annotations / f"{stem}.xml"
                split_file = folder.split_files / f"{split}.txt"
                if not xml.is_file():
                    problems.add("annotation missing", f"{split_file}: '{stem}' has no {xml.name} in "
                                                          f"{folder.annotations}, skipped")
                elif xml in seen:
                    problems.add("listed twice", f"{split_file}: '{stem}' is already in {seen[xml]}, skipped")
                else:
                    seen[xml] = split
                    entries.append(_Entry(xml, folder, split))
        unlisted = sum(1 for p in folder.annotations.glob("*.xml") if p not in seen)
        if unlisted:
            note(notes, f"{folder.annotations}: {unlisted} annotations are in no split file of "
                        f"{folder.split_files}; left out")
    return entries


def _read_all(entries: list[_Entry], problems: Problems, notes: list[str], exclude: Path | None = None
              ) -> list[_Entry]:
    """Parse every XML and find its image (not under ``exclude``, the output folder); the entries that
    have both."""
    indexes: dict[Path, ImageIndex] = {}
    matched: dict[Path, set[Path]] = {}
    usable, renamed, sized = [], 0, 0
    for entry in entries:
        try:
            entry.annotation = read_voc_xml(entry.xml)
        except (ET.ParseError, ValueError) as exc:
            problems.add("unreadable annotation", f"{entry.xml}: not a readable VOC annotation ({exc}), skipped")
            continue
        folder = entry.folder.images
        if folder not in indexes:
            indexes[folder] = ImageIndex(folder, exclude)
        index = indexes[folder]
        ann = entry.annotation
        entry.image = index.match(entry.xml, ann.filename, ann.path)
        if entry.image is None:
            problems.add("annotation without image", f"{entry.xml}: no image '{ann.filename or entry.xml.stem}' "
                                                     f"in {folder}, skipped")
            continue
        matched.setdefault(folder, set()).add(entry.image)
        tag = basename(ann.filename).lower()
        if tag and tag not in (entry.image.name.lower(), entry.image.stem.lower()):
            renamed += 1
        try:
            header = image_size(entry.image)
        except (OSError, SyntaxError, ValueError) as exc:  # what PIL raises for a file that is no image
            problems.add("unreadable image", f"{entry.image}: not a readable image ({exc}), skipped")
            continue
        if ann.width <= 0 or ann.height <= 0:
            ann.width, ann.height = header
            sized += 1
        elif (ann.width, ann.height) != header:
            problems.add("size differs from the image",
                         f"{entry.xml}: <size> {ann.width:g}x{ann.height:g} but {entry.image.name} is "
                         f"{header[0]:g}x{header[1]:g}; boxes normalised by <size>")
        usable.append(entry)
    unlisted = {e.folder.images for e in entries if e.folder.split_files is None}  # a VOC year lists its own
    for folder, index in indexes.items():
        if folder in unlisted:
            for image in index.files:
                if image not in matched.get(folder, set()):
                    problems.add("image without annotation", f"{image}: no XML annotation names it, skipped")
    if renamed:
        note(notes, f"{renamed} annotations name another file in <filename> than their own; matched by the "
                    f"XML's own name")
    if sized:
        note(notes, f"{sized} annotations have no usable <size>; read it from the image")
    return usable


def _rows(entry: _Entry, index: dict[str, int], skip_difficult: bool, problems: Problems,
          counts: dict[str, int]) -> list:
    ann = entry.annotation
    rows = []
    for k, obj in enumerate(ann.objects, 1):
        where = f"{entry.xml}: object {k} ({obj.name or '?'})"
        if obj.error:
            problems.add("unusable object", f"{where}: {obj.error}, dropped")
            continue
        if obj.difficult:
            counts["difficult"] += 1
            if skip_difficult:
                continue
        counts["truncated"] += obj.truncated
        if obj.name not in index:
            problems.add("unknown class", f"{where}: class '{obj.name}' is not in the class list, dropped")
            continue
        clipped = check_box(obj.box, ann.width, ann.height, where, problems)
        if clipped is not None:
            rows.append(to_yolo_row(index[obj.name], clipped, ann.width, ann.height))
    return rows


def convert_voc(src: str | Path, dst: str | Path, copy: bool = False, names: list[str] | None = None,
                skip_difficult: bool = False, val_fraction: float = DEFAULT_VAL_FRACTION,
                test_fraction: float = DEFAULT_TEST_FRACTION, seed: int = DEFAULT_SEED,
                layout: str = "auto") -> ConversionResult:
    """Convert a Pascal VOC export in any supported layout into YOLO labels under ``dst``.

    Splits: the layout's (``ImageSets/Main`` files, ``train/ valid/ test/`` folders), else a
    deterministic split by ``val_fraction``, ``test_fraction`` and ``seed`` (logged). Class order:
    ``names``, else ``src/classes.txt``, else the class names found, sorted; objects of other classes
    are reported and dropped. ``layout`` forces one of ``auto``, ``devkit``, ``flat``, ``labelimg``,
    ``splits`` (``flat`` on a VOC year folder ignores its split files).
    """
    src, dst = Path(src), Path(dst)
    check_fractions(val_fraction, test_fraction)
    found_layout, folders = find_layout(src, layout, exclude=dst)
    problems, notes = Problems(), []
    note(notes, f"{src}: layout '{found_layout}' ({', '.join(str(f.annotations) for f in folders)})")
    entries = _read_all(_entries(folders, problems, notes), problems, notes, exclude=dst)
    if not entries:
        problems.log()
        raise_empty(src, problems)
    found = {o.name for e in entries for o in e.annotation.objects
             if not o.error and not (skip_difficult and o.difficult)}
    names = class_order(names, src, found, notes)
    index = {n: k for k, n in enumerate(names)}
    by_key = dict(zip(split_keys([e.image for e in entries], src), entries))
    keys_by_split = assign_splits({k: e.split for k, e in by_key.items()}, val_fraction, test_fraction, seed, notes)
    counts = {"difficult": 0, "truncated": 0}
    splits: dict[str, list[Item]] = {}
    for split, keys in keys_by_split.items():
        items = splits.setdefault(split, [])
        for key in keys:
            entry = by_key[key]
            items.append(Item(entry.image, entry.image.name, _rows(entry, index, skip_difficult, problems, counts)))
    action = "dropped (--skip-difficult)" if skip_difficult else "kept"
    note(notes, f"objects marked difficult: {counts['difficult']} ({action}); truncated: {counts['truncated']} (kept)")
    command = f"voc {src} {dst}" + (f" --layout {layout}" if layout != "auto" else "")
    return write(dst, splits, names, copy, command, problems, notes)


def raise_empty(src: Path, problems: Problems) -> None:
    """No usable image at all: one line naming the folder and what went wrong."""
    summary = ", ".join(f"{n} {kind}" for kind, n in problems.counts.items()) or "nothing to convert"
    raise UserError(f"{src}: no usable annotated image ({summary})")
