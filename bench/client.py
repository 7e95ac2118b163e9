"""One streaming request to an OpenAI-compatible endpoint, timed per chunk.

Timing follows ``vllm bench serve``: TTFT is the time from sending to the first chunk that
carries generated text, each later text chunk adds one ITL gap, and the request's E2E latency
ends at its last text chunk. Per-chunk work is kept to one ``perf_counter`` call and one typed
msgspec decode so that one client process keeps up with 1,000+ concurrent streams.

Every request asks for ``disagg_timings`` (an extension other servers ignore; ``--extra-body
'{"disagg_timings": false}'`` turns it off); a server that sends them (the disagg proxy, or an
instance) has each request's TTFT phases recorded (disagg/common/timings.py).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import msgspec

COMPLETIONS = "/v1/completions"
CHAT_COMPLETIONS = "/v1/chat/completions"
ENDPOINTS = (COMPLETIONS, CHAT_COMPLETIONS)
_ERROR_BODY_CHARS = 300


class _Delta(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    text: str | None = None
    delta: _Delta | None = None


class _Usage(msgspec.Struct):
    completion_tokens: int | None = None


class _Chunk(msgspec.Struct):
    """The fields of one SSE data payload the benchmark reads; others are skipped unparsed."""

    choices: list[_Choice] = []
    usage: _Usage | None = None
    error: Any = None
    disagg_timings: dict[str, Any] | None = None


_CHUNK_DECODER = msgspec.json.Decoder(_Chunk)


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestInput:
    """Everything one request needs."""

    api_url: str
    """Full URL: base URL + endpoint."""
    model: str
    """The ``model`` field of the request body."""
    prompt: str
    """Prompt text (the user message on the chat endpoint)."""
    prompt_len: int
    """Prompt tokens, recorded as the request's input length."""
    output_len: int
    """Sent as ``max_tokens`` and ``min_tokens`` with ``ignore_eos``."""
    extra_body: dict[str, Any] | None = None
    """Merged into the request body last."""
    headers: dict[str, str] | None = None
    """Extra HTTP headers (Authorization)."""
    messages: list[dict[str, str]] | None = None
    """The chat endpoint's whole message list (multi-turn); None: ``prompt`` as one user turn."""


@dataclass(slots=True)
class RequestOutput:
    """What one request produced; times are seconds from ``time.perf_counter``."""

    prompt_len: int = 0
    success: bool = False
    output_tokens: int = 0
    """From the final ``usage`` chunk; the number of text chunks when the server sends none."""
    ttft_s: float = 0.0
    latency_s: float = 0.0
    """Send to last text chunk (vLLM's E2EL)."""
    itl_s: list[float] = field(default_factory=list)
    start_s: float = 0.0
    """``perf_counter`` when the request was sent."""
    end_s: float = 0.0
    """``perf_counter`` when the request finished, failed or not."""
    error: str = ""
    generated_text: str = ""
    """The streamed text, joined: a multi-turn conversation puts it in its next prompt."""
    phases_s: dict[str, float] | None = None
    """The server's TTFT phases in seconds (``disagg_timings``' top-level ``*_s`` numbers,
    suffix dropped), when it sent them."""


def build_payload(req: RequestInput) -> dict[str, Any]:
    """The JSON body: exact output length through max_tokens + min_tokens + ignore_eos."""
    body: dict[str, Any] = {
        "model": req.model,
        "max_tokens": req.output_len,
        "min_tokens": req.output_len,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "disagg_timings": True,
    }
    if req.api_url.endswith(CHAT_COMPLETIONS):
        body["messages"] = req.messages or [{"role": "user", "content": req.prompt}]
    else:
        body["prompt"] = req.prompt
    if req.extra_body:
        body.update(req.extra_body)
    return body


def _seconds(timings: dict[str, Any], prefix: str = "") -> dict[str, float]:
    return {prefix + key[:-2]: float(value) for key, value in timings.items()
            if key.endswith("_s") and isinstance(value, int | float)
            and not isinstance(value, bool)}


def phase_seconds(timings: dict[str, Any]) -> dict[str, float]:
    """``{"ttft_s": 0.1, "kv_transfer_s": 0.01, "mode": ..., "prefill": {"queue_s": ...}}`` ->
    ``{"ttft": 0.1, "kv_transfer": 0.01, "prefill_own_queue": ...}``: the numbers only (None:
    not known); a proxy's nested ``prefill`` and ``decode`` objects (each instance's own
    timings) as ``<side>_own_<name>``, so a phase that holds transit (prefill_queue = P's queue
    plus the HTTP hop) can be split."""
    out = _seconds(timings)
    for side in ("prefill", "decode"):
        own = timings.get(side)
        if isinstance(own, dict):
            out.update(_seconds(own, f"{side}_own_"))
    return out


def _chunk_text(chunk: _Chunk) -> str | None:
    """Generated text of a chunk (completion ``text`` or chat ``delta.content``)."""
    choice = chunk.choices[0]
    if choice.text is not None:
        return choice.text
    return choice.delta.content if choice.delta is not None else None


async def _read_stream(response: aiohttp.ClientResponse, out: RequestOutput) -> None:
    """Consume the SSE stream, filling TTFT, ITLs, latency and the token count."""
    last_s = out.start_s
    num_chunks = 0
    usage_tokens: int | None = None
    texts: list[str] = []
    async for raw_line in response.content:
        if not raw_line.startswith(b"data:"):
            continue  # blank separators, SSE comments (pings), event/id fields
        payload = raw_line[5:].strip()
        if payload == b"[DONE]":
            break
        now_s = time.perf_counter()
        chunk = _CHUNK_DECODER.decode(payload)
        if chunk.error is not None:
            out.error = f"stream error: {str(chunk.error)[:_ERROR_BODY_CHARS]}"
            return
        if chunk.usage is not None and chunk.usage.completion_tokens is not None:
            usage_tokens = chunk.usage.completion_tokens
        if chunk.disagg_timings is not None:
            out.phases_s = phase_seconds(chunk.disagg_timings)
        text = _chunk_text(chunk) if chunk.choices else None
        if not text:
            continue  # role-only, finish-only or usage-only chunks carry no token
        texts.append(text)
        if num_chunks == 0:
            out.ttft_s = now_s - out.start_s
        else:
            out.itl_s.append(now_s - last_s)
        last_s = now_s
        num_chunks += 1
    if num_chunks == 0:
        out.error = "the stream ended without any generated text"
        return
    out.latency_s = last_s - out.start_s
    out.generated_text = "".join(texts)
    out.output_tokens = usage_tokens if usage_tokens is not None else num_chunks
    out.success = True


async def send_request(session: aiohttp.ClientSession, req: RequestInput,
                       timeout_s: float) -> RequestOutput:
    """Send one streaming request; never raises: failures come back in ``error``."""
    out = RequestOutput(prompt_len=req.prompt_len)
    data = msgspec.json.encode(build_payload(req))
    headers = {"Content-Type": "application/json", **(req.headers or {})}
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    out.start_s = time.perf_counter()
    try:
        async with session.post(req.api_url, data=data, headers=headers,
                                timeout=timeout) as response:
            if response.status == 200:
                await _read_stream(response, out)
            else:
                body = await response.text()
                out.error = f"HTTP {response.status}: {body[:_ERROR_BODY_CHARS]}"
    except asyncio.TimeoutError:
        out.error = f"timed out after {timeout_s:g} s"
    except (aiohttp.ClientError, msgspec.DecodeError, ValueError) as exc:
        out.error = f"{type(exc).__name__}: {exc}"
    out.end_s = time.perf_counter()
    if out.error:
        out.success = False
    return out
