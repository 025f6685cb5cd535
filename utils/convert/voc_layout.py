"""Where the XML files of a Pascal VOC export are, and how each finds its image: by file name.

An XML's image is looked up by name (the XML's own stem, its ``<filename>``, the last part of its
``<path>``) among all the images under a folder, wherever they lie below it and whatever the folders
are called. Folder names only matter where they carry the split:

- ``devkit``: ``VOCdevkit/VOC2007``, ``VOC2012`` (one or several years, merged split by split), or
  one such year folder: ``Annotations/`` + ``JPEGImages/`` + ``ImageSets/Main/{train,val,test}.txt``
  (``trainval.txt`` stands in for a missing ``train.txt``).
- ``splits``: ``train/``, ``valid/`` (or ``val/``), ``test/`` folders, each with images and XML side by
  side (the Roboflow "Pascal VOC" export) or in sub-folders of any name.
- ``flat``: XML files in any folders under the export (``annotations/``, ``annots/``, ``xml/``, ...),
  their images anywhere under it (``images/``, ``JPEGImages/``, beside the XML, ...); no split.
- ``labelimg``: one folder with each image's XML beside it, as LabelImg saves by default (what
  ``flat`` finds when the export's own folder is the only one holding XML files).

:func:`find_layout` detects the layout (or checks the one asked for) and returns the folders.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from utils.convert.writer import SPLIT_DIRS, is_image
from utils.core.errors import UserError

LAYOUTS = ("auto", "devkit", "flat", "labelimg", "splits")
ANNOTATION_DIRS = ("annotations", "annotation", "xml", "xmls", "labels")  # a VOC year's XML folder
DEVKIT_IMAGE_DIR = "jpegimages"
SPLIT_FILES = ("train", "val", "test", "trainval")
YEAR_DIR = re.compile(r"voc\d{4}", re.IGNORECASE)
DEVKIT_DIR = "vocdevkit"


@dataclass
class VocFolder:
    """One folder of XML files and the folder under which (sub-folders included) their images are.

    ``split`` is the split the layout gives (a ``valid/`` folder), ``split_files`` the
    ``ImageSets/Main`` folder of a VOC year; both ``None`` when the layout gives no split.
    """

    annotations: Path
    images: Path
    split: str | None = None
    split_files: Path | None = None


def _subdirs(folder: Path) -> dict[str, Path]:
    """Sub-folders by lower-case name (the first in sorted order wins a case clash)."""
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_dir():
            out.setdefault(p.name.lower(), p)
    return out


def has_xml(folder: Path) -> bool:
    return any(p.suffix.lower() == ".xml" and p.is_file() for p in folder.iterdir())


def walk_files(root: Path, exclude: Path | None = None) -> Iterator[tuple[Path, list[Path]]]:
    """``(folder, sorted file paths)`` for ``root`` and every folder below it, in sorted order. Linked
    folders are followed (each real folder once); hidden folders (``.git``, ``.ipynb_checkpoints``)
    and ``exclude`` (the output folder) are skipped."""
    seen = {exclude.resolve()} if exclude is not None else set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        here = Path(folder)
        seen.add(here.resolve())
        kept = []
        for name in sorted(dirs):
            real = (here / name).resolve()
            if not name.startswith(".") and real not in seen:
                seen.add(real)
                kept.append(name)
        dirs[:] = kept
        yield here, [here / f for f in sorted(files)]


def xml_folders(root: Path, exclude: Path | None = None) -> list[Path]:
    """``root`` and the folders below it that hold at least one ``.xml`` file."""
    return [folder for folder, files in walk_files(root, exclude) if any(f.suffix.lower() == ".xml" for f in files)]


def _annotation_dir(folder: Path) -> Path | None:
    """The XML folder of a VOC year: ``Annotations/`` (any case, or another usual name)."""
    subs = _subdirs(folder)
    return next((subs[n] for n in ANNOTATION_DIRS if n in subs and has_xml(subs[n])), None)


def _split_files(folder: Path) -> Path | None:
    main = folder / "ImageSets" / "Main"
    return main if any((main / f"{s}.txt").is_file() for s in SPLIT_FILES) else None


def _year(folder: Path, split_files: Path | None) -> VocFolder | None:
    annotations = _annotation_dir(folder)
    if annotations is None:
        return None
    images = _subdirs(folder).get(DEVKIT_IMAGE_DIR, folder)  # not SegmentationClass/ with the same stems
    return VocFolder(annotations, images, split_files=split_files)


def _devkit(src: Path, exclude: Path | None) -> list[VocFolder]:
    """VOC year folders under ``src`` or ``src/VOCdevkit``, or ``src`` itself as one year with split files."""
    for base in (src, _subdirs(src).get(DEVKIT_DIR)):
        if base is None:
            continue
        years = [p for name, p in _subdirs(base).items() if YEAR_DIR.fullmatch(name)]
        # a year without split files has its images split like a flat folder
        folders = [f for f in (_year(year, _split_files(year)) for year in years) if f is not None]
        if folders:
            return folders
    sets = _split_files(src)
    single = _year(src, sets) if sets else None
    return [single] if single else []


def _splits(src: Path, exclude: Path | None) -> list[VocFolder]:
    folders = []
    for name, path in _subdirs(src).items():
        split = SPLIT_DIRS.get(name)
        if split is not None:
            folders += [VocFolder(xml_dir, path, split=split) for xml_dir in xml_folders(path, exclude)]
    return folders


def _flat(src: Path, exclude: Path | None) -> list[VocFolder]:
    return [VocFolder(xml_dir, src) for xml_dir in xml_folders(src, exclude)]


def _labelimg(src: Path, exclude: Path | None) -> list[VocFolder]:
    return [VocFolder(src, src)] if has_xml(src) else []


FINDERS = {"devkit": _devkit, "splits": _splits, "flat": _flat, "labelimg": _labelimg}
AUTO_ORDER = ("devkit", "splits", "flat")  # flat finds labelimg folders too (named so in find_layout)
EXPECTED = {
    "devkit": "VOC20xx/ folders or Annotations/ + JPEGImages/ + ImageSets/Main/*.txt",
    "splits": "train/, valid/ or val/, test/ folders holding .xml files and images",
    "flat": ".xml files in any folder, their images anywhere below",
    "labelimg": ".xml files beside the images",
}


def find_layout(src: Path, layout: str = "auto", exclude: Path | None = None) -> tuple[str, list[VocFolder]]:
    """The layout of ``src`` and its folders; ``layout`` forces one (``auto``: the first that fits, in
    the order devkit, splits, flat). ``exclude`` (the output folder, when it lies inside ``src``) is
    not searched. Raises ``UserError`` when none fits."""
    if not src.is_dir():
        raise UserError(f"{src} is not a Pascal VOC folder: no such folder")
    if layout not in LAYOUTS:
        raise UserError(f"--layout {layout}: choose one of {', '.join(LAYOUTS)}")
    tried = AUTO_ORDER if layout == "auto" else (layout,)
    for name in tried:
        folders = FINDERS[name](src, exclude)
        if folders:
            if layout == "auto" and name == "flat" and [f.annotations for f in folders] == [src]:
                name = "labelimg"
            return name, folders
    if layout != "auto":
        raise UserError(f"--layout {layout}: {src} does not hold {EXPECTED[layout]}")
    raise UserError(f"{src} is not a Pascal VOC folder: it holds no .xml file")


def read_split_file(path: Path) -> list[str]:
    """Image ids of one ``ImageSets/Main`` file (first word of each line)."""
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def split_ids(folder: VocFolder) -> dict[str, list[str]]:
    """Image ids per split from a year folder's split files (``trainval`` when ``train`` is missing)."""
    if folder.split_files is None:
        return {}
    found = {s: read_split_file(folder.split_files / f"{s}.txt") for s in ("train", "val", "test")
             if (folder.split_files / f"{s}.txt").is_file()}
    if "train" not in found and (folder.split_files / "trainval.txt").is_file():
        found["train"] = read_split_file(folder.split_files / "trainval.txt")
    return found


class ImageIndex:
    """The images under one folder (sub-folders included), looked up by file name or stem without regard
    to case."""

    def __init__(self, folder: Path, exclude: Path | None = None) -> None:
        self.files = [p for _, files in walk_files(folder, exclude) for p in files if is_image(p)]
        self.by_name: dict[str, list[Path]] = {}
        self.by_stem: dict[str, list[Path]] = {}
        for p in self.files:
            self.by_name.setdefault(p.name.lower(), []).append(p)
            self.by_stem.setdefault(p.stem.lower(), []).append(p)

    def match(self, xml: Path, filename: str | None, path: str | None) -> Path | None:
        """The image of annotation ``xml``: one with the XML's own stem (any extension), else the one
        ``<filename>`` names (with or without extension), else the file name at the end of ``<path>``
        (written on another machine). Among several, the one named ``<filename>``, then the one in the
        XML's own folder, then the one whose folder is the last folder of ``<path>``."""
        tag, path_name = basename(filename), basename(path)
        lookups = ((xml.stem, self.by_stem), (tag, self.by_name), (tag, self.by_stem), (path_name, self.by_name),
                   (path_name, self.by_stem))
        for key, table in lookups:
            candidates = table.get(key.lower(), []) if key else []
            if candidates:
                return min(candidates, key=lambda p: _preference(p, xml, tag, path))
        return None


def _preference(image: Path, xml: Path, tag: str, path: str | None) -> tuple:
    """Sort key among images of the same name: lower is better."""
    parts = (path or "").strip().replace("\\", "/").split("/")
    path_folder = parts[-2].lower() if len(parts) > 1 else ""
    return (image.name.lower() != tag.lower(), image.parent != xml.parent, image.parent.name.lower() != path_folder,
            str(image))


def basename(text: str | None) -> str:
    """The last part of a path written on Windows or POSIX."""
    return (text or "").strip().replace("\\", "/").rsplit("/", 1)[-1]
