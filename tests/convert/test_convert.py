"""VOC and COCO converters: BCCD counts, degenerate boxes, the CLI, and the written data.yaml."""

import json

import cv2
import numpy as np
import pytest

from tests.fixtures.export_fixtures import BCCD, BCCD_BOXES, BCCD_SPLITS
from utils.convert import convert_coco, convert_voc, main
from utils.data.config import load_data_config
from utils.data.dataset import LoaderOptions, create_dataloader



def count_rows(folder) -> int:
    return sum(len(p.read_text().splitlines()) for p in folder.glob("*.txt"))


@pytest.fixture(scope="module")
def bccd_converted(tmp_path_factory):
    """The bundled BCCD converted once for the tests of this module."""
    dst = tmp_path_factory.mktemp("bccd") / "bccd"
    return convert_voc(BCCD, dst), dst


def test_bccd_voc_conversion(bccd_converted, bccd_root):
    result, dst = bccd_converted
    assert result.images == BCCD_SPLITS
    assert result.names == ["RBC", "WBC", "Platelets"]  # data/bccd/classes.txt
    assert result.boxes == BCCD_BOXES
    assert sum(count_rows(dst / "labels" / s) for s in BCCD_SPLITS) == BCCD_BOXES
    degenerate = [p for p in result.problems if "degenerate" in p]
    assert len(degenerate) == 2 and len(result.problems) == 2
    assert any("BloodImage_00338.xml: object 13 (RBC)" in p for p in degenerate)
    assert any("BloodImage_00343.xml: object 4 (RBC)" in p for p in degenerate)
    # Images are symlinks to the originals; nothing of BCCD is copied.
    first = next((dst / "images" / "train").iterdir())
    assert first.is_symlink() and first.resolve().parent == (bccd_root / "JPEGImages").resolve()

    data = load_data_config(result.yaml_file)
    assert data["nc"] == 3 and data["names"] == ["RBC", "WBC", "Platelets"]
    assert data["test"] == str(dst / "images" / "test")
    # The loader agrees: every label passes its checks (no drops besides the converter's).
    _, dataset = create_dataloader(data["val"], LoaderOptions(128, 8, workers=0, nc=3))
    val_rows = count_rows(dst / "labels" / "val")
    assert sum(len(lab) for lab in dataset.labels) == val_rows
    assert dataset.counts.get("corrupt", 0) == 0


def test_bccd_labels_match_the_xml(bccd_converted):
    _, dst = bccd_converted
    rows = np.loadtxt(dst / "labels" / "val" / "BloodImage_00000.txt", ndmin=2)
    # First object of BloodImage_00000.xml: WBC, xmin 260, ymin 177, xmax 491, ymax 376 on 640x480.
    expect = [1, (260 + 491) / 2 / 640, (177 + 376) / 2 / 480, (491 - 260) / 640, (376 - 177) / 480]
    assert np.allclose(rows[0], expect, atol=1e-6)


def make_voc(root, splits=True):
    """A tiny VOC folder: 3 images, one degenerate box, one unknown-size annotation."""
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    objects = {"a": [("cat", 10, 10, 50, 40), ("dog", 60, 20, 90, 70)],
               "b": [("cat", 5, 5, 5, 30)],  # degenerate: zero width
               "c": [("dog", -5, 0, 30, 30)]}  # 5 px outside: clipped
    for stem, objs in objects.items():
        cv2.imwrite(str(root / "JPEGImages" / f"{stem}.jpg"), np.zeros((80, 100, 3), np.uint8))
        size = "" if stem == "c" else "<size><width>100</width><height>80</height><depth>3</depth></size>"
        body = "".join(f"<object><name>{n}</name><difficult>0</difficult><bndbox><xmin>{x1}</xmin>"
                       f"<ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
                       for n, x1, y1, x2, y2 in objs)
        (root / "Annotations" / f"{stem}.xml").write_text(
            f"<annotation><filename>{stem}.jpg</filename>{size}{body}</annotation>")
    if splits:
        (root / "ImageSets" / "Main").mkdir(parents=True)
        (root / "ImageSets" / "Main" / "train.txt").write_text("a\nb\nmissing\n")
        (root / "ImageSets" / "Main" / "val.txt").write_text("c\n")


def test_voc_small_cases_and_copy(tmp_path):
    make_voc(tmp_path / "voc")
    result = convert_voc(tmp_path / "voc", tmp_path / "out", copy=True, names=["dog", "cat"])
    assert result.images == {"train": 2, "val": 1} and result.boxes == 3
    assert any("b.xml: object 1 (cat): degenerate" in p for p in result.problems)
    assert any("'missing' has no missing.xml" in p for p in result.problems)
    assert any("c.xml: object 1 (dog)" in p and "clipped" in p for p in result.problems)
    assert not (tmp_path / "out" / "images" / "train" / "a.jpg").is_symlink()
    rows = np.loadtxt(tmp_path / "out" / "labels" / "val" / "c.txt", ndmin=2)
    assert rows[0, 0] == 0 and np.allclose(rows[0, 1:], [15 / 100, 15 / 80, 30 / 100, 30 / 80])
    assert (tmp_path / "out" / "labels" / "train" / "b.txt").read_text() == ""  # a background image
    # Converting again over our own output works and gives the same result.
    again = convert_voc(tmp_path / "voc", tmp_path / "out", names=["dog", "cat"])
    assert again.images == result.images and (tmp_path / "out" / "images" / "train" / "a.jpg").is_symlink()


def test_voc_without_split_files(tmp_path):
    make_voc(tmp_path / "voc", splits=False)
    result = convert_voc(tmp_path / "voc", tmp_path / "out", val_fraction=0.34)
    assert sum(result.images.values()) == 3 and result.images["val"] >= 1
    assert result.names == ["cat", "dog"]  # tie in counts: alphabetical


def test_coco_conversion_and_merge(tmp_path, log_lines):
    images = tmp_path / "imgs"
    images.mkdir()
    for name in ("x.jpg", "y.jpg"):
        cv2.imwrite(str(images / name), np.zeros((50, 100, 3), np.uint8))
    coco = {
        "images": [{"id": 1, "file_name": "x.jpg", "width": 100, "height": 50},
                   {"id": 2, "file_name": "y.jpg", "width": 100, "height": 50},
                   {"id": 3, "file_name": "gone.jpg", "width": 100, "height": 50}],
        "categories": [{"id": 7, "name": "car"}, {"id": 3, "name": "person"}],
        "annotations": [{"id": 10, "image_id": 1, "category_id": 7, "bbox": [10, 10, 20, 10], "iscrowd": 0},
                        {"id": 11, "image_id": 1, "category_id": 3, "bbox": [50, 0, 0, 10], "iscrowd": 0},
                        {"id": 12, "image_id": 2, "category_id": 3, "bbox": [0, 0, 100, 50], "iscrowd": 1},
                        {"id": 13, "image_id": 2, "category_id": 3, "bbox": [40, 20, 30, 20], "iscrowd": 0}]}
    train_json = tmp_path / "instances_train.json"
    train_json.write_text(json.dumps(coco))
    result = convert_coco(train_json, images, tmp_path / "out")
    assert result.names == ["person", "car"]  # ordered by COCO category id
    assert result.images == {"train": 2} and result.boxes == 2
    assert any("annotation 11 of x.jpg: degenerate" in p for p in result.problems)
    assert any("gone.jpg (id 3) not found" in p for p in result.problems)
    assert any("1 crowd annotations skipped" in line for line in log_lines)
    rows = np.loadtxt(tmp_path / "out" / "labels" / "train" / "x.txt", ndmin=2)
    assert np.allclose(rows, [[1, 0.2, 0.3, 0.2, 0.2]])

    val_json = tmp_path / "instances_val.json"
    val_json.write_text(json.dumps(coco))
    convert_coco(val_json, images, tmp_path / "out")
    data = load_data_config(tmp_path / "out" / "data.yaml")
    assert data["train"].endswith("images/train") and data["val"].endswith("images/val")




def test_cli_exit_codes(tmp_path, capsys, restore_logger):
    with pytest.raises(SystemExit) as exc:
        main(["voc", str(tmp_path / "nowhere"), str(tmp_path / "out")])
    assert exc.value.code == 2
    assert "not a Pascal VOC folder" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{\"images\": []}")
    with pytest.raises(SystemExit) as exc:
        main(["coco", str(bad), str(tmp_path), str(tmp_path / "out")])
    assert exc.value.code == 2 and "not a COCO detection file" in capsys.readouterr().err
    make_voc(tmp_path / "voc")
    result = main(["voc", str(tmp_path / "voc"), str(tmp_path / "cli_out"), "--names", "cat,dog"])
    assert result.names == ["cat", "dog"] and (tmp_path / "cli_out" / "data.yaml").is_file()
