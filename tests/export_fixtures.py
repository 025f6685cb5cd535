"""Data set exports laid out the way the tools that make them write them, built from the bundled BCCD.

The BCCD labels are read here with ElementTree, independently of utils.convert, and written back as
- a VOCdevkit with two years (VOC2007 with test.txt, VOC2012 without: the official tars' layout);
- flat ``images/`` + ``annotations/`` folders (any case) without ImageSets;
- a LabelImg folder: each image's XML beside it, LabelImg's tags (``<folder>``, ``<path>`` on the
  labeller's Windows machine, ``<source><database>Unknown``, ``<segmented>``, pose/truncated/difficult);
- Roboflow exports ("Pascal VOC", "COCO", "YOLOv8"): ``train/``, ``valid/``, ``test/`` folders, files
  renamed ``<stem>_jpg.rf.<32 hex>.jpg``, Roboflow's XML (empty ``<folder>``, ``<path>`` = file name,
  ``roboflow.com`` database, ``<occluded>``, bndbox in the order xmin, xmax, ymin, ymax), COCO JSON with
  the project-level category 0, YOLO data.yaml with ``../train/images`` paths and a ``roboflow:`` block.
Images are symlinks to data/bccd/JPEGImages (never decoded here).
"""

from __future__ import annotations

import hashlib
import json
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BCCD = ROOT / "data" / "bccd"
BCCD_SPLITS = {"train": 205, "val": 87, "test": 72}
BCCD_IMAGES = 364
BCCD_BOXES = 4886  # 4,888 objects, 2 of them degenerate (dropped by the converter)
BCCD_DEGENERATE = 2
WIDTH, HEIGHT = 640, 480
ROBOFLOW_SPLITS = {"train": "train", "val": "valid", "test": "test"}
ROBOFLOW_PROJECT = "bccd-cells"


@dataclass
class Obj:
    name: str
    box: tuple[int, int, int, int]  # xmin, ymin, xmax, ymax in pixels
    truncated: int
    difficult: int


def read_bccd() -> tuple[dict[str, list[Obj]], dict[str, list[str]]]:
    """Objects per image stem, and the published split (stems per split) of the bundled BCCD."""
    objects = {}
    for xml in sorted((BCCD / "Annotations").glob("*.xml")):
        found = []
        for obj in ET.parse(xml).getroot().iter("object"):
            box = obj.find("bndbox")
            corners = tuple(int(box.findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax"))
            found.append(Obj(obj.findtext("name"), corners, int(obj.findtext("truncated")),
                             int(obj.findtext("difficult"))))
        objects[xml.stem] = found
    splits = {s: (BCCD / "ImageSets" / "Main" / f"{s}.txt").read_text().split() for s in BCCD_SPLITS}
    return objects, splits


def link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(src, dst)


def image_of(stem: str) -> Path:
    return BCCD / "JPEGImages" / f"{stem}.jpg"


def rf_name(stem: str) -> str:
    """Roboflow's file stem: the original name with its extension folded in, plus a content hash."""
    return f"{stem}_jpg.rf.{hashlib.md5(stem.encode()).hexdigest()}"


def original_stem(name: str) -> str:
    """Back from a Roboflow name to the BCCD stem (identity for other names)."""
    return Path(name).stem.split("_jpg.rf.")[0]


# ------------------------------------------------------------------------------------ VOC XML writers
def labelimg_xml(folder: str, filename: str | None, path: str, size: tuple[int, int] | None, objects: list[Obj]
                 ) -> str:
    """An annotation as LabelImg saves it (tab-indented); ``filename=None`` leaves the tag out,
    ``size=None`` leaves ``<size>`` out."""
    lines = ["<annotation>", f"\t<folder>{folder}</folder>"]
    if filename is not None:
        lines.append(f"\t<filename>{filename}</filename>")
    lines += [f"\t<path>{path}</path>", "\t<source>", "\t\t<database>Unknown</database>", "\t</source>"]
    if size is not None:
        lines += ["\t<size>", f"\t\t<width>{size[0]}</width>", f"\t\t<height>{size[1]}</height>",
                  "\t\t<depth>3</depth>", "\t</size>"]
    lines.append("\t<segmented>0</segmented>")
    for o in objects:
        x1, y1, x2, y2 = o.box
        lines += ["\t<object>", f"\t\t<name>{o.name}</name>", "\t\t<pose>Unspecified</pose>",
                  f"\t\t<truncated>{o.truncated}</truncated>", f"\t\t<difficult>{o.difficult}</difficult>",
                  "\t\t<bndbox>", f"\t\t\t<xmin>{x1}</xmin>", f"\t\t\t<ymin>{y1}</ymin>",
                  f"\t\t\t<xmax>{x2}</xmax>", f"\t\t\t<ymax>{y2}</ymax>", "\t\t</bndbox>", "\t</object>"]
    return "\n".join(lines + ["</annotation>", ""])


def roboflow_xml(filename: str, objects: list[Obj]) -> str:
    """An annotation of Roboflow's "Pascal VOC" export."""
    lines = ["<annotation>", "\t<folder></folder>", f"\t<filename>{filename}</filename>",
             f"\t<path>{filename}</path>", "\t<source>", "\t\t<database>roboflow.com</database>", "\t</source>",
             "\t<size>", f"\t\t<width>{WIDTH}</width>", f"\t\t<height>{HEIGHT}</height>", "\t\t<depth>3</depth>",
             "\t</size>", "\t<segmented>0</segmented>"]
    for o in objects:
        x1, y1, x2, y2 = o.box
        lines += ["\t<object>", f"\t\t<name>{o.name}</name>", "\t\t<pose>Unspecified</pose>",
                  f"\t\t<truncated>{o.truncated}</truncated>", f"\t\t<difficult>{o.difficult}</difficult>",
                  "\t\t<occluded>0</occluded>", "\t\t<bndbox>", f"\t\t\t<xmin>{x1}</xmin>",
                  f"\t\t\t<xmax>{x2}</xmax>", f"\t\t\t<ymin>{y1}</ymin>", f"\t\t\t<ymax>{y2}</ymax>",
                  "\t\t</bndbox>", "\t</object>"]
    return "\n".join(lines + ["</annotation>", ""])


ROBOFLOW_READMES = {
    "README.roboflow.txt": "\nBCCD cells - v1 2024-01-01 10:00am\n==============================\n\n"
                           "This dataset was exported via roboflow.com on January 1, 2024\n",
    "README.dataset.txt": "# BCCD cells > 2024-01-01 10:00am\n\nProvided by a Roboflow user\nLicense: MIT\n",
}


# ------------------------------------------------------------------------------------------ layouts
def make_devkit(root: Path, splits: dict[str, list[str]]) -> Path:
    """``root/VOCdevkit/VOC2007`` (all test images, half of train and val, with test.txt) and
    ``VOC2012`` (the other half, train/val/trainval only, like the VOC2012 trainval tar)."""
    devkit = root / "VOCdevkit"
    years = {"VOC2007": {s: [] for s in splits}, "VOC2012": {"train": [], "val": []}}
    for split, stems in splits.items():
        for k, stem in enumerate(stems):
            year = "VOC2007" if split == "test" or k % 2 == 0 else "VOC2012"
            years[year][split].append(stem)
    for year, parts in years.items():
        main = devkit / year / "ImageSets" / "Main"
        main.mkdir(parents=True)
        for split, stems in parts.items():
            (main / f"{split}.txt").write_text("".join(f"{s}\n" for s in stems))
            for stem in stems:
                link(BCCD / "Annotations" / f"{stem}.xml", devkit / year / "Annotations" / f"{stem}.xml")
                link(image_of(stem), devkit / year / "JPEGImages" / f"{stem}.jpg")
        (main / "trainval.txt").write_text("".join(f"{s}\n" for s in parts["train"] + parts["val"]))
    return devkit


def make_flat(root: Path, objects: dict[str, list[Obj]], images: str = "images", annotations: str = "annotations"
              ) -> Path:
    """Two folders, no split files (the XML are BCCD's own)."""
    for stem in objects:
        link(image_of(stem), root / images / f"{stem}.jpg")
        link(BCCD / "Annotations" / f"{stem}.xml", root / annotations / f"{stem}.xml")
    return root


# LabelImg quirks put into a few files: what users' folders really contain.
NO_FILENAME, NO_EXTENSION, STALE_FILENAME = "BloodImage_00001", "BloodImage_00002", "BloodImage_00003"
ZERO_SIZE, NO_SIZE, DIFFICULT = "BloodImage_00004", "BloodImage_00005", "BloodImage_00006"


def make_labelimg(root: Path, objects: dict[str, list[Obj]]) -> Path:
    """One folder, each image's XML beside it, labelled on a Windows machine; six files carry a quirk:
    no ``<filename>``, one without extension, a stale one (the image was renamed after labelling),
    ``<size>`` 0x0, no ``<size>``, a first object marked difficult."""
    folder = root / "labelled"
    for stem, objs in objects.items():
        link(image_of(stem), folder / f"{stem}.jpg")
        filename, size = f"{stem}.jpg", (WIDTH, HEIGHT)
        if stem == NO_FILENAME:
            filename = None
        elif stem == NO_EXTENSION:
            filename = stem
        elif stem == STALE_FILENAME:
            filename = "IMG_20190412_101500.jpg"
        elif stem == ZERO_SIZE:
            size = (0, 0)
        elif stem == NO_SIZE:
            size = None
        elif stem == DIFFICULT:
            objs = [Obj(objs[0].name, objs[0].box, objs[0].truncated, 1)] + objs[1:]
        path = f"C:\\Users\\lab\\Pictures\\labelled\\{stem}.jpg"
        (folder / f"{stem}.xml").write_text(labelimg_xml("labelled", filename, path, size, objs))
    return folder


def make_roboflow_voc(root: Path, objects: dict[str, list[Obj]], splits: dict[str, list[str]]) -> Path:
    export = root / "BCCD-cells.v1i.voc"
    for split, stems in splits.items():
        for stem in stems:
            name = rf_name(stem)
            link(image_of(stem), export / ROBOFLOW_SPLITS[split] / f"{name}.jpg")
            (export / ROBOFLOW_SPLITS[split] / f"{name}.xml").write_text(roboflow_xml(f"{name}.jpg", objects[stem]))
    for name, text in ROBOFLOW_READMES.items():
        (export / name).write_text(text)
    return export


def coco_categories(names: list[str]) -> list[dict]:
    """Roboflow's categories: id 0 is the project itself (no box), the classes follow sorted."""
    cats = [{"id": 0, "name": ROBOFLOW_PROJECT, "supercategory": "none"}]
    return cats + [{"id": k, "name": n, "supercategory": ROBOFLOW_PROJECT} for k, n in enumerate(sorted(names), 1)]


def make_roboflow_coco(root: Path, objects: dict[str, list[Obj]], splits: dict[str, list[str]]) -> Path:
    export = root / "BCCD-cells.v1i.coco"
    names = sorted({o.name for objs in objects.values() for o in objs})
    categories = coco_categories(names)
    cat_id = {c["name"]: c["id"] for c in categories}
    for split, stems in splits.items():
        folder = export / ROBOFLOW_SPLITS[split]
        images, annotations = [], []
        for image_id, stem in enumerate(stems):
            name = f"{rf_name(stem)}.jpg"
            link(image_of(stem), folder / name)
            images.append({"id": image_id, "license": 1, "file_name": name, "height": HEIGHT, "width": WIDTH,
                           "date_captured": "2024-01-01T10:00:00+00:00"})
            for o in objects[stem]:
                x1, y1, x2, y2 = o.box
                annotations.append({"id": len(annotations), "image_id": image_id, "category_id": cat_id[o.name],
                                    "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                                    "segmentation": [], "iscrowd": 0})
        info = {"year": "2024", "version": "1", "description": "Exported from roboflow.com",
                "contributor": "", "url": "https://public.roboflow.com/object-detection/bccd",
                "date_created": "2024-01-01T10:00:00+00:00"}
        licenses = [{"id": 1, "url": "https://opensource.org/licenses/MIT", "name": "MIT"}]
        (folder / "_annotations.coco.json").write_text(json.dumps(
            {"info": info, "licenses": licenses, "categories": categories, "images": images,
             "annotations": annotations}))
    for name, text in ROBOFLOW_READMES.items():
        (export / name).write_text(text)
    return export


def make_roboflow_yolo(root: Path, objects: dict[str, list[Obj]], splits: dict[str, list[str]]) -> Path:
    """Roboflow's "YOLOv8" export: ``<split>/images``, ``<split>/labels``, data.yaml with ``../`` paths.
    Every box is written as it is, the 2 zero-size BCCD boxes too (the loader has to drop them)."""
    export = root / "BCCD-cells.v1i.yolov8"
    names = sorted({o.name for objs in objects.values() for o in objs})
    for split, stems in splits.items():
        folder = export / ROBOFLOW_SPLITS[split]
        for stem in stems:
            name = rf_name(stem)
            link(image_of(stem), folder / "images" / f"{name}.jpg")
            rows = []
            for o in objects[stem]:
                x1, y1, x2, y2 = o.box
                rows.append(f"{names.index(o.name)} {(x1 + x2) / 2 / WIDTH} {(y1 + y2) / 2 / HEIGHT} "
                            f"{(x2 - x1) / WIDTH} {(y2 - y1) / HEIGHT}\n")
            (folder / "labels").mkdir(parents=True, exist_ok=True)
            (folder / "labels" / f"{name}.txt").write_text("".join(rows))
    (export / "data.yaml").write_text(
        "train: ../train/images\nval: ../valid/images\ntest: ../test/images\n\n"
        f"nc: {len(names)}\nnames: {names!r}\n\nroboflow:\n  workspace: lab\n  project: {ROBOFLOW_PROJECT}\n"
        f"  version: 1\n  license: MIT\n  url: https://universe.roboflow.com/lab/{ROBOFLOW_PROJECT}/dataset/1\n")
    for name, text in ROBOFLOW_READMES.items():
        (export / name).write_text(text)
    return export
