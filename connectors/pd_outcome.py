"""How a transfer ends on this side of the P/D connector.

Every terminal state (DONE, FAILED, EXPIRED) counts itself, tells the peer what it must know,
settles the request (a consumer's request resumes, recomputes or fails; a producer's fails if
nobody will consume it) and frees the blocks it holds, but only once no one-sided op can still
touch them: a failed transfer with ops pending is "draining" until they settle or time out.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from connectors.pd_peers import PeerLinks
from connectors.pd_worker import PDWorkerSide
from connectors.protocol import Release, TransferFailed, WriteDone
from connectors.transfer import Timeouts, Transfer, TransferRole, TransferState
from connectors.transports.base import TransferStatus

if TYPE_CHECKING:
    from disagg.scheduler import Scheduler

logger = logging.getLogger(__name__)


class Outcomes:
    """The terminal transitions of one connector's transfers."""

    def __init__(self, engine_id: str, worker: PDWorkerSide, peers: PeerLinks,
                 transfers: dict[str, Transfer], sched: Callable[[], Scheduler], *,
                 timeouts: Timeouts, policy: str, counters: dict[str, float]) -> None:
        self.engine_id = engine_id
        self.worker = worker
        self.peers = peers
        self.transfers = transfers
        self._sched = sched
        self.timeouts = timeouts
        self.policy = policy
        self.counters = counters
        self.draining: list[tuple[Transfer, float]] = []
        """Failed transfers whose blocks wait for their pending ops (with a deadline)."""

    def complete(self, t: Transfer) -> None:
        """DONE: count it, tell the peer (release / write_done), wake a consumer's request."""
        t.move(TransferState.DONE)
        self.counters["transfers_done_total"] += 1
        self.counters["bytes_moved_total"] += t.bytes_moved
        if t.posted_s is not None:
            self.counters["transfer_seconds_sum"] += time.monotonic() - t.posted_s
            self.counters["transfer_seconds_count"] += 1
        if t.role is TransferRole.CONSUMER_READ:
            self.peers.send(t, Release(transfer_id=t.transfer_id, engine_id=self.engine_id))
        elif t.role is TransferRole.PRODUCER_WRITE:
            self.peers.send(t, WriteDone(transfer_id=t.transfer_id, engine_id=self.engine_id))
        if not t.role.is_producer:
            self._sched().on_remote_kv(t.request_id, None, recompute=False)
        self.free_if_held(t)
        self.forget(t)

    def fail(self, t: Transfer, reason: str, *, state: TransferState = TransferState.FAILED,
             notify_peer: bool = True, notify_request: bool = True) -> None:
        """Terminal failure: tell the peer, settle the request, free what is safe to free."""
        if t.terminal:
            return
        t.move(state, reason)
        t.handles = self.worker.drop_unposted(t.handles)  # start no write the peer gave up on
        key = "transfers_expired_total" if state is TransferState.EXPIRED \
            else "transfers_failed_total"
        self.counters[key] += 1
        logger.warning("KV transfer %s %s: %s", t.transfer_id, state.value, reason)
        if notify_peer:
            self.peers.send(t, TransferFailed(transfer_id=t.transfer_id,
                                              engine_id=self.engine_id, reason=reason))
        if notify_request:
            self._settle_request(t, reason)
        if t.handles:
            self.peers.forget_hello(t)  # a failed one-sided op may mean a restarted peer
            self.draining.append((t, time.monotonic() + self.timeouts.transfer_timeout_s))
        else:
            self.free_if_held(t)
        self.forget(t)

    def _settle_request(self, t: Transfer, reason: str) -> None:
        sched = self._sched()
        req = sched.requests.get(t.request_id)
        if req is None or req.is_finished:
            return
        from disagg.request import RequestStatus

        if t.role.is_producer:  # nobody will consume this prefill: end it with the reason
            sched.finish(req, RequestStatus.FINISHED_ERROR, f"KV transfer failed: {reason}")
        elif t.request_id in sched.remote_wait:
            sched.on_remote_kv(t.request_id, f"KV transfer failed: {reason}",
                               recompute=self.policy == "recompute")
        elif self.policy == "recompute":
            req.kv_transfer_params = None  # still queued: it will prefill locally
        else:
            sched.finish(req, RequestStatus.FINISHED_ERROR, f"KV transfer failed: {reason}")

    def drain_settled(self, now: float) -> None:
        """Free blocks of failed transfers once their pending ops settle (or time out)."""
        keep = []
        for t, deadline in self.draining:
            if now < deadline and any(self.worker.poll(h) is TransferStatus.PENDING
                                      for h in t.handles):
                keep.append((t, deadline))
                continue
            self.release_handles(t)
            self.free_if_held(t)
        self.draining = keep

    def release_handles(self, t: Transfer) -> None:
        """Forget t's ops in the worker."""
        for h in t.handles:
            self.worker.release(h)
        t.handles = []

    def free_if_held(self, t: Transfer) -> None:
        """Give t's held blocks back to the scheduler."""
        if t.holds_blocks:
            t.holds_blocks = False
            self._sched().free_held(t.transfer_id, t.local_block_ids)

    def forget(self, t: Transfer) -> None:
        """Drop a terminal transfer from the live table."""
        self.transfers.pop(t.transfer_id, None)
