"""OpenAI request bodies: strict decoding, validation, conversion to sampling parameters
(their prompts become token ids in prompt_ids.py).

Every client-controlled value is bounded here, at the edge, so nothing past it can overflow a
64-bit wire field, recurse without limit or see a NaN: a body that does not fit is a 400 with an
OpenAI-style error. The proxy validates with the same types (``validate_object``), so it rejects
what an instance would reject before routing anything.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

import msgspec

from disagg.common.generation_config import SamplingDefaults
from disagg.common.kv_transfer_params import (
    KVParamsError,
    KVTransferParams,
    TransferId,
    parse_kv_params,
)
from disagg.common.sampling_params import (
    MAX_ABS_BIAS,
    MAX_ABS_PENALTY,
    MAX_LOGIT_BIAS,
    MAX_LOGPROBS,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    MAX_TOKEN_ID,
    REPETITION_PENALTY_MAX,
    REPETITION_PENALTY_MIN,
    SEED_MAX,
    SEED_MIN,
    SamplingParams,
)

MAX_JSON_DEPTH = 64
"""Deepest array/object nesting a body may have (OpenAI bodies need < 10; msgspec recurses)."""
MAX_COUNT = 2**31 - 1
"""Upper bound of every token count (max_tokens, min_tokens, top_k)."""
MAX_N = 16
MAX_BATCH_PROMPTS = 64
"""Most prompts one /v1/completions request may batch (each with its n choices)."""
MAX_FAN_OUT_TOKENS = 1 << 20
"""Most prompt tokens one request may ask to compute over all its prompts and choices
(n x the batch's prompt tokens): one small body must not become gigabytes of work."""
"""Most choices one request may ask for (``n``); each is its own engine request."""
MAX_CACHE_SALT_CHARS = 1024
MAX_STOP_STRING_CHARS = 1024
MAX_DETOKENIZE_TOKENS = 1 << 20
KV_KEY_HEADER = "X-Disagg-KV-Key"
"""Header carrying ``--kv-params-key`` from the proxy to an instance."""

Count = Annotated[int, msgspec.Meta(ge=1, le=MAX_COUNT)]
NonNegCount = Annotated[int, msgspec.Meta(ge=0, le=MAX_COUNT)]
TopK = Annotated[int, msgspec.Meta(ge=-1, le=MAX_COUNT)]
"""-1 or 0 disable top-k (as vLLM), k >= 1 keeps the k most likely tokens."""
N = Annotated[int, msgspec.Meta(ge=1, le=MAX_N)]
Seed = Annotated[int, msgspec.Meta(ge=SEED_MIN, le=SEED_MAX)]
"""Signed 64-bit, as vLLM (torch.Generator.manual_seed takes the whole range)."""
TokenId = Annotated[int, msgspec.Meta(ge=0, le=MAX_TOKEN_ID)]
NumLogprobs = Annotated[int, msgspec.Meta(ge=0, le=MAX_LOGPROBS)]
Temperature = Annotated[float, msgspec.Meta(ge=0.0, le=2.0)]
"""OpenAI's range; the bounds also refuse NaN and infinities."""
TopP = Annotated[float, msgspec.Meta(gt=0.0, le=1.0)]
Penalty = Annotated[float, msgspec.Meta(ge=-MAX_ABS_PENALTY, le=MAX_ABS_PENALTY)]
RepetitionPenalty = Annotated[float, msgspec.Meta(ge=REPETITION_PENALTY_MIN,
                                                  le=REPETITION_PENALTY_MAX)]
MinP = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
Bias = Annotated[float, msgspec.Meta(ge=-MAX_ABS_BIAS, le=MAX_ABS_BIAS)]
LogitBias = Annotated[dict[str, Bias], msgspec.Meta(max_length=MAX_LOGIT_BIAS)]
"""OpenAI's map of token id (a decimal string) -> bias; keys are checked by logit_bias_pairs."""
StopString = Annotated[str, msgspec.Meta(max_length=MAX_STOP_STRING_CHARS)]
StopStrings = Annotated[list[StopString], msgspec.Meta(max_length=MAX_STOP_STRINGS)]
StopTokenIds = Annotated[list[TokenId], msgspec.Meta(max_length=MAX_STOP_TOKEN_IDS)]
CacheSalt = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_CACHE_SALT_CHARS)]
TruncatePrompt = Annotated[int, msgspec.Meta(ge=-1, le=MAX_COUNT)]


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
    continuous_usage_stats: bool = False
    """vLLM's: every chunk carries the usage so far (with include_usage)."""


class _Common(msgspec.Struct, kw_only=True):
    model: str | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    """None: the model's generation_config.json default, else 1.0 (as temperature, top_k)."""
    top_k: TopK | None = None
    n: N = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopString | StopStrings | None = None
    stop_token_ids: StopTokenIds | None = None
    seed: Seed | None = None
    ignore_eos: bool = False
    min_tokens: NonNegCount = 0
    presence_penalty: Penalty | None = None
    """None (as vLLM takes null) is 0."""
    frequency_penalty: Penalty | None = None
    repetition_penalty: RepetitionPenalty | None = None
    """None is 1 (no penalty)."""
    min_p: MinP | None = None
    logit_bias: LogitBias | None = None
    best_of: N | None = None
    """Only ``n`` (or absent): every candidate is returned, none is ranked out."""
    kv_transfer_params: dict[str, Any] | None = None
    return_token_ids: bool = False
    """Extension: include prompt and output token ids in the response."""
    disagg_timings: bool = False
    """Extension: include the request's phase timings (``disagg_timings``, defined in
    disagg/common/timings.py) in the response, or in a stream's last chunk."""
    user: str | None = None
    cache_salt: CacheSalt | None = None
    """Only requests with the same salt share prefix-cache blocks (vLLM's field)."""
    include_stop_str_in_output: bool = False
    """vLLM's: keep the stop string (or the stop token's text) that ended the output."""
    skip_special_tokens: bool = True
    """vLLM's: leave special tokens' text out of the output."""
    return_tokens_as_token_ids: bool = False
    """vLLM's: logprobs name tokens ``token_id:N``."""
    truncate_prompt_tokens: TruncatePrompt | None = None
    """vLLM's: keep only the prompt's last k tokens (-1: as many as max_model_len allows)."""
    # OpenAI/vLLM fields this server does not implement: kept so that a request using one is
    # a 400 naming it (``check_request``), not silently served as if it were absent. Other
    # unknown fields are ignored, as vLLM and OpenAI do.
    response_format: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    suffix: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    structured_outputs: Any = None
    allowed_token_ids: Any = None
    bad_words: Any = None
    use_beam_search: Any = None
    prompt_logprobs: Any = None
    length_penalty: Any = None
    logits_processors: Any = None
    vllm_xargs: Any = None


class CompletionRequest(_Common, kw_only=True):
    """POST /v1/completions."""

    prompt: str | list[Any]
    max_tokens: Count | None = 16
    logprobs: NumLogprobs | None = None
    echo: bool = False


class ContentPart(msgspec.Struct):
    """One part of a chat message's content; only ``text`` parts are supported (others are a
    400 in ``check_request``: this server has no vision or audio encoder)."""

    type: str
    text: str | None = None


ChatTemplateKwargs = Annotated[dict[str, Any], msgspec.Meta(max_length=64)]


class ChatMessage(msgspec.Struct):
    """One chat message; content may be a string or a list of text parts."""

    role: str
    content: str | list[ContentPart] | None = None


class ChatCompletionRequest(_Common, kw_only=True):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage]
    max_tokens: Count | None = None
    max_completion_tokens: Count | None = None
    logprobs: bool = False
    top_logprobs: NumLogprobs | None = None
    echo: bool = False
    """vLLM's (prepend the last message's content): not supported, a 400 when true."""
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    """vLLM's: continue the last (assistant) message instead of starting a new one."""
    chat_template_kwargs: ChatTemplateKwargs | None = None
    """vLLM's: more variables for the chat template (``enable_thinking``, ...)."""
    chat_template: Any = None
    """vLLM's per-request template: not supported (a 400); set it with --chat-template."""


class KVFaultsRequest(msgspec.Struct, forbid_unknown_fields=True):
    """POST /v1/kv_faults (only with DISAGG_FAULT_INJECTION=1)."""

    faults: Annotated[list[dict[str, Any]], msgspec.Meta(max_length=64)]


class KVAbortRequest(msgspec.Struct):
    """POST /v1/kv_transfer/abort."""

    transfer_id: TransferId


class TokenizeRequest(msgspec.Struct, kw_only=True):
    """POST /tokenize (vLLM's shapes): exactly one of ``prompt`` and ``messages``."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    """None: true for a prompt (BOS, as a completion gets it), false for messages (the chat
    template writes its own), so the ids are what a generation request would prefill."""
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    return_token_strs: bool = False


class DetokenizeRequest(msgspec.Struct, kw_only=True):
    """POST /detokenize (vLLM's shape)."""

    model: str | None = None
    tokens: Annotated[list[TokenId], msgspec.Meta(max_length=MAX_DETOKENIZE_TOKENS)]


# A JSON string (escapes included), skipped when measuring nesting: brackets in text do not nest.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_INNERMOST_PAIR = re.compile(rb"\[\]|\{\}")
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")


def nesting_exceeds(raw: bytes, max_depth: int = MAX_JSON_DEPTH) -> bool:
    """True when JSON text nests arrays/objects deeper than ``max_depth`` (before decoding it:
    msgspec recurses once per level, so a deep body would end in RecursionError)."""
    if raw.count(b"[") + raw.count(b"{") <= max_depth:
        return False  # the usual body: too few brackets to be deep
    brackets = _JSON_STRING.sub(b"", raw).translate(None, _NOT_BRACKET)
    # Each round removes the innermost level exactly once; what is left after max_depth
    # rounds is deeper than allowed (or unbalanced, which the decoder refuses anyway).
    for _ in range(max_depth):
        brackets, num_removed = _INNERMOST_PAIR.subn(b"", brackets)
        if num_removed == 0:
            return False
    return _INNERMOST_PAIR.search(brackets) is not None


def check_json_text(raw: bytes) -> None:
    """400 for an empty body or one nested deeper than MAX_JSON_DEPTH."""
    if not raw.strip():
        raise ApiError(400, "the request body is empty; send a JSON object")
    if nesting_exceeds(raw):
        raise _too_deep()


def _too_deep() -> ApiError:
    return ApiError(400, f"the request body nests arrays/objects more than {MAX_JSON_DEPTH} "
                         "levels deep")


_BOUND_WORDS = {">=": "at least", "<=": "at most", ">": "greater than", "<": "less than"}
_BOUND = re.compile(r"^Expected `\w+` (>=|<=|>|<) (\S+) - at `\$\.(\w+)(\[[^\]]*\])?`$")
_LENGTH = re.compile(r"^Expected `(\w+)` of length (>=|<=) (\d+) - at `\$\.(\w+)`$")
_PATH = re.compile(r" - at `\$\.(\w+)")
_MISSING = re.compile(r"^Object missing required field `(\w+)`$")


def validation_error(exc: msgspec.ValidationError) -> ApiError:
    """A 400 for a body that decodes but does not fit the types; ``param`` names the field."""
    text = str(exc)
    bound = _BOUND.match(text)
    if bound is not None:
        op, limit, field, item = bound.groups()
        what = f"each value of {field}" if item else field
        return ApiError(400, f"{what} must be {_BOUND_WORDS[op]} {limit}", param=field)
    length = _LENGTH.match(text)
    if length is not None:
        kind, op, limit, field = length.groups()
        unit = "characters" if kind == "str" else "entries"
        return ApiError(400, f"{field} must have {_BOUND_WORDS[op]} {limit} {unit}",
                        param=field)
    path = _PATH.search(text) or _MISSING.search(text)
    return ApiError(400, f"invalid request: {text}", param=path.group(1) if path else None)


def without_nulls(obj: Any) -> Any:
    """A body object without its null fields (and its ``stream_options``' null fields): OpenAI's
    API takes ``null`` as "not given" for every optional field, and clients send it
    (``"n": null``, ``"stream": null``); a field's absence gives its default. Except
    ``max_tokens``: null asks for as many tokens as the context leaves (vLLM), where an absent
    one is a completion's default of 16."""
    if not isinstance(obj, dict):
        return obj
    out = {k: v for k, v in obj.items() if v is not None or k == "max_tokens"}
    options = out.get("stream_options")
    if isinstance(options, dict):
        out["stream_options"] = {k: v for k, v in options.items() if v is not None}
    return out


def decode_body(raw: bytes, kind: Any = Any) -> Any:
    """Decode an untrusted JSON body into ``kind``; every failure is a 400 naming the field.
    A struct's null fields take their defaults (``without_nulls``); of a key given twice, the
    last value counts (as in the proxy, which reads the body into a dict, and in vLLM)."""
    check_json_text(raw)
    struct = isinstance(kind, type) and issubclass(kind, msgspec.Struct)
    try:
        if b"null" in raw and struct:
            # a field may be null: through Python objects once, nulls dropped; the usual body
            # (no null anywhere) decodes straight into the struct
            return msgspec.convert(without_nulls(msgspec.json.decode(raw)), kind)
        try:
            return msgspec.json.decode(raw, type=kind)
        except msgspec.ValidationError:
            if not struct:
                raise
            # decoding straight into a struct checks every value of a key given twice; only
            # the last one counts: the body is read into Python objects once to tell
            return msgspec.convert(msgspec.json.decode(raw), kind)
    except msgspec.ValidationError as exc:
        raise validation_error(exc) from None
    except msgspec.DecodeError as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
    except RecursionError:  # belt and braces: nesting_exceeds should have caught it
        raise _too_deep() from None


def validate_object(obj: Any, kind: type[msgspec.Struct]) -> Any:
    """Validate an already decoded body against ``kind`` (the proxy's check); 400 if unfit.
    Null fields take their defaults (``without_nulls``)."""
    try:
        return msgspec.convert(without_nulls(obj), kind)
    except msgspec.ValidationError as exc:
        raise validation_error(exc) from None
    except RecursionError:
        raise _too_deep() from None


_NO_OP_VALUES: dict[str, tuple[Any, ...]] = {
    "response_format": ({"type": "text"},), "tools": ([],), "tool_choice": ("none",),
    "functions": ([],), "function_call": ("none",), "suffix": ("",), "use_beam_search": (False,),
    "allowed_token_ids": (), "bad_words": ([],), "length_penalty": (1, 1.0),
    "logits_processors": ([],), "vllm_xargs": ({},)}
"""Values of unsupported fields that ask for nothing (clients send these defaults)."""


_UNSUPPORTED = ("response_format", "tools", "tool_choice", "functions", "function_call",
                "suffix", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
                "structured_outputs", "allowed_token_ids", "bad_words", "use_beam_search",
                "prompt_logprobs", "length_penalty", "logits_processors", "vllm_xargs")
"""Fields of OpenAI's or vLLM's API that change the output and that this server does not
implement: a request setting one (to anything but a no-op value) is a 400 naming it."""


def _unsupported_field(req: CompletionRequest | ChatCompletionRequest) -> str | None:
    names = _UNSUPPORTED + (("chat_template",) if isinstance(req, ChatCompletionRequest) else ())
    for name in names:
        value = getattr(req, name)
        if value is not None and not any(value == v and type(value) is type(v)
                                         for v in _NO_OP_VALUES.get(name, ())):
            return name
    return None


def check_request(req: CompletionRequest | ChatCompletionRequest, *,
                  fan_out: bool = False) -> None:
    """The checks beyond the types that need no tokenizer (the proxy runs them too).
    ``fan_out``: the caller serves ``n > 1`` by fanning out (an instance, for a request without
    kv_transfer_params; the proxy, one P/D flow per choice)."""
    unsupported = _unsupported_field(req)
    if unsupported is not None:
        raise ApiError(400, f"{unsupported} is not supported by this server; remove it from "
                            "the request", param=unsupported)
    if isinstance(req, ChatCompletionRequest):
        for m in req.messages:
            for part in m.content if isinstance(m.content, list) else ():
                if part.type != "text":
                    raise ApiError(400, f"content parts of type {part.type!r} are not "
                                        "supported: this server serves text-only models; "
                                        "send text parts", param="messages")
    _check_n(req, fan_out)
    logit_bias_pairs(req.logit_bias)
    if req.echo:
        raise ApiError(400, "echo is not supported", param="echo")
    if req.stream_options is not None and not req.stream:
        raise ApiError(400, "stream_options can only be given with stream: true",
                       param="stream_options")
    if isinstance(req, CompletionRequest):
        if len(completion_prompts(req.prompt)) > 1 and (
                req.kv_transfer_params is not None or not fan_out):
            raise ApiError(400, "a P/D request has one prompt (the proxy sends each prompt of "
                                "a batch as its own)", param="prompt")
    else:
        if not req.messages:
            raise ApiError(400, "messages must not be empty", param="messages")
        if req.top_logprobs is not None and not req.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        if req.continue_final_message and req.add_generation_prompt:
            raise ApiError(400, "continue_final_message and add_generation_prompt cannot both "
                                "be true", param="continue_final_message")
    max_tokens = requested_max_tokens(req)
    if max_tokens is not None and req.min_tokens > max_tokens:
        raise ApiError(400, f"min_tokens ({req.min_tokens}) must not exceed max_tokens "
                            f"({max_tokens})", param="min_tokens")


def _check_n(req: CompletionRequest | ChatCompletionRequest, fan_out: bool) -> None:
    if req.best_of is not None and req.best_of != req.n:
        raise ApiError(400, f"best_of ({req.best_of}) must equal n ({req.n}): this server "
                            "returns every candidate and ranks none out", param="best_of")
    if req.n > 1 and (not fan_out or req.kv_transfer_params is not None):
        raise ApiError(400, "n > 1 is not supported for a disaggregated (P/D) request; send "
                            "n=1 (one request per choice) or send it to an instance directly",
                       param="n")


_TOKEN_ID_KEY = re.compile(r"[0-9]{1,10}")


def logit_bias_pairs(bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    """``logit_bias`` as (token id, bias) pairs sorted by id; 400 for a key that is not a
    token id in [0, 2**31) or names one id twice ("7" and "07")."""
    pairs: dict[int, float] = {}
    for key, value in (bias or {}).items():
        token = int(key) if _TOKEN_ID_KEY.fullmatch(key) else MAX_TOKEN_ID + 1
        if token > MAX_TOKEN_ID:
            raise ApiError(400, f"logit_bias keys must be token ids (decimal strings in "
                                f"[0, {MAX_TOKEN_ID}]), got {key[:40]!r}", param="logit_bias")
        if token in pairs:
            raise ApiError(400, f"logit_bias names token id {token} twice", param="logit_bias")
        pairs[token] = float(value)
    return tuple(sorted(pairs.items()))


def requested_max_tokens(req: CompletionRequest | ChatCompletionRequest) -> int | None:
    """The client's output limit (chat: ``max_completion_tokens`` wins); None: unlimited."""
    if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None:
        return req.max_completion_tokens
    return req.max_tokens


def kv_params(req: CompletionRequest | ChatCompletionRequest) -> KVTransferParams | None:
    """The request's ``kv_transfer_params``, parsed into the typed struct (400 if invalid)."""
    if req.kv_transfer_params is None:
        return None
    try:
        return parse_kv_params(req.kv_transfer_params)
    except KVParamsError as exc:
        raise ApiError(400, str(exc), param="kv_transfer_params") from None


def _is_token_ids(prompt: list[Any]) -> bool:
    return all(type(t) is int for t in prompt)  # bool is an int subclass but no token id


def single_prompt(prompt: object) -> str | list[int]:
    """The one prompt of a completion request: text or token ids in [0, 2**31); 400 else.
    An empty text is a prompt (the tokenizer's BOS alone); an empty id list is not."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, list) and not prompt:
        raise ApiError(400, "the prompt is empty", param="prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and _is_token_ids(prompt):
        bad = [t for t in prompt if not 0 <= t <= MAX_TOKEN_ID]
        if bad:
            raise ApiError(400, f"token id {bad[0]} is out of range", param="prompt")
        return prompt
    if isinstance(prompt, list) and all(isinstance(p, str | list) for p in prompt):
        raise ApiError(400, "a batch of prompts is not taken here: send one prompt",
                       param="prompt")
    raise ApiError(400, "'prompt' must be a string or a list of token ids", param="prompt")


def check_fan_out(num_prompt_tokens: list[int], n: int) -> None:
    """A 400 when the prompts' choices add up to more than MAX_FAN_OUT_TOKENS to compute."""
    total = sum(num_prompt_tokens) * n
    if total > MAX_FAN_OUT_TOKENS and (n > 1 or len(num_prompt_tokens) > 1):
        raise ApiError(400, f"{len(num_prompt_tokens)} prompt(s) x n={n} ask for {total} "
                            f"prompt tokens to compute, over this server's limit of "
                            f"{MAX_FAN_OUT_TOKENS}; send fewer choices or prompts",
                       param="n")


def completion_prompts(prompt: object) -> list[str | list[int]]:
    """The prompts of a completion request: one (single_prompt), or a batch as OpenAI and vLLM
    take it (a list of texts or of token-id lists, each checked as one prompt; at most
    MAX_BATCH_PROMPTS)."""
    if not (isinstance(prompt, list) and len(prompt) > 1 and not _is_token_ids(prompt)):
        return [single_prompt(prompt)]
    if len(prompt) > MAX_BATCH_PROMPTS:
        raise ApiError(400, f"a batch of {len(prompt)} prompts is over this server's limit of "
                            f"{MAX_BATCH_PROMPTS}", param="prompt")
    for p in prompt:
        if not isinstance(p, str) and not (isinstance(p, list) and _is_token_ids(p)):
            raise ApiError(400, "each prompt of a batch must be a string or a list of token "
                                "ids", param="prompt")
    return [single_prompt(p) for p in prompt]


def check_context(num_prompt_tokens: int, max_tokens: int, max_model_len: int) -> None:
    """A 400 (context_length_exceeded) when the prompt leaves no room for max_tokens."""
    if num_prompt_tokens + max_tokens > max_model_len:
        raise ApiError(400, f"This model's maximum context length is {max_model_len} tokens. "
                       f"However, you requested {num_prompt_tokens + max_tokens} tokens "
                       f"({num_prompt_tokens} in the prompt, {max_tokens} for the completion). "
                       "Please reduce the prompt or max_tokens.", param="max_tokens",
                       code="context_length_exceeded")


def sampling_params(req: CompletionRequest | ChatCompletionRequest, num_prompt_tokens: int,
                    max_model_len: int,
                    defaults: SamplingDefaults = SamplingDefaults(),
                    vocab_size: int | None = None, *,
                    max_logprobs: int = 20) -> SamplingParams:
    """Build validated SamplingParams (one choice's: ``n`` is the caller's to fan out); a
    prompt + max_tokens over max_model_len is a 400, and so is a logit_bias id outside
    ``vocab_size`` (when given). Fields the request omits take ``defaults`` (the model's
    generation config), then the API's own defaults."""
    check_request(req, fan_out=True)
    max_tokens = requested_max_tokens(req)
    if max_tokens is not None and defaults.max_tokens is not None:
        # the generation config's max_new_tokens caps every request, as in vLLM (the
        # completions default of 16 included); the client's own is checked for room first
        check_context(num_prompt_tokens, max_tokens, max_model_len)
        max_tokens = min(max_tokens, defaults.max_tokens)
    elif max_tokens is None and defaults.max_tokens is not None:
        max_tokens = min(defaults.max_tokens, max(1, max_model_len - num_prompt_tokens))
    if isinstance(req, ChatCompletionRequest):
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
    else:
        logprobs = req.logprobs
    if logprobs is not None and logprobs > max_logprobs:
        field_name = "top_logprobs" if isinstance(req, ChatCompletionRequest) else "logprobs"
        raise ApiError(400, f"{field_name}={logprobs} is over this server's limit of "
                            f"{max_logprobs} (--max-logprobs)", param=field_name)
    if max_tokens is None:
        max_tokens = max(1, max_model_len - num_prompt_tokens)
    check_context(num_prompt_tokens, max_tokens, max_model_len)
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    sp = SamplingParams(max_tokens=max_tokens,
                        temperature=_pick(req.temperature, defaults.temperature, 1.0),
                        top_p=_pick(req.top_p, defaults.top_p, 1.0),
                        top_k=max(_pick(req.top_k, defaults.top_k, 0), 0), seed=req.seed,
                        stop=stop,
                        stop_token_ids=tuple(req.stop_token_ids or ()),
                        ignore_eos=req.ignore_eos, logprobs=logprobs, min_tokens=req.min_tokens,
                        presence_penalty=req.presence_penalty or 0.0,
                        frequency_penalty=req.frequency_penalty or 0.0,
                        repetition_penalty=_pick(req.repetition_penalty,
                                                 defaults.repetition_penalty, 1.0),
                        min_p=_pick(req.min_p, defaults.min_p, 0.0),
                        logit_bias=_checked_bias(req.logit_bias, vocab_size))
    try:
        sp.validate()
    except ValueError as exc:
        raise ApiError(400, str(exc)) from exc
    return sp


def _checked_bias(bias: dict[str, float] | None,
                  vocab_size: int | None) -> tuple[tuple[int, float], ...]:
    pairs = logit_bias_pairs(bias)
    bad = [t for t, _ in pairs if vocab_size is not None and t >= vocab_size]
    if bad:
        raise ApiError(400, f"logit_bias token id {bad[0]} is out of range [0, {vocab_size})",
                       param="logit_bias")
    return pairs


def _pick(given: Any, model_default: Any, api_default: Any) -> Any:
    """The request's value, else the model's default, else the API's."""
    if given is not None:
        return given
    return api_default if model_default is None else model_default
