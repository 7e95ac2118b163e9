"""OpenAI request bodies: strict decoding, validation, conversion to engine inputs."""

from __future__ import annotations

from typing import Any

import msgspec

from disagg.kv_transfer_params import KVParamsError, KVTransferParams, parse_kv_params
from disagg.sampling_params import SamplingParams
from disagg.tokenizer import Tokenizer


class ApiError(Exception):
    """A user error mapped to an HTTP status and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, err_type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.err_type = status, message, err_type
        self.param, self.code = param, code

    def body(self) -> dict[str, Any]:
        """The JSON error body."""
        return {"error": {"message": self.message, "type": self.err_type, "param": self.param,
                          "code": self.code or self.status}}


class StreamOptions(msgspec.Struct):
    """``stream_options``."""

    include_usage: bool = False


class _Common(msgspec.Struct, kw_only=True):
    model: str | None = None
    temperature: float | None = None
    top_p: float = 1.0
    top_k: int = 0
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    kv_transfer_params: dict[str, Any] | None = None
    return_token_ids: bool = False
    """Extension: include prompt and output token ids in the response."""
    user: str | None = None


class CompletionRequest(_Common, kw_only=True):
    """POST /v1/completions."""

    prompt: str | list[Any]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False


class ChatMessage(msgspec.Struct):
    """One chat message; content may be a string or a list of text parts."""

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_Common, kw_only=True):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


def decode_body(body: bytes, kind: type[msgspec.Struct]) -> Any:
    """Strict JSON decode with a 400 naming the offending field."""
    if not body.strip():
        raise ApiError(400, "the request body is empty; send a JSON object")
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        raise ApiError(400, f"invalid request: {exc}") from exc
    except msgspec.DecodeError as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from exc


def _check_common(req: _Common) -> None:
    if req.n != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
    if req.presence_penalty or req.frequency_penalty:
        raise ApiError(400, "presence_penalty and frequency_penalty are not supported",
                       param="presence_penalty")


def kv_params(req: CompletionRequest | ChatCompletionRequest) -> KVTransferParams | None:
    """The request's ``kv_transfer_params``, parsed into the typed struct (400 if invalid)."""
    if req.kv_transfer_params is None:
        return None
    try:
        return parse_kv_params(req.kv_transfer_params)
    except KVParamsError as exc:
        raise ApiError(400, str(exc), param="kv_transfer_params") from None


def completion_prompt_ids(req: CompletionRequest, tok: Tokenizer) -> list[int]:
    """Token ids of a single completion prompt (text or ids)."""
    prompt: Any = req.prompt
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise ApiError(400, "the prompt is empty", param="prompt")
        return tok.encode(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        bad = [t for t in prompt if not 0 <= t < tok.vocab_size]
        if bad:
            raise ApiError(400, f"token id {bad[0]} is out of range [0, {tok.vocab_size})",
                           param="prompt")
        return list(prompt)
    if isinstance(prompt, list) and not prompt:
        raise ApiError(400, "the prompt is empty", param="prompt")
    raise ApiError(400, "batched prompts are not supported: send one prompt per request",
                   param="prompt")


def chat_prompt_ids(req: ChatCompletionRequest, tok: Tokenizer) -> list[int]:
    """Render the chat template and tokenize it."""
    if not req.messages:
        raise ApiError(400, "messages must not be empty", param="messages")
    msgs = []
    for m in req.messages:
        content = m.content
        if isinstance(content, list):
            content = "".join(str(p.get("text", "")) for p in content if p.get("type") == "text")
        msgs.append({"role": m.role, "content": content or ""})
    text = tok.apply_chat_template(msgs)
    return tok.encode(text, add_special_tokens=not text.startswith("<|begin_of_text|>"))


def sampling_params(req: CompletionRequest | ChatCompletionRequest, num_prompt_tokens: int,
                    max_model_len: int) -> SamplingParams:
    """Build validated SamplingParams; a prompt + max_tokens over max_model_len is a 400."""
    _check_common(req)
    if isinstance(req, ChatCompletionRequest):
        max_tokens = req.max_completion_tokens or req.max_tokens
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
    else:
        max_tokens, logprobs = req.max_tokens, req.logprobs
        if req.echo:
            raise ApiError(400, "echo is not supported", param="echo")
    if max_tokens is None:
        max_tokens = max(1, max_model_len - num_prompt_tokens)
    if num_prompt_tokens + max_tokens > max_model_len:
        raise ApiError(400, f"This model's maximum context length is {max_model_len} tokens. "
                       f"However, you requested {num_prompt_tokens + max_tokens} tokens "
                       f"({num_prompt_tokens} in the prompt, {max_tokens} for the completion). "
                       "Please reduce the prompt or max_tokens.", param="max_tokens",
                       code="context_length_exceeded")
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    sp = SamplingParams(max_tokens=max_tokens,
                        temperature=1.0 if req.temperature is None else req.temperature,
                        top_p=req.top_p, top_k=max(req.top_k, 0), seed=req.seed, stop=stop,
                        stop_token_ids=tuple(req.stop_token_ids or ()),
                        ignore_eos=req.ignore_eos, logprobs=logprobs, min_tokens=req.min_tokens)
    try:
        sp.validate()
    except ValueError as exc:
        raise ApiError(400, str(exc)) from exc
    return sp
