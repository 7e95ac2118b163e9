"""One client request's route through the pools: local, READ or WRITE, with retries.

Nothing here writes to the client but a READ flow's first token (proxy/first_token.py): a flow
ends with a complete ``Reply`` or an ``OpenStream`` whose first event is in hand, so every retry
below happens before the client saw a byte, or, once that token went out, continues from it.

    local : D alone (prompt under --local-prefill-threshold), retried on other D's
    READ  : P(max_tokens=1) -> kv params -> D; P retried on other P's, D on other D's with
            the same params (P holds the KV until its transfer timeout). P's params carry the
            token it sampled: the proxy streams it at once (proxy/first_token.py), or D does
            while it reads the KV (--first-token)
    WRITE : P and D at once with one transfer_id; either failing aborts both, and the pair
            is retried with a fresh transfer_id and the failed instance left out
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from disagg.common.kv_transfer_params import (
    KV_TRANSFER_FAILED_CODE,
    KVParamsError,
    kv_params_to_json,
    parse_kv_params,
)
from disagg.common.timings import TIMINGS_FIELD, parse_instance_timings
from proxy.bodies import ClientRequest, decode_body, prefill_body
from proxy.config import ProxyConfig, TransferMode
from proxy.errors import ProxyError
from proxy.first_token import ClientStream, SentFirstToken, first_token_chunk, request_allows
from proxy.local_prefill import LocalPrefillThreshold
from proxy.metrics import ProxyMetrics
from proxy.policies import Policy
from proxy.registration import InstanceInfo
from proxy.registry import Instance, Pool, Registry
from proxy.scope import BackgroundTasks, RequestScope
from proxy.timings import PhaseClock
from proxy.upstream import (
    OpenStream,
    Reply,
    UpstreamFailure,
    open_stream,
    post_json,
    while_up,
    with_deadline,
)

logger = logging.getLogger(__name__)

Result = Reply | OpenStream


@dataclass(frozen=True, slots=True)
class FlowDeps:
    """The long-lived pieces every flow uses."""

    cfg: ProxyConfig
    registry: Registry
    policies: Mapping[Pool, Policy]
    metrics: ProxyMetrics
    background: BackgroundTasks
    local_prefill: LocalPrefillThreshold
    """Which prompts skip the prefill pool (fixed, or learned from the flows' timings)."""
    revive: Callable[[Pool], Awaitable[None]] | None = None
    """Probe a pool that has no healthy instance now (proxy/health.py Reviver)."""
    suspect: Callable[[Instance], None] | None = None
    """Probe an instance a request just failed on, in the background (Reviver.suspect)."""


class DecodeExhausted(ProxyError):
    """Every decode instance tried failed before the client got a byte."""


def new_transfer_id() -> str:
    """A fresh transfer id: the one key P and D share for one KV transfer."""
    return "xfer-" + uuid.uuid4().hex


def peer_params(info: InstanceInfo | None) -> dict[str, Any]:
    """The ``remote_*`` fields that tell one side of a WRITE where the other side listens."""
    if info is None:
        return {}
    return {"remote_engine_id": info.engine_id, "remote_host": info.kv_host,
            "remote_handshake_port": info.kv_handshake_port,
            "remote_notify_port": info.kv_notify_port}


def _consume_result(task: asyncio.Future[Any]) -> None:
    """Mark a task's exception as seen (the flow already acted on the other side's failure)."""
    if not task.cancelled():
        task.exception()


class Flow:
    """Routes one client request; ``run()`` returns what the decode instance answered."""

    def __init__(self, deps: FlowDeps, scope: RequestScope, req: ClientRequest,
                 clock: PhaseClock | None = None, client: ClientStream | None = None) -> None:
        self._deps = deps
        self._cfg = deps.cfg
        self._scope = scope
        self._req = req
        self.clock = clock if clock is not None else PhaseClock(want=req.want_timings)
        """When each call went out and came back (proxy/timings.py)."""
        self._client = client if client is not None and deps.cfg.first_token_from_prefill \
            and request_allows(req) else None
        """Where a READ flow streams the prefill's first token itself (proxy/first_token.py);
        None: the decode's stream carries it."""
        self.sent: SentFirstToken | None = None
        """The first token the client already has (every decode attempt continues from it)."""

    async def run(self) -> Result:
        """Pick the flow for this request and run it."""
        threshold = self._deps.local_prefill.tokens(
            i.outstanding_tokens for i in self._deps.registry.healthy(Pool.PREFILL))
        self._deps.metrics.local_prefill_threshold_tokens = threshold
        if threshold > 0 and self._req.num_prompt_tokens < threshold:
            self._deps.metrics.local_prefills += 1
            return await self._decode_with_retries(None, None)
        self.clock.mode = self._cfg.mode.value
        if self._cfg.mode is TransferMode.READ:
            return await self._run_read()
        return await self._run_write()

    def _pick(self, pool: Pool, tried: set[str], last: UpstreamFailure | None) -> Instance:
        """The policy's choice among healthy, not yet tried instances of ``pool``."""
        healthy = self._deps.registry.healthy(pool)
        candidates = [i for i in healthy if i.url not in tried]
        if candidates:
            return self._deps.policies[pool].choose(candidates, self._req.prompt_token_ids,
                                                       self._req.cache_salt)
        if last is not None:
            raise ProxyError(last.exhausted_status(), f"{pool.value} failed on {len(tried)} "
                                                      f"instance(s); last error: {last}")
        raise ProxyError(503, f"no healthy {pool.value} instance available")

    async def _pick_reviving(self, pool: Pool, tried: set[str],
                             last: UpstreamFailure | None) -> Instance:
        """``_pick``, but when ``pool`` has no healthy instance at all, its instances are
        probed at once first (one probe round shared by the requests that find it empty):
        an instance that came back since the last health round (a restart) serves now
        instead of the request failing with 503 until the next round."""
        if last is None:
            await self._revive_if_empty(pool)
        return self._pick(pool, tried, last)

    async def _revive_if_empty(self, pool: Pool) -> None:
        """Probe ``pool`` at once when it has no healthy instance (proxy/health.py Reviver)."""
        if self._deps.revive is not None and not self._deps.registry.healthy(pool):
            await self._deps.revive(pool)

    async def _any_healthy(self, pool: Pool) -> None:
        """A 503 unless ``pool`` has a healthy instance (probed at once when it has none)."""
        await self._revive_if_empty(pool)
        if not self._deps.registry.healthy(pool):
            raise ProxyError(503, f"no healthy {pool.value} instance available")

    def _untried(self, pool: Pool, tried: set[str]) -> bool:
        """Whether ``pool`` has a healthy instance not in ``tried``."""
        return any(i.url not in tried for i in self._deps.registry.healthy(pool))

    def _note_failure(self, failure: UpstreamFailure, pool: Pool) -> None:
        logger.warning("%s attempt failed: %s", pool.value, failure)
        self._deps.metrics.retries[pool.value] += 1
        if failure.instance_down:
            self._deps.registry.mark_failed(failure.inst, failure.reason)
        elif failure.status != 429 and self._deps.suspect is not None:
            # a timeout, a 5xx, a decode that heard nothing from this prefill: is it frozen?
            self._deps.suspect(failure.inst)

    async def _prefill(self, p: Instance, kv_params: dict[str, Any]) -> Reply:
        """One prefill call (``max_tokens=1``, not streamed), its load counted on ``p``. P
        also gets the client's max_tokens, so a prompt with no room for them is refused (400)
        before it is computed rather than by the decode after it."""
        decode_len = self._deps.registry.largest_max_model_len(Pool.DECODE)
        if self._req.requested_max_tokens is not None and decode_len is not None:
            kv_params = {**kv_params, "decode_max_tokens": self._req.requested_max_tokens,
                         "decode_max_model_len": decode_len}
        body = prefill_body(self._req.body, kv_params)
        body[TIMINGS_FIELD] = True
        timeout = aiohttp.ClientTimeout(total=self._cfg.prefill_timeout_s,
                                        sock_connect=self._cfg.connect_timeout_s)
        registry, num_tokens = self._deps.registry, self._req.num_prompt_tokens
        registry.acquire(p, num_tokens)
        started_s = time.perf_counter()
        self.clock.prefill_sent_s = time.monotonic()
        try:
            reply = await while_up(post_json(self._scope.session(p), p,
                                             self._req.endpoint.value, body, timeout),
                                   p, "prefill")
        finally:
            registry.release(p, num_tokens)
        self.clock.prefill_answered_s = time.monotonic()
        self._deps.metrics.prefill_latency_s.observe(time.perf_counter() - started_s)
        self._learn_prefill(reply)
        return reply

    def _learn_prefill(self, reply: Reply) -> None:
        """Feed the prefill's own compute time to the local-prefill threshold (auto)."""
        if not self._deps.local_prefill.auto:
            return
        data = reply.json_object()
        t = parse_instance_timings(data.get(TIMINGS_FIELD)) if data is not None else None
        if t is not None:
            self._deps.local_prefill.observe_prefill(self._req.num_prompt_tokens, t.compute_s)

    async def _decode(self, d: Instance, kv_params: dict[str, Any] | None) -> Result:
        """Send the decode request; return the whole reply, or the stream once it started."""
        cfg, path = self._cfg, self._req.endpoint.value
        body = decode_body(self._req.body, kv_params)
        body[TIMINGS_FIELD] = True
        timeout = aiohttp.ClientTimeout(total=cfg.request_timeout_s,
                                        sock_connect=cfg.connect_timeout_s)
        self._scope.acquire(d, self._req.num_prompt_tokens + self._req.max_tokens)
        self.clock.decode_sent_s = time.monotonic()
        try:
            result: Result
            if not self._req.stream:
                result = await while_up(
                    post_json(self._scope.session(d), d, path, body, timeout), d, "decode")
            else:
                opening = while_up(open_stream(self._scope.session(d), d, path, body, timeout),
                                   d, "decode")
                result = await with_deadline(opening, cfg.first_byte_timeout_s, d, "decode")
            self.clock.decode_answered_s = time.monotonic()
            answered = self.clock.prefill_answered_s
            if kv_params is not None and answered is not None:  # what P/D added after P
                self._deps.local_prefill.observe_handoff(
                    max(0.0, self.clock.decode_answered_s - answered))
            return result
        except BaseException:
            self._scope.release(d)
            raise

    async def _decode_with_retries(self, kv_params: dict[str, Any] | None,
                                   transfer_id: str | None) -> Result:
        tried: set[str] = set()
        last: UpstreamFailure | None = None
        for _ in range(self._cfg.max_decode_attempts):
            if last is not None and not self._untried(Pool.DECODE, tried):
                break
            d = await self._pick_reviving(Pool.DECODE, tried, last)
            if transfer_id is not None:
                self._scope.note_transfer(d, transfer_id)
            try:
                return await self._decode(d, kv_params)
            except UpstreamFailure as failure:
                # No abort here: in READ mode the P must keep the KV for the next decode.
                tried.add(d.url)
                last = failure
                self._note_failure(failure, Pool.DECODE)
        raise DecodeExhausted(502 if last is None else last.exhausted_status(),
                              f"decode failed on {len(tried)} instance(s); last error: {last}")

    async def _run_read(self) -> Result:
        """Prefill, then decode; when no decode could use that KV, prefill again elsewhere.
        Nothing is prefilled while no decode could take the KV: with no healthy decode (after
        an on-demand probe) the request is a 503 at once, not a prefill computed in vain and,
        streamed, a 200 whose first token is followed by an error."""
        if self._deps.registry.healthy(Pool.PREFILL):  # (none: the prefill's 503 below)
            await self._any_healthy(Pool.DECODE)
        tried: set[str] = set()
        last: UpstreamFailure | None = None
        for _ in range(self._cfg.max_prefill_attempts):
            p = await self._pick_reviving(Pool.PREFILL, tried, last)
            tried.add(p.url)
            transfer_id = new_transfer_id()
            self._scope.note_transfer(p, transfer_id)
            try:
                params = await self._read_prefill(p, transfer_id)
            except UpstreamFailure as failure:
                self._scope.abort(p, transfer_id)
                last = failure
                self._note_failure(failure, Pool.PREFILL)
                continue
            d_params = {**params, "do_remote_prefill": True, "mode": TransferMode.READ.value,
                        "transfer_id": transfer_id}
            if not self._cfg.first_token_from_prefill:
                d_params.pop("first_token_id", None)
            await self._stream_first_token(d_params)
            try:
                return await self._decode_with_retries(d_params, transfer_id)
            except DecodeExhausted:
                # P's KV is unusable (P's transfer side broken?): free it, start over elsewhere.
                self._scope.abort(p, transfer_id)
                if not self._untried(Pool.PREFILL, tried) \
                        or not self._deps.registry.healthy(Pool.DECODE):
                    raise
                self._deps.metrics.retries[Pool.PREFILL.value] += 1
                logger.warning("no decode could use the KV prefilled on %s; prefilling again",
                               p.url)
        raise ProxyError(502 if last is None else last.exhausted_status(),
                         f"prefill failed on {len(tried)} instance(s); last error: {last}")

    async def _stream_first_token(self, d_params: dict[str, Any]) -> None:
        """Send the prefill's first token to the client now when allowed; from then on every
        decode attempt continues from that token (a prefill retried after the first token
        went out hands over its KV, not its own token)."""
        if self.sent is None and self._client is not None \
                and self.clock.prefill_reply is not None:
            made = first_token_chunk(self._req.endpoint, self.clock.prefill_reply,
                                     d_params.get("first_token_id"))
            if made is not None:
                self.sent, event = made
                await self._client.start(event)
                self.clock.relayed_s = time.monotonic()
                self.clock.first_token_by_proxy = True
        if self.sent is not None:
            d_params["first_token_id"] = self.sent.token_id
            d_params["first_token_text"] = self.sent.text

    async def _read_prefill(self, p: Instance, transfer_id: str) -> dict[str, Any]:
        """Prefill on ``p``; returns the ``kv_transfer_params`` P handed back."""
        reply = await self._prefill(p, {"transfer_id": transfer_id, "do_remote_decode": True,
                                        "mode": TransferMode.READ.value})
        self.clock.prefill_reply, self.clock.transfer_id = reply, transfer_id
        return _returned_params(p, reply)

    async def _run_write(self) -> Result:
        tried: dict[Pool, set[str]] = {Pool.PREFILL: set(), Pool.DECODE: set()}
        last: dict[Pool, UpstreamFailure | None] = {Pool.PREFILL: None, Pool.DECODE: None}
        budget = {Pool.PREFILL: self._cfg.max_prefill_attempts,
                  Pool.DECODE: self._cfg.max_decode_attempts}
        while True:
            p = await self._pick_reviving(Pool.PREFILL, tried[Pool.PREFILL], last[Pool.PREFILL])
            d = await self._pick_reviving(Pool.DECODE, tried[Pool.DECODE], last[Pool.DECODE])
            transfer_id = new_transfer_id()
            self._scope.note_transfer(p, transfer_id)
            self._scope.note_transfer(d, transfer_id)
            try:
                return await self._write_pair(p, d, transfer_id)
            except UpstreamFailure as failure:
                self._scope.abort(p, transfer_id)
                self._scope.abort(d, transfer_id)
                pool = Pool.PREFILL if failure.inst is p else Pool.DECODE
                tried[pool].add(failure.inst.url)
                last[pool] = failure
                self._note_failure(failure, pool)
                if len(tried[pool]) >= budget[pool]:
                    raise ProxyError(failure.exhausted_status(),
                                     f"{pool.value} failed on {len(tried[pool])} instance(s); "
                                     f"last error: {failure}") from None

    async def _write_pair(self, p: Instance, d: Instance, transfer_id: str) -> Result:
        """Start P and D together; done when D answers (P may still be finishing)."""
        common = {"transfer_id": transfer_id, "mode": TransferMode.WRITE.value}
        p_params = {**common, "do_remote_decode": True, **peer_params(d.info)}
        d_params = {**common, "do_remote_prefill": True, **peer_params(p.info)}
        if not self._cfg.first_token_from_prefill:
            d_params["recompute_first_token"] = True
        # P's call outlives this function when D answers first; the app owns it from here.
        p_task = self._deps.background.spawn(self._prefill(p, p_params),
                                             name=f"prefill-{transfer_id}")
        self._scope.own(p_task)
        self.clock.prefill_task, self.clock.transfer_id = p_task, transfer_id
        d_task = asyncio.ensure_future(self._decode(d, d_params))
        d_task.add_done_callback(_consume_result)
        try:
            await asyncio.wait({p_task, d_task}, return_when=asyncio.FIRST_COMPLETED)
            if p_task.done() and not d_task.done() and not _decode_settles(p_task):
                p_task.result()  # P failed first: raise its error, D is waiting in vain
            try:
                return await d_task
            except UpstreamFailure as failure:
                if failure.code != KV_TRANSFER_FAILED_CODE:
                    raise
                # D failed for want of P's KV (P failed it, froze, or is unreachable): the
                # pair's failure is P's, so the retry takes another prefill
                if p_task.done() and _decode_settles(p_task):
                    p_task.result()
                raise UpstreamFailure(p, f"the decode got no KV from this prefill: "
                                         f"{failure.reason}", status=failure.status,
                                      code=failure.code) from None
        except BaseException:
            d_task.cancel()
            p_task.cancel()
            raise


def _decode_settles(p_task: asyncio.Future[Reply]) -> bool:
    """P's KV transfer failed (the decode gave it up, say, after the request waited in its
    queue past defer_timeout, or P's own deadline passed): the decode knows (P notified it, or
    the decode caused it) and settles that request itself, by its kv_load_failure_policy
    (computing the prompt, or failing with its own error), so its answer is the request's."""
    exc = None if p_task.cancelled() else p_task.exception()
    return isinstance(exc, UpstreamFailure) and exc.code == KV_TRANSFER_FAILED_CODE


def _returned_params(p: Instance, reply: Reply) -> dict[str, Any]:
    """The ``kv_transfer_params`` object of a READ prefill's response."""
    data = reply.json_object()
    raw = data.get("kv_transfer_params") if data is not None else None
    if not isinstance(raw, dict):
        raise UpstreamFailure(p, "prefill response carries no kv_transfer_params object")
    try:
        params = parse_kv_params(raw, require_role=False)
    except KVParamsError as exc:
        raise UpstreamFailure(p, f"prefill answered unusable kv_transfer_params: {exc}") from None
    return kv_params_to_json(params)
