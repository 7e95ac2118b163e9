"""Client request bodies: validation, prompt token counts, and the bodies sent to P and D."""

from __future__ import annotations

import dataclasses
import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from disagg.common.openai_api import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    check_fan_out,
    check_request,
    completion_prompts,
    requested_max_tokens,
    validate_object,
)
from disagg.common.openai_api import decode_body as decode_json
from disagg.common.prompt_ids import chat_prompt_ids, truncated_prompt
from disagg.common.tokenizer import ByteTokenizer, Tokenizer, get_tokenizer
from proxy.errors import ProxyError

logger = logging.getLogger(__name__)

DEFAULT_COMPLETION_MAX_TOKENS = 16
"""OpenAI's default ``max_tokens`` for /v1/completions (chat has none: unknown = this)."""


class Endpoint(enum.Enum):
    """The generation routes the proxy serves, by path."""

    COMPLETIONS = "/v1/completions"
    CHAT = "/v1/chat/completions"


@dataclass(frozen=True, slots=True)
class ClientRequest:
    """A validated client request (the client's ``kv_transfer_params`` already dropped)."""

    endpoint: Endpoint
    body: dict[str, Any]
    stream: bool
    num_prompt_tokens: int
    max_tokens: int
    prompt_token_ids: tuple[int, ...] = ()
    """The prompt as the instances tokenize it (KV-aware routing hashes its blocks)."""
    cache_salt: str | None = None
    """The client's ``cache_salt``: the instances root the prompt's hash chain with it."""
    want_timings: bool = False
    """The client asked for ``disagg_timings`` (the proxy asks the instances either way)."""
    requested_max_tokens: int | None = None
    """The client's own max_tokens (None: it gave none, the decode fills the context)."""
    n: int = 1
    """Choices asked for: n > 1 runs one flow per choice (proxy/fan_out.py)."""
    batch: tuple[ClientRequest, ...] = ()
    """A completion with a batch of prompts: one request per prompt (the fields above are the
    first's); each prompt's choices are flows of their own (proxy/fan_out.py)."""


class PromptCounter:
    """Tokenizes prompts with the served model's tokenizer, loaded once, as the instances do
    (disagg/common/openai_api.py), so a prompt's block hashes match theirs."""

    def __init__(self, model: str | None, fallback_model: Callable[[], str | None]) -> None:
        self._model = model
        self._fallback_model = fallback_model
        self._tokenizer: Tokenizer | None = None

    def tokenizer(self) -> Tokenizer:
        """The tokenizer; a byte tokenizer stands in until the model's name is known."""
        if self._tokenizer is not None:
            return self._tokenizer
        name = self._model or self._fallback_model()
        if name is None:
            return ByteTokenizer()
        try:
            self._tokenizer = get_tokenizer(name)
        except Exception as exc:  # a broken tokenizer must not take requests down with it
            logger.warning("cannot load tokenizer for %s (%s); counting bytes", name, exc)
            self._tokenizer = ByteTokenizer()
        return self._tokenizer

    def prompt_ids(self, prompt: str | list[int]) -> list[int]:
        """A completion prompt's token ids (token-id prompts are their own)."""
        if isinstance(prompt, list):
            return prompt
        return self.tokenizer().encode(prompt)

    def count_prompt(self, prompt: str | list[int]) -> int:
        """Tokens in a completion prompt."""
        return len(self.prompt_ids(prompt))

    def chat_ids(self, req: ChatCompletionRequest) -> list[int]:
        """The rendered chat prompt's token ids."""
        return chat_prompt_ids(req, self.tokenizer())


def _check_shape(endpoint: Endpoint, body: dict[str, Any]) -> None:
    """The required fields, with the proxy's own messages (before the typed check)."""
    if body.get("stream") is not None and not isinstance(body["stream"], bool):
        raise ProxyError(400, "'stream' must be true or false", param="stream")
    if endpoint is Endpoint.COMPLETIONS:
        if "prompt" not in body:
            raise ProxyError(400, "'prompt' is required", param="prompt")
        completion_prompts(body["prompt"])
        return
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ProxyError(400, "'messages' must be a non-empty list", param="messages")
    if not all(isinstance(m, dict) for m in messages):
        raise ProxyError(400, "each message must be an object", param="messages")


def _validated(endpoint: Endpoint, raw: bytes) -> tuple[dict[str, Any], Any]:
    """The body as a dict (what is forwarded) and as the instance's typed request, checked
    with the instance's own bounds so the proxy refuses what an instance would refuse."""
    body = decode_json(raw)
    if not isinstance(body, dict):
        raise ProxyError(400, "request body must be a JSON object")
    body.pop("kv_transfer_params", None)  # only the proxy sets these
    _check_shape(endpoint, body)
    kind = CompletionRequest if endpoint is Endpoint.COMPLETIONS else ChatCompletionRequest
    req = validate_object(body, kind)
    check_request(req, fan_out=True)  # n > 1: proxy/fan_out.py
    return body, req


def _check_max_tokens(requested: int | None, max_model_len: int | None) -> None:
    """400 for an output limit no prompt leaves room for (every prompt has >= 1 token); the
    exact prompt + max_tokens check is the instance's, with its own tokenizer."""
    if requested is not None and max_model_len is not None and requested >= max_model_len:
        raise ProxyError(400, f"This model's maximum context length is {max_model_len} "
                              f"tokens; max_tokens {requested} leaves no room for the prompt",
                         param="max_tokens", code="context_length_exceeded")


def parse_request(endpoint: Endpoint, raw: bytes, counter: PromptCounter,
                  max_model_len: int | None = None) -> ClientRequest:
    """Validate a client's body and count its prompt; raises ProxyError(400) on bad input.
    ``max_model_len``: the pools' limit, when known."""
    try:
        return _parsed(endpoint, raw, counter, max_model_len)
    except ApiError as exc:
        raise ProxyError(exc.status, exc.message, param=exc.param, code=exc.code) from None


def _parsed(endpoint: Endpoint, raw: bytes, counter: PromptCounter,
            max_model_len: int | None) -> ClientRequest:
    body, req = _validated(endpoint, raw)
    prompts = completion_prompts(req.prompt) if endpoint is Endpoint.COMPLETIONS else []
    max_tokens = requested_max_tokens(req)
    _check_max_tokens(max_tokens, max_model_len)
    if len(prompts) > 1:  # a batch: one request per prompt, each with its own ids
        batch = tuple(_client_request(endpoint, {**body, "prompt": p}, req,
                                      counter.prompt_ids(p), max_tokens, max_model_len)
                      for p in prompts)
        check_fan_out([b.num_prompt_tokens for b in batch], req.n)
        return dataclasses.replace(batch[0], body=body, batch=batch)
    ids = counter.prompt_ids(prompts[0]) if prompts else counter.chat_ids(req)
    out = _client_request(endpoint, body, req, ids, max_tokens, max_model_len)
    check_fan_out([out.num_prompt_tokens], req.n)
    return out


def _client_request(endpoint: Endpoint, body: dict[str, Any], req: Any, ids: list[int],
                    max_tokens: int | None, max_model_len: int | None) -> ClientRequest:
    ids = truncated_prompt(ids, req, max_model_len or len(ids))  # as the instance will
    return ClientRequest(endpoint, body, req.stream, len(ids),
                         DEFAULT_COMPLETION_MAX_TOKENS if max_tokens is None else max_tokens,
                         tuple(ids), req.cache_salt, want_timings=req.disagg_timings,
                         requested_max_tokens=max_tokens, n=req.n)


def prefill_body(body: dict[str, Any], kv_params: dict[str, Any]) -> dict[str, Any]:
    """The prefill instance's body: one token, not streamed, carrying ``kv_params``."""
    out = dict(body)
    out["max_tokens"] = 1
    if "max_completion_tokens" in out:
        out["max_completion_tokens"] = 1
    if "n" in out:
        out["n"] = 1
    out["stream"] = False
    # These would contradict max_tokens=1 / stream=false and get the prefill refused.
    for key in ("stream_options", "best_of"):
        out.pop(key, None)
    # The first token obeys min_tokens too (no EOS or stop token where the client asked for
    # more): the decode may take the prefill's token, which must be the one it would sample.
    if isinstance(out.get("min_tokens"), int) and out["min_tokens"] > 1:
        out["min_tokens"] = 1
    out["kv_transfer_params"] = kv_params
    return out


def decode_body(body: dict[str, Any], kv_params: dict[str, Any] | None) -> dict[str, Any]:
    """The decode instance's body: the client's, plus ``kv_params`` when the KV is remote."""
    out = dict(body)
    if kv_params is not None:
        out["kv_transfer_params"] = kv_params
    return out
