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
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from typing import TYPE_CHECKING, Any

from connectors.base import KVConnector
from connectors.control_plane import ControlPlane
from connectors.pd_metadata import build_metadata, compat_error, parse_layerwise, parse_timeouts
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
from connectors.transfer import Transfer, TransferRole, TransferState
from connectors.transports.base import TransferOp, TransferStatus
from disagg.config import ConfigError, KVTransferConfig

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
        self.mode = str(extra.get("mode", "read"))
        if self.mode not in ("read", "write"):
            raise ConfigError(f"kv_connector_extra_config.mode must be read or write, "
                              f"got {self.mode!r}")
        self.policy = str(extra.get("kv_load_failure_policy", "fail"))
        if self.policy not in ("fail", "recompute"):
            raise ConfigError("kv_load_failure_policy must be fail or recompute")
        if (self.mode == "write" and cfg.kv_role != "kv_consumer"
                and engine.cfg.parallel.data_parallel_size > 1):
            raise ConfigError("WRITE mode with a data-parallel prefill instance is not "
                              "supported yet; use mode=read or one prefill rank per instance")
        self.timeouts = parse_timeouts(extra)
        self.layerwise = parse_layerwise(extra, kv_cache.is_cuda)
        self.engine_id: str = engine.engine_id
        self.host = str(extra.get("host", "127.0.0.1"))
        hs, nt = kv_ports(int(extra.get("base_port", 0)),
                          engine.cfg.parallel.data_parallel_rank)
        self.worker = PDWorkerSide(str(extra.get("transport", "tcp")), self.engine_id,
                                   self.host, kv_cache, dict(extra.get("transport_options", {})),
                                   ready_timeout_s=self.timeouts.transfer_timeout_s)
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
        self._early: dict[str, tuple[RemoteBlocks, float]] = {}
        # transfers the peer failed before this side knew them: a late request for one must
        # not use stale remote_blocks (the decode already freed those blocks)
        self._tombstones: dict[str, tuple[str, float]] = {}
        self._hellos: dict[tuple[str, int], concurrent.futures.Future[EngineMetadata]] = {}
        self._draining: list[tuple[Transfer, float]] = []
        self.counters: dict[str, float] = dict.fromkeys(
            ("bytes_moved_total", "layer_posts_total", "transfers_done_total",
             "transfers_failed_total", "transfers_expired_total", "notifications_unknown_total",
             "transfer_seconds_sum", "transfer_seconds_count"), 0.0)

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
        tid = p.get("transfer_id")
        consumer, producer = p.get("do_remote_prefill"), p.get("do_remote_decode")
        if not tid or not (consumer or producer):
            return
        if tid in self.transfers:
            logger.warning("duplicate transfer_id %s ignored", tid)
            return
        tomb = self._tombstones.pop(str(tid), None)
        mode = str(p.get("mode", self.mode))
        role = ((TransferRole.CONSUMER_READ if mode == "read" else TransferRole.CONSUMER_WRITE)
                if consumer else
                (TransferRole.PRODUCER_READ if mode == "read" else TransferRole.PRODUCER_WRITE))
        t = Transfer(str(tid), role, req.request_id, time.monotonic(),
                     peer_engine_id=p.get("remote_engine_id"), peer_host=p.get("remote_host"),
                     peer_handshake_port=p.get("remote_handshake_port"),
                     peer_notify_port=p.get("remote_notify_port"),
                     layerwise=self.layerwise and role is TransferRole.PRODUCER_WRITE)
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
            self._start_hello(t)
        if role is TransferRole.PRODUCER_WRITE:
            t.start_clock(time.monotonic())  # waits for the decode's remote_blocks
        if role is TransferRole.PRODUCER_WRITE and t.transfer_id in self._early:
            self._on_remote_blocks(t, self._early.pop(t.transfer_id)[0])

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
            self._send(t, self._remote_blocks_msg(t, []))
        else:
            self._send(t, Release(transfer_id=t.transfer_id, engine_id=self.engine_id))
        t.move(TransferState.DONE)
        self._forget(t)

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
            self._send(t, self._remote_blocks_msg(t, t.local_block_ids))
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
        self._drain_settled(now)
        self._expire_early(now)
        self._refresh_leases()

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
                self._early[msg.transfer_id] = (msg, now)  # WRITE: D raced ahead of P
            elif isinstance(msg, TransferFailed):  # the peer gave up before we knew it
                self._early.pop(msg.transfer_id, None)
                self._tombstones[msg.transfer_id] = (msg.reason, now)
            else:
                self.counters["notifications_unknown_total"] += 1
            return
        t.last_lease_s = now
        if isinstance(msg, RemoteBlocks) and t.role is TransferRole.PRODUCER_WRITE:
            self._on_remote_blocks(t, msg)
        elif isinstance(msg, WriteDone) and t.role is TransferRole.CONSUMER_WRITE:
            self._complete(t)
        elif isinstance(msg, Release) and t.role is TransferRole.PRODUCER_READ:
            self._complete(t)
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
        self._start_hello(t)
        self._try_post(t)

    # ---- posting and polling -------------------------------------------------------------
    def _start_hello(self, t: Transfer) -> None:
        if t.peer_host is None or t.peer_handshake_port is None:
            return
        addr = (t.peer_host, int(t.peer_handshake_port))
        fut = self._hellos.get(addr)
        if fut is None or (fut.done() and fut.exception() is not None):
            timeout = min(self.timeouts.transfer_timeout_s, 10.0)
            self._hellos[addr] = self.control.handshake(*addr, timeout)

    def _peer(self, t: Transfer) -> str | None:
        """The peer's engine id once its handshake succeeded; fails t if it was refused."""
        if t.peer_host is None or t.peer_handshake_port is None:
            return None
        fut = self._hellos.get((t.peer_host, int(t.peer_handshake_port)))
        if fut is None or not fut.done():
            return None
        exc = fut.exception()
        if exc is not None:
            self.fail(t, str(exc))
            return None
        meta = fut.result()
        if t.peer_engine_id is not None and meta.engine_id != t.peer_engine_id:
            # The peer restarted on the same ports: its cached metadata is stale.
            del self._hellos[(t.peer_host, int(t.peer_handshake_port))]
            self._start_hello(t)
            return None
        self.worker.add_peer(meta.engine_id, meta.transport_descriptor)
        return meta.engine_id

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
                self._complete(t)
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
            self._complete(t)

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
            self._complete(t)

    def _release_handles(self, t: Transfer) -> None:
        for h in t.handles:
            self.worker.release(h)
        t.handles = []

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

    # ---- terminal states ---------------------------------------------------------------
    def _complete(self, t: Transfer) -> None:
        t.move(TransferState.DONE)
        self.counters["transfers_done_total"] += 1
        self.counters["bytes_moved_total"] += t.bytes_moved
        if t.posted_s is not None:
            self.counters["transfer_seconds_sum"] += time.monotonic() - t.posted_s
            self.counters["transfer_seconds_count"] += 1
        if t.role is TransferRole.CONSUMER_READ:
            self._send(t, Release(transfer_id=t.transfer_id, engine_id=self.engine_id))
        elif t.role is TransferRole.PRODUCER_WRITE:
            self._send(t, WriteDone(transfer_id=t.transfer_id, engine_id=self.engine_id))
        if not t.role.is_producer:
            self.sched.on_remote_kv(t.request_id, None, recompute=False)
        self._free_if_held(t)
        self._forget(t)

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
            self._send(t, TransferFailed(transfer_id=t.transfer_id, engine_id=self.engine_id,
                                         reason=reason))
        if notify_request:
            self._settle_request(t, reason)
        if t.peer_host is not None and t.peer_handshake_port is not None and t.handles:
            # a failed one-sided op may mean a restarted peer: handshake afresh next time
            self._hellos.pop((t.peer_host, int(t.peer_handshake_port)), None)
        if t.handles:
            self._draining.append((t, time.monotonic() + self.timeouts.transfer_timeout_s))
        else:
            self._free_if_held(t)
        self._forget(t)

    def _settle_request(self, t: Transfer, reason: str) -> None:
        req = self.sched.requests.get(t.request_id)
        if req is None or req.is_finished:
            return
        from disagg.request import RequestStatus

        if t.role.is_producer:  # nobody will consume this prefill: end it with the reason
            self.sched.finish(req, RequestStatus.FINISHED_ERROR, f"KV transfer failed: {reason}")
        elif t.request_id in self.sched.remote_wait:
            self.sched.on_remote_kv(t.request_id, f"KV transfer failed: {reason}",
                                    recompute=self.policy == "recompute")
        elif self.policy == "recompute":
            req.kv_transfer_params = None  # still queued: it will prefill locally
        else:
            self.sched.finish(req, RequestStatus.FINISHED_ERROR, f"KV transfer failed: {reason}")

    def _drain_settled(self, now: float) -> None:
        """Free blocks of failed transfers once their pending ops settle (or time out)."""
        keep = []
        for t, deadline in self._draining:
            if now < deadline and any(self.worker.poll(h) is TransferStatus.PENDING
                                      for h in t.handles):
                keep.append((t, deadline))
                continue
            self._release_handles(t)
            self._free_if_held(t)
        self._draining = keep

    def _free_if_held(self, t: Transfer) -> None:
        if t.holds_blocks:
            t.holds_blocks = False
            self.sched.free_held(t.transfer_id, t.local_block_ids)

    def _forget(self, t: Transfer) -> None:
        self.transfers.pop(t.transfer_id, None)

    # ---- peers -------------------------------------------------------------------------
    def _send(self, t: Transfer, msg: Notification) -> None:
        addr = t.peer_notify
        if addr is not None:
            self.control.send((addr[0], int(addr[1])), msg)

    def _refresh_leases(self) -> None:
        """Hand the control thread the transfers to lease (it sends them on its own timer)."""
        by_peer: dict[tuple[str, int], list[str]] = {}
        for t in self.transfers.values():
            addr = t.peer_notify
            if addr is not None and not t.terminal:
                by_peer.setdefault((addr[0], int(addr[1])), []).append(t.transfer_id)
        self.control.set_leases(by_peer)

    def _expire_early(self, now: float) -> None:
        limit = self.timeouts.defer_timeout_s
        for tid in [k for k, (_, t0) in self._tombstones.items() if now - t0 > limit]:
            del self._tombstones[tid]
        for tid in [k for k, (_, t0) in self._early.items() if now - t0 > limit]:
            del self._early[tid]
            self.counters["notifications_unknown_total"] += 1

    # ---- KVConnector API -----------------------------------------------------------------
    def busy(self) -> bool:
        """Outstanding transfers, draining ops or early notifications."""
        return bool(self.transfers or self._draining or self._early)

    def metrics(self) -> dict[str, float]:
        """Counters plus gauges."""
        return {**self.counters, "transfers_active": float(len(self.transfers)),
                "notifications_malformed_total": float(self.control.malformed),
                "handshakes_refused_total": float(self.control.refused)}

    def abort_transfer(self, transfer_id: str) -> bool:
        """Proxy cleanup: fail a transfer (the request, if any, is aborted by the engine)."""
        self._early.pop(transfer_id, None)
        t = self.transfers.get(transfer_id)
        if t is None:
            return False
        self.fail(t, "aborted by the proxy")
        return True

    def close(self) -> None:
        """Stop the control plane and the transport."""
        self.control.close()
        self.worker.close()
