"""Relaying a decode instance's SSE stream to the client, whole events at a time."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncGenerator
from typing import Any

import aiohttp
from aiohttp import web

from disagg.common.sse import SSE_HEADERS, SSEDecoder, SSEFramingError, is_done
from proxy.errors import error_event
from proxy.metrics import Outcome
from proxy.timings import StreamTimings
from proxy.upstream import ERROR_EVENT_PREFIX, OpenStream, client_error_text

logger = logging.getLogger(__name__)


class StreamBroke(Exception):
    """The decode instance's stream failed after the client got its first bytes."""


async def _read_within(stream: OpenStream, timeout_s: float) -> bytes:
    if sys.version_info >= (3, 11):  # no extra task per chunk, unlike wait_for on 3.11
        async with asyncio.timeout(timeout_s):
            return await stream.response.content.readany()
    return await asyncio.wait_for(stream.response.content.readany(), timeout_s)


class DownWatch:
    """Ends a stream whose instance is given up (its health probes failed: frozen or dead)
    while the stream runs: its upstream response is closed, so the read waiting on it ends
    now with that reason, not at the stream's idle timeout (120 s by default). One task per
    stream, none per chunk."""

    def __init__(self, stream: OpenStream) -> None:
        self._stream = stream
        self._waiter = asyncio.ensure_future(stream.inst.down.wait())
        self._waiter.add_done_callback(self._fire)

    def _fire(self, waiter: asyncio.Future[Any]) -> None:
        if not waiter.cancelled():
            self._stream.given_up = True
            self._stream.response.close()

    def close(self) -> None:
        """Stop watching (the stream ended)."""
        self._waiter.cancel()


def _given_up(stream: OpenStream) -> StreamBroke:
    return StreamBroke(f"decode instance {stream.inst.url} stopped answering its health "
                       f"checks mid-stream ({stream.inst.last_error})")


async def _next_chunk(stream: OpenStream, idle_timeout_s: float) -> bytes:
    """The next upstream chunk (b"" at the end); a stall, a broken connection or an instance
    given up raises."""
    try:
        chunk = await _read_within(stream, idle_timeout_s)
    except asyncio.TimeoutError:
        raise StreamBroke(f"decode instance {stream.inst.url} sent nothing for "
                          f"{idle_timeout_s:g} s") from None
    except aiohttp.ClientError as exc:
        if stream.given_up:
            raise _given_up(stream) from None
        raise StreamBroke(f"decode instance {stream.inst.url} failed mid-stream: "
                          f"{client_error_text(exc)}") from None
    if stream.given_up:
        raise _given_up(stream)
    return chunk


async def stream_events(stream: OpenStream, idle_timeout_s: float
                        ) -> AsyncGenerator[bytes, None]:
    """Every event of ``stream``, its first ones included, until the upstream ends (setting
    ``saw_done``/``saw_error`` as they pass); a stall or a broken stream raises StreamBroke.
    The caller closes ``stream.response``."""
    try:
        pending = SSEDecoder().feed(stream.first_events)  # complete events already
    except SSEFramingError as exc:
        raise StreamBroke(f"decode instance {stream.inst.url}: {exc}") from None
    watch = DownWatch(stream)
    try:
        while True:
            for event in pending:
                stream.saw_done = stream.saw_done or is_done(event)
                stream.saw_error = stream.saw_error or event.startswith(ERROR_EVENT_PREFIX)
                yield event
            chunk = await _next_chunk(stream, idle_timeout_s)
            if not chunk:
                return
            try:
                pending = stream.decoder.feed(chunk)
            except SSEFramingError as exc:
                raise StreamBroke(f"decode instance {stream.inst.url}: {exc}") from None
    finally:
        watch.close()


async def _pump(client: web.StreamResponse, stream: OpenStream, idle_timeout_s: float,
                timings: StreamTimings | None) -> bool:
    """Copy events until the upstream ends; True when the stream ended with [DONE]
    (``stream.saw_done`` is set as soon as the upstream sends it). ``timings`` rewrites the
    event that carries the decode's timings."""
    while True:
        chunk = await _next_chunk(stream, idle_timeout_s)
        if not chunk:
            return stream.saw_done
        try:
            events = stream.decoder.feed(chunk)
        except SSEFramingError as exc:
            raise StreamBroke(f"decode instance {stream.inst.url}: {exc}") from None
        if events:
            stream.saw_done = stream.saw_done or is_done(events[-1])
            stream.saw_error = stream.saw_error or any(
                e.startswith(ERROR_EVENT_PREFIX) for e in events)
            if timings is not None:
                events = await timings.events(events)
            await client.write(b"".join(events))


async def relay_stream(request: web.Request, stream: OpenStream, idle_timeout_s: float,
                       timings: StreamTimings | None = None,
                       started: web.StreamResponse | None = None
                       ) -> tuple[web.StreamResponse, Outcome]:
    """Send the stream's first events, then the rest; the upstream response is always closed.
    ``started``: the client's response, when the proxy already sent its headers and the first
    token (proxy/first_token.py).

    A client that goes away raises out of ``write``: CLIENT_GONE, and the caller's scope
    aborts upstream; unless the upstream had already sent [DONE] (the request is complete and
    the client closed after the last event, as the openai client does): that is OK.
    """
    client = started or web.StreamResponse(status=stream.response.status, headers=SSE_HEADERS)
    watch = DownWatch(stream)
    try:
        if started is None:
            await client.prepare(request)
        first = stream.first_events
        if timings is not None:
            timings.relaying()
            first = await timings.joined(first)
        await client.write(first)
        try:
            complete = await _pump(client, stream, idle_timeout_s, timings)
            if not complete and not stream.saw_error:  # a clean end without [DONE] (and no
                # error event of the instance's own): the client must not take it whole
                raise StreamBroke(f"decode instance {stream.inst.url} ended its stream "
                                  "without [DONE]: the answer is incomplete")
        except StreamBroke as exc:
            logger.warning("%s", exc)
            await client.write(error_event(502, str(exc)))
            complete = False
        await client.write_eof()
    except ConnectionResetError:
        return client, (Outcome.OK if stream.saw_done and not stream.saw_error
                        else Outcome.CLIENT_GONE)
    finally:
        watch.close()
        stream.response.close()
        if timings is not None:
            timings.close()
    # an instance's own error event (then its [DONE]) is a failed request too
    return client, Outcome.OK if complete and not stream.saw_error else Outcome.FAILED
