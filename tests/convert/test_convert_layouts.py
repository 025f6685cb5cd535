"""Every export layout converts BCCD to the same classes and boxes; bad input is reported, not fatal.

Each layout is built once per module from the bundled BCCD (tests/fixtures/export_fixtures.py: laid out the
way VOCdevkit, LabelImg and Roboflow write them, and as public sets ship them, e.g. ``images/`` +
``annots/``) and converted once; the tests read the result.
"""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from tests.fixtures.export_fixtures import (BCCD, BCCD_BOXES, BCCD_DEGENERATE, BCCD_IMAGES, BCCD_SPLITS, DIFFICULT,
                             NO_EXTENSION, NO_FILENAME, NO_SIZE, STALE_FILENAME, ZERO_SIZE, Obj, image_of,
                             labelimg_xml, link, make_devkit, make_flat, make_labelimg, make_roboflow_coco,
                             make_roboflow_voc, make_roboflow_yolo, original_stem, read_bccd)
from utils.convert import convert_coco_export, convert_voc, main
from utils.convert.writer import assign_splits, random_split
from utils.core.errors import UserError
from utils.data.config import load_data_config
from utils.data.dataset import LoaderOptions, create_dataloader

SORTED_NAMES = ["Platelets", "RBC", "WBC"]  # no classes.txt in an export: the names found, sorted
VAL, TEST, SEED = 0.2, 0.1, 0
# round(364 * 0.2) = 73 val, round(364 * 0.1) = 36 test, the other 255 train
RANDOM_SPLIT = {"train": BCCD_IMAGES - 73 - 36, "val": 73, "test": 36}


@pytest.fixture(scope="module")
def bccd():
    return read_bccd()


@pytest.fixture(scope="module")
def reference(bccd):
    """Per BCCD stem, the sorted (class name, x1, y1, x2, y2) boxes a conversion has to give."""
    objects, _ = bccd
    return {stem: sorted((o.name, *o.box) for o in objs if o.box[2] > o.box[0] and o.box[3] > o.box[1])
            for stem, objs in objects.items()}


def converted_boxes(dst: Path, names: list[str]) -> tuple[dict[str, list], dict[str, set[str]]]:
    """(per original stem its boxes back in pixels, the stems per split) of a converted set."""
    boxes, splits = {}, {}
    for label in sorted((dst / "labels").glob("*/*.txt")):
        rows = np.loadtxt(label, ndmin=2).reshape(-1, 5)
        stem = original_stem(label.name)
        assert stem not in boxes, f"{stem} converted twice"
        boxes[stem] = sorted((names[int(c)], round((x - w / 2) * 640), round((y - h / 2) * 480),
                              round((x + w / 2) * 640), round((y + h / 2) * 480)) for c, x, y, w, h in rows)
        splits.setdefault(label.parent.name, set()).add(stem)
    return boxes, splits


def assert_bccd(result, dst, reference, names, split_sizes=BCCD_SPLITS):
    assert result.names == names and result.images == split_sizes and result.boxes == BCCD_BOXES
    assert result.problem_counts.get("degenerate box") == BCCD_DEGENERATE
    boxes, splits = converted_boxes(dst, names)
    assert boxes == reference  # the same boxes and classes as the source, image by image
    return splits


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("layouts")


# ------------------------------------------------------------------------------------------ VOC
def test_vocdevkit_with_two_years_merges_their_splits(work, bccd, reference):
    _, published = bccd
    devkit = make_devkit(work / "devkit", published)
    result = convert_voc(devkit, work / "devkit-out")
    splits = assert_bccd(result, work / "devkit-out", reference, SORTED_NAMES)
    assert splits == {s: set(stems) for s, stems in published.items()}
    assert any("layout 'devkit'" in n and "VOC2007" in n and "VOC2012" in n for n in result.notes)
    # Run on a year folder itself (VOC2012 without its VOCdevkit parent): the single-year form.
    single = convert_voc(devkit / "VOC2012", work / "voc2012-out")
    assert single.images == {"train": 102, "val": 43}  # the odd-numbered half of train and val


@pytest.fixture(scope="module", params=[("images", "annotations"), ("Images", "Annotations"), ("images", "annots")])
def flat(request, work, bccd):
    """Two folders, no split files; ``annots/``: the XML folder has none of the usual names, and no XML
    has an image beside it (only the file names pair them)."""
    objects, _ = bccd
    images, annotations = request.param
    src = make_flat(work / f"flat-{images}-{annotations}", objects, images, annotations)
    dst = work / f"flat-{images}-{annotations}-out"
    return convert_voc(src, dst, val_fraction=VAL, test_fraction=TEST, seed=SEED), dst


def test_flat_folders_get_a_deterministic_split(flat, reference, work):
    result, dst = flat
    splits = assert_bccd(result, dst, reference, SORTED_NAMES, RANDOM_SPLIT)
    assert any("layout 'flat'" in n for n in result.notes)
    assert any("364 images split by seed 0 into 255 train, 73 val, 36 test" in n for n in result.notes)
    # Every spelling of the folders holds the same files: the split has to come out the same.
    record = work / "flat-split.txt"
    text = "\n".join(f"{s}: {' '.join(sorted(stems))}" for s, stems in sorted(splits.items()))
    if record.is_file():
        assert record.read_text() == text
    record.write_text(text)


def test_xml_finds_its_image_by_name_wherever_it_is(tmp_path, bccd, reference):
    """XML files named unlike their images, images in sub-folders of a folder of another name: each
    pair is made by the XML's own stem, its <filename> or the end of its <path>; between two images of
    the same name the folder at the end of <path> decides. Linked folders are followed once; the output
    folder inside the export is not searched on a second run."""
    objects, _ = bccd
    names = ["Platelets", "RBC", "WBC"]
    src = tmp_path / "export"
    by_filename, by_path, by_stem, twin = "BloodImage_00000", "BloodImage_00001", "BloodImage_00002", "BloodImage_00003"
    link(image_of(by_filename), src / "pics" / "batch1" / f"{by_filename}.jpg")
    link(image_of(by_path), tmp_path / "elsewhere" / f"{by_path}.jpg")
    link(tmp_path / "elsewhere", src / "pics" / "batch2")  # a linked folder is followed
    link(src, src / "pics" / "loop")  # a link back up is walked once
    link(image_of(by_stem), src / "pics" / f"{by_stem}.jpg")
    link(image_of(twin), src / "pics" / "b" / f"{twin}.jpg")
    link(image_of("BloodImage_00004"), src / "pics" / "a" / f"{twin}.jpg")  # same name, other picture
    xml_dir = src / "meta"
    xml_dir.mkdir()
    (xml_dir / "label_0001.xml").write_text(labelimg_xml("x", f"{by_filename}.jpg", "/home/u/elsewhere.jpg",
                                                         (640, 480), objects[by_filename]))
    (xml_dir / "label_0002.xml").write_text(labelimg_xml("x", None, f"C:\\lab\\{by_path}.jpg", (640, 480),
                                                         objects[by_path]))
    (xml_dir / f"{by_stem}.xml").write_text(labelimg_xml("x", "renamed.jpg", "p", (640, 480), objects[by_stem]))
    (xml_dir / "label_0004.xml").write_text(labelimg_xml("x", f"{twin}.jpg", f"D:\\cells\\b\\{twin}.jpg",
                                                         (640, 480), objects[twin]))
    dst = src / "yolo"
    for _ in range(2):
        result = convert_voc(src, dst, names=names, val_fraction=0.25, seed=SEED)
        assert any("layout 'flat'" in n and str(xml_dir) in n for n in result.notes)
        assert result.problem_counts == {"image without annotation": 1}  # pics/a/, not the output's images
        assert sum(result.images.values()) == 4
        boxes, _ = converted_boxes(dst, names)
        assert boxes == {s: reference[s] for s in (by_filename, by_path, by_stem, twin)}
        chosen = next(dst.glob(f"images/*/{twin}.jpg"))
        assert chosen.resolve() == image_of(twin).resolve()  # pics/a/ links to another picture


def test_random_split_is_deterministic_and_follows_the_seed():
    keys = [f"img{k:03d}" for k in range(100)]
    a = random_split(keys, 0.2, 0.1, seed=0)
    assert a == random_split(list(reversed(keys)), 0.2, 0.1, seed=0)  # input order does not matter
    assert {s: len(v) for s, v in a.items()} == {"train": 70, "val": 20, "test": 10}
    assert a != random_split(keys, 0.2, 0.1, seed=1)
    assert sorted(sum(a.values(), [])) == keys
    # A layout that gives train but no val (Roboflow without valid/): val is carved out of train.
    notes = []
    parts = assign_splits({k: "train" for k in keys} | {"t": "test"}, 0.2, 0.0, 0, notes)
    assert len(parts["val"]) == 20 and len(parts["train"]) == 80 and parts["test"] == ["t"]
    assert "no val split" in notes[0]


@pytest.fixture(scope="module")
def labelimg(work, bccd):
    objects, _ = bccd
    src = make_labelimg(work / "labelimg", objects)
    return convert_voc(src, work / "labelimg-out", val_fraction=VAL, seed=SEED), work / "labelimg-out"


def test_labelimg_folder_with_the_tags_users_have(labelimg, reference):
    result, dst = labelimg
    assert_bccd(result, dst, reference, SORTED_NAMES, {"train": BCCD_IMAGES - 73, "val": 73})
    assert any("layout 'labelimg'" in n for n in result.notes)
    assert any(n.startswith("1 annotations name another file") for n in result.notes)  # the stale <filename>
    assert any(n.startswith("2 annotations have no usable <size>") for n in result.notes)
    assert any("marked difficult: 1 (kept)" in n for n in result.notes)
    for stem in (NO_FILENAME, NO_EXTENSION, STALE_FILENAME, ZERO_SIZE, NO_SIZE, DIFFICULT):
        assert len(list(dst.glob(f"images/*/{stem}.jpg"))) == 1
    assert sum(result.problem_counts.values()) == BCCD_DEGENERATE  # the quirks are no problems


def test_roboflow_voc_export(work, bccd, reference):
    objects, published = bccd
    src = make_roboflow_voc(work / "rf-voc", objects, published)
    result = convert_voc(src, work / "rf-voc-out")
    splits = assert_bccd(result, work / "rf-voc-out", reference, SORTED_NAMES)
    assert splits == {s: set(stems) for s, stems in published.items()}  # valid/ became val
    assert any("layout 'splits'" in n for n in result.notes)
    name = next((work / "rf-voc-out" / "images" / "val").iterdir()).name
    assert "_jpg.rf." in name  # Roboflow's names are kept


def test_forced_layout_flat_ignores_split_files(work, bccd):
    """--layout flat on a VOC year folder: its ImageSets are ignored, the split is made."""
    result = convert_voc(BCCD, work / "forced-out", layout="flat", val_fraction=VAL, test_fraction=TEST)
    assert result.images == RANDOM_SPLIT and result.names == ["RBC", "WBC", "Platelets"]  # classes.txt
    with pytest.raises(UserError, match="--layout splits"):
        convert_voc(BCCD, work / "forced-bad", layout="splits")


# ----------------------------------------------------------------------------------------- COCO
def test_roboflow_coco_export(work, bccd, reference):
    objects, published = bccd
    src = make_roboflow_coco(work / "rf-coco", objects, published)
    result = convert_coco_export(src, work / "rf-coco-out")
    splits = assert_bccd(result, work / "rf-coco-out", reference, SORTED_NAMES)
    assert splits == {s: set(stems) for s, stems in published.items()}
    assert any("bccd-cells" in n and "left out" in n for n in result.notes)  # the project category


# ----------------------------------------------------------------------------------------- YOLO
def test_roboflow_yolo_export_loads_with_ultralytics_paths(work, bccd, monkeypatch):
    objects, published = bccd
    export = make_roboflow_yolo(work / "rf-yolo", objects, published)
    monkeypatch.chdir(work)  # neither the export nor its parent
    data = load_data_config(export / "data.yaml")
    assert data["train"] == str(export / "train" / "images") and data["val"] == str(export / "valid" / "images")
    assert data["names"] == SORTED_NAMES and data["roboflow"]["project"] == "bccd-cells"
    boxes, degenerate = 0, 0
    for split, n in BCCD_SPLITS.items():
        _, dataset = create_dataloader(data[split], LoaderOptions(64, 4, workers=0, nc=3))
        assert len(dataset.im_files) == n
        boxes += sum(len(lab) for lab in dataset.labels)
        degenerate += dataset.counts.get("degenerate", 0)
    assert boxes == BCCD_BOXES and degenerate == BCCD_DEGENERATE


def test_parent_prefix_rule_prefers_the_real_parent_folder(tmp_path):
    """Ultralytics: ``../x`` resolves against ``path`` first; only when that is missing without ``../``."""
    (tmp_path / "export" / "train" / "images").mkdir(parents=True)
    (tmp_path / "export" / "data.yaml").write_text("train: ../train/images\nnames: [a]\n")
    assert load_data_config(tmp_path / "export" / "data.yaml")["train"] == str(tmp_path / "export/train/images")
    (tmp_path / "train" / "images").mkdir(parents=True)  # now export/../train/images exists: it wins
    assert load_data_config(tmp_path / "export" / "data.yaml")["train"] == str(tmp_path / "train/images")


# ------------------------------------------------------------------------------------ bad input
def small_labelimg(root: Path, objects: dict[str, list[Obj]], stems: list[str]) -> Path:
    for stem in stems:
        shutil.copy(image_of(stem), root / f"{stem}.jpg")
        (root / f"{stem}.xml").write_text(labelimg_xml("x", f"{stem}.jpg", f"/home/u/x/{stem}.jpg",
                                                       (640, 480), objects[stem]))
    return root




def test_bad_files_are_reported_skipped_and_counted(tmp_path, bccd, capsys, restore_logger):
    objects, _ = bccd
    src = tmp_path / "src"
    src.mkdir()
    good = ["BloodImage_00000", "BloodImage_00001", "BloodImage_00002"]
    small_labelimg(src, objects, good)
    (src / "broken.xml").write_text("<annotation><filename>broken.jpg</filename><object><name>RBC")
    (src / "config.xml").write_text("<config><setting>1</setting></config>")  # some other XML
    (src / "orphan.xml").write_text(labelimg_xml("x", "ghost.jpg", "/home/u/ghost.jpg", (640, 480),
                                                 objects[good[0]]))
    shutil.copy(image_of("BloodImage_00003"), src / "lonely.jpg")
    (src / "fake.jpg").write_text("not a JPEG")  # an image that is none, with its XML
    (src / "fake.xml").write_text(labelimg_xml("x", "fake.jpg", "/home/u/fake.jpg", None, objects[good[0]]))
    extra = Obj("Neutrophil", (10, 10, 50, 50), 0, 0)
    (src / f"{good[1]}.xml").write_text(labelimg_xml("x", f"{good[1]}.jpg", "p", (640, 480),
                                                     objects[good[1]] + [extra]))
    result = main(["voc", str(src), str(tmp_path / "out"), "--names", "RBC,WBC,Platelets", "--val-fraction", "0.34"])
    assert result.problem_counts == {"unreadable annotation": 2, "annotation without image": 1,
                                     "unreadable image": 1, "image without annotation": 1, "unknown class": 1}
    assert sum(result.images.values()) == 3
    assert result.boxes == sum(len(objects[s]) for s in good)  # the unknown object is dropped, its image kept
    err = capsys.readouterr().err
    for name in ("broken.xml", "config.xml", "orphan.xml", "fake.jpg", "lonely.jpg", f"{good[1]}.xml: object"):
        assert name in err
    summary = next(line for line in err.splitlines() if line.startswith("wrote "))
    for kind, n in result.problem_counts.items():
        assert f"{n} {kind}" in summary


def test_difficult_objects_are_kept_unless_asked(tmp_path, bccd):
    objects, _ = bccd
    stems = ["BloodImage_00000", "BloodImage_00001", "BloodImage_00002"]
    marked = {s: [Obj(o.name, o.box, o.truncated, int(k == 0)) for k, o in enumerate(objects[s])] for s in stems}
    src = small_labelimg(tmp_path, marked, stems)
    kept = convert_voc(src, tmp_path / "kept")
    dropped = convert_voc(src, tmp_path / "dropped", skip_difficult=True)
    assert kept.boxes == sum(len(objects[s]) for s in stems) and dropped.boxes == kept.boxes - len(stems)


@pytest.mark.parametrize("fmt", ["voc", "coco"])
def test_empty_or_unusable_folder_is_one_line_and_exit_2(tmp_path, capsys, restore_logger, fmt):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exc:
        main([fmt, str(tmp_path / "empty"), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ")
    if fmt == "voc":  # XML files, none usable: every one is reported, then one error line
        (tmp_path / "bad").mkdir()
        (tmp_path / "bad" / "a.xml").write_text("<annotation>")
        with pytest.raises(SystemExit) as exc:
            main(["voc", str(tmp_path / "bad"), str(tmp_path / "out")])
        err = capsys.readouterr().err.splitlines()
        assert exc.value.code == 2 and err[-1].startswith("error: ") and "1 unreadable annotation" in err[-1]
        assert not (tmp_path / "out").exists()


def test_problem_lines_are_capped_per_kind(tmp_path, log_lines):
    """Thousands of bad files give a readable log: the first lines of each kind, then a count."""
    from utils.convert.writer import SHOWN_PER_KIND, Problems

    problems = Problems()
    for k in range(SHOWN_PER_KIND + 5):
        problems.add("unknown class", f"f{k}.xml: class 'x' is not in the class list, dropped")
    problems.log()
    assert len([line for line in log_lines if "f" in line and ".xml" in line]) == SHOWN_PER_KIND
    assert any("5 more of 'unknown class'" in line for line in log_lines)
    assert Counter(problems.kinds) == {"unknown class": SHOWN_PER_KIND + 5}
