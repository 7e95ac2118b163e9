"""Server-sent events framing (one helper, used by the API server and the proxy tests)."""

from __future__ import annotations

import json
from typing import Any

DONE_FRAME = b"data: [DONE]\n\n"


def sse_frame(payload: dict[str, Any]) -> bytes:
    """One ``data:`` event carrying compact JSON."""
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def iter_sse_data(buffer: bytearray) -> list[bytes]:
    """Pop every complete event's data from ``buffer`` (partial events stay in it)."""
    events: list[bytes] = []
    while True:
        end = buffer.find(b"\n\n")
        if end < 0:
            return events
        raw = bytes(buffer[:end])
        del buffer[:end + 2]
        data = [line[5:].lstrip() for line in raw.split(b"\n") if line.startswith(b"data:")]
        if data:
            events.append(b"\n".join(data))
