"""``X-Request-Id``, as vLLM takes it: the client's id when it is a sane one, else a new one;
bound to the log lines of the request's handling and echoed on its response.

    client --X-Request-Id: R--> proxy --X-Request-Id: R--> prefill   (logs R, answers R)
                                      --X-Request-Id: R--> decode    (logs R, answers R)
           <--X-Request-Id: R--

An instance names the request ``cmpl-R`` (``chatcmpl-R``) in its answer and gives its engine
a unique id that starts with it (disagg/server/api_server.py), so the engine core's lines, the
KV connector's included, carry R next to the transfer id.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping

from aiohttp import web
from aiohttp.typedefs import Handler

from disagg.common.logging_setup import bound_request_id, current_request_id

REQUEST_ID_HEADER = "X-Request-Id"
MAX_REQUEST_ID_LEN = 128
"""Longer ids are replaced by a new one (they end up in every log line of the request)."""
_VALID = re.compile(rf"[\x21-\x7e]{{1,{MAX_REQUEST_ID_LEN}}}")
"""Printable ASCII without spaces: nothing that can break a log line or a header."""


def valid_request_id(raw: str | None) -> str | None:
    """``raw`` when it is a usable request id (1-128 printable ASCII characters, no space),
    else None."""
    return raw if raw is not None and _VALID.fullmatch(raw) else None


def request_id_from(headers: Mapping[str, str]) -> str:
    """The request's valid ``X-Request-Id``, else a new random one."""
    return valid_request_id(headers.get(REQUEST_ID_HEADER)) or uuid.uuid4().hex


@web.middleware
async def request_id_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Bind the request's id to the log lines of its handling and name it on the response
    (outermost middleware, so even an auth error carries it)."""
    request_id = request_id_from(request.headers)
    with bound_request_id(request_id):
        response = await handler(request)
    if not response.prepared:
        response.headers[REQUEST_ID_HEADER] = request_id
    return response


async def echo_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: a stream, prepared inside its handler, names the id too."""
    request_id = current_request_id()
    if request_id is not None:
        response.headers[REQUEST_ID_HEADER] = request_id


def install_request_ids(app: web.Application) -> None:
    """Add the middleware (first, so outermost) and the response hook to ``app`` (before it
    starts)."""
    app.middlewares.insert(0, request_id_middleware)
    app.on_response_prepare.append(echo_request_id)
