"""Scheduler side of the P/D connector: the three hooks the scheduler calls.

Who computes the first output token: the DECODE instance. It loads the KV of prompt positions
[0, n-1) from the prefill and recomputes the last prompt token itself, so its first sampled
token comes from its own logits and P/D output equals monolithic output token for token. The
prefill's single sampled token (max_tokens=1) is discarded by the proxy.
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
        """Prompt tokens whose KV the decode loads from the prefill (all but the last)."""
        t = self._c.consumer_transfer(req)
        if t is None:
            return 0
        num_external = req.num_prompt_tokens - 1
        if num_external <= 0:
            self._c.complete_without_data(t)
            return 0
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
