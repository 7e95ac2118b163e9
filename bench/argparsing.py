"""argparse that reports user errors as one line and exit code 2 (no usage dump)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import NoReturn

USAGE_EXIT_CODE = 2


class UsageError(Exception):
    """A user error in the command line or its inputs; the message is one readable line."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors raise UsageError instead of printing usage."""

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
