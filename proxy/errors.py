"""OpenAI-style errors: the one shape every failure takes on the way to a client."""

from __future__ import annotations

import msgspec
from aiohttp import web

from disagg.common.sse import encode_event

# OpenAI's own error ``type`` strings where one fits, plain descriptive ones otherwise.
_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    502: "upstream_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


class ProxyError(Exception):
    """A failure that becomes an HTTP error response with an OpenAI-style body."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


def error_type(status: int) -> str:
    """The ``error.type`` string for an HTTP status."""
    return _TYPE_BY_STATUS.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_body(status: int, message: str, param: str | None = None,
               code: str | None = None) -> dict[str, object]:
    """``{"error": {"message", "type", "param", "code"}}`` as OpenAI sends it (``code``: the
    instances' code string where one applies, else the status)."""
    kind = "invalid_request_error" if code == "model_not_found" else error_type(status)
    return {"error": {"message": message, "type": kind, "param": param,  # OpenAI's, instances'
                      "code": code or status}}


def error_response(status: int, message: str, param: str | None = None,
                   code: str | None = None) -> web.Response:
    """A JSON error response."""
    return web.Response(status=status,
                        body=msgspec.json.encode(error_body(status, message, param, code)),
                        content_type="application/json")


def from_proxy_error(exc: ProxyError) -> web.Response:
    """The response for a raised ProxyError."""
    return error_response(exc.status, exc.message, exc.param, exc.code)


def error_event(status: int, message: str) -> bytes:
    """An in-stream OpenAI-style error event (the stream's headers are already sent)."""
    return encode_event(error_body(status, message))
