"""How a transfer ends on this side of the P/D connector.

Every terminal state (DONE, FAILED, EXPIRED) counts itself, tells the peer what it must know,
reports what the scheduler must do with the request (it resumes, recomputes or fails; a
producer's fails if nobody will consume it) and which holds to free. Blocks are given back
only once nothing can still touch them; until then the transfer is *parked*:
  - ops this side posted are pending: parked until they settle (or ``transfer_timeout``, then
    cancelled);
  - a WRITE consumer that announced its blocks: parked until the producer says ``quiesced``
    (no op of it can still write them), sends ``write_done``/``transfer_failed(quiesced)``, or
    is gone for sure (its port refuses connections or another engine answers there). Until then
    it is asked again each heartbeat. A producer frozen for good keeps those blocks held
    (counted, visible in the ledger), never handed to another request.
A WRITE producer whose ops settled tells its consumer ``quiesced``.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from dataclasses import dataclass

from connectors.pd_peers import PeerLinks
from connectors.pd_worker import PDWorkerSide
from connectors.protocol import Quiesce, Quiesced, TransferFailed, WriteDone
from connectors.transfer import Timeouts, Transfer, TransferRole, TransferState
from connectors.transports.base import TransferStatus
from disagg.common.kv_transfer_histograms import observe_transfer
from disagg.common.kv_transfer_params import KV_TRANSFER_FAILED
from disagg.engine.kv_connector import ConnectorOutput, LoadFailure

logger = logging.getLogger(__name__)


@dataclass(eq=False, slots=True)
class Parked:
    """A terminal transfer whose blocks must not be reused yet."""

    transfer: Transfer
    drain_deadline_s: float
    """Pending ops are cancelled after this."""
    needs_quiesce: bool
    """WRITE consumer: wait until the producer cannot write our blocks any more."""
    parked_s: float
    """When it was parked (its producer owes a quiesce from then: pd_exposure.py)."""
    quiesced: bool = False
    next_ask_s: float = 0.0
    probe: concurrent.futures.Future[bool] | None = None


class Outcomes:
    """The terminal transitions of one connector's transfers, and the parked ones."""

    def __init__(self, engine_id: str, epoch: int, worker: PDWorkerSide, peers: PeerLinks,
                 transfers: dict[str, Transfer], *, timeouts: Timeouts, recompute: bool,
                 counters: dict[str, float]) -> None:
        self.engine_id, self.epoch = engine_id, epoch
        self.worker = worker
        self.peers = peers
        self.transfers = transfers
        self.timeouts = timeouts
        self.recompute = recompute
        self.counters = counters
        self.parked: dict[str, Parked] = {}
        self.out = ConnectorOutput()

    def take_output(self) -> ConnectorOutput:
        """What the scheduler must apply (reset after each call)."""
        out, self.out = self.out, ConnectorOutput()
        return out

    def complete(self, t: Transfer) -> None:
        """DONE: count it, tell a WRITE consumer (write_done), let a consumer's request run."""
        t.move(TransferState.DONE)
        logger.debug("KV transfer %s (request %s) done: %s, %d bytes moved by this side",
                     t.transfer_id, t.request_id, t.role.value, t.bytes_moved)
        self.counters["transfers_done_total"] += 1
        self.counters["bytes_moved_total"] += t.bytes_moved
        if t.posted_s is not None:
            seconds = time.monotonic() - t.posted_s
            self.counters["transfer_seconds_sum"] += seconds
            self.counters["transfer_seconds_count"] += 1
            observe_transfer(self.counters, mode=t.role.mode, role=t.role.side, seconds=seconds,
                             num_bytes=t.bytes_moved)
        if t.first_posted_s is not None or not t.role.is_producer:  # it moved, or it waited
            self.out.transfer_times.append((t.request_id, t.first_posted_s, time.monotonic()))
        if t.role is TransferRole.PRODUCER_WRITE:
            assert t.peer_generation is not None
            self.peers.send(t, WriteDone(transfer_id=t.transfer_id, engine_id=self.engine_id,
                                         epoch=self.epoch, generation=t.peer_generation,
                                         digests=t.digests, first_token_id=t.first_token_id))
        if t.role is TransferRole.CONSUMER_WRITE:
            self.report_first_token(t)  # unless first_token already brought it
        if not t.role.is_producer:
            self.out.loaded.append(t.request_id)
        elif t.role is TransferRole.PRODUCER_WRITE and t.request_finished:
            self.out.producer_settled.append((t.request_id, None))
        self.free_if_held(t)
        self.forget(t)

    def report_first_token(self, t: Transfer) -> None:
        """Hand a consumer's first token (from the prefill) to the scheduler, once."""
        if t.first_token_id is None or t.first_token_reported or not t.takes_first_token:
            return
        t.first_token_reported = True
        self.out.first_tokens.append((t.request_id, t.first_token_id))
        self.counters["first_tokens_received_total"] += 1

    def fail(self, t: Transfer, reason: str, *, state: TransferState = TransferState.FAILED,
             notify_peer: bool = True, notify_request: bool = True,
             refused: bool = False) -> None:
        """Terminal failure: tell the peer, settle the request, free what is safe to free.
        ``refused``: the KV landed but could not be vouched for (counted apart)."""
        if t.terminal:
            return
        t.move(state, reason)
        t.handles = self.worker.drop_unposted(t.handles)  # start no write the peer gave up on
        key = "transfers_expired_total" if state is TransferState.EXPIRED \
            else "transfers_failed_total"
        self.counters[key] += 1
        if refused:
            self.counters["kv_refused_total"] += 1
        logger.warning("KV transfer %s (request %s) %s: %s", t.transfer_id, t.request_id,
                       state.value, reason)
        if notify_peer:
            quiesced = t.role is TransferRole.PRODUCER_WRITE and not t.handles
            self.peers.send(t, TransferFailed(transfer_id=t.transfer_id, engine_id=self.engine_id,
                                              epoch=self.epoch, reason=reason[:2000],
                                              quiesced=quiesced))
        if t.role is TransferRole.PRODUCER_WRITE:
            # the decode resends its blocks until it hears of this: each resend is answered
            # with this failure (pd_inbox), so a lost transfer_failed costs it a heartbeat
            self.peers.bury(t.transfer_id, reason, time.monotonic())
        needs_quiesce = t.role is TransferRole.CONSUMER_WRITE and t.announced
        if (t.handles or needs_quiesce) and not t.role.is_producer and not t.holds_blocks:
            self.out.park.append((t.request_id, t.transfer_id))  # keep them off other requests
            t.holds_blocks = True
        if notify_request:
            self._settle_request(t, f"{KV_TRANSFER_FAILED}: {reason}")
        if state is TransferState.EXPIRED and t.started_s is not None:
            # the peer never answered: it may have restarted, or forgotten us (a flood of
            # strangers' handshakes can push us out of its table); the next transfer to it
            # handshakes afresh instead of reusing this hello forever. (A consumer that
            # expired in this engine's own queue says nothing about the peer.)
            self.peers.forget_hello(t)
        if t.handles or needs_quiesce:
            if t.handles:
                self.peers.forget_hello(t)  # a failed one-sided op may mean a restarted peer
            now = time.monotonic()
            self.parked[t.transfer_id] = Parked(t, now + self.timeouts.transfer_timeout_s,
                                                needs_quiesce, now)
        else:
            self.free_if_held(t)
        self.forget(t)

    def _settle_request(self, t: Transfer, error: str) -> None:
        if t.role.is_producer:
            if not t.request_finished:  # nobody will consume this prefill: end it
                self.out.producer_failed.append((t.request_id, error))
            elif t.role is TransferRole.PRODUCER_WRITE:  # its answer waited for this
                self.out.producer_settled.append((t.request_id, error))
        else:
            # after its first token went out the request can only go on: compute the prompt
            # here (prompt + that token gives the monolithic continuation) whatever the policy
            self.out.load_failed.append(LoadFailure(t.request_id, error,
                                                    self.recompute or t.first_token_reported))

    def _settled(self, t: Transfer) -> None:
        """Nothing of ours can touch t's blocks any more: free them, and tell a WRITE consumer
        that we will not write its blocks."""
        self.free_if_held(t)
        if t.role is TransferRole.PRODUCER_WRITE and t.remote_block_ids:
            self.peers.send(t, Quiesced(transfer_id=t.transfer_id, engine_id=self.engine_id,
                                        epoch=self.epoch))

    # ---- parked transfers --------------------------------------------------------------
    def step_parked(self, now: float) -> None:
        """Free the parked transfers that became safe; ask the others' peers again."""
        for tid, p in list(self.parked.items()):
            t = p.transfer
            if t.handles and now < p.drain_deadline_s and any(
                    self.worker.poll(h) is TransferStatus.PENDING for h in t.handles):
                continue
            self.release_handles(t)
            if p.needs_quiesce and not p.quiesced:
                self._ask_quiesce(p, now)
                if not p.quiesced:
                    continue
            del self.parked[tid]
            self._settled(t)

    def _ask_quiesce(self, p: Parked, now: float) -> None:
        t = p.transfer
        if p.probe is not None and p.probe.done():
            p.quiesced = not p.probe.exception() and p.probe.result()
            p.probe = None
            if p.quiesced:
                logger.warning("KV transfer %s (request %s): producer %s is gone; its "
                               "blocks are freed", t.transfer_id, t.request_id, t.peer_engine_id)
                return
        if now < p.next_ask_s:
            return
        p.next_ask_s = now + self.timeouts.heartbeat_interval_s
        # the producer answers quiesced as the peer it handshook with: learn it now if this
        # transfer failed before its handshake was ever looked at, and handshake again if that
        # one failed (a producer frozen past it, which never handshook us either): else its
        # answer is dropped as unidentified and the blocks stay parked for good
        self.peers.start_hello(t)
        self.peers.resolve(t, connect=False)  # a WRITE decode posts nothing to it
        self.peers.send(t, Quiesce(transfer_id=t.transfer_id, engine_id=self.engine_id,
                                   epoch=self.epoch))
        if p.probe is None and t.peer_host is not None and t.peer_handshake_port is not None \
                and t.peer_engine_id is not None and t.peer_epoch is not None:
            p.probe = self.peers.control.probe_gone(t.peer_host, int(t.peer_handshake_port),
                                                    t.peer_engine_id, t.peer_epoch)

    def on_quiesced(self, transfer_id: str, engine_id: str, epoch: int) -> bool:
        """The producer of a parked WRITE cannot write our blocks any more; True if that
        parked transfer was waiting for it."""
        p = self.parked.get(transfer_id)
        if p is None or not p.needs_quiesce:
            return False
        t = p.transfer
        if (t.peer_engine_id, t.peer_epoch) not in ((engine_id, epoch), (engine_id, None)):
            self.counters["notifications_wrong_peer_total"] += 1
            return False
        p.quiesced = True
        return True

    def draining_writes(self) -> list[Transfer]:
        """Failed WRITE producers whose writes to the decode's blocks still drain (they owe
        the decode a quiesced: leased meanwhile)."""
        return [p.transfer for p in self.parked.values()
                if p.transfer.role is TransferRole.PRODUCER_WRITE and p.transfer.handles]

    def draining(self, transfer_id: str) -> bool:
        """A parked transfer with ops of ours still pending."""
        p = self.parked.get(transfer_id)
        return p is not None and bool(p.transfer.handles)

    # ---- helpers -----------------------------------------------------------------------
    def release_handles(self, t: Transfer) -> None:
        """Forget t's ops in the worker (cancelling pending ones)."""
        for h in t.handles:
            self.worker.release(h)
        t.handles = []

    def free_if_held(self, t: Transfer) -> None:
        """Give t's held blocks back (the scheduler frees them)."""
        if t.holds_blocks:
            t.holds_blocks = False
            self.out.free_holds.append(t.transfer_id)

    def forget(self, t: Transfer) -> None:
        """Drop a terminal transfer from the live table."""
        self.transfers.pop(t.transfer_id, None)

    @property
    def num_parked_blocks(self) -> int:
        """Distinct blocks held by parked transfers (a gauge; transfers of prompts with a
        common prefix share its blocks)."""
        return len(set().union(*(p.transfer.local_block_ids for p in self.parked.values())))
