"""data/bccd.yaml works on a fresh clone: the bundled source is committed and converted on first use."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import yaml

from tests.fixtures.export_fixtures import BCCD, BCCD_SPLITS
from utils.convert import main
from utils.convert.prepare import MARKER
from utils.core.errors import UserError
from utils.data.config import load_data_config
from utils.data.labels import list_image_files

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["BloodImage_00000", "BloodImage_00001", "BloodImage_00002", "BloodImage_00003"]


def test_shipped_bccd_yaml_converts_the_bundled_source():
    """The real data/bccd.yaml, as a fresh clone runs it (into the git-ignored datasets/bccd)."""
    data = load_data_config(ROOT / "data" / "bccd.yaml")
    assert data["path"] == str(ROOT / "datasets" / "bccd")
    assert {s: len(list_image_files(data[s])) for s in BCCD_SPLITS} == BCCD_SPLITS
    assert data["names"] == ["RBC", "WBC", "Platelets"]
    some = next(Path(data["val"]).iterdir())
    assert some.resolve().parent == (BCCD / "JPEGImages").resolve()  # linked to the bundled copy
    marker = Path(data["path"]) / MARKER
    stamp = marker.stat().st_mtime_ns
    load_data_config("bccd.yaml")  # a bare name finds data/bccd.yaml; nothing is converted again
    assert marker.stat().st_mtime_ns == stamp


def git_lines(*args: str, stdin: str = "") -> list[str] | None:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        return None
    run = subprocess.run(["git", *args], cwd=ROOT, input=stdin, capture_output=True, text=True)
    return run.stdout.splitlines()


def test_gitignore_keeps_the_source_and_hides_the_conversion():
    files = [str(p.relative_to(ROOT)) for p in sorted(BCCD.rglob("*")) if p.is_file()]
    assert len(files) >= 364 * 2 + 4 + 2  # images, XML, 4 split files, LICENSE, SOURCE.md
    ignored = git_lines("check-ignore", "--no-index", "--stdin", stdin="\n".join(files))
    if ignored is None:
        pytest.skip("not a git checkout")
    assert ignored == []
    assert git_lines("check-ignore", "--no-index", "datasets/bccd/data.yaml") == ["datasets/bccd/data.yaml"]


@pytest.fixture
def small_source(tmp_path):
    """A four-image VOC year folder (two train, one val, one test) next to a data.yaml converting it."""
    src = tmp_path / "data" / "cells"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (src / sub).mkdir(parents=True)
    for stem in SMALL:
        shutil.copy(BCCD / "Annotations" / f"{stem}.xml", src / "Annotations")
        os.symlink(BCCD / "JPEGImages" / f"{stem}.jpg", src / "JPEGImages" / f"{stem}.jpg")
    for split, stems in {"train": SMALL[:2], "val": SMALL[2:3], "test": SMALL[3:]}.items():
        (src / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(stems) + "\n")
    yaml_file = tmp_path / "data" / "cells.yaml"
    config = {"path": "../sets/cells", "train": "images/train", "val": "images/val", "test": "images/test",
              "names": ["WBC", "RBC", "Platelets"], "convert": {"format": "voc", "source": "cells"}}
    yaml_file.write_text(yaml.safe_dump(config, sort_keys=False))
    return yaml_file, src, config


def class_ids(root: Path) -> list[int]:
    files = sorted((root / "labels").glob("*/*.txt"))
    return [int(line.split()[0]) for f in files for line in f.read_text().splitlines()]


def test_convert_block_converts_once_and_again_when_the_source_changes(small_source, tmp_path):
    yaml_file, src, config = small_source
    data = load_data_config(yaml_file)
    root = tmp_path / "sets" / "cells"
    assert data["path"] == str(root) and data["names"] == ["WBC", "RBC", "Platelets"]  # the yaml's order
    assert [len(list_image_files(data[s])) for s in ("train", "val", "test")] == [2, 1, 1]
    first_ids = class_ids(root)
    stamp = (root / MARKER).stat().st_mtime_ns
    load_data_config(yaml_file)
    assert (root / MARKER).stat().st_mtime_ns == stamp
    # A changed source file (its size, its time) is converted again.
    xml = src / "Annotations" / "BloodImage_00000.xml"
    xml.write_text(xml.read_text().replace("<name>WBC</name>", "<name>RBC</name>", 1))
    load_data_config(yaml_file)
    assert (root / MARKER).stat().st_mtime_ns != stamp
    old_ids = class_ids(root)
    assert Counter(old_ids) - Counter(first_ids) == Counter({1: 1})  # one WBC (0) became RBC (1)
    # Other names in the yaml: converted again in that order.
    config["names"] = ["Platelets", "RBC", "WBC"]
    yaml_file.write_text(yaml.safe_dump(config, sort_keys=False))
    main(["prepare", str(yaml_file)])
    new_ids = class_ids(root)
    assert new_ids != old_ids  # other ids, the same classes
    assert [config["names"][c] for c in new_ids] == [["WBC", "RBC", "Platelets"][c] for c in old_ids]
    assert not list((tmp_path / "sets").glob(".cells.*"))  # no temporary folder left


@pytest.mark.parametrize("change, message", [
    ({"format": "yolo"}, "convert 'format' must be one of voc, coco"),
    ({"source": "nowhere"}, "convert source .*nowhere not found"),
    ({"seed": "zero"}, "convert 'seed' must be an integer"),
    ({"shuffle": True}, "unknown convert setting"),
])
def test_convert_block_errors_name_the_yaml(small_source, change, message):
    yaml_file, _, config = small_source
    config["convert"].update(change)
    yaml_file.write_text(yaml.safe_dump(config, sort_keys=False))
    with pytest.raises(UserError, match=message):
        load_data_config(yaml_file)


def test_convert_block_never_overwrites_a_foreign_folder(small_source, tmp_path):
    yaml_file, _, _ = small_source
    (tmp_path / "sets" / "cells").mkdir(parents=True)
    (tmp_path / "sets" / "cells" / "mine.txt").write_text("keep me")
    with pytest.raises(UserError, match="was not written by utils.convert"):
        load_data_config(yaml_file)
    assert (tmp_path / "sets" / "cells" / "mine.txt").read_text() == "keep me"
