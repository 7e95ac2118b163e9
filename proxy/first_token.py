"""READ: the proxy streams the prefill's first token itself, as soon as the prefill answers.

A READ prefill answers with the token it sampled (``first_token_id``) and its text. For a
streamed request the proxy writes that text to the client at once, as the stream's first chunk,
then calls the decode with ``first_token_id`` and ``first_token_text``: the decode continues
from that token and leaves its text out of its own stream (disagg/server/serving.py checks that
its output begins with it, else the request fails). The decode's admission and its first
event's round trip leave the time to first token.

Only where the prefill's text is exactly what the decode's stream would begin with:
    - a streamed request, n = 1, without stop strings (a stop string may hold back or cut the
      token's text), logprobs (even logprobs: 0; the decode recomputes the first token for
      them), echo, returned token ids or continuous usage stats;
    - a prefill that stopped on max_tokens=1 (not on a stop token or string) with a non-empty
      text that does not end in an incomplete character (U+FFFD).
Anything else takes the decode's own first token (``--first-token prefill``) or its recompute.

Once this chunk is out, the client has its answer's first byte: a later failure (no decode
could continue) ends the stream with an error event instead of an HTTP error status.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from disagg.common.kv_transfer_params import MAX_FIRST_TOKEN_TEXT
from disagg.common.sse import SSE_HEADERS, encode_event
from proxy.bodies import ClientRequest, Endpoint
from proxy.errors import error_event
from proxy.upstream import Reply

_REPLACEMENT = "\ufffd"


@dataclass(frozen=True, slots=True)
class SentFirstToken:
    """The prefill's first token as the proxy streamed it."""

    token_id: int
    text: str


def request_allows(req: ClientRequest) -> bool:
    """Whether the decode's stream would begin with exactly the prefill's token text."""
    body = req.body
    if not req.stream or body.get("n") not in (None, 1) or body.get("echo"):
        return False
    logprobs = body.get("logprobs")
    if (logprobs is not None and logprobs is not False) or body.get("top_logprobs") is not None:
        return False  # logprobs: 0 asks for the sampled token's (and 0 == False)
    if body.get("return_token_ids") or body.get("include_stop_str_in_output"):
        return False
    options = body.get("stream_options")
    if isinstance(options, dict) and options.get("continuous_usage_stats"):
        return False  # every chunk carries the usage: the decode's do
    stop = body.get("stop")
    return not stop  # None, "" or []


def first_token_chunk(endpoint: Endpoint, reply: Reply, token_id: int | None
                      ) -> tuple[SentFirstToken, bytes] | None:
    """The token and the SSE event carrying it, from a READ prefill's answer (None: the
    answer does not allow it)."""
    if token_id is None:
        return None
    data = reply.json_object()
    if data is None:
        return None
    choices = data.get("choices")
    if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
        return None
    choice = choices[0]
    if choice.get("finish_reason") != "length":
        return None  # a stop token or string ended the prefill: the decode says what follows
    if endpoint is Endpoint.CHAT:
        message = choice.get("message")
        text = message.get("content") if isinstance(message, dict) else None
    else:
        text = choice.get("text")
    if not isinstance(text, str) or not 0 < len(text) <= MAX_FIRST_TOKEN_TEXT \
            or text.endswith(_REPLACEMENT):
        return None
    head = {key: data.get(key) for key in ("id", "created", "model")}
    if not all(isinstance(head[key], str if key != "created" else int) for key in head):
        return None
    out: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": None}
    if endpoint is Endpoint.CHAT:
        head["object"] = "chat.completion.chunk"
        out["delta"] = {"role": "assistant", "content": text}
    else:
        head["object"] = "text_completion"
        out["text"] = text
    return SentFirstToken(token_id, text), encode_event({**head, "choices": [out]})


class ClientStream:
    """The client's SSE response when the proxy starts it before the decode answers."""

    def __init__(self, request: web.Request) -> None:
        self._request = request
        self.response: web.StreamResponse | None = None
        """Set once the headers and the first chunk were written."""
        self.started_s: float | None = None
        """``time.perf_counter()`` when the first chunk was written."""

    async def start(self, event: bytes) -> None:
        """Send the headers and ``event`` (a client gone raises ConnectionResetError)."""
        response = web.StreamResponse(status=200, headers=SSE_HEADERS)
        self.response = response
        await response.prepare(self._request)
        await response.write(event)
        self.started_s = time.perf_counter()

    async def fail(self, status: int, message: str) -> web.StreamResponse:
        """End the started stream with an error event (the status line is long gone)."""
        assert self.response is not None
        try:
            await self.response.write(error_event(status, message))
            await self.response.write_eof()
        except ConnectionResetError:
            pass
        return self.response
