"""Where the XML files and the images of a Pascal VOC export are: the layouts real tools write.

- ``devkit``: ``VOCdevkit/VOC2007``, ``VOC2012`` (one or several years, merged split by split), or
  one such year folder: ``Annotations/`` + ``JPEGImages/`` + ``ImageSets/Main/{train,val,test}.txt``
  (``trainval.txt`` stands in for a missing ``train.txt``).
- ``flat``: an annotation folder (``Annotations/``, ``annotations/``, ``xml/``, ...) beside an image
  folder (``JPEGImages/``, ``images/``, ``Images/``, ...), any case, no split files (or ignored).
- ``labelimg``: one folder with each image's XML beside it, as LabelImg saves by default.
- ``splits``: ``train/``, ``valid/`` (or ``val/``), ``test/`` folders, each with images and XML side by
  side (the Roboflow "Pascal VOC" export) or with its own image and annotation folders.

:func:`find_layout` detects the layout (or checks the one asked for) and returns the folders.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from utils.convert.writer import SPLIT_DIRS, is_image
from utils.errors import UserError

LAYOUTS = ("auto", "devkit", "flat", "labelimg", "splits")
ANNOTATION_DIRS = ("annotations", "annotation", "xml", "xmls", "labels")
IMAGE_DIRS = ("jpegimages", "images", "imgs", "img")
SPLIT_FILES = ("train", "val", "test", "trainval")
YEAR_DIR = re.compile(r"voc\d{4}", re.IGNORECASE)
DEVKIT_DIR = "vocdevkit"


@dataclass
class VocFolder:
    """One folder of XML files and the folder of the images they describe.

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


def _has_images(folder: Path) -> bool:
    return any(is_image(p) for p in folder.iterdir())


def _pair(folder: Path) -> tuple[Path, Path] | None:
    """(annotation folder, image folder) directly inside ``folder``, if both are there."""
    subs = _subdirs(folder)
    ann = next((subs[n] for n in ANNOTATION_DIRS if n in subs and has_xml(subs[n])), None)
    img = next((subs[n] for n in IMAGE_DIRS if n in subs), None)
    return (ann, img) if ann is not None and img is not None else None


def _split_files(folder: Path) -> Path | None:
    main = folder / "ImageSets" / "Main"
    return main if any((main / f"{s}.txt").is_file() for s in SPLIT_FILES) else None


def _devkit(src: Path) -> list[VocFolder]:
    """VOC year folders under ``src`` or ``src/VOCdevkit``, or ``src`` itself as one year with split files."""
    for base in (src, _subdirs(src).get(DEVKIT_DIR)):
        if base is None:
            continue
        years = [p for name, p in _subdirs(base).items() if YEAR_DIR.fullmatch(name)]
        folders = []
        for year in years:
            pair = _pair(year)
            if pair:  # a year without split files has its images split like a flat folder
                folders.append(VocFolder(pair[0], pair[1], split_files=_split_files(year)))
        if folders:
            return folders
    pair, sets = _pair(src), _split_files(src)
    return [VocFolder(pair[0], pair[1], split_files=sets)] if pair and sets else []


def _flat(src: Path) -> list[VocFolder]:
    pair = _pair(src)
    return [VocFolder(*pair)] if pair else []


def _splits(src: Path) -> list[VocFolder]:
    folders = []
    for name, path in _subdirs(src).items():
        split = SPLIT_DIRS.get(name)
        if split is None:
            continue
        if has_xml(path):
            folders.append(VocFolder(path, path, split=split))
        elif (pair := _pair(path)) is not None:
            folders.append(VocFolder(pair[0], pair[1], split=split))
    return folders


def _labelimg(src: Path) -> list[VocFolder]:
    return [VocFolder(src, src)] if has_xml(src) else []


FINDERS = {"devkit": _devkit, "splits": _splits, "flat": _flat, "labelimg": _labelimg}
EXPECTED = {
    "devkit": "VOC20xx/ folders or Annotations/ + JPEGImages/ + ImageSets/Main/*.txt",
    "splits": "train/, valid/ or val/, test/ folders holding .xml files and images",
    "flat": "an Annotations/ (or annotations/, xml/) folder beside a JPEGImages/ (or images/) folder",
    "labelimg": ".xml files beside the images",
}


def find_layout(src: Path, layout: str = "auto") -> tuple[str, list[VocFolder]]:
    """The layout of ``src`` and its folders; ``layout`` forces one (``auto``: the first that fits,
    in the order devkit, splits, flat, labelimg). Raises ``UserError`` when none fits."""
    if not src.is_dir():
        raise UserError(f"{src} is not a Pascal VOC folder: no such folder")
    if layout not in LAYOUTS:
        raise UserError(f"--layout {layout}: choose one of {', '.join(LAYOUTS)}")
    tried = list(FINDERS) if layout == "auto" else [layout]
    for name in tried:
        folders = FINDERS[name](src)
        if folders:
            return name, folders
    if layout != "auto":
        raise UserError(f"--layout {layout}: {src} does not hold {EXPECTED[layout]}")
    found = "holds no .xml file" if not any(src.rglob("*.xml")) else "matches no known layout"
    raise UserError(f"{src} is not a Pascal VOC folder: it {found} (expected "
                    f"{'; or '.join(EXPECTED.values())})")


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
    """The images of one folder, looked up by file name or stem without regard to case."""

    def __init__(self, folder: Path) -> None:
        self.files = sorted(p for p in folder.iterdir() if is_image(p))
        self.by_name: dict[str, Path] = {}
        self.by_stem: dict[str, list[Path]] = {}
        for p in self.files:
            self.by_name.setdefault(p.name.lower(), p)
            self.by_stem.setdefault(p.stem.lower(), []).append(p)

    def match(self, xml: Path, filename: str | None, path: str | None) -> Path | None:
        """The image of annotation ``xml``: same stem as the XML, else ``<filename>`` (with or without
        extension), else the file name at the end of ``<path>`` (written on another machine)."""
        tag = basename(filename)
        same = self.by_stem.get(xml.stem.lower(), [])
        if same:
            return next((p for p in same if p.name.lower() == tag.lower()), same[0])
        for name in (tag, basename(path)):
            if not name:
                continue
            hit = self.by_name.get(name.lower()) or (self.by_stem.get(name.lower()) or [None])[0]
            if hit is not None:
                return hit
        return None


def basename(text: str | None) -> str:
    """The last part of a path written on Windows or POSIX."""
    return (text or "").strip().replace("\\", "/").rsplit("/", 1)[-1]
