"""One help style for ``disagg serve`` and ``disagg-proxy``: every flag shows its default, and
a bad argument is one line (no page of usage before it)."""

from __future__ import annotations

import argparse
from typing import NoReturn


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, except that an error is one line naming ``--help``, exit code 2."""

    def error(self, message: str) -> NoReturn:
        """``PROG: error: MESSAGE (PROG --help lists the flags)``, then exit 2."""
        self.exit(2, f"{self.prog}: error: {message} ({self.prog} --help lists the flags)\n")


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """argparse's ArgumentDefaultsHelpFormatter ("(default: X)" after every flag's help),
    except where the help already says its default in words ("(default: the model's own)"),
    which a "(default: None)" would only contradict."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return shown_help(action)


def shown_help(action: argparse.Action) -> str | None:
    """The help text ``DefaultsHelpFormatter`` shows for ``action`` (before ``%`` expansion)."""
    text = action.help
    if text is None or text == argparse.SUPPRESS or "default" in text.lower():
        return text
    if action.default is argparse.SUPPRESS:
        return text
    if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
        return f"{text} (default: %(default)s)"
    return text
