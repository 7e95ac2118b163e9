"""The aiohttp runner both HTTP servers (instance and proxy) use: requests aiohttp's HTTP
parser refuses also get an OpenAI-style JSON error.

A request line, header or chunked body that aiohttp cannot parse (bad chunk size, a header over
8 KiB, an invalid method, Content-Length with Transfer-Encoding, ...) never reaches the app and
its middlewares: aiohttp's protocol handler answers it itself with a plain-text 400 that quotes
the offending bytes, and logs a traceback per request. Clients expect the same
``{"error": {...}}`` body as for every other refusal, and a client's malformed bytes are not a
server fault to log at error level. aiohttp has no public hook for this; the runner's server
is switched to a subclass whose connection handler overrides ``handle_error`` (its documented
override point in ``RequestHandler``).
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

import msgspec
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

logger = logging.getLogger(__name__)

MAX_QUOTED_CHARS = 200
"""How much of aiohttp's parser message a client gets back (it can quote 8 KiB of header)."""


def protocol_error_body(status: int, message: str | None) -> bytes:
    """The JSON body for a request aiohttp's parser refused (``message``: its reason)."""
    reason = (message or "").strip().splitlines()
    detail = reason[0][:MAX_QUOTED_CHARS] if reason else HTTPStatus(status).phrase
    if status >= 500:
        text, err_type = "internal server error", "server_error"
    else:
        text, err_type = f"malformed HTTP request: {detail}", "invalid_request_error"
    return msgspec.json.encode({"error": {"message": text, "type": err_type, "param": None,
                                          "code": status}})


def _client_fault(exc: object) -> bool:
    """An exception a client's bytes caused (a body that does not decompress, a malformed
    chunk): aiohttp raises it again while draining the body after the answer went out."""
    while isinstance(exc, BaseException):
        if isinstance(exc, HttpProcessingError) and 400 <= (exc.code or 0) < 500:
            return True
        exc = exc.__cause__
    return False


class _JsonErrorHandler(RequestHandler):
    """A connection handler whose parser-level errors are OpenAI-style JSON, and that logs a
    client's malformed bytes at debug level, not as an unhandled exception."""

    def log_exception(self, *args: Any, **kw: Any) -> None:
        if _client_fault(kw.get("exc_info")):
            logger.debug("dropped a malformed request body: %s", kw["exc_info"])
            return
        super().log_exception(*args, **kw)

    def handle_error(self, request: BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if request.writer.output_size > 0:  # mid-response: only aiohttp's own path applies
            return super().handle_error(request, status, exc, message)
        if status >= 500:
            logger.error("error handling a request from %s", request.remote, exc_info=exc)
        else:
            logger.debug("malformed request from %s: %s", request.remote, exc)
        resp = web.Response(status=status, body=protocol_error_body(status, message),
                            content_type="application/json")
        resp.force_close()
        return resp


class _JsonErrorServer(web.Server):
    """``web.Server`` making ``_JsonErrorHandler`` connections."""

    def __call__(self) -> RequestHandler:
        return _JsonErrorHandler(self, loop=self._loop, **self._kwargs)


async def setup_runner(app: web.Application, **kwargs: Any) -> web.AppRunner:
    """``web.AppRunner(app, **kwargs)``, set up, answering parser errors with JSON bodies."""
    runner = web.AppRunner(app, **kwargs)
    try:
        await runner.setup()
    except BaseException:  # a start-up context failed: close what the earlier ones opened
        await runner.cleanup()
        raise
    server = runner.server
    assert type(server) is web.Server, type(server)  # the class swap below needs exactly it
    server.__class__ = _JsonErrorServer
    return runner
