"""HTTP handlers of the OpenAI-compatible surface plus ``/health`` and ``/metrics``."""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler
from aiohttp.web_protocol import RequestPayloadError
from prometheus_client import CONTENT_TYPE_LATEST

from disagg.common.logging_setup import current_request_id
from disagg.common.version import __version__
from proxy.bodies import Endpoint, parse_request
from proxy.errors import ProxyError, error_response, from_proxy_error
from proxy.fan_out import serve_choices
from proxy.first_token import ClientStream
from proxy.flows import Flow
from proxy.metrics import Outcome
from proxy.registry import Pool
from proxy.relay import relay_stream
from proxy.state import STATE_KEY, ProxyState
from proxy.timings import PhaseClock
from proxy.upstream import OpenStream, Reply, UpstreamRejected, client_error_text

logger = logging.getLogger(__name__)


@web.middleware
async def openai_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error the proxy itself answers (404, 405, a bug) gets an OpenAI-style body."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(exc.status, f"{exc.reason}: {request.method} {request.path}")
    except RequestPayloadError as exc:  # any route's body in an encoding it is not in
        return error_response(400, f"cannot read the request body: {exc}")
    except Exception:
        logger.exception("unexpected error on %s %s", request.method, request.path)
        return error_response(500, "internal proxy error; the proxy's log has the details")


def _outcome_for(status: int) -> Outcome:
    if status == 503:
        return Outcome.UNAVAILABLE
    return Outcome.REJECTED if status < 500 else Outcome.FAILED


async def _read_body(request: web.Request) -> bytes:
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[STATE_KEY].cfg.max_request_body_bytes
        raise ProxyError(413, f"request body is over the proxy's limit of {limit} bytes") from None
    except RequestPayloadError as exc:  # e.g. a Content-Encoding the body is not in
        raise ProxyError(400, f"cannot read the request body: {exc}") from None


async def _generate(request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
    """Route one generation request through the pools and answer the client."""
    st: ProxyState = request.app[STATE_KEY]
    clock = PhaseClock()
    started_s = time.perf_counter()
    scope = st.new_scope(current_request_id())  # X-Request-Id, bound by the middleware
    outcome = Outcome.FAILED
    result: Reply | OpenStream | None = None
    st.metrics.in_flight += 1
    client = ClientStream(request)
    try:
        req = parse_request(endpoint, await _read_body(request), st.counter,
                            st.registry.min_max_model_len())
        clock.want = req.want_timings
        if req.n > 1 or req.batch:
            response, outcome = await serve_choices(request, st, req, started_s)
            return response
        result = await Flow(st.deps, scope, req, clock, client).run()
        if isinstance(result, Reply) and client.response is not None:  # not a stream (bug)
            return await client.fail(502, "the decode answered a streamed request in one piece")
        if isinstance(result, Reply):
            scope.succeeded, outcome = True, Outcome.OK
            st.metrics.time_to_first_byte_s.observe(time.perf_counter() - started_s)
            body = await st.phases.answer_body(clock, result.body)
            return web.Response(status=result.status, body=body,
                                content_type=result.content_type)
        first_byte_s = client.started_s if client.started_s is not None else time.perf_counter()
        st.metrics.time_to_first_byte_s.observe(first_byte_s - started_s)
        response, outcome = await relay_stream(request, result, st.cfg.stream_idle_timeout_s,
                                               st.phases.stream(clock), client.response)
        scope.succeeded = outcome is Outcome.OK
        return response
    except ProxyError as exc:
        outcome = _outcome_for(exc.status)
        if client.response is not None:  # the first token went out: end the stream instead
            return await client.fail(exc.status, exc.message)
        return from_proxy_error(exc)
    except UpstreamRejected as exc:
        outcome = Outcome.REJECTED
        if client.response is not None:
            return await client.fail(exc.status,
                                     f"the decode refused the request: {exc.message()}")
        if exc.openai_error() is not None:  # an instance's own error: as it was
            return web.Response(status=exc.status, body=exc.body, content_type="application/json")
        return error_response(exc.status, f"an instance refused the request: {exc.message()}")
    except ConnectionResetError:
        if client.response is None:
            raise
        outcome = Outcome.CLIENT_GONE  # it left while the proxy sent the first token
        return client.response
    except asyncio.CancelledError:
        if isinstance(result, OpenStream) and result.saw_done and not result.saw_error:
            # the client left after the decode's [DONE] (the openai client closes as soon as
            # it reads it): the request is complete, there is nothing to abort
            scope.succeeded, outcome = True, Outcome.OK
        else:
            outcome = Outcome.CLIENT_GONE
        raise
    finally:
        scope.close()
        st.metrics.in_flight -= 1
        st.metrics.count_request(endpoint.value, outcome)


async def completions(request: web.Request) -> web.StreamResponse:
    """``POST /v1/completions``."""
    return await _generate(request, Endpoint.COMPLETIONS)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """``POST /v1/chat/completions``."""
    return await _generate(request, Endpoint.CHAT)


def _model_cards(request: web.Request) -> list[dict[str, object]] | web.Response:
    """The served model's cards (its name, then its aliases), or the 503 to answer while no
    instance is healthy."""
    st = request.app[STATE_KEY]
    max_model_len = st.registry.min_max_model_len()
    if max_model_len is None:
        return error_response(503, "no healthy instance yet; the model is not known")
    names = st.registry.model_names() or (st.cfg.model or "unknown",)
    root = st.registry.model_root() or names[0]
    return [{"id": name, "object": "model", "created": st.started_at_s, "owned_by": "disagg",
             "root": root, "max_model_len": max_model_len} for name in names]


async def models(request: web.Request) -> web.Response:
    """``GET /v1/models``: the served model, with the pool's smallest ``max_model_len``."""
    cards = _model_cards(request)
    if isinstance(cards, web.Response):
        return cards
    return web.json_response({"object": "list", "data": cards})


async def model(request: web.Request) -> web.Response:
    """``GET /v1/models/{id}`` (the OpenAI client's models.retrieve): the card, or a 404."""
    cards = _model_cards(request)
    if isinstance(cards, web.Response):
        return cards
    wanted = request.match_info["model_id"]
    for card in cards:
        if card["id"] == wanted:
            return web.json_response(card)
    return error_response(404, f"The model `{wanted}` does not exist; this proxy serves "
                               f"`{cards[0]['id']}`", param="model", code="model_not_found")


async def _forwarded(request: web.Request) -> web.Response:
    """``POST /tokenize`` and ``/detokenize``: a healthy instance's answer as it is (decode
    pool first: it tokenizes as the decode that serves the request does). The proxy's own
    checks (API key, body size) apply first."""
    st = request.app[STATE_KEY]
    raw = await _read_body(request)
    candidates = st.registry.healthy(Pool.DECODE) or st.registry.healthy(Pool.PREFILL)
    if not candidates:
        return error_response(503, "no healthy instance to answer it")
    inst = candidates[0]
    timeout = aiohttp.ClientTimeout(total=st.cfg.connect_timeout_s + st.cfg.probe_timeout_s)
    headers = {"Content-Type": request.headers.get("Content-Type", "application/json")}
    try:
        async with st.sessions[inst.pool].post(inst.url + request.path, data=raw,
                                               headers=headers, timeout=timeout) as resp:
            body = await resp.read()
            return web.Response(status=resp.status, body=body, content_type=resp.content_type)
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        return error_response(502, f"instance {inst.url} did not answer {request.path}: "
                                   f"{client_error_text(exc)}")


async def version(request: web.Request) -> web.Response:
    """``GET /version``: the proxy's (the package's) version."""
    return web.json_response({"version": __version__})


async def health(request: web.Request) -> web.Response:
    """``GET /health``: 200 when both pools have a healthy instance, else 503."""
    st = request.app[STATE_KEY]
    num_prefill = len(st.registry.healthy(Pool.PREFILL))
    num_decode = len(st.registry.healthy(Pool.DECODE))
    ready = num_decode > 0 and num_prefill > 0
    return web.json_response({"status": "ok" if ready else "unavailable",
                              "prefill": num_prefill, "decode": num_decode},
                             status=200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    """``GET /metrics``: Prometheus text."""
    st = request.app[STATE_KEY]
    return web.Response(body=st.metrics.render(st.registry.instances(), st.kv_index).encode(),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})


def add_routes(app: web.Application) -> None:
    """Attach the public routes."""
    app.router.add_post(Endpoint.COMPLETIONS.value, completions)
    app.router.add_post(Endpoint.CHAT.value, chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{model_id:.+}", model)
    app.router.add_get("/health", health)
    app.router.add_post("/tokenize", _forwarded)
    app.router.add_post("/detokenize", _forwarded)
    app.router.add_get("/version", version)
    app.router.add_get("/metrics", metrics)
