"""COCO detection JSON to YOLO labels: one JSON for one split, or an export with one JSON per split
folder (Roboflow's "COCO" export: ``train/_annotations.coco.json``, ``valid/``, ``test/``, the images
beside each JSON).

- Classes: the categories in order of their COCO id (COCO's ids 1..90 with gaps become 0..79), or
  ``--names``. A category without a single box that is the supercategory of the others (Roboflow's
  project-level category 0) is left out and logged.
- Crowd annotations are skipped (counted); a box of a category outside the class list is reported.
- An image the JSON lists but the folder lacks is reported and skipped; so is an image of a split
  folder that its JSON does not list. A ``width`` / ``height`` of 0 or none is read from the image.
"""

from __future__ import annotations

import json
from pathlib import Path

from utils.convert.writer import (DEFAULT_SEED, DEFAULT_TEST_FRACTION, DEFAULT_VAL_FRACTION, SPLIT_DIRS,
                                  SPLITS, ConversionResult, Item, Problems, assign_splits, check_box,
                                  check_fractions, image_size, is_image, note, split_keys, to_yolo_row,
                                  write)
from utils.core.errors import UserError
from utils.core.log import LOGGER

ROBOFLOW_JSON = "_annotations.coco.json"


def _load(json_file: Path) -> dict:
    try:
        data = json.loads(json_file.read_text())
        for key in ("images", "categories"):
            if not isinstance(data[key], list):
                raise TypeError(f"'{key}' is not a list")
        data.setdefault("annotations", [])
        for c in data["categories"]:
            if "id" not in c:
                raise KeyError("a category without 'id'")
            c["name"] = str(c["name"])
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{json_file} is not a COCO detection file ({type(exc).__name__}: {exc})") from None
    return data


def _class_list(datas: list[dict], names: list[str] | None, notes: list[str]) -> list[str]:
    """``names``, else every category by COCO id, less an empty umbrella category (Roboflow's)."""
    if names:
        return list(names)
    first_id: dict[str, int] = {}
    used: set[str] = set()
    parents: set[str] = set()
    for data in datas:
        by_id = {c["id"]: c["name"] for c in data["categories"]}
        used |= {by_id.get(a.get("category_id")) for a in data["annotations"]}
        for c in data["categories"]:
            first_id[c["name"]] = min(first_id.get(c["name"], c["id"]), c["id"])
            if str(c.get("supercategory", "")) not in ("", "none", c["name"]):
                parents.add(str(c["supercategory"]))
    umbrella = sorted(n for n in first_id if n in parents and n not in used)
    if umbrella:
        note(notes, f"categories {', '.join(umbrella)} have no box and are the supercategory of the others "
                    f"(a Roboflow export's project category); left out")
    return sorted((n for n in first_id if n not in umbrella), key=lambda n: (first_id[n], n))


def _items(json_file: Path, data: dict, images_dir: Path, index: dict[str, int], problems: Problems,
           listed_only: bool) -> list[Item]:
    """The images of one JSON with their rows; with ``listed_only`` also report folder images it omits."""
    cat_names = {c["id"]: c["name"] for c in data["categories"]}
    per_image: dict = {}
    for ann in data["annotations"]:
        per_image.setdefault(ann.get("image_id"), []).append(ann)
    crowd = 0
    items, seen = [], set()
    for info in data["images"]:
        file_name = str(info.get("file_name", ""))
        image = images_dir / file_name
        if not file_name or not image.is_file():
            problems.add("annotation without image", f"{json_file}: image {file_name or '(none)'} "
                                                     f"(id {info.get('id')}) not found in {images_dir}, skipped")
            continue
        seen.add(image.resolve())
        width, height = float(info.get("width") or 0), float(info.get("height") or 0)
        if width <= 0 or height <= 0:
            try:
                width, height = image_size(image)
            except (OSError, SyntaxError, ValueError) as exc:  # what PIL raises for a file that is no image
                problems.add("unreadable image", f"{image}: not a readable image ({exc}), skipped")
                continue
        rows = []
        for ann in per_image.get(info.get("id"), []):
            where = f"{json_file}: annotation {ann.get('id')} of {file_name}"
            if ann.get("iscrowd"):
                crowd += 1
                continue
            name = cat_names.get(ann.get("category_id"))
            if name is None:
                problems.add("unknown class", f"{where}: unknown category {ann.get('category_id')}, dropped")
                continue
            if name not in index:
                problems.add("unknown class", f"{where}: class '{name}' is not in the class list, dropped")
                continue
            try:
                x, y, w, h = (float(v) for v in ann["bbox"])
            except (KeyError, TypeError, ValueError):
                problems.add("unusable object", f"{where}: no bbox [x, y, w, h], dropped")
                continue
            clipped = check_box([x, y, x + w, y + h], width, height, where, problems)
            if clipped is not None:
                rows.append(to_yolo_row(index[name], clipped, width, height))
        relative = Path(file_name)
        safe = not relative.is_absolute() and ".." not in relative.parts  # stay inside DST
        items.append(Item(image, str(relative) if safe else relative.name, rows))
    if listed_only:
        for image in sorted(p for p in images_dir.iterdir() if is_image(p)):
            if image.resolve() not in seen:
                problems.add("image without annotation", f"{image}: not listed in {json_file}, skipped")
    if crowd:
        LOGGER.info(f"{json_file}: {crowd} crowd annotations skipped")
    return items


def _guess_split(json_file: Path) -> str | None:
    name = json_file.stem.lower()
    return next((s for s in SPLITS if s in name), None)


def convert_coco(json_file: str | Path, images_dir: str | Path, dst: str | Path, copy: bool = False,
                 split: str | None = None, names: list[str] | None = None) -> ConversionResult:
    """Convert one COCO detection JSON (one split) into YOLO labels under ``dst``.

    ``split`` defaults to train / val / test as found in the file name, else train. Converting a
    second JSON into the same ``dst`` adds its split to data.yaml.
    """
    json_file, images_dir, dst = Path(json_file), Path(images_dir), Path(dst)
    if not json_file.is_file():
        raise UserError(f"COCO annotation file {json_file} not found")
    if not images_dir.is_dir():
        raise UserError(f"COCO images folder {images_dir} not found")
    data, problems, notes = _load(json_file), Problems(), []
    names = _class_list([data], names, notes)
    items = _items(json_file, data, images_dir, {n: k for k, n in enumerate(names)}, problems, False)
    split = split or _guess_split(json_file) or "train"
    return write(dst, {split: items}, names, copy, f"coco {json_file} {images_dir} {dst}", problems, notes)


def _json_in(folder: Path) -> Path | None:
    """The COCO JSON of one split folder: Roboflow's name, else the only ``.json`` there."""
    if (folder / ROBOFLOW_JSON).is_file():
        return folder / ROBOFLOW_JSON
    found = sorted(p for p in folder.glob("*.json") if p.is_file())
    return found[0] if len(found) == 1 else None


def find_coco_export(src: Path) -> list[tuple[Path, Path, str | None]]:
    """(JSON, images folder, split or ``None``) of an export: split folders, else one JSON in ``src``."""
    if src.is_file():
        return [(src, src.parent, _guess_split(src))]
    if not src.is_dir():
        raise UserError(f"{src} not found (give a COCO JSON or the folder of a COCO export)")
    found = []
    for sub in sorted(p for p in src.iterdir() if p.is_dir()):
        split = SPLIT_DIRS.get(sub.name.lower())
        if split is not None and (json_file := _json_in(sub)) is not None:
            found.append((json_file, sub, split))
    if not found and (json_file := _json_in(src)) is not None:
        found.append((json_file, src, _guess_split(json_file)))
    if not found:
        raise UserError(f"{src} is not a COCO export: no train/, valid/ or test/ folder holding a JSON "
                        f"({ROBOFLOW_JSON}), and no single .json file in it")
    return found


def convert_coco_export(src: str | Path, dst: str | Path, copy: bool = False, names: list[str] | None = None,
                        val_fraction: float = DEFAULT_VAL_FRACTION, test_fraction: float = DEFAULT_TEST_FRACTION,
                        seed: int = DEFAULT_SEED) -> ConversionResult:
    """Convert a COCO export (one JSON per split folder, or one JSON) into YOLO labels under ``dst``.

    A JSON whose split neither its folder nor its name gives is split deterministically by
    ``val_fraction``, ``test_fraction`` and ``seed``; an export without val gets one out of train.
    """
    src, dst = Path(src), Path(dst)
    check_fractions(val_fraction, test_fraction)
    parts = find_coco_export(src)
    problems, notes = Problems(), []
    note(notes, f"{src}: COCO export ({', '.join(str(j) for j, _, _ in parts)})")
    datas = [_load(j) for j, _, _ in parts]
    names = _class_list(datas, names, notes)
    index = {n: k for k, n in enumerate(names)}
    found: list[tuple[Item, str | None]] = []
    for (json_file, images_dir, split), data in zip(parts, datas):
        found += [(item, split) for item in _items(json_file, data, images_dir, index, problems, listed_only=True)]
    keyed = dict(zip(split_keys([item.image for item, _ in found], src if src.is_dir() else src.parent), found))
    if not keyed:
        problems.log()
        raise UserError(f"{src}: no usable annotated image ("
                        f"{', '.join(f'{n} {k}' for k, n in problems.counts.items()) or 'no image listed'})")
    keys_by_split = assign_splits({k: s for k, (_, s) in keyed.items()}, val_fraction, test_fraction, seed, notes)
    splits = {split: [keyed[k][0] for k in keys] for split, keys in keys_by_split.items()}
    return write(dst, splits, names, copy, f"coco {src} {dst}", problems, notes)
