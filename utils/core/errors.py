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


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with each flag's default appended, as ``(default: X)``.

    Left out where there is nothing to show: flags that take no value (``store_true``: off unless
    given), defaults of ``None`` (no value), and help strings that already state the default
    (``%(default)s`` or their own ``(default ...)`` words). An empty-string default is shown as ``''``.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if action.nargs == 0 or action.default is None or action.default is argparse.SUPPRESS:
            return help_text
        if "%(default)" in help_text or "(default" in help_text or not action.option_strings:
            return help_text
        shown = "''" if action.default == "" else "%(default)s"
        return f"{help_text} (default: {shown})".strip()


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one :class:`UserError` line (exit 2 through :func:`cli_main`)
    and shows every default in ``--help`` (:class:`DefaultsHelpFormatter`, unless another is given)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{message} (see --help)")
