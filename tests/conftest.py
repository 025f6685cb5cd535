"""Shared pytest setup: the repository root on sys.path, few threads, fixed seeds."""

import logging
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BCCD = ROOT / "data" / "bccd"  # bundled in the repository (data/bccd/SOURCE.md)

torch.set_num_threads(1)

from utils.core.log import LOGGER  # noqa: E402  (after the root is on sys.path)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def bccd_root() -> Path:
    if not BCCD.is_dir():
        pytest.fail(f"{BCCD} is missing: it is part of the repository")
    return BCCD


@pytest.fixture
def log_lines():
    """Messages the project logger emits during the test."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    handler, old_level = Collect(), LOGGER.level
    LOGGER.addHandler(handler)
    LOGGER.setLevel(logging.INFO)
    yield lines
    LOGGER.removeHandler(handler)
    LOGGER.setLevel(old_level)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> str:
    """A generated 8-image training set (96 px, 7 classes) for end-to-end runs of the engine."""
    from utils.data.synthetic import generate

    return str(generate(tmp_path_factory.mktemp("syn"), n_train=8, n_val=4, img_size=96, seed=0))


@pytest.fixture
def restore_logger():
    """The CLIs configure the project logger; put it back for the tests that follow."""
    saved = (list(LOGGER.handlers), LOGGER.level, LOGGER.propagate)
    yield
    LOGGER.handlers[:] = saved[0]
    LOGGER.setLevel(saved[1])
    LOGGER.propagate = saved[2]
