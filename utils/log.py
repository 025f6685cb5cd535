"""The project logger. Configured by entry scripts, never at import."""

from __future__ import annotations

import logging

LOGGER = logging.getLogger("yolo_distill")


def setup_logging(verbose: bool = True) -> None:
    """Send the project's log records to stderr as plain lines (idempotent)."""
    if not LOGGER.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        LOGGER.addHandler(handler)
    LOGGER.setLevel(logging.INFO if verbose else logging.WARNING)
    LOGGER.propagate = False
