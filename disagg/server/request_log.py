"""``--enable-log-requests``: one INFO line when a request arrives and one when it ends.

    Received request cmpl-R-1a2b3c4d: prompt_tokens=42, params={"max_tokens":8,...},
        kv_transfer=producer (read, xfer-...)
    Finished request cmpl-R-1a2b3c4d: finish_reason=length, prompt_tokens=42,
        output_tokens=8, cached_tokens=0, ttft=0.041 s, e2e=0.210 s

Off by default (vLLM's default since it renamed the flag): at thousands of requests per second
two lines each are a cost.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncGenerator

import msgspec

from disagg.common.kv_transfer_params import KVTransferParams
from disagg.common.openai_api import ApiError
from disagg.common.sampling_params import SamplingParams
from disagg.server.serving import Delta

logger = logging.getLogger("disagg.requests")


def kv_role(params: KVTransferParams | None) -> str:
    """``producer (read, xfer-...)``, ``consumer (...)`` or ``none``."""
    if params is None:
        return "none"
    role = "producer" if params.do_remote_decode else "consumer"
    mode = params.mode.value if params.mode is not None else "default mode"
    return f"{role} ({mode}, {params.transfer_id})"


def log_arrival(request_id: str, num_prompt_tokens: int, sp: SamplingParams,
                kv_params: KVTransferParams | None) -> None:
    """The arrival line: id, prompt size, the sampling fields that differ from the defaults,
    and the request's side of a KV transfer."""
    logger.info("Received request %s: prompt_tokens=%d, params=%s, kv_transfer=%s", request_id,
                num_prompt_tokens, msgspec.json.encode(sp).decode(), kv_role(kv_params))


async def logged(deltas: AsyncGenerator[Delta, None], request_id: str, num_prompt_tokens: int,
                 received_s: float) -> AsyncGenerator[Delta, None]:
    """``deltas`` unchanged, then the finish line: finish reason (``abort`` when the consumer
    stopped early, ``error ...`` when it failed), token counts, TTFT and end-to-end time from
    ``received_s`` (monotonic)."""
    first_s: float | None = None
    num_out = num_cached = 0
    reasons: dict[int, str] = {}
    outcome: str | None = None
    try:
        async with contextlib.aclosing(deltas):
            async for delta in deltas:
                if delta.token_ids and first_s is None:
                    first_s = time.monotonic()
                num_out += len(delta.token_ids)
                num_cached = max(num_cached, delta.num_cached_tokens)
                if delta.finish_reason is not None:
                    reasons[delta.index] = delta.finish_reason
                yield delta
    except ApiError as err:
        outcome = f"error {err.status} ({err.message[:200]})"
        raise
    finally:
        end_s = time.monotonic()
        ttft = "-" if first_s is None else f"{first_s - received_s:.3f} s"
        reason = outcome or ",".join(reasons[i] for i in sorted(reasons)) or "abort"
        logger.info("Finished request %s: finish_reason=%s, prompt_tokens=%d, output_tokens=%d, "
                    "cached_tokens=%d, ttft=%s, e2e=%.3f s", request_id, reason,
                    num_prompt_tokens, num_out, num_cached, ttft, end_s - received_s)
