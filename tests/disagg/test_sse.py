"""SSE framing: splitting arbitrary chunks into whole events, building events."""

from __future__ import annotations

import msgspec
import pytest

from disagg.common.sse import (
    DONE_EVENT,
    SSEDecoder,
    SSEFramingError,
    encode_event,
    event_data,
    is_done,
)
from proxy.errors import error_event

STREAM = b'data: {"a": 1}\n\ndata: {"b": 2}\r\n\r\n: comment\n\ndata: [DONE]\n\n'


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 7, 16, len(STREAM)])
def test_decoder_reassembles_events_whatever_the_chunking(chunk_size: int) -> None:
    decoder = SSEDecoder()
    events: list[bytes] = []
    for i in range(0, len(STREAM), chunk_size):
        events += decoder.feed(STREAM[i:i + chunk_size])
    assert events == [b'data: {"a": 1}\n\n', b'data: {"b": 2}\r\n\r\n', b": comment\n\n",
                      b"data: [DONE]\n\n"]
    assert b"".join(events) == STREAM
    assert decoder.pending_bytes == 0


def test_decoder_keeps_an_unfinished_event() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: x\n") == []
    assert decoder.pending_bytes == len(b"data: x\n")
    assert decoder.feed(b"\n") == [b"data: x\n\n"]


def test_decoder_refuses_an_oversized_event() -> None:
    decoder = SSEDecoder(max_event_bytes=8)
    with pytest.raises(SSEFramingError):
        decoder.feed(b"data: 0123456789")


def test_event_data_joins_data_lines_and_skips_other_fields() -> None:
    assert event_data(b"event: x\ndata: one\ndata:two\n\n") == b"one\ntwo"
    assert event_data(b": comment\n\n") is None


def test_done_detection() -> None:
    assert is_done(DONE_EVENT)
    assert is_done(b"data:[DONE]\r\n\r\n")
    assert not is_done(b'data: {"text": "[DONE] is just text"}\n\n')
    assert not is_done(b'data: {"x": 1}\n\n')


def test_encode_event_round_trips_through_the_decoder() -> None:
    event = encode_event({"k": "v"})
    assert SSEDecoder().feed(event) == [event]
    assert msgspec.json.decode(event_data(event) or b"") == {"k": "v"}
    assert encode_event("a\nb") == b"data: a\ndata: b\n\n"


def test_error_event_is_openai_shaped() -> None:
    body = msgspec.json.decode(event_data(error_event(502, "boom")) or b"")
    assert body == {"error": {"message": "boom", "type": "upstream_error", "param": None,
                              "code": 502}}
