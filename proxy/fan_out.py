"""``n > 1`` at the proxy: one P/D flow per choice, merged into the answer an instance gives
for ``n > 1`` (disagg/server/parallel_sampling.py does the same inside one instance).

    client, n = 3 ──> choice 0: flow(n=1, seed)      ──┐  not streamed: choices[i]; usage
                      choice 1: flow(n=1, seed + 1)  ──┼─> with the prompt once, the
                      choice 2: flow(n=1, seed + 2)  ──┘  completions summed. Streamed: the
                                                          events as they come, index i; one
                                                          usage chunk, one [DONE]
Each choice is a whole flow: its own prefill (a prefix cache on the prefill makes the later
ones of the same prompt cheap), KV transfer, retries and scope, so a failed or abandoned request
aborts every choice's transfers. A choice's seed is ``seed + i`` as on an instance, so choice i
equals the instance's choice i. Any failure before a byte went out fails the request (the other
choices are cancelled); after, it ends the stream with an error event. The proxy does not
stream a prefill's first token itself here (proxy/first_token.py): the choices' flows start no
client stream.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any

import msgspec
from aiohttp import web

from disagg.common.logging_setup import current_request_id
from disagg.common.sampling_params import child_seed
from disagg.common.sse import DONE_EVENT, SSE_HEADERS, encode_event, event_data, is_done
from proxy.bodies import ClientRequest
from proxy.errors import ProxyError, error_event
from proxy.flows import Flow, Result
from proxy.metrics import Outcome
from proxy.relay import StreamBroke, stream_events
from proxy.state import ProxyState
from proxy.timings import PhaseClock, StreamTimings
from proxy.upstream import ERROR_EVENT_PREFIX, OpenStream, Reply

logger = logging.getLogger(__name__)


def choice_requests(req: ClientRequest) -> list[ClientRequest]:
    """One n = 1 request per choice, prompt after prompt (a batch's), choice i of a prompt
    seeded ``seed + i`` (when seeded)."""
    out = []
    for prompt in req.batch or (req,):
        for i in range(req.n):
            body = {**prompt.body, "n": 1}
            body.pop("best_of", None)  # best_of == n was checked; a choice has n = 1
            seed = body.get("seed")
            if type(seed) is int:
                body["seed"] = child_seed(seed, i)
            out.append(dataclasses.replace(prompt, body=body, n=1, batch=()))
    return out


def merged_usage(usages: list[dict[str, Any]], n: int = 0) -> dict[str, Any]:
    """One usage for all choices, as an instance counts it: each prompt once (the usages of
    a prompt's ``n`` choices come together; 0: one prompt), every choice's completion tokens,
    the most cached prompt tokens."""
    firsts = usages[::n] if n else usages[:1]
    prompt = sum(int(u.get("prompt_tokens") or 0) for u in firsts)
    completion = sum(int(u.get("completion_tokens") or 0) for u in usages)
    out: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion,
                           "total_tokens": prompt + completion}
    cached = [u["prompt_tokens_details"].get("cached_tokens") for u in usages
              if isinstance(u.get("prompt_tokens_details"), dict)]
    if cached:
        out["prompt_tokens_details"] = {"cached_tokens": max(int(c or 0) for c in cached)}
    return out


async def serve_choices(request: web.Request, st: ProxyState, req: ClientRequest,
                        started_s: float) -> tuple[web.StreamResponse, Outcome]:
    """Answer an ``n > 1`` request from one flow per choice (the request's phases are its
    first choice's; ``started_s``: its arrival, ``time.perf_counter``, for its first byte)."""
    choices = choice_requests(req)
    parent_id = current_request_id()
    scopes = [st.new_scope(None if parent_id is None else f"{parent_id}-{i}")
              for i in range(len(choices))]
    clocks = [PhaseClock(want=req.want_timings, observed=i == 0) for i in range(len(choices))]
    tasks = [asyncio.create_task(Flow(st.deps, scope, choice, clock).run())
             for scope, choice, clock in zip(scopes, choices, clocks, strict=True)]
    outcome = Outcome.FAILED
    try:
        results = await _all(tasks)
        st.metrics.time_to_first_byte_s.observe(time.perf_counter() - started_s)
        answer_id = _AnswerId(parent_id)
        if req.stream:
            response, outcome = await _relay_merged(request, st, _streams(results), clocks,
                                                    req.n, answer_id)
        else:
            response = await _merged_reply(st, results, clocks, req.n, answer_id)
            outcome = Outcome.OK
        return response, outcome
    finally:
        # nothing awaited here: a client closing right after [DONE] cancels this handler,
        # and every choice's load must be released and its transfers settled regardless
        _settle(tasks)
        for scope in scopes:
            scope.succeeded = outcome is Outcome.OK
            scope.close()


async def _all(tasks: list[asyncio.Task[Result]]) -> list[Result]:
    """Every choice's result; the first failure is raised at once (the caller cancels)."""
    await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    for task in tasks:
        if task.done() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
    return [task.result() for task in tasks]


def _settle(tasks: list[asyncio.Task[Result]]) -> None:
    """Cancel the choices still running; close every stream a choice opened (one finishing
    after this closes its own: see _close_late)."""
    for task in tasks:
        if task.done():
            _close_late(task)
        else:
            task.cancel()
            task.add_done_callback(_close_late)


def _close_late(task: asyncio.Task[Result]) -> None:
    if task.cancelled() or task.exception() is not None:
        return
    result = task.result()
    if isinstance(result, OpenStream):
        result.response.close()


class _AnswerId:
    """One id for the whole answer, as an instance gives: choice k's call carried request
    id ``<parent>-<k>``, so its answer's id ends so; the parent's id is that without it."""

    def __init__(self, parent_id: str | None) -> None:
        self._parent_id = parent_id
        self.value: str | None = None

    def of(self, choice_id: object, index: int) -> object:
        """The answer's id, fixed by the first choice id seen."""
        if self.value is None and isinstance(choice_id, str):
            suffix = f"{self._parent_id}-{index}"
            self.value = choice_id[:-len(f"-{index}")] \
                if self._parent_id is not None and choice_id.endswith(suffix) else choice_id
        return self.value if self.value is not None else choice_id


def _streams(results: list[Result]) -> list[OpenStream]:
    if not all(isinstance(r, OpenStream) for r in results):
        raise ProxyError(502, "a decode answered a streamed request in one piece")
    return [r for r in results if isinstance(r, OpenStream)]


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        obj = msgspec.json.decode(body)
    except (msgspec.DecodeError, RecursionError):
        obj = None
    if not isinstance(obj, dict) or not isinstance(obj.get("choices"), list) \
            or len(obj["choices"]) != 1 or not isinstance(obj["choices"][0], dict):
        raise ProxyError(502, "a decode answered a choice with an unexpected body")
    return obj


async def _merged_reply(st: ProxyState, results: list[Result], clocks: list[PhaseClock],
                        n: int, answer_id: _AnswerId) -> web.Response:
    objs = []
    for result, clock in zip(results, clocks, strict=True):
        if not isinstance(result, Reply):
            raise ProxyError(502, "a decode streamed a request that was not streamed")
        objs.append(_json_object(await st.phases.answer_body(clock, result.body)))
    merged = dict(objs[0])
    merged["id"] = answer_id.of(merged.get("id"), 0)
    merged["choices"] = [{**o["choices"][0], "index": i} for i, o in enumerate(objs)]
    usages = [o.get("usage") for o in objs]
    if all(isinstance(u, dict) for u in usages):
        merged["usage"] = merged_usage([u for u in usages if isinstance(u, dict)], n)
    if all("prompt_token_ids" in o for o in objs) and len(objs) > n:  # a batch: per prompt
        merged["prompt_token_ids"] = [o["prompt_token_ids"] for o in objs[::n]]
    return web.Response(status=200, body=msgspec.json.encode(merged),
                        content_type="application/json")


async def _relay_merged(request: web.Request, st: ProxyState, streams: list[OpenStream],
                        clocks: list[PhaseClock], n: int, answer_id: _AnswerId
                        ) -> tuple[web.StreamResponse, Outcome]:
    """Interleave the choices' events as they come, each choice's re-indexed; their usage
    chunks become one and their [DONE]s one. The first broken choice ends the stream with an
    error event."""
    idle_s = st.cfg.stream_idle_timeout_s
    timings = [st.phases.stream(clock) for clock in clocks]
    queue: asyncio.Queue[tuple[int, bytes | None, BaseException | None]] = asyncio.Queue()

    async def pump(i: int) -> None:
        try:
            async for event in stream_events(streams[i], idle_s):
                queue.put_nowait((i, event, None))
        except StreamBroke as exc:
            queue.put_nowait((i, None, exc))
        else:
            queue.put_nowait((i, None, None))

    client = web.StreamResponse(status=200, headers=SSE_HEADERS)
    pumps: list[asyncio.Task[None]] = []
    try:
        await client.prepare(request)
        for t in timings:
            t.relaying()
        pumps = [asyncio.create_task(pump(i)) for i in range(len(streams))]
        complete = await _forward(client, queue, streams, timings, n, answer_id)
        await client.write_eof()
        return client, Outcome.OK if complete else Outcome.FAILED
    except ConnectionResetError:
        return client, Outcome.CLIENT_GONE
    finally:
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        for stream, t in zip(streams, timings, strict=True):
            stream.response.close()
            t.close()


async def _forward(client: web.StreamResponse,
                   queue: asyncio.Queue[tuple[int, bytes | None, BaseException | None]],
                   streams: list[OpenStream], timings: list[StreamTimings], n: int,
                   answer_id: _AnswerId) -> bool:
    """Write the choices' events until all ended (True), or until one failed (False: the
    stream then ends with that failure's error event)."""
    usages: dict[int, dict[str, Any]] = {}
    running = len(streams)
    while running:
        i, event, error = await queue.get()
        if error is None and event is None and not streams[i].saw_done:
            error = StreamBroke(f"decode instance {streams[i].inst.url} ended choice {i}'s "
                                "stream without [DONE]: the answer is incomplete")
        if error is not None:
            logger.warning("%s", error)
            await client.write(error_event(502, str(error)))
            return False
        if event is None:
            running -= 1
            continue
        if is_done(event):
            continue
        if event.startswith(ERROR_EVENT_PREFIX):  # the instance's own error, as it sent it
            await client.write(event)
            return False
        for rewritten in await timings[i].events([event]):
            out = _reindexed(rewritten, i, usages, answer_id)
            if out is not None:
                await client.write(out)
    if usages:
        last = usages[max(usages)]
        await client.write(encode_event(
            {**last, "usage": merged_usage([usages[i]["usage"] for i in sorted(usages)], n)}))
    await client.write(DONE_EVENT)
    return True


def _reindexed(event: bytes, index: int, usages: dict[int, dict[str, Any]],
               answer_id: _AnswerId) -> bytes | None:
    """``event`` with its choices' index set to ``index``; a usage-only chunk is kept in
    ``usages`` (None: write nothing now)."""
    payload = event_data(event)
    try:
        obj = msgspec.json.decode(payload) if payload is not None else None
    except (msgspec.DecodeError, RecursionError):
        return event
    if not isinstance(obj, dict) or not isinstance(obj.get("choices"), list):
        return event
    obj["id"] = answer_id.of(obj.get("id"), index)
    if not obj["choices"] and isinstance(obj.get("usage"), dict):
        usages[index] = obj
        return None
    for choice in obj["choices"]:
        if isinstance(choice, dict):
            choice["index"] = index
    return encode_event(obj)
