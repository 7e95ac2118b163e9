"""Server-sent events framing, the one helper: the instance builds its streams with it, the
proxy splits upstream byte streams into whole events with it.

An event is one or more ``field: value`` lines ended by a blank line. OpenAI streams carry one
``data:`` line per event and end with ``data: [DONE]``. The proxy relays whole events only, so
that an error event it adds never lands in the middle of an upstream event.
"""

from __future__ import annotations

import re

import msgspec

DONE_EVENT = b"data: [DONE]\n\n"
"""The event that ends an OpenAI stream."""
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
"""Response headers of an SSE stream."""

# A blank line ends an event; servers may use \n, \r\n or \r line ends.
_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")


class SSEFramingError(ValueError):
    """The upstream sent an event larger than the decoder accepts."""


class SSEDecoder:
    """Incremental splitter: feed raw chunks, get back complete events (terminator included)."""

    def __init__(self, max_event_bytes: int = 16 * 1024 * 1024) -> None:
        self._buffer = b""
        self._max_event_bytes = max_event_bytes

    def feed(self, chunk: bytes) -> list[bytes]:
        """Add bytes; return every event completed by them, in order."""
        data = self._buffer + chunk if self._buffer else chunk
        events: list[bytes] = []
        start = 0
        for match in _EVENT_END.finditer(data):
            events.append(data[start:match.end()])
            start = match.end()
        self._buffer = data[start:]
        if len(self._buffer) > self._max_event_bytes:
            raise SSEFramingError(f"SSE event over {self._max_event_bytes} bytes")
        return events

    @property
    def pending_bytes(self) -> int:
        """Bytes of an event not yet terminated."""
        return len(self._buffer)


def event_data(event: bytes) -> bytes | None:
    """The event's ``data`` payload (several data lines joined by newlines), or None."""
    lines = event.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    parts = []
    for line in lines:
        if line == b"data" or line.startswith(b"data:"):
            value = line[5:]
            parts.append(value[1:] if value.startswith(b" ") else value)
    return b"\n".join(parts) if parts else None


def is_done(event: bytes) -> bool:
    """True for the ``data: [DONE]`` event."""
    if b"[DONE]" not in event:  # the common case, without parsing
        return False
    return event_data(event) == b"[DONE]"


def encode_event(data: bytes | str | dict[str, object]) -> bytes:
    """One ``data:`` event; dicts are JSON-encoded, multi-line data gets one line each."""
    if isinstance(data, dict):
        payload = msgspec.json.encode(data)
    elif isinstance(data, str):
        payload = data.encode("utf-8")
    else:
        payload = data
    lines = payload.replace(b"\r\n", b"\n").split(b"\n")
    return b"".join(b"data: " + line + b"\n" for line in lines) + b"\n"
