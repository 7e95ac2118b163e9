"""The P/D connector: READ mode (decode pulls) and WRITE mode (prefill pushes).

    READ   P: prefill, hold blocks (PRODUCER_READ) ---------- release/failed/expiry -> free
           D: handshake P, alloc, READ blocks (CONSUMER_READ) -> release -> decode
    WRITE  D: alloc, remote_blocks -> P (CONSUMER_WRITE) ---- write_done -> decode
           P: prefill, hold, [deferred until remote_blocks] WRITE (PRODUCER_WRITE)
              -> write_done -> free
           layerwise P: [deferred until remote_blocks + handshake] prefill, each layer's
              blocks WRITTEN as soon as computed (pd_stream.py), hold -> all landed
              -> write_done -> free
Every side leases its live transfers to the peer each heartbeat; a transfer whose deadline
passes is EXPIRED, frees or releases its blocks and tells the peer (connectors/transfer.py).
Blocks with a one-sided op still pending are never freed until the op settles ("draining").
Peers (handshakes, sends, leases) live in pd_peers.py, terminal states in pd_outcome.py.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from connectors.base import KVConnector
from connectors.control_plane import ControlPlane
from connectors.pd_metadata import (
    build_metadata,
    compat_error,
    parse_layerwise,
    parse_mode_policy,
    parse_timeouts,
    slow_path_hint,
)
from connectors.pd_outcome import Outcomes
from connectors.pd_peers import PeerLinks
from connectors.pd_scheduler import PDSchedulerSide
from connectors.pd_stream import LayerPlan, LayerStreamer, plan_chunk
from connectors.pd_worker import PDWorkerSide
from connectors.protocol import (
    EngineMetadata,
    Lease,
    Notification,
    Release,
    RemoteBlocks,
    TransferFailed,
    WriteDone,
    kv_ports,
)
from connectors.transfer import Transfer, TransferRole, TransferState, transfer_from_params
from connectors.transports.base import TransferOp, TransferStatus
from disagg.config import KVTransferConfig

if TYPE_CHECKING:
    import torch

    from disagg.models.llama import LayerHook
    from disagg.request import Request
    from disagg.scheduler import Scheduler, SchedulerOutput

logger = logging.getLogger(__name__)
_OK_FINISH = frozenset({"finished_stopped", "finished_length"})


class PDConnector(KVConnector):
    """One engine core's P/D connector (either role, either mode)."""

    def __init__(self, cfg: KVTransferConfig, engine: Any, kv_cache: torch.Tensor) -> None:
        extra = cfg.kv_connector_extra_config
        self.kv_role = cfg.kv_role
        mode, self.policy = parse_mode_policy(extra, cfg.kv_role,
                                              engine.cfg.parallel.data_parallel_size)
        self.mode: str = mode
        self.timeouts = parse_timeouts(extra)
        self.layerwise = parse_layerwise(extra, kv_cache.is_cuda)
        self.engine_id: str = engine.engine_id
        self.host = str(extra.get("host", "127.0.0.1"))
        hs, nt = kv_ports(int(extra.get("base_port", 0)),
                          engine.cfg.parallel.data_parallel_rank)
        transport = str(extra.get("transport", "tcp"))
        self.worker = PDWorkerSide(transport, self.engine_id, self.host, kv_cache,
                                   dict(extra.get("transport_options", {})),
                                   ready_timeout_s=self.timeouts.transfer_timeout_s)
        if (hint := slow_path_hint(transport, mode, cfg.kv_role, kv_cache.is_cuda)) is not None:
            logger.warning("%s: %s", self.engine_id, hint)
        self.control = ControlPlane(self.host, hs, nt, self._compat_error)
        self.control.heartbeat_interval_s = self.timeouts.heartbeat_interval_s
        self.handshake_port = self.control.handshake_port
        self.notify_port = self.control.notify_port
        self.metadata = self._metadata(engine, kv_cache)
        self.control.start(self.metadata)
        self.scheduler = PDSchedulerSide(self)
        self._sched: Scheduler | None = None
        self.transfers: dict[str, Transfer] = {}
        self._by_request: dict[str, str] = {}
        self.counters: dict[str, float] = dict.fromkeys(
            ("bytes_moved_total", "layer_posts_total", "transfers_done_total",
             "transfers_failed_total", "transfers_expired_total", "notifications_unknown_total",
             "transfer_seconds_sum", "transfer_seconds_count"), 0.0)
        self.peers = PeerLinks(self.control, self.worker, self.timeouts, self.counters)
        self.outcomes = Outcomes(self.engine_id, self.worker, self.peers, self.transfers,
                                 lambda: self.sched, timeouts=self.timeouts, policy=self.policy,
                                 counters=self.counters)

    # ---- metadata and compatibility ----------------------------------------------------
    def _metadata(self, engine: Any, kv_cache: torch.Tensor) -> EngineMetadata:
        return build_metadata(engine, kv_cache, self.engine_id, self.control, self.worker)

    def _compat_error(self, peer: EngineMetadata) -> str | None:
        return compat_error(self.metadata, peer)

    def bind(self, scheduler: Scheduler) -> None:
        """Remember the scheduler (finished loads and freed holds go to it)."""
        self._sched = scheduler

    @property
    def sched(self) -> Scheduler:
        """The bound scheduler."""
        assert self._sched is not None, "bind() first"
        return self._sched

    # ---- request life cycle ------------------------------------------------------------
    def on_request_arrival(self, req: Request) -> None:
        """Create the transfer for a request that carries kv_transfer_params."""
        p = req.kv_transfer_params or {}
        t = transfer_from_params(p, req.request_id, self.mode, time.monotonic(),
                                 layerwise=self.layerwise)
        if t is None:
            return
        if t.transfer_id in self.transfers:
            logger.warning("duplicate transfer_id %s ignored", t.transfer_id)
            return
        role = t.role
        tomb = self.peers.tombstones.pop(t.transfer_id, None)
        self.transfers[t.transfer_id] = t
        self._by_request[req.request_id] = t.transfer_id
        if tomb is not None:
            self.fail(t, f"the peer already gave up on this transfer: {tomb[0]}",
                      notify_peer=False)
            return
        if role is TransferRole.CONSUMER_READ:
            t.remote_block_ids = list(p.get("remote_block_ids") or [])
            if int(p.get("remote_num_tokens", -1)) != req.num_prompt_tokens:
                self.fail(t, f"prefill computed {p.get('remote_num_tokens')} tokens but this "
                             f"request has {req.num_prompt_tokens}")
                return
        if role.posts_ops:
            self.peers.start_hello(t)
        if role is TransferRole.PRODUCER_WRITE:
            t.start_clock(time.monotonic())  # waits for the decode's remote_blocks
        if role is TransferRole.PRODUCER_WRITE and t.transfer_id in self.peers.early:
            self._on_remote_blocks(t, self.peers.early.pop(t.transfer_id)[0])

    def can_schedule(self, req: Request) -> bool:
        """A WRITE prefill waits until the decode has allocated its destination blocks, so a
        prefill never holds blocks a busy decode cannot take (that would deadlock P and D).
        A layerwise one also waits for the peer's handshake (it posts inside the forward) and,
        after a preemption, for its earlier layer writes to settle before it rewrites them."""
        t = self.transfers.get(self._by_request.get(req.request_id, ""))
        if t is None or t.terminal or t.role is not TransferRole.PRODUCER_WRITE:
            return True
        if t.remote_block_ids is None:
            return False
        return not t.layerwise or (t.stream_peer is not None and not t.handles)

    def consumer_transfer(self, req: Request) -> Transfer | None:
        """The live consumer transfer of a request, if its KV comes from a peer."""
        t = self.transfers.get(self._by_request.get(req.request_id, ""))
        if t is None or t.role.is_producer or t.terminal:
            return None
        return t

    def complete_without_data(self, t: Transfer) -> None:
        """A one-token prompt: nothing to move; let the prefill free at once."""
        if t.role is TransferRole.CONSUMER_WRITE:
            self.peers.send(t, self._remote_blocks_msg(t, []))
        else:
            self.peers.send(t, Release(transfer_id=t.transfer_id, engine_id=self.engine_id))
        t.move(TransferState.DONE)
        self.outcomes.forget(t)

    def on_allocated(self, req: Request) -> None:
        """Consumer blocks exist: READ posts when the peer is known, WRITE sends them to P."""
        t = self.consumer_transfer(req)
        if t is None:
            return
        num_blocks = -(-req.num_external_tokens // self.metadata.block_size)
        t.start_clock(time.monotonic())
        t.local_block_ids = list(req.block_ids[:num_blocks])
        t.num_tokens = req.num_external_tokens
        if t.role is TransferRole.CONSUMER_WRITE:
            self.peers.send(t, self._remote_blocks_msg(t, t.local_block_ids))
        else:
            self._try_post(t)

    def _remote_blocks_msg(self, t: Transfer, blocks: list[int]) -> RemoteBlocks:
        m = self.metadata
        return RemoteBlocks(transfer_id=t.transfer_id, engine_id=self.engine_id,
                            block_ids=blocks, num_tokens=t.num_tokens, host=m.host,
                            handshake_port=m.handshake_port, notify_port=m.notify_port)

    def on_request_finished(self, req: Request) -> str | None:
        """Return the hold key if the request's blocks must outlive it."""
        tid = self._by_request.pop(req.request_id, None)
        t = self.transfers.get(tid or "")
        if t is None:
            return None
        if t.role.is_producer and t.terminal and req.status.value in _OK_FINISH:
            from disagg.request import RequestStatus  # the prefill is useless without its KV

            req.status, req.error = RequestStatus.FINISHED_ERROR, \
                f"KV transfer {t.transfer_id} {t.state.value}: {t.error}"
        elif t.role.is_producer and not t.terminal and req.status.value in _OK_FINISH:
            t.start_clock(time.monotonic())
            t.request_finished, t.holds_blocks = True, True
            t.local_block_ids, t.num_tokens = list(req.block_ids), req.num_prompt_tokens
            if t.role is TransferRole.PRODUCER_READ:
                req.kv_transfer_params = self._read_params(t, req)
            # WRITE posts at the next update_connector_output: the scheduler moves the blocks
            # to this transfer's key only after this hook returns.
            return t.transfer_id
        if not t.terminal:
            self.fail(t, req.error or f"request ended ({req.status.value}) before the KV "
                                      "transfer completed", notify_request=False)
        if t.handles and not t.holds_blocks:
            t.holds_blocks, t.local_block_ids = True, list(req.block_ids)
            return t.transfer_id  # a one-sided op may still read or write these blocks
        return None

    def _read_params(self, t: Transfer, req: Request) -> dict[str, Any]:
        return {"transfer_id": t.transfer_id, "remote_engine_id": self.engine_id,
                "remote_host": self.host, "remote_handshake_port": self.handshake_port,
                "remote_notify_port": self.notify_port, "remote_block_ids": t.local_block_ids,
                "remote_num_tokens": req.num_prompt_tokens, "mode": "read"}

    # ---- the step hook -------------------------------------------------------------------
    def update_connector_output(self) -> None:
        """Notifications, posting deferred work, polling, expiry, leases: once per step."""
        now = time.monotonic()
        for msg in self.control.drain():
            self._on_notification(msg, now)
        for t in list(self.transfers.values()):
            if t.terminal:
                continue
            if t.handles:
                self._poll(t)
            if not t.terminal and not t.handles and t.role.posts_ops:
                self._try_post(t)
            if not t.terminal and now > t.deadline_s(self.timeouts):
                self.fail(t, f"transfer {t.transfer_id} expired after {now - t.created_s:.1f} s "
                             f"in state {t.state.value} (peer {t.peer_engine_id} at "
                             f"{t.peer_host}:{t.peer_handshake_port})",
                          state=TransferState.EXPIRED)
        self.outcomes.drain_settled(now)
        self.peers.expire(now)
        self.peers.refresh_leases(self.transfers.values())

    def _on_notification(self, msg: Notification, now: float) -> None:
        if isinstance(msg, Lease):
            for tid in msg.transfer_ids:
                t = self.transfers.get(tid)
                if t is not None:
                    t.last_lease_s = now
            return
        t = self.transfers.get(msg.transfer_id)
        if t is None:
            if isinstance(msg, RemoteBlocks):
                self.peers.early[msg.transfer_id] = (msg, now)  # WRITE: D raced ahead of P
            elif isinstance(msg, TransferFailed):  # the peer gave up before we knew it
                self.peers.early.pop(msg.transfer_id, None)
                self.peers.tombstones[msg.transfer_id] = (msg.reason, now)
            else:
                self.counters["notifications_unknown_total"] += 1
            return
        t.last_lease_s = now
        if isinstance(msg, RemoteBlocks) and t.role is TransferRole.PRODUCER_WRITE:
            self._on_remote_blocks(t, msg)
        elif isinstance(msg, WriteDone) and t.role is TransferRole.CONSUMER_WRITE:
            self.outcomes.complete(t)
        elif isinstance(msg, Release) and t.role is TransferRole.PRODUCER_READ:
            self.outcomes.complete(t)
        elif isinstance(msg, TransferFailed):
            self.fail(t, f"peer {msg.engine_id} failed the transfer: {msg.reason}",
                      notify_peer=False)
        else:
            self.counters["notifications_unknown_total"] += 1

    def _on_remote_blocks(self, t: Transfer, msg: RemoteBlocks) -> None:
        t.remote_block_ids = list(msg.block_ids)
        if not t.remote_block_ids:
            t.layerwise = False  # a one-token prompt: nothing to stream, done at its end
        t.peer_engine_id, t.peer_host = msg.engine_id, msg.host
        t.peer_handshake_port, t.peer_notify_port = msg.handshake_port, msg.notify_port
        self.peers.start_hello(t)
        self._try_post(t)

    # ---- posting and polling -------------------------------------------------------------
    def _peer(self, t: Transfer) -> str | None:
        """The peer's engine id once its handshake succeeded; fails t if it was refused."""
        peer, error = self.peers.resolve(t)
        if error is not None:
            self.fail(t, error)
        return peer

    def _try_post(self, t: Transfer) -> None:
        if t.terminal or t.handles:
            return
        if t.role is TransferRole.PRODUCER_WRITE:
            if t.remote_block_ids is None:
                return  # deferred: waits for remote_blocks
            if t.layerwise:
                self._advance_stream(t)
                return
            if not t.request_finished:
                return  # deferred: waits for the prefill
            if not t.remote_block_ids:
                self.outcomes.complete(t)
                return
        elif not t.local_block_ids:
            return
        peer = self._peer(t)
        if peer is None or t.terminal:
            return
        assert t.remote_block_ids is not None
        if len(t.remote_block_ids) < len(t.local_block_ids) and not t.role.is_producer:
            self.fail(t, "the prefill returned fewer blocks than the prompt needs")
            return
        n = min(len(t.local_block_ids), len(t.remote_block_ids))
        op = TransferOp.WRITE if t.role is TransferRole.PRODUCER_WRITE else TransferOp.READ
        handle, nbytes = self.worker.post(op, peer, t.local_block_ids[:n], t.remote_block_ids[:n])
        t.handles, t.bytes_moved, t.posted_s = [handle], nbytes, time.monotonic()
        t.move(TransferState.IN_FLIGHT)

    def _advance_stream(self, t: Transfer) -> None:
        """A layerwise WRITE with no op pending: first resolve its peer (the prefill waits for
        it, see can_schedule); once its prefill finished, every layer write has landed."""
        if t.stream_peer is None:
            t.stream_peer = self._peer(t)
        elif t.request_finished:
            self.outcomes.complete(t)

    def _poll(self, t: Transfer) -> None:
        """Fail on any failed op; release the settled ones; a posted whole batch is done."""
        states = [(h, self.worker.poll(h)) for h in t.handles]
        failed = [h for h, s in states if s is TransferStatus.FAILED]
        if failed:
            more = f" (and {len(failed) - 1} more failed ops)" if len(failed) > 1 else ""
            self.fail(t, f"KV transfer failed: {self.worker.error(failed[0])}{more}")
            return
        for h, s in states:
            if s is TransferStatus.DONE:
                self.worker.release(h)
        t.handles = [h for h, s in states if s is TransferStatus.PENDING]
        if not t.handles and not t.layerwise:
            self.outcomes.complete(t)

    # ---- layerwise WRITE -----------------------------------------------------------------
    def layer_hook(self, out: SchedulerOutput) -> LayerHook | None:
        """Per-layer posts of this step's streaming WRITE prefills (None: none this step)."""
        plans: list[LayerPlan] = []
        for chunk in out.chunks:
            t = self.transfers.get(self._by_request.get(chunk.request.request_id, ""))
            if t is None or not t.layerwise or t.terminal or t.stream_peer is None:
                continue
            plan = plan_chunk(t, chunk.request, chunk.num_tokens, self.metadata.block_size)
            if plan is not None:
                plans.append(plan)
                if t.state is TransferState.WAITING_REMOTE:
                    t.move(TransferState.IN_FLIGHT)
        return LayerStreamer(self.worker, plans, self.counters) if plans else None

    # ---- terminal states (pd_outcome.py) ------------------------------------------------
    def fail(self, t: Transfer, reason: str, *, state: TransferState = TransferState.FAILED,
             notify_peer: bool = True, notify_request: bool = True) -> None:
        """Terminal failure: tell the peer, settle the request, free what is safe to free."""
        self.outcomes.fail(t, reason, state=state, notify_peer=notify_peer,
                           notify_request=notify_request)

    # ---- KVConnector API -----------------------------------------------------------------
    def busy(self) -> bool:
        """Outstanding transfers, draining ops or early notifications."""
        return bool(self.transfers or self.outcomes.draining or self.peers.early)

    def metrics(self) -> dict[str, float]:
        """Counters plus gauges."""
        return {**self.counters, "transfers_active": float(len(self.transfers)),
                "notifications_malformed_total": float(self.control.malformed),
                "handshakes_refused_total": float(self.control.refused)}

    def abort_transfer(self, transfer_id: str) -> bool:
        """Proxy cleanup: fail a transfer (the request, if any, is aborted by the engine)."""
        self.peers.early.pop(transfer_id, None)
        t = self.transfers.get(transfer_id)
        if t is None:
            return False
        self.fail(t, "aborted by the proxy")
        return True

    def close(self) -> None:
        """Stop the control plane and the transport."""
        self.control.close()
        self.worker.close()
