"""Drives one request through the engine and yields text deltas (frontend side)."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field

from disagg.common.kv_transfer_params import (
    KV_TRANSFER_FAILED,
    KV_TRANSFER_FAILED_CODE,
    KVTransferParams,
)
from disagg.common.openai_api import ApiError
from disagg.common.pause import PAUSE_ABORT_ERROR
from disagg.common.protocol import TokenLogprob
from disagg.common.sampling_params import SamplingParams
from disagg.common.tokenizer import Tokenizer
from disagg.server.detokenizer import IncrementalDetokenizer
from disagg.server.engine_client import EngineClient
from disagg.server.engine_health import EngineUnavailableError
from disagg.server.metrics import ServerMetrics
from disagg.server.request_clock import RequestClock


@dataclass(frozen=True, slots=True)
class TextOptions:
    """How output ids become text (the request's vLLM fields; frontend only)."""

    include_stop_str_in_output: bool = False
    """Keep the stop string, or the stop token's text, that ended the output."""
    skip_special_tokens: bool = True


@dataclass(slots=True)
class Delta:
    """New output of one request since the last delta."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    """With finish_reason "stop": the stop string or ``stop_token_ids`` id that ended the
    output (None for EOS), as vLLM's ``stop_reason``."""
    kv_transfer_params: KVTransferParams | None = None
    num_cached_tokens: int = 0
    """With the finish: prompt tokens served from the prefix cache."""
    index: int = 0
    """The choice it belongs to (n > 1: disagg/server/parallel_sampling.py)."""
    already_sent: bool = False
    """Its text was the first token's, which the proxy already streamed (READ): a stream
    writes no chunk for it (the ids still count)."""


@dataclass(slots=True)
class GenerationResult:
    """Accumulated non-streaming result."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    kv_transfer_params: KVTransferParams | None = None
    num_cached_tokens: int = 0

    def add(self, d: Delta) -> None:
        """Append one delta of this generation."""
        self.text += d.text
        self.token_ids.extend(d.token_ids)
        if d.logprobs:
            self.logprobs.extend(d.logprobs)
        if d.finish_reason is not None:
            self.finish_reason, self.stop_reason = d.finish_reason, d.stop_reason
            self.kv_transfer_params = d.kv_transfer_params
            self.num_cached_tokens = d.num_cached_tokens


def _engine_error(message: str) -> ApiError:
    """Engine-side failures: length/empty checks are the user's (400), the rest 500. KV
    transfer failures stay 500 even when the request's kv_transfer_params were refused: the
    proxy made them (a prompt digest that differs is tokenizer drift between instances), so
    it retries and answers 502, not a 400 about a field the client never sent."""
    if "exceeds max_model_len" in message or "prompt is empty" in message:
        return ApiError(400, message, code="context_length_exceeded")
    if message.startswith("logit_bias"):  # an id past the model's vocabulary
        return ApiError(400, message, param="logit_bias")
    if message.startswith("prompt token id"):  # past the model's vocabulary (not the
        return ApiError(400, message, param="prompt")  # tokenizer's, which may be larger)
    if message == PAUSE_ABORT_ERROR:
        return ApiError(503, message, err_type="server_error", code="paused")
    if message.startswith(KV_TRANSFER_FAILED):  # a WRITE decode settles its own request
        return ApiError(500, message, err_type="server_error", code=KV_TRANSFER_FAILED_CODE)
    return ApiError(500, message, err_type="server_error")


def _dead_error(exc: Exception) -> ApiError:
    """A dead or stalled engine core (or a lost connection to it): 503, so clients and proxies
    retry elsewhere while a supervisor restarts this instance or the engine resumes."""
    return ApiError(503, f"engine unavailable: {exc}", err_type="server_error")


class _SentText:
    """The first token's text the proxy already streamed (READ, from the prefill's answer):
    left out of this stream, which must begin with it exactly. Anything else would put text
    the client never sees, or sees twice, into its answer: the request fails instead."""

    def __init__(self, text: str | None) -> None:
        self._left = text or ""

    @property
    def owed(self) -> bool:
        """Part of the sent text has not come out of this stream yet."""
        return bool(self._left)

    def strip(self, text: str, done: bool) -> str:
        """``text`` without what is still owed to the already-sent prefix."""
        if not self._left:
            return text
        n = min(len(text), len(self._left))
        if text[:n] != self._left[:n] or (done and n < len(self._left)):
            self._left = ""
            raise ApiError(500, "the decode's first token text differs from the prefill's, "
                                "which the proxy already sent", err_type="server_error")
        self._left = self._left[n:]
        return text[n:]


async def generate(engine: EngineClient, tok: Tokenizer, metrics: ServerMetrics,
                   request_id: str, prompt_ids: list[int], sp: SamplingParams,
                   kv_params: KVTransferParams | None,
                   cache_salt: str | None = None,
                   clock: RequestClock | None = None,
                   text_options: TextOptions = TextOptions()) -> AsyncGenerator[Delta, None]:
    """Submit and stream; aborts the engine request if the consumer stops early (or a stop
    string ended the output). ``clock`` gets the first output's instant and the engine's
    timings."""
    start = time.monotonic()
    first: float | None = None
    last = start
    num_out = 0
    reason: str | None = None
    done = engine_done = False
    try:
        handle = await engine.add_request(request_id, prompt_ids, sp, kv_params, cache_salt)
    except EngineUnavailableError as exc:  # dead or stalled, before or while sending: no abort
        raise _dead_error(exc) from None
    detok = IncrementalDetokenizer(tok, sp.stop, min_tokens=sp.min_tokens,
                                   include_stop=text_options.include_stop_str_in_output,
                                   skip_special_tokens=text_options.skip_special_tokens)
    sent = _SentText(kv_params.first_token_text if kv_params is not None else None)
    try:
        while not done:
            item = await handle.queue.get()
            if isinstance(item, Exception):  # the engine died: an error, not a client abort
                done = engine_done = True
                raise _dead_error(item)
            if clock is not None:
                clock.on_output(item.timings)
            if item.finish_reason == "error":
                done = engine_done = True
                raise _engine_error(item.error or "the engine failed the request")
            done = engine_done = item.finish_reason is not None
            if item.new_token_ids:
                now = time.monotonic()
                if first is None:
                    first = now
                    metrics.first_token(now - start)
                    metrics.tokens(prompt=len(prompt_ids))
                else:
                    metrics.next_output(now - last)
                metrics.tokens(generated=len(item.new_token_ids))
                last = now
            num_out += len(item.new_token_ids)
            owed = sent.owed
            # the engine's "stop" is always a stop token (EOS or stop_token_ids), the last id
            stop_token = item.finish_reason == "stop"
            text = sent.strip(detok.push(item.new_token_ids, final=done, stop_token=stop_token),
                              done)
            reason = item.finish_reason
            stop_reason: str | int | None = None
            if detok.stopped:  # a stop string, maybe on the last token max_tokens allowed
                reason, stop_reason, done = "stop", detok.stop_string, True
            elif stop_token and item.new_token_ids[-1:] and \
                    item.new_token_ids[-1] in sp.stop_token_ids:
                stop_reason = item.new_token_ids[-1]
            yield Delta(text, item.new_token_ids, item.logprobs, reason, stop_reason,
                        item.kv_transfer_params, item.num_cached_tokens,
                        already_sent=owed and not text and reason is None)
    finally:
        if not engine_done:
            await engine.abort(request_id)
        if done:  # engine-finished, or ended here by a stop string
            metrics.finished(reason or "error")
            metrics.completed(start_s=start, first_s=first, end_s=time.monotonic(),
                              num_output_tokens=num_out)
        else:
            metrics.finished("abort")


async def collect(deltas: AsyncIterator[Delta]) -> GenerationResult:
    """Gather a whole generation for a non-streaming response."""
    res = GenerationResult()
    async for d in deltas:
        res.add(d)
    return res
