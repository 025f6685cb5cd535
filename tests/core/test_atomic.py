"""Atomic writes (utils/core/atomic.py) and the files that rely on them: a failed write keeps the old file."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from utils.core import atomic
from utils.core.atomic import atomic_write, atomic_write_text, swap_in_folder
from utils.engine.run_logger import RunLogger


def _half_then_fail(failure: BaseException):
    def write(f) -> None:
        f.write(b"new and half")
        raise failure
    return write


@pytest.mark.parametrize("failure", [OSError("disk full"), KeyboardInterrupt()])
def test_failed_write_keeps_the_previous_file_and_no_temporary(tmp_path, failure):
    path = tmp_path / "file.bin"
    path.write_bytes(b"old")
    with pytest.raises(type(failure)):
        atomic_write(path, _half_then_fail(failure), durable=True)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]


def test_write_replaces_and_creates_folders(tmp_path):
    path = tmp_path / "a" / "b" / "out.md"
    atomic_write_text(path, "first\n")
    atomic_write_text(path, "second\r\nline\n")  # text is written as given (csv writes \r\n itself)
    assert path.read_bytes() == b"second\r\nline\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.md"]


def _csv_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_resumed_run_logger_keeps_epochs_done_and_drops_the_rest(tmp_path):
    logger = RunLogger(tmp_path, tensorboard=False)
    for epoch in range(5):
        logger.log({"epoch": epoch, "loss": 1.0 / (epoch + 1)})
    resumed = RunLogger(tmp_path, tensorboard=False, last_epoch=2)
    assert [r["epoch"] for r in _csv_rows(tmp_path / "results.csv")] == ["0", "1", "2"]
    resumed.log({"epoch": 3, "loss": 9.0})
    assert [r["epoch"] for r in resumed.rows()] == ["0", "1", "2", "3"]
    assert resumed.rows()[-1]["loss"].startswith("9")


def test_run_logger_rewrite_that_fails_keeps_every_row(tmp_path, monkeypatch):
    logger = RunLogger(tmp_path, tensorboard=False)
    for epoch in range(4):
        logger.log({"epoch": epoch, "loss": 0.5})
    before = (tmp_path / "results.csv").read_bytes()

    def fail(self, rows):
        raise OSError("disk full")

    monkeypatch.setattr(csv.DictWriter, "writerows", fail)
    with pytest.raises(OSError):
        RunLogger(tmp_path, tensorboard=False, last_epoch=1)
    assert (tmp_path / "results.csv").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv"]


def _folder(path, text):
    path.mkdir()
    (path / "done.json").write_text(text)
    (path / "data.txt").write_text(text)
    return path


def test_swap_in_folder_replaces_the_old_folder_and_leaves_nothing_behind(tmp_path):
    root = _folder(tmp_path / "set", "old")
    swap_in_folder(_folder(tmp_path / ".set.tmp", "new"), root, "done.json")
    assert (root / "data.txt").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["set"]


@pytest.mark.parametrize("other_finished", [True, False])
def test_swap_in_folder_when_another_process_got_there_first(tmp_path, monkeypatch, other_finished):
    """Between our two renames another process puts its folder at root: a complete one (with the
    marker) wins and ours is dropped; a half one is not taken for complete (the error is raised)."""
    root, tmp = tmp_path / "set", _folder(tmp_path / ".set.tmp", "ours")
    real_rename = atomic.os.rename

    def racing_rename(src, dst):
        if Path(src) == root:  # no old folder to move away; meanwhile the other process writes root
            _folder(root, "theirs") if other_finished else root.mkdir()
            (root / "partial").write_text("x")
            raise FileNotFoundError(src)
        return real_rename(src, dst)

    monkeypatch.setattr(atomic.os, "rename", racing_rename)
    if other_finished:
        swap_in_folder(tmp, root, "done.json")
        assert (root / "data.txt").read_text() == "theirs"
    else:
        with pytest.raises(OSError):
            swap_in_folder(tmp, root, "done.json")
    assert not tmp.exists()
