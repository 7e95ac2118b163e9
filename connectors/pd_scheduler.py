"""Scheduler side of the P/D connector: the three hooks the scheduler calls.

Which KV the decode loads: the wire counts the prompt's first n-1 tokens (``RemoteBlocks`` and
the READ params say n-1), but blocks move whole, so the block holding the last prompt token
arrives too unless that token starts a block (n % block_size == 1). When the decode takes the
prefill's first token (neither ``recompute_first_token`` nor logprobs), that last token's KV
counts as loaded: the decode's first step computes the given token alone (a one-token decode
step, replayed from a graph) instead of the last prompt token and it together. Without the
given token (recompute, logprobs, or a WRITE token still on its way when the KV lands), the
scheduler recomputes the last prompt token and samples, and P/D output still equals
monolithic token for token.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from connectors.pd_connector import PDConnector
    from disagg.engine.kv_connector import FinishAction
    from disagg.engine.request import Request


class PDSchedulerSide:
    """Delegates to the connector's transfer table; holds no state of its own."""

    def __init__(self, connector: PDConnector) -> None:
        self._c = connector

    def get_num_new_matched_tokens(self, req: Request) -> int:
        """Prompt tokens whose KV the decode loads from the prefill: all but the last, or all
        of them when the block moved for the others holds the last one's KV too and the
        decode takes the prefill's first token (the module docstring says why)."""
        t = self._c.consumer_transfer(req)
        if t is None:
            return 0
        num_external = req.num_prompt_tokens - 1
        if num_external <= 0:
            self._c.complete_without_data(t)
            return 0
        if t.takes_first_token and num_external % self._c.metadata.block_size:
            return req.num_prompt_tokens  # the same blocks: the last token's KV is in them
        return num_external

    def can_schedule(self, req: Request) -> bool:
        """False while a request must not start yet (a WRITE prefill without destination)."""
        return self._c.can_schedule(req)

    def update_state_after_alloc(self, req: Request) -> None:
        """Blocks exist: READ posts the read, WRITE tells the prefill where to write."""
        self._c.on_allocated(req)

    def request_finished(self, req: Request) -> FinishAction:
        """Producer: hold the prompt's blocks for the peer. Consumer: settle the transfer."""
        return self._c.on_request_finished(req)
