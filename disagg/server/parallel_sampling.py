"""``n > 1`` on an instance: one engine request per choice, merged into one stream of deltas
(a batch of prompts likewise: each prompt's choices, prompt after prompt, ``index`` p * n + i).

    request id, n = 3 ──> child 0: "<id>-0", seed      ──┐
                          child 1: "<id>-1", seed + 1  ──┼──> one stream of Deltas,
                          child 2: "<id>-2", seed + 2  ──┘    each tagged .index = i

Seeds: child i samples with ``seed + i`` (wrapped into the signed 64-bit range), so child 0
draws what the same request with n=1 draws and each choice is reproducible alone. vLLM V1 does
the same (``seed + index`` in vllm/v1/engine/parallel_sampling.py) without the wrap, so only a
seed within n of 2**63 - 1 differs there; vLLM V0 drew all n sequences from one generator
seeded once, so seeded n > 1 outputs differ from V0's. vLLM names children ``"<i>_<id>"``.

The children run concurrently (each is balanced onto a rank of its own). The first failure
ends the request and aborts the others; so does the consumer closing the stream early (a
client disconnect): closing a child generator aborts its engine request (serving.generate).
A P/D leg (kv_transfer_params) never gets here: n > 1 is refused there (openai_api); the
proxy fans a P/D request out itself, one P/D flow per choice (proxy/fan_out.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence

import msgspec

from disagg.common.sampling_params import SamplingParams, child_seed
from disagg.server.serving import Delta, GenerationResult

ChildFactory = Callable[[str, SamplingParams], AsyncGenerator[Delta, None]]
"""(engine request id, params) -> that child's deltas (serving.generate, bound)."""

def child_request_id(request_id: str, index: int) -> str:
    """The engine request id of choice ``index``."""
    return f"{request_id}-{index}"


def child_params(sp: SamplingParams, index: int) -> SamplingParams:
    """Choice ``index``'s params: the seed, if any, plus ``index`` (wrapped to 64 bits)."""
    if sp.seed is None or index == 0:
        return sp
    return msgspec.structs.replace(sp, seed=child_seed(sp.seed, index))


def fan_out(start: ChildFactory, request_id: str, sp: SamplingParams,
            n: int) -> AsyncGenerator[Delta, None]:
    """The deltas of all ``n`` choices; n == 1 is the plain request (same id, same params)."""
    if n == 1:
        return start(request_id, sp)
    return merge(choices(start, request_id, sp, n))


def choices(start: ChildFactory, request_id: str, sp: SamplingParams,
            n: int) -> list[AsyncGenerator[Delta, None]]:
    """The ``n`` choices of one prompt, unstarted (n == 1: the plain request)."""
    if n == 1:
        return [start(request_id, sp)]
    return [start(child_request_id(request_id, i), child_params(sp, i)) for i in range(n)]


async def merge(children: Sequence[AsyncGenerator[Delta, None]]
                ) -> AsyncGenerator[Delta, None]:
    """Interleave the children's deltas as they come, each tagged with its child's index.
    Ends when every child has; a child's exception is raised at once, after which (as after
    the consumer closing this generator) every child still running is cancelled and closed,
    which aborts its engine request."""
    queue: asyncio.Queue[tuple[Delta | None, BaseException | None]] = asyncio.Queue()

    async def pump(index: int, child: AsyncGenerator[Delta, None]) -> None:
        try:
            async with contextlib.aclosing(child):
                async for delta in child:
                    delta.index = index
                    queue.put_nowait((delta, None))
        except Exception as exc:  # the request's failure; cancellation passes through
            queue.put_nowait((None, exc))
        else:
            queue.put_nowait((None, None))

    tasks = [asyncio.create_task(pump(i, c)) for i, c in enumerate(children)]
    try:
        running = len(tasks)
        while running:
            delta, error = await queue.get()
            if error is not None:
                raise error
            if delta is None:
                running -= 1
            else:
                yield delta
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def collect_choices(deltas: AsyncIterator[Delta], n: int) -> list[GenerationResult]:
    """Gather every choice of a non-streaming response, in index order."""
    results = [GenerationResult() for _ in range(n)]
    async for d in deltas:
        results[d.index].add(d)
    return results
