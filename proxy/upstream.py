"""HTTP calls from the proxy to one instance, each with a deadline, failures classified.

``UpstreamFailure``: the instance failed (connection, timeout, 5xx, 408/429) and another
instance may succeed. ``UpstreamRejected``: the instance refused the request itself (other
4xx); the client gets that answer unchanged, as a monolithic instance would have sent it.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import aiohttp
import msgspec
from aiohttp.client import _RequestContextManager

from disagg.common.openai_api import KV_KEY_HEADER
from disagg.common.request_ids import REQUEST_ID_HEADER
from disagg.common.sse import SSEDecoder, is_done
from proxy.registration import InstanceInfo
from proxy.registry import Instance

logger = logging.getLogger(__name__)

JSON_HEADERS = {"Content-Type": "application/json"}
ABORT_PATH = "/v1/kv_transfer/abort"
INFO_PATH = "/instance_info"


def upstream_headers(kv_params_key: str | None, api_key: str | None = None) -> dict[str, str]:
    """Headers every call to an instance carries: the KV params key and the API key, when
    configured (set on each pool's session, so posts, streams, aborts and probes send them)."""
    headers = {} if kv_params_key is None else {KV_KEY_HEADER: kv_params_key}
    if api_key is not None:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


class RequestSession:
    """A pool's session bound to one client request (RequestScope.session): every call it
    makes also sends the request's ``X-Request-Id``, so both instances log the id the client
    sees, and name it in their answers."""

    __slots__ = ("_session", "_headers")

    def __init__(self, session: aiohttp.ClientSession, request_id: str) -> None:
        self._session = session
        self._headers = {REQUEST_ID_HEADER: request_id}

    def post(self, url: str, *, headers: dict[str, str] | None = None,
             **kwargs: Any) -> _RequestContextManager:
        """``ClientSession.post`` with the request id among the headers."""
        return self._session.post(url, headers={**(headers or {}), **self._headers}, **kwargs)


Session: TypeAlias = aiohttp.ClientSession | RequestSession
"""What the calls below post with: a pool's session, or one bound to a client request."""


class UpstreamFailure(Exception):
    """The instance failed; the request may be retried on another instance."""

    def __init__(self, inst: Instance, reason: str, *, instance_down: bool = False,
                 status: int | None = None, code: str | None = None) -> None:
        super().__init__(f"{inst.url}: {reason}")
        self.inst = inst
        self.reason = reason
        self.instance_down = instance_down
        """True when the instance looks dead (refused or dropped the connection)."""
        self.status = status
        """The instance's HTTP status when it answered one (429, 5xx)."""
        self.code = code
        """The ``code`` string of the instance's OpenAI-style error body, if any."""

    def exhausted_status(self) -> int:
        """The client's status once no instance is left to try after this failure: an
        instance's 429 or 503 (overloaded: the client may retry later) as it was, else 502."""
        return self.status if self.status in (429, 503) else 502


class UpstreamRejected(Exception):
    """The instance refused the request (4xx): that answer goes back to the client."""

    def __init__(self, status: int, body: bytes, content_type: str) -> None:
        super().__init__(f"upstream answered {status}")
        self.status = status
        self.body = body
        self.content_type = content_type

    def openai_error(self) -> dict[str, Any] | None:
        """The body's ``error`` object when it is an OpenAI-style error (what instances
        answer), else None (some other server's page: the proxy words its own)."""
        try:
            data = msgspec.json.decode(self.body)
        except msgspec.DecodeError:
            return None
        error = data.get("error") if isinstance(data, dict) else None
        return error if isinstance(error, dict) and isinstance(error.get("message"), str) \
            else None

    def message(self) -> str:
        """What the instance said: its error message, or the start of its body."""
        error = self.openai_error()
        if error is not None:
            return str(error["message"])
        return self.body[:500].decode("utf-8", "replace").strip() or f"HTTP {self.status}"


_UNPARSED: Any = object()


@dataclass(slots=True)
class Reply:
    """A complete, successful (2xx) upstream response."""

    status: int
    body: bytes
    content_type: str
    _object: Any = field(default=_UNPARSED, repr=False, compare=False)

    def json_object(self) -> dict[str, Any] | None:
        """The body as a JSON object, decoded once however many readers ask (a READ
        prefill's answer gives its kv_transfer_params, first token and timings); None when
        it is not JSON or not an object."""
        if self._object is _UNPARSED:
            try:
                data = msgspec.json.decode(self.body)
            except (msgspec.DecodeError, RecursionError):
                data = None
            self._object = data if isinstance(data, dict) else None
        return self._object  # type: ignore[no-any-return]


ERROR_EVENT_PREFIX = b'data: {"error"'
"""How an instance's in-stream error event begins (disagg/server/api_server.py)."""


@dataclass(slots=True, eq=False)
class OpenStream:
    """A 2xx SSE response whose first event(s) have arrived; the relay owns ``response``."""

    inst: Instance
    response: aiohttp.ClientResponse
    first_events: bytes
    decoder: SSEDecoder
    saw_done: bool
    saw_error: bool = False
    """The instance sent an error event of its own (it ends the stream without [DONE])."""
    given_up: bool = False
    """The instance failed its health probes mid-stream (proxy/relay.py DownWatch)."""


def _is_retriable(status: int) -> bool:
    return status in (408, 429) or status >= 500


def _classify(inst: Instance, status: int, body: bytes, content_type: str) -> Reply:
    """2xx -> Reply; otherwise raise the matching exception."""
    if 200 <= status < 300:
        return Reply(status, body, content_type)
    if _is_retriable(status):
        snippet = body[:200].decode("utf-8", errors="replace")
        raise UpstreamFailure(inst, f"HTTP {status}: {snippet}", status=status,
                              code=_error_code(body))
    raise UpstreamRejected(status, body, content_type)


class _ErrorObject(msgspec.Struct):
    code: str | int | None = None


class _ErrorBody(msgspec.Struct):
    error: _ErrorObject


def _error_code(body: bytes) -> str | None:
    """The ``error.code`` string of an OpenAI-style error body (None: another body)."""
    try:
        code = msgspec.json.decode(body, type=_ErrorBody).error.code
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    return code[:64] if isinstance(code, str) else None


def _failure(inst: Instance, exc: BaseException, what: str) -> UpstreamFailure:
    """Turn a client-side exception into an UpstreamFailure with a readable reason."""
    if isinstance(exc, asyncio.TimeoutError):
        return UpstreamFailure(inst, f"{what} timed out")
    down = isinstance(exc, (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError))
    return UpstreamFailure(inst, f"{what} failed: {client_error_text(exc)}", instance_down=down)


def client_error_text(exc: BaseException) -> str:
    """What went wrong talking to an instance, in words (error bodies and logs carry this,
    never a Python repr)."""
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect: {exc.os_error.strerror or exc.os_error}"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the instance closed the connection before answering"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "the answer broke off mid-body"
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"HTTP {exc.status}: {exc.message}"
    text = str(exc).strip()
    return text or "the connection failed"


async def post_json(session: Session, inst: Instance, path: str,
                    body: dict[str, Any], timeout: aiohttp.ClientTimeout) -> Reply:
    """POST a JSON body and read the whole response."""
    try:
        async with session.post(inst.url + path, data=msgspec.json.encode(body),
                                headers=JSON_HEADERS, timeout=timeout) as resp:
            data = await resp.read()
            return _classify(inst, resp.status, data, resp.content_type)
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        raise _failure(inst, exc, f"POST {path}") from exc


async def open_stream(session: Session, inst: Instance, path: str,
                      body: dict[str, Any], timeout: aiohttp.ClientTimeout) -> OpenStream:
    """POST a streaming request and wait for its first complete SSE event."""
    try:
        resp = await session.post(inst.url + path, data=msgspec.json.encode(body),
                                  headers=JSON_HEADERS, timeout=timeout)
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        raise _failure(inst, exc, f"POST {path}") from exc
    try:
        if not 200 <= resp.status < 300:
            _classify(inst, resp.status, await resp.read(), resp.content_type)
        decoder = SSEDecoder()
        events: list[bytes] = []
        while not events:
            chunk = await resp.content.readany()
            if not chunk:
                raise UpstreamFailure(inst, "stream ended before its first event")
            events = decoder.feed(chunk)
        return OpenStream(inst, resp, b"".join(events), decoder, any(map(is_done, events)),
                          any(e.startswith(ERROR_EVENT_PREFIX) for e in events))
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        resp.close()
        raise _failure(inst, exc, f"stream from {path}") from exc
    except BaseException:
        resp.close()  # closing the connection is what aborts the request inside the instance
        raise


async def send_abort(session: Session, url: str, transfer_id: str,
                     timeout_s: float) -> bool:
    """Ask an instance to drop everything held for ``transfer_id``; True if it said 200."""
    try:
        async with session.post(url + ABORT_PATH,
                                data=msgspec.json.encode({"transfer_id": transfer_id}),
                                headers=JSON_HEADERS,
                                timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            await resp.read()
            return resp.status == 200
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        logger.warning("abort of transfer %s on %s failed: %r", transfer_id, url, exc)
        return False


async def fetch_instance_info(session: aiohttp.ClientSession, inst: Instance,
                              timeout_s: float) -> InstanceInfo:
    """``GET /instance_info``; raises UpstreamFailure on any error or a malformed body."""
    try:
        async with session.get(inst.url + INFO_PATH,
                               timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            data = await resp.read()
            if resp.status != 200:
                raise UpstreamFailure(inst, f"{INFO_PATH} answered HTTP {resp.status}")
            return msgspec.json.decode(data, type=InstanceInfo)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise UpstreamFailure(inst, f"malformed {INFO_PATH}: {exc}") from exc
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        raise _failure(inst, exc, f"GET {INFO_PATH}") from exc


async def while_up(coro: Any, inst: Instance, what: str) -> Any:
    """Await ``coro``, unless ``inst`` fails its health probes first (frozen or dead: its
    ``down`` event): then ``coro`` is cancelled and an UpstreamFailure raised at once, not
    after the request's own deadline (an hour for a non-streamed answer). Whatever way this
    ends, both helper tasks are finished and read, and a stream opened by a call that lost
    the race is closed."""
    task = asyncio.ensure_future(coro)
    task.add_done_callback(_read_exception)  # read even if our caller is cancelled twice
    waiter = asyncio.ensure_future(inst.down.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # the caller was cancelled or timed out
        await _settle(task, waiter)
        raise
    if task.done():
        waiter.cancel()
        await asyncio.wait({waiter})
        return task.result()
    await _settle(task, waiter)
    raise UpstreamFailure(inst, f"{what}: {inst.url} stopped answering its health checks "
                                f"({inst.last_error})")


def _read_exception(task: asyncio.Future[Any]) -> None:
    """Mark a finished call's failure as seen (the caller acts on it, or is gone)."""
    if not task.cancelled():
        task.exception()


async def _settle(task: asyncio.Future[Any], waiter: asyncio.Future[Any]) -> None:
    """Cancel both, wait for them, and drop the task's outcome: its exception is read, an
    opened stream closed."""
    task.cancel()
    waiter.cancel()
    await asyncio.wait({task, waiter})
    if not task.cancelled() and task.exception() is None:
        response = getattr(task.result(), "response", None)
        if response is not None:
            response.close()


async def with_deadline(coro: Any, timeout_s: float, inst: Instance, what: str) -> Any:
    """Await ``coro`` for at most ``timeout_s``; a miss is an UpstreamFailure."""
    try:
        return await asyncio.wait_for(coro, timeout_s)
    except asyncio.TimeoutError:
        raise UpstreamFailure(inst, f"{what} got no answer within {timeout_s:g} s") from None
