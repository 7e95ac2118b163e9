"""Log lines as an operator reads them: JSON lines that parse, the request id in both formats,
and which X-Request-Id values are taken as they are."""

from __future__ import annotations

import io
import json
import logging
import os

import pytest

from disagg.common import envs
from disagg.common.logging_setup import (
    JsonFormatter,
    TextFormatter,
    bound_request_id,
    current_request_id,
    export_to_children,
)
from disagg.common.request_ids import valid_request_id


def _emit(formatter: logging.Formatter, *, exc: bool = False) -> str:
    """One WARNING (with a traceback when ``exc``) through ``formatter``; the text written."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    log = logging.getLogger("disagg.test_logging_setup")
    log.addHandler(handler)
    log.propagate = False
    try:
        if exc:
            try:
                raise ValueError("boom\nsecond line")
            except ValueError:
                log.exception("failed %s", "here")
        else:
            log.warning("a \"quoted\"\nmessage %d", 7)
    finally:
        log.removeHandler(handler)
        log.propagate = True
    return out.getvalue()


def test_json_lines_parse_and_carry_the_request_id_and_the_exception() -> None:
    with bound_request_id("req-1"):
        plain = _emit(JsonFormatter("engine"))
        failed = _emit(JsonFormatter(), exc=True)
    assert current_request_id() is None  # unbound on exit
    assert plain.count("\n") == 1 and failed.count("\n") == 1  # one line each, whatever the text
    record = json.loads(plain)
    assert record["level"] == "WARNING" and record["logger"] == "disagg.test_logging_setup"
    assert record["msg"] == 'a "quoted"\nmessage 7' and record["process"] == "engine"
    assert record["request_id"] == "req-1" and record["ts"].endswith("+00:00")
    error = json.loads(failed)
    assert error["msg"] == "failed here" and "process" not in error
    assert "ValueError: boom" in error["exc"] and "Traceback" in error["exc"]
    assert "request_id" not in json.loads(_emit(JsonFormatter()))  # none bound: none written
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "bytes \udcff here", None, None)
    assert json.loads(JsonFormatter().format(record))["msg"] == "bytes \udcff here"


def test_text_lines_name_the_bound_request_id() -> None:
    with bound_request_id("req-2"):
        line = _emit(TextFormatter("engine"))
    assert " WARNING engine disagg.test_logging_setup [req-2]: a " in line
    assert " WARNING disagg.test_logging_setup: a " in _emit(TextFormatter())


def test_a_request_id_binds_once() -> None:
    with bound_request_id("outer"), pytest.raises(RuntimeError, match="already bound"), \
            bound_request_id("inner"):
        pass


@pytest.mark.parametrize(("raw", "taken"), [
    ("client-req-42", True), ("a" * 128, True), ("x:/{}[]=~", True), ("a" * 129, False),
    ("", False), ("two words", False), ("tab\there", False), ("caf\u00e9", False),
    ("line\nbreak", False), (None, False)])
def test_which_request_ids_are_taken(raw: str | None, taken: bool) -> None:
    assert valid_request_id(raw) == (raw if taken else None)


def test_children_inherit_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(envs.LOG_LEVEL_ENV, "warning")  # both restored after the test
    monkeypatch.setenv(envs.LOG_FORMAT_ENV, "text")
    export_to_children(None, "JSON")
    assert os.environ[envs.LOG_LEVEL_ENV] == "warning"  # no flag: left as it is
    assert (envs.log_level(), envs.log_format()) == ("WARNING", "json")
    export_to_children("debug", None)
    assert envs.log_level() == "DEBUG"
