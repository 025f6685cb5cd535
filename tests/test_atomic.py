"""Atomic writes (utils/atomic.py) and the files that rely on them: a failed write keeps the old file."""

from __future__ import annotations

import csv

import pytest

from utils.atomic import atomic_write, atomic_write_text
from utils.run_logger import RunLogger


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
