"""utils/core/paths.py: run folders are numbered like YOLO's (exp, exp2, exp3, ...)."""

from __future__ import annotations

from utils.core.paths import increment_path


def test_a_free_path_is_used_as_it_is(tmp_path):
    assert increment_path(tmp_path / "exp") == tmp_path / "exp" and (tmp_path / "exp").is_dir()
    assert increment_path(tmp_path / "other", mkdir=False) == tmp_path / "other"
    assert not (tmp_path / "other").exists()


def test_a_taken_path_gets_the_next_free_number(tmp_path):
    (tmp_path / "exp").mkdir()
    assert increment_path(tmp_path / "exp") == tmp_path / "exp2"
    assert increment_path(tmp_path / "exp") == tmp_path / "exp3"
    assert increment_path(tmp_path / "exp2") == tmp_path / "exp4"  # numbered from the same stem
    assert increment_path(tmp_path / "exp", exist_ok=True) == tmp_path / "exp"
    assert increment_path(tmp_path / "exp", mkdir=False) == tmp_path / "exp5"
    assert not (tmp_path / "exp5").exists()
