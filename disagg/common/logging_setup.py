"""Process-wide logging: one format (text or JSON lines) and one level, set once at start-up.

``disagg serve`` and ``disagg-proxy`` call ``configure_logging`` from their flags
(``--log-level``, ``--log-format``; else DISAGG_LOG_LEVEL / DISAGG_LOG_FORMAT) and
``export_to_children`` before they spawn anything, so the engine cores and TP workers, which
call ``configure_logging`` from those variables, log in the same format at the same level.

A request id bound with ``bound_request_id`` (the HTTP layers bind the request's
X-Request-Id while they handle it, disagg/common/request_ids.py) goes into every line logged
meanwhile: ``[id]`` after the logger name in text, ``"request_id"`` in JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from datetime import datetime, timezone

import msgspec

from disagg.common import envs
from disagg.common.config import ConfigError

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LOG_FORMATS = ("text", "json")

_request_id: ContextVar[str | None] = ContextVar("disagg_request_id", default=None)
"""The id of the request this task is handling (task-local: each aiohttp handler task and the
tasks it spawns see their own)."""


@contextlib.contextmanager
def bound_request_id(request_id: str) -> Iterator[None]:
    """Bind ``request_id`` to the log lines of this task (and tasks it starts) until exit;
    refuses nesting (one request per handler)."""
    if _request_id.get() is not None:
        raise RuntimeError(f"request id {_request_id.get()!r} is already bound")
    token = _request_id.set(request_id)
    try:
        yield
    finally:
        _request_id.reset(token)


def current_request_id() -> str | None:
    """The id bound by ``bound_request_id`` in this task, if any."""
    return _request_id.get()


def _timestamp(record: logging.LogRecord) -> str:
    return datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(
        timespec="milliseconds")


class TextFormatter(logging.Formatter):
    """``TIME LEVEL [process] logger [request id]: message``."""

    def __init__(self, process: str | None = None) -> None:
        label = f"{process} " if process else ""
        super().__init__(f"%(asctime)s %(levelname)s {label}%(name)s%(disagg_rid)s: "
                         "%(message)s")

    def format(self, record: logging.LogRecord) -> str:
        """The line, with the bound request id when there is one."""
        rid = _request_id.get()
        record.disagg_rid = f" [{rid}]" if rid else ""
        return super().format(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC, ISO 8601), level, logger, msg, then process,
    request_id, exc and stack when there are any."""

    def __init__(self, process: str | None = None) -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        """The record as one JSON line (newlines inside strings are escaped)."""
        out: dict[str, str] = {"ts": _timestamp(record), "level": record.levelname,
                               "logger": record.name, "msg": record.getMessage()}
        if self.process:
            out["process"] = self.process
        rid = _request_id.get()
        if rid:
            out["request_id"] = rid
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        try:
            return msgspec.json.encode(out).decode()
        except UnicodeEncodeError:  # a lone surrogate (undecodable bytes in a header, say)
            return json.dumps(out)


def check_log_settings(level: str, fmt: str) -> tuple[str, str]:
    """(LEVEL, format) validated; ConfigError names a bad one."""
    if level.lower() not in LOG_LEVELS:
        raise ConfigError(f"log level {level.lower()!r} (--log-level, {envs.LOG_LEVEL_ENV}) is "
                          f"not one of {', '.join(LOG_LEVELS)}")
    if fmt.lower() not in LOG_FORMATS:
        raise ConfigError(f"log format {fmt.lower()!r} (--log-format, {envs.LOG_FORMAT_ENV}) "
                          f"is not one of {', '.join(LOG_FORMATS)}")
    return level.upper(), fmt.lower()


def configure_logging(level: str | None = None, fmt: str | None = None, *,
                      process: str | None = None) -> None:
    """Log to stderr at ``level`` in ``fmt`` (None: DISAGG_LOG_LEVEL / DISAGG_LOG_FORMAT);
    ``process`` labels a child's lines (``engine``). Like ``logging.basicConfig``, it leaves a
    root logger that already has handlers alone (disagg embedded in another program, pytest);
    Python warnings go through logging too, so a JSON log stays JSON."""
    level, fmt = check_log_settings(level or envs.log_level(), fmt or envs.log_format())
    root = logging.getLogger()
    if root.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter(process) if fmt == "json" else TextFormatter(process))
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)


def export_to_children(level: str | None, fmt: str | None) -> None:
    """Put the settings in this process's environment, which every child it spawns inherits
    (the engine cores and TP workers read them there); None leaves a variable as it is."""
    if level is not None:
        os.environ[envs.LOG_LEVEL_ENV] = level.upper()
    if fmt is not None:
        os.environ[envs.LOG_FORMAT_ENV] = fmt.lower()


def add_logging_args(parser: argparse.ArgumentParser) -> None:
    """``--log-level``, ``--log-format`` and ``--disable-log-stats`` (disagg serve and
    disagg-proxy)."""
    parser.add_argument("--log-level", type=str.lower, choices=LOG_LEVELS, default=None,
                        help=f"log level of this process and the processes it starts (default: "
                             f"${envs.LOG_LEVEL_ENV}, else info)")
    parser.add_argument("--log-format", type=str.lower, choices=LOG_FORMATS, default=None,
                        help="text, or json: one JSON object per line (ts, level, logger, msg, "
                             f"request_id when known, exc) (default: ${envs.LOG_FORMAT_ENV}, "
                             "else text)")
    parser.add_argument("--disable-log-stats", action="store_true",
                        help="no periodic stats line (one every "
                             f"${envs.LOG_STATS_INTERVAL_ENV} s, 10 when unset, while there "
                             "is activity) (default: %(default)s)")


async def log_every(interval_s: float, make_line: Callable[[], str | None],
                    log: logging.Logger) -> None:
    """Every ``interval_s``, log ``make_line()`` at INFO unless it is None (until cancelled);
    a failing ``make_line`` is logged and the loop goes on."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            line = make_line()
        except Exception:
            log.exception("the stats line failed")
            continue
        if line is not None:
            log.info("%s", line)
