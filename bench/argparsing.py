"""argparse that reports user errors as one line and exit code 2 (no usage dump), and shows
every flag's default in ``--help``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any, NoReturn

USAGE_EXIT_CODE = 2


class UsageError(Exception):
    """A user error in the command line or its inputs; the message is one readable line."""


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to a flag's help (``off`` for a switch), unless the help
    already says its default or there is no value to show (None, an empty list): such help
    says itself what leaving the flag out means."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if ("default" in text or not action.option_strings or default is argparse.SUPPRESS
                or default is None or default == []):
            return text
        if default is False and action.nargs == 0:
            return f"{text} (default: off)"
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors raise UsageError instead of printing usage."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        """Turn argparse's complaint into a UsageError."""
        raise UsageError(message)


def run_cli(prog: str, body: Callable[[], int]) -> int:
    """Run ``body``; a UsageError becomes one ``prog: error: ...`` line and exit code 2."""
    try:
        return body()
    except UsageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return USAGE_EXIT_CODE
    except SystemExit as exc:  # --help and --version exit through argparse
        return exc.code if isinstance(exc.code, int) else 0


def csv_numbers(text: str, kind: type[int] | type[float], flag: str) -> list:
    """``"1,64,256"`` -> ``[1, 64, 256]``; every value must be > 0."""
    try:
        values = [kind(item) for item in text.split(",") if item.strip()]
    except ValueError:
        values = []
    if not values or any(v <= 0 for v in values):
        raise UsageError(f"{flag} takes a comma list of positive numbers, got {text!r}")
    return values


def key_values(items: list[str] | None, flag: str) -> dict[str, str] | None:
    """``["a=1", "b=x=y"]`` -> ``{"a": "1", "b": "x=y"}`` (keys and values stripped); None when
    the flag was not given."""
    if items is None:
        return None
    pairs: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"{flag} takes KEY=VALUE pairs, got {item!r}")
        pairs[key.strip()] = value.strip()
    return pairs
