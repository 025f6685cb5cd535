"""User-facing errors: one clear line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import argparse
import functools
import sys
from typing import Callable, TypeVar

EXIT_USAGE = 2

F = TypeVar("F", bound=Callable[..., object])


class UserError(Exception):
    """A problem with what the user handed in (a flag, a file, a data set), not a bug.

    Entry scripts wrap their ``main`` with :func:`cli_main`, which prints the message as
    one line and exits with code 2.
    """


def cli_main(fn: F) -> F:
    """Decorate an entry point so that a :class:`UserError` becomes ``error: ...`` + exit 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(EXIT_USAGE) from None
        except FileNotFoundError as exc:
            print(f"error: file not found: {exc.filename or exc}", file=sys.stderr)
            raise SystemExit(EXIT_USAGE) from None

    return wrapper  # type: ignore[return-value]


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one :class:`UserError` line (exit 2 through :func:`cli_main`)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{message} (see --help)")
