"""The instance's OpenAI-compatible HTTP server (aiohttp app factory).

Only built after every engine core's ready handshake, so every check below uses synced values.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import secrets
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError
from prometheus_client import CONTENT_TYPE_LATEST

from disagg.common import envs
from disagg.common.auth import API_KEY_MESSAGE, bearer_matches, needs_api_key
from disagg.common.block_hash import model_seed
from disagg.common.generation_config import SamplingDefaults
from disagg.common.kv_transfer_params import kv_params_to_json
from disagg.common.logging_setup import current_request_id, log_every
from disagg.common.openai_api import (
    KV_KEY_HEADER,
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    KVAbortRequest,
    KVFaultsRequest,
    check_context,
    check_fan_out,
    completion_prompts,
    decode_body,
    kv_params,
    sampling_params,
)
from disagg.common.prompt_ids import chat_prompt_ids, prompt_ids_of, truncated_prompt
from disagg.common.protocol import TokenLogprob
from disagg.common.request_ids import REQUEST_ID_HEADER, install_request_ids, valid_request_id
from disagg.common.sampling_params import SamplingParams
from disagg.common.sse import DONE_EVENT, SSE_HEADERS, encode_event
from disagg.common.timings import TIMINGS_FIELD, timings_dict
from disagg.common.tokenizer import Tokenizer
from disagg.common.version import __version__
from disagg.server.admin import AdminApi
from disagg.server.engine_client import EngineClient
from disagg.server.engine_health import EngineUnavailableError
from disagg.server.metrics import ServerMetrics
from disagg.server.metrics_render import render_instance_metrics
from disagg.server.parallel_sampling import (
    ChildFactory,
    choices,
    collect_choices,
    fan_out,
    merge,
)
from disagg.server.request_clock import RequestClock
from disagg.server.request_log import log_arrival, logged
from disagg.server.serving import Delta, GenerationResult, TextOptions, generate
from disagg.server.stats_logger import InstanceStatsLogger
from disagg.server.tokenization import TokenizeApi


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """Static facts the HTTP layer reports."""

    served_model_name: str
    model: str
    http_url: str
    admin_key: str | None = None
    kv_params_key: str | None = field(default_factory=envs.kv_params_key)
    """When set, kv_transfer_params and KV aborts need header X-Disagg-KV-Key with it."""
    api_key: str | None = None
    """When set, every /v1/* request needs ``Authorization: Bearer`` it (--api-key)."""
    model_aliases: tuple[str, ...] = ()
    """More names the ``model`` field may give (--served-model-name A B: B here)."""
    sampling_defaults: SamplingDefaults = field(default_factory=SamplingDefaults)
    """Defaults of omitted sampling fields from the model's generation_config.json."""
    log_requests: bool = False
    """One log line per request at arrival and at finish (--enable-log-requests)."""
    max_logprobs: int = 20
    """The most logprobs a request may ask for per token (--max-logprobs)."""
    log_stats_interval_s: float | None = None
    """Seconds between periodic stats lines; None: none (--disable-log-stats)."""

    @property
    def model_names(self) -> tuple[str, ...]:
        """Every name a request may use: the served names, then the model path."""
        return (self.served_model_name, *self.model_aliases, self.model)

    def check_model(self, name: str | None) -> None:
        """404 for a ``model`` field naming another model (None: the served one)."""
        if name is not None and name not in self.model_names:
            raise ApiError(404, f"The model `{name}` does not exist; this server serves "
                           f"`{self.served_model_name}`", code="model_not_found", param="model")


logger = logging.getLogger(__name__)

_STARTED_S = int(time.time())
"""The model cards' ``created``: when this server process started."""

ENGINE = web.AppKey("engine", EngineClient)
TOKENIZER = web.AppKey("tokenizer", Tokenizer)
INFO = web.AppKey("info", ServerInfo)
METRICS = web.AppKey("metrics", ServerMetrics)


def check_kv_key(request: web.Request) -> None:
    """401 unless the request carries the instance's --kv-params-key (when it has one)."""
    key = request.app[INFO].kv_params_key
    if key is None:
        return
    # Headers arrive decoded with surrogateescape: encoding back gives the bytes as sent.
    sent = request.headers.get(KV_KEY_HEADER, "").encode("utf-8", "surrogateescape")
    if not hmac.compare_digest(sent, key.encode()):
        raise ApiError(401, f"kv_transfer_params and KV aborts need header {KV_KEY_HEADER} "
                            "with the instance's --kv-params-key",
                       err_type="authentication_error", code="invalid_kv_params_key")


def json_error(err: ApiError) -> web.Response:
    """OpenAI-style error response."""
    return web.json_response(err.body(), status=err.status)


@web.middleware
async def api_key_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """401 for a /v1/* request without the --api-key Bearer token (when there is a key)."""
    key = request.app[INFO].api_key
    if key is not None and needs_api_key(request.path) and not bearer_matches(
            request.headers.get("Authorization", ""), key):
        return json_error(ApiError(401, API_KEY_MESSAGE, err_type="authentication_error",
                                   code="invalid_api_key"))
    return await handler(request)


@web.middleware
async def error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Map ApiError and unexpected failures to JSON bodies; never a traceback page."""
    try:
        return await handler(request)
    except ApiError as err:
        return json_error(err)
    except RequestPayloadError as exc:  # e.g. a Content-Encoding the body is not in
        return json_error(ApiError(400, f"cannot read the request body: {exc}"))
    except web.HTTPException as exc:
        if exc.status >= 400:
            return json_error(ApiError(exc.status, exc.reason or "error"))
        raise
    except (ConnectionResetError, asyncio.CancelledError):
        raise
    except EngineUnavailableError as exc:  # dead, stalled, or silent past a call's deadline
        return json_error(ApiError(503, f"engine unavailable: {exc}", err_type="server_error"))
    except Exception as exc:  # a bug: log it, answer JSON, keep serving
        logger.exception("unhandled error on %s", request.path)
        return json_error(ApiError(500, f"internal error: {type(exc).__name__}: {exc}",
                                   err_type="server_error"))


def _token_text(tok: Tokenizer, token_id: int, as_ids: bool) -> str:
    """A token as logprobs name it: its text, or ``token_id:N`` (return_tokens_as_token_ids,
    vLLM's form, for tokens whose text alone is ambiguous)."""
    return f"token_id:{token_id}" if as_ids else tok.decode([token_id])


def _logprobs_json(lps: list[TokenLogprob], ids: list[int], tok: Tokenizer, chat: bool,
                   as_ids: bool = False, text_offset: int = 0) -> dict[str, Any]:
    """OpenAI's logprobs object. Completions: ``top_logprobs`` also holds the sampled token
    (vLLM's, and legacy OpenAI's, shape: logprobs=0 gives the sampled token alone) and
    ``text_offset`` counts from ``text_offset``, where this part of the choice's text starts."""
    names = [_token_text(tok, t, as_ids) for t in ids]
    if chat:
        return {"content": [
            {"token": name, "logprob": lp.logprob, "bytes": list(name.encode()),
             "top_logprobs": [{"token": (alt := _token_text(tok, a, as_ids)), "logprob": v,
                               "bytes": list(alt.encode())} for a, v in lp.top]}
            for name, lp in zip(names, lps, strict=False)]}
    offsets = []
    for name in names:
        offsets.append(text_offset)
        text_offset += len(name)
    tops = []
    for name, lp in zip(names, lps, strict=False):
        top = {_token_text(tok, a, as_ids): v for a, v in lp.top}
        top.setdefault(name, lp.logprob)
        tops.append(top)
    return {"tokens": names, "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": tops, "text_offset": offsets[:len(lps)]}


def _ids(request: web.Request, chat: bool) -> tuple[str, str]:
    """(the answer's id, the engine's request id): ``cmpl-R`` for the request id R the
    request_ids middleware bound (the client's X-Request-Id when valid: vLLM's naming).
    A client's R may repeat (a proxy's retry on the same instance, a careless client), so its
    engine id gets a random suffix; a generated R is unique already."""
    answer_id = ("chatcmpl-" if chat else "cmpl-") + (current_request_id() or uuid.uuid4().hex)
    if valid_request_id(request.headers.get(REQUEST_ID_HEADER)) is None:
        return answer_id, answer_id
    return answer_id, f"{answer_id}-{secrets.token_hex(4)}"


class _Call:
    """One OpenAI call: parsed body, prompt ids, params, ids for the response."""

    def __init__(self, request: web.Request, chat: bool) -> None:
        self.app, self.chat = request.app, chat
        self.tok = request.app[TOKENIZER]
        self.engine = request.app[ENGINE]
        self.created = int(time.time())
        self.id, self.engine_request_id = _ids(request, chat)
        self.object = "chat.completion" if chat else "text_completion"
        self.clock = RequestClock()

    async def parse(self, request: web.Request) -> None:
        body = await request.read()
        kind = ChatCompletionRequest if self.chat else CompletionRequest
        self.req = req = decode_body(body, kind)
        if req.kv_transfer_params is not None:
            check_kv_key(request)
        info = self.app[INFO]
        info.check_model(req.model)
        self.model = info.served_model_name
        synced = self.engine.synced
        assert synced is not None
        prompts = [chat_prompt_ids(req, self.tok)] if self.chat else [
            prompt_ids_of(p, self.tok) for p in completion_prompts(req.prompt)]
        self.prompts = [truncated_prompt(ids, req, synced.max_model_len) for ids in prompts]
        """Every prompt's ids (completions may batch several; choices go prompt by prompt)."""
        check_fan_out([len(ids) for ids in self.prompts], req.n)
        self.prompt_ids = self.prompts[0]
        self.text_options = TextOptions(req.include_stop_str_in_output, req.skip_special_tokens)
        self.kv_params = kv = kv_params(req)
        if kv is not None and kv.do_remote_decode and kv.decode_max_tokens is not None \
                and kv.decode_max_model_len is not None:
            # a prefill for a decode: the decode's length check (the client's max_tokens, not
            # the prefill's 1), before the prompt is computed
            check_context(len(self.prompt_ids), kv.decode_max_tokens, kv.decode_max_model_len)
        self.sps = [sampling_params(req, len(ids), synced.max_model_len,
                                    info.sampling_defaults, self.tok.vocab_size,
                                    max_logprobs=info.max_logprobs) for ids in self.prompts]
        self.sp = self.sps[0]
        self.num_prompt_tokens = sum(len(ids) for ids in self.prompts)
        if info.log_requests:
            log_arrival(self.engine_request_id, self.num_prompt_tokens, self.sp, self.kv_params)

    @property
    def num_choices(self) -> int:
        """Choices in the answer: n for each prompt."""
        return self.req.n * len(self.prompts)

    def choice_usage(self, index: int, num_out: int) -> dict[str, Any]:
        """One choice's usage so far (continuous usage stats, per choice as in vLLM)."""
        n = len(self.prompts[index // self.req.n])
        return {"prompt_tokens": n, "completion_tokens": num_out, "total_tokens": n + num_out}

    def usage(self, num_out: int, num_cached: int) -> dict[str, Any]:
        n = self.num_prompt_tokens
        return {"prompt_tokens": n, "completion_tokens": num_out, "total_tokens": n + num_out,
                "prompt_tokens_details": {"cached_tokens": num_cached}}

    def deltas(self) -> AsyncGenerator[Delta, None]:
        """Every choice's deltas (n > 1: an engine request each, parallel_sampling.py)."""
        rid = self.engine_request_id
        if len(self.prompts) == 1:
            deltas = fan_out(self._generator(0), rid, self.sp, self.req.n)
        else:  # a batch: prompt p's choice i is choice p * n + i (merge's order)
            deltas = merge([c for p, sp in enumerate(self.sps)
                            for c in choices(self._generator(p), f"{rid}-p{p}", sp,
                                             self.req.n)])
        if not self.app[INFO].log_requests:
            return deltas
        return logged(deltas, rid, self.num_prompt_tokens, self.clock.received_s)

    def _generator(self, prompt: int) -> ChildFactory:
        def start(request_id: str, sp: SamplingParams) -> AsyncGenerator[Delta, None]:
            return generate(self.engine, self.tok, self.app[METRICS], request_id,
                            self.prompts[prompt], sp, self.kv_params, self.req.cache_salt,
                            self.clock, self.text_options)
        return start

    def timings(self) -> dict[str, Any]:
        """``{"disagg_timings": ...}`` when the request asked for it (else empty); the first
        call marks the request answered (disagg/common/timings.py)."""
        timings = self.clock.answered(self.app[METRICS])
        return {TIMINGS_FIELD: timings_dict(timings)} if self.req.disagg_timings else {}

    def choice(self, delta: Delta | GenerationResult, stream: bool, index: int = 0,
               text_offset: int = 0, first: bool = True) -> dict[str, Any]:
        """One choice of an answer or a chunk. ``text_offset``: where ``delta``'s text starts in
        its choice's (completion logprobs); ``first``: the choice's first chunk (the one chat
        delta that names the role)."""
        lps = delta.logprobs
        lp_json = _logprobs_json(lps, delta.token_ids, self.tok, self.chat,
                                 self.req.return_tokens_as_token_ids,
                                 text_offset) if lps else None
        c: dict[str, Any] = {"index": index, "logprobs": lp_json,
                             "finish_reason": delta.finish_reason,
                             "stop_reason": delta.stop_reason}
        if self.chat:
            message = {"role": "assistant", "content": delta.text} if first or not stream \
                else {"content": delta.text}
            c["delta" if stream else "message"] = message
        else:
            c["text"] = delta.text
        if self.req.return_token_ids:
            c["token_ids"] = delta.token_ids
        return c


async def _completions(request: web.Request, chat: bool) -> web.StreamResponse:
    call = _Call(request, chat)
    await call.parse(request)
    if call.req.stream:
        return await _stream(request, call)
    results = await collect_choices(call.deltas(), call.num_choices)
    body: dict[str, Any] = {
        "id": call.id, "object": call.object, "created": call.created, "model": call.model,
        "choices": [call.choice(r, False, i) for i, r in enumerate(results)],
        "usage": call.usage(sum(len(r.token_ids) for r in results),
                            max(r.num_cached_tokens for r in results)), **call.timings()}
    if call.req.return_token_ids:  # a batch's: one list per prompt
        body["prompt_token_ids"] = call.prompt_ids if len(call.prompts) == 1 else call.prompts
    res = results[0]  # n == 1 whenever there are kv_transfer_params
    if res.kv_transfer_params is not None:
        body["kv_transfer_params"] = kv_params_to_json(res.kv_transfer_params)
    return web.json_response(body)


async def _stream(request: web.Request, call: _Call) -> web.StreamResponse:
    deltas = call.deltas()
    first = await anext(deltas)  # errors before the first byte still become JSON errors
    resp = web.StreamResponse(headers=SSE_HEADERS)
    obj = call.object + ".chunk" if call.chat else call.object
    head = {"id": call.id, "object": obj, "created": call.created, "model": call.model}
    num_out = num_cached = 0
    opts = call.req.stream_options
    with_usage = opts is not None and bool(opts.include_usage)
    every_usage = with_usage and opts is not None and bool(opts.continuous_usage_stats)
    offsets: dict[int, int] = {}  # per choice: its text so far (completion text_offset)
    counts: dict[int, int] = {}  # per choice: its tokens so far (continuous usage)
    timings = call.timings()  # the first token goes out now; the last chunk carries them
    try:
        await resp.prepare(request)  # the client may be gone already
        delta: Delta | None = first
        while delta is not None:
            num_out += len(delta.token_ids)
            num_cached = max(num_cached, delta.num_cached_tokens)
            if not delta.already_sent:
                offset = offsets.get(delta.index)
                last = timings if delta.finish_reason is not None and not with_usage else {}
                counts[delta.index] = counts.get(delta.index, 0) + len(delta.token_ids)
                usage = {"usage": call.choice_usage(delta.index, counts[delta.index])} \
                    if every_usage else {}
                choice = call.choice(delta, True, delta.index, offset or 0,
                                     first=offset is None)
                ids: dict[str, Any] = {}
                if call.req.return_token_ids and offset is None:  # its choice's first chunk
                    prompt_ids = call.prompts[delta.index // call.req.n]
                    if call.chat:  # vLLM's places: the chunk's, the choice's
                        ids["prompt_token_ids"] = prompt_ids
                    else:
                        choice["prompt_token_ids"] = prompt_ids
                await resp.write(encode_event({**head, "choices": [choice], **ids, **usage,
                                               **last}))
                offsets[delta.index] = (offset or 0) + len(delta.text)
            delta = await anext(deltas, None)
        if with_usage:
            usage = call.usage(num_out, num_cached)
            await resp.write(encode_event({**head, "choices": [], "usage": usage, **timings}))
        await resp.write(DONE_EVENT)
    except ApiError as err:
        # no [DONE] after it (vLLM sends one): a client or proxy that takes [DONE] as "the
        # answer is whole" must not take a failed one as whole
        with contextlib.suppress(ConnectionResetError):
            await resp.write(encode_event(err.body()))
    except ConnectionResetError:
        # the client left (a proxy closes its side once it read [DONE]): nothing to tell it;
        # closing the deltas below aborts what is left of the request
        logger.debug("%s: the client closed the stream", call.id)
    finally:
        await deltas.aclose()
    return resp


async def completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/completions."""
    return await _completions(request, chat=False)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/chat/completions."""
    return await _completions(request, chat=True)


def _model_cards(request: web.Request) -> list[dict[str, Any]]:
    info, synced = request.app[INFO], request.app[ENGINE].synced
    assert synced is not None
    return [{"id": name, "object": "model", "created": _STARTED_S, "owned_by": "disagg",
             "root": info.model, "max_model_len": synced.max_model_len}
            for name in (info.served_model_name, *info.model_aliases)]


async def models(request: web.Request) -> web.Response:
    """GET /v1/models with the synced max_model_len."""
    return web.json_response({"object": "list", "data": _model_cards(request)})


async def model(request: web.Request) -> web.Response:
    """GET /v1/models/{id} (the OpenAI client's models.retrieve): its card, or a 404."""
    wanted = request.match_info["model_id"]
    for card in _model_cards(request):
        if card["id"] == wanted:
            return web.json_response(card)
    request.app[INFO].check_model(wanted)  # a 404 naming the served model
    return web.json_response(_model_cards(request)[0])  # the model path: the served card


async def health(request: web.Request) -> web.Response:
    """GET /health: 200 while an engine core can serve; 503 once it died or every rank is
    stalled (frozen: a load balancer or the proxy takes the instance out of rotation)."""
    why = request.app[ENGINE].unavailable()
    if why:
        return json_error(ApiError(503, why, err_type="server_error"))
    return web.json_response({"status": "ok"})


async def version(request: web.Request) -> web.Response:
    """GET /version."""
    return web.json_response({"version": __version__})


def instance_info_dict(engine: EngineClient, info: ServerInfo) -> dict[str, Any]:
    """Role, connector addresses and synced limits (GET /instance_info, proxy registration)."""
    assert engine.synced is not None
    r0 = engine.synced.ready[0]
    return {
        "role": r0.kv_role, "mode": r0.kv_mode, "engine_id": r0.engine_id,
        "http_url": info.http_url, "max_model_len": engine.synced.max_model_len,
        "block_size": engine.synced.block_size, "dp_size": engine.dp_size,
        "tp_size": r0.tp_size,
        "model": info.served_model_name, "model_aliases": list(info.model_aliases),
        "model_root": info.model, "kv_host": r0.kv_host,
        "kv_handshake_port": r0.kv_handshake_port, "kv_notify_port": r0.kv_notify_port,
        "num_gpu_blocks": engine.synced.num_gpu_blocks,
        "hash_seed": (model_seed(engine.cfg.model.model)
                      if engine.cfg.cache.enable_prefix_caching else None)}


async def instance_info(request: web.Request) -> web.Response:
    """GET /instance_info (the proxy's health probe): 503 while the engine cannot serve, as
    ``/health``; a frozen engine answered 200 here and every request routed to it failed at
    once with 503, so the proxy kept choosing it."""
    why = request.app[ENGINE].unavailable()
    if why:
        return json_error(ApiError(503, why, err_type="server_error"))
    return web.json_response(instance_info_dict(request.app[ENGINE], request.app[INFO]))


async def kv_abort(request: web.Request) -> web.Response:
    """POST /v1/kv_transfer/abort {"transfer_id": ...}: drop a transfer's request and blocks."""
    check_kv_key(request)
    transfer_id = decode_body(await request.read(), KVAbortRequest).transfer_id
    found = await request.app[ENGINE].utility("kv_abort", {"transfer_id": transfer_id})
    return web.json_response({"transfer_id": transfer_id, "found": any(found)})


async def kv_faults(request: web.Request) -> web.Response:
    """POST /v1/kv_faults {"faults": [...]}: replace every rank's fault-injection rules
    (connectors/faults.py). Only with DISAGG_FAULT_INJECTION=1; guarded like the KV params."""
    check_kv_key(request)
    body = decode_body(await request.read(), KVFaultsRequest)
    try:
        counts = await request.app[ENGINE].utility("kv_faults", {"faults": body.faults})
    except EngineUnavailableError:
        raise
    except RuntimeError as exc:  # a rank refused the rules
        raise ApiError(400, str(exc), param="faults") from None
    return web.json_response({"rules": counts})


async def kv_ledger(request: web.Request) -> web.Response:
    """GET /v1/kv_ledger: per-rank block ledger (checked for consistency on each call)."""
    ranks = await request.app[ENGINE].utility("ledger")
    return web.json_response({"ranks": ranks})


async def metrics(request: web.Request) -> web.Response:
    """GET /metrics in Prometheus text format."""
    text = render_instance_metrics(request.app[ENGINE], request.app[METRICS],
                                   request.app[INFO].served_model_name)
    return web.Response(body=text.encode(), headers={"Content-Type": CONTENT_TYPE_LATEST})


def _max_model_len(engine: EngineClient) -> int:
    synced = engine.synced
    assert synced is not None  # the app is built after the ready handshake
    return synced.max_model_len


async def _stats_ctx(app: web.Application) -> AsyncIterator[None]:
    """The periodic stats line (disagg/server/stats_logger.py), from start-up to shutdown."""
    interval_s = app[INFO].log_stats_interval_s
    assert interval_s is not None
    stats = InstanceStatsLogger(app[ENGINE], app[METRICS])
    task = asyncio.ensure_future(log_every(interval_s, stats.line,
                                           logging.getLogger("disagg.stats")))
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def make_app(engine: EngineClient, tokenizer: Tokenizer, info: ServerInfo) -> web.Application:
    """Build the instance app around a started EngineClient."""
    app = web.Application(middlewares=[api_key_middleware, error_middleware],
                          client_max_size=64 * 2**20)
    app[ENGINE], app[TOKENIZER], app[INFO], app[METRICS] = engine, tokenizer, info, \
        ServerMetrics(info.served_model_name)
    install_request_ids(app)
    if info.log_stats_interval_s is not None:
        app.cleanup_ctx.append(_stats_ctx)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{model_id:.+}", model)
    app.router.add_get("/health", health)
    app.router.add_get("/version", version)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/instance_info", instance_info)
    app.router.add_post("/v1/kv_transfer/abort", kv_abort)
    app.router.add_get("/v1/kv_ledger", kv_ledger)
    if envs.fault_injection():
        app.router.add_post("/v1/kv_faults", kv_faults)
    AdminApi(engine, info.admin_key).routes(app)
    TokenizeApi(tokenizer, info.check_model, lambda: _max_model_len(engine)).routes(app)
    return app

