"""The project logger. Configured by entry scripts, never at import."""

from __future__ import annotations

import logging
import sys

LOGGER = logging.getLogger("yolo_distill")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record (it may be replaced later)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # the base class assigns it once; the property ignores it
        pass


def setup_logging(verbose: bool = True) -> None:
    """Send the project's log records to stderr as plain lines (idempotent)."""
    if not LOGGER.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        LOGGER.addHandler(handler)
    LOGGER.setLevel(logging.INFO if verbose else logging.WARNING)
    LOGGER.propagate = False
