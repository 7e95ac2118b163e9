"""The P/D connector: READ mode (decode pulls) and WRITE mode (prefill pushes).

    READ   P: prefill, hold blocks (PRODUCER_READ) ---------- release -> ack(held?) -> free
           D: handshake P, alloc, READ blocks (CONSUMER_READ) -> release -> ack(held) -> decode
    WRITE  D: handshake P, alloc, remote_blocks -> P (CONSUMER_WRITE) -- write_done -> decode
           P: prefill, hold, [deferred until remote_blocks + handshake] WRITE (PRODUCER_WRITE)
              -> write_done -> free
           layerwise P: [deferred until remote_blocks + handshake] prefill, each layer's
              blocks WRITTEN as soon as computed (pd_stream.py), hold -> all landed
              -> write_done -> free
Every side leases its live transfers to the peer each heartbeat; a transfer whose deadline
passes is EXPIRED, frees or releases its blocks and tells the peer (connectors/transfer.py).
Received KV is used only once the producer vouched for it (protocol.py); blocks that an op or
a peer may still write are parked, never reused (pd_outcome.py). The connector reports and the
scheduler acts: ``update_connector_output`` returns a ConnectorOutput
(disagg/engine/kv_connector.py).
Peers live in pd_peers.py, incoming messages in pd_inbox.py, posting and polling ops in
pd_ops.py, terminal states in pd_outcome.py, a WRITE decode's exposure to frozen prefills in
pd_exposure.py.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from connectors.control_plane import ControlPlane
from connectors.faults import parse_faults
from connectors.pd_admission import EarlyStarts, destination_known
from connectors.pd_config import PDConnectorConfig, parse_pd_config
from connectors.pd_exposure import Exposure
from connectors.pd_heads import RankGeometry
from connectors.pd_inbox import Inbox
from connectors.pd_metadata import build_metadata, compat_error, slow_path_hint
from connectors.pd_ops import Ops
from connectors.pd_outcome import Outcomes
from connectors.pd_peers import PeerLinks
from connectors.pd_rank import RankKV, RemoteRank
from connectors.pd_scheduler import PDSchedulerSide
from connectors.pd_worker import PDWorkerSide, rank_name
from connectors.protocol import (
    EngineMetadata,
    FirstToken,
    Release,
    RemoteBlocks,
    kv_ports,
    transport_port,
)
from connectors.transfer import (
    Transfer,
    TransferRole,
    TransferState,
    prompt_digest,
    transfer_from_params,
)
from disagg.common.config import KVTransferConfig
from disagg.common.kv_transfer_params import (
    KV_TRANSFER_FAILED,
    PEER_GAVE_UP,
    KVTransferParams,
    TransferMode,
)
from disagg.engine.kv_connector import ConnectorOutput, FinishAction, KVConnector, LoadFailure

if TYPE_CHECKING:
    from disagg.engine.request import Request
    from disagg.engine.scheduler import SchedulerOutput
    from disagg.models.layers import LayerHook

logger = logging.getLogger(__name__)
_OK_FINISH = frozenset({"finished_stopped", "finished_length"})
_COUNTERS = ("bytes_moved_total", "layer_posts_total", "transfers_done_total",
             "transfers_failed_total", "transfers_expired_total", "kv_refused_total",
             "notifications_unknown_total", "notifications_unidentified_total",
             "notifications_wrong_peer_total", "leases_ignored_total", "transfer_seconds_sum",
             "transfer_seconds_count", "first_tokens_received_total")


class PDConnector(KVConnector):
    """One engine core's P/D connector (either role, either mode)."""

    def __init__(self, cfg: KVTransferConfig, engine: Any, kv_cache: torch.Tensor) -> None:
        par = engine.cfg.parallel
        self.cfg = c = parse_pd_config(cfg.kv_connector_extra_config, cfg.kv_role,
                                       kv_cache.is_cuda, par.data_parallel_size,
                                       par.tensor_parallel_size)
        self.kv_role = cfg.kv_role
        self.mode: str = c.mode.value
        self.timeouts = c.timeouts
        self.layerwise = c.layerwise
        self.engine_id: str = engine.engine_id
        self.epoch = secrets.randbits(62)
        """Random per start: a restarted engine is another peer (protocol.py)."""
        self.host = c.host
        hs, nt = kv_ports(c.base_port, par.data_parallel_rank)
        self.worker = _worker_side(c, engine, kv_cache)
        if (hint := slow_path_hint(c.transport, self.mode, cfg.kv_role,
                                   kv_cache.is_cuda)) is not None:
            logger.warning("%s: %s", self.engine_id, hint)
        self.control = ControlPlane(self.host, hs, nt, self._compat_error,
                                    auth_key=c.auth_key, faults=c.faults)
        self.control.heartbeat_interval_s = self.timeouts.heartbeat_interval_s
        self.handshake_port = self.control.handshake_port
        self.notify_port = self.control.notify_port
        self.metadata = build_metadata(engine, kv_cache, self.engine_id, self.epoch,
                                       self.control, self.worker)
        self.control.start(self.metadata)
        self.scheduler = PDSchedulerSide(self)
        self.transfers: dict[str, Transfer] = {}
        self.early_starts = EarlyStarts(self.transfers, self.metadata.block_size,
                                        self.metadata.num_blocks)
        self._by_request: dict[str, str] = {}
        self.counters: dict[str, float] = dict.fromkeys(_COUNTERS, 0.0)
        self.peers = PeerLinks(self.control, self.worker, self.timeouts, self.counters,
                               self.transfers)
        self.outcomes = Outcomes(self.engine_id, self.epoch, self.worker, self.peers,
                                 self.transfers, timeouts=self.timeouts,
                                 recompute=c.kv_load_failure_policy == "recompute",
                                 counters=self.counters)
        self.inbox = Inbox(self)
        self.ops = Ops(self)
        self.exposure = Exposure(self.transfers, self.outcomes.parked, self.peers,
                                 self.timeouts, self.metadata.num_blocks)

    def _compat_error(self, peer: EngineMetadata) -> str | None:
        return compat_error(self.metadata, peer, self.worker.num_kv_heads)

    @staticmethod
    def check_config(cfg: KVTransferConfig, data_parallel_size: int = 1,
                     tensor_parallel_size: int = 1) -> None:
        """Every option of ``kv_connector_extra_config`` (the frontend calls this before the
        engine loads a weight: engine/kv_connector.check_connector_config)."""
        parse_pd_config(cfg.kv_connector_extra_config, cfg.kv_role, False, data_parallel_size,
                        tensor_parallel_size)

    @staticmethod
    def make_rank_worker(cfg: KVTransferConfig, engine_id: str, tp_rank: int,
                         kv_cache: torch.Tensor, dp_rank: int = 0) -> RankKV:
        """A TP worker rank's own KV endpoint (disagg/engine/tp_worker.py); rank 0 reaches it
        through RemoteRank (connectors/pd_rank.py)."""
        c = parse_pd_config(cfg.kv_connector_extra_config, cfg.kv_role, kv_cache.is_cuda)
        return RankKV(c.transport, rank_name(engine_id, tp_rank), c.host, kv_cache,
                      _rank_options(c.transport_options, dp_rank, tp_rank),
                      ready_timeout_s=c.timeouts.transfer_timeout_s)

    # ---- request life cycle ------------------------------------------------------------
    def on_request_arrival(self, req: Request) -> None:
        """Create the transfer for a request that carries kv_transfer_params."""
        p = req.kv_transfer_params
        if p is None or p.role_error() is not None:
            return
        t = transfer_from_params(p, req.request_id, TransferMode(self.mode), time.monotonic(),
                                 layerwise=self.layerwise)
        if t.transfer_id in self.transfers or t.transfer_id in self.outcomes.parked:
            t.request_id = req.request_id  # fails this request alone, not the live transfer
            self.outcomes.out.load_failed.append(self._reused_id_failure(t))
            return
        self.transfers[t.transfer_id] = t
        self._by_request[req.request_id] = t.transfer_id
        logger.debug("KV transfer %s for request %s: %s, %d prompt tokens, peer %s",
                     t.transfer_id, req.request_id, t.role.value, req.num_prompt_tokens,
                     t.peer_engine_id or "(answers later)")
        t.num_tokens = req.num_prompt_tokens
        t.prompt_digest = prompt_digest(req.prompt_token_ids)
        tomb = self.peers.tombstones.pop(t.transfer_id, None)
        error = self._params_error(t, p, req) if tomb is None else \
            f"{PEER_GAVE_UP}: {tomb[0]}"
        if error is not None:
            self.fail(t, error, notify_peer=tomb is None)
            return
        if not t.role.is_producer:
            t.takes_first_token = (not p.recompute_first_token
                                   and req.sampling_params.logprobs is None)
            if t.role is TransferRole.CONSUMER_READ and t.takes_first_token \
                    and p.first_token_id is not None:
                # P sampled it already: the client gets it as soon as P is identified (the
                # handshake, at once with a known peer), while the KV moves
                t.first_token_id = p.first_token_id
        if t.role is not TransferRole.PRODUCER_READ:
            self.peers.start_hello(t)  # identifies the peer before any of its messages count
        if t.role is TransferRole.PRODUCER_WRITE:
            t.start_clock(time.monotonic())  # waits for the decode's remote_blocks
            early = self.peers.take_early(t.transfer_id)
            if early is not None:
                self.inbox.on_remote_blocks(t, early)

    def on_request_queued(self, req: Request) -> None:
        """A consumer's queue wait starts counting toward its deadline (Transfer.deadline_s)."""
        t = self.consumer_transfer(req)
        if t is not None and t.queued_s is None:
            t.queued_s = time.monotonic()

    def on_request_paused(self, req: Request) -> None:
        """A queued consumer's wait stops counting while the engine is paused."""
        t = self.consumer_transfer(req)
        if t is not None and t.started_s is None:
            t.queued_s = None

    def _reused_id_failure(self, t: Transfer) -> Any:
        logger.warning("transfer_id %s is already in use; request %s refused", t.transfer_id,
                       t.request_id)
        return LoadFailure(t.request_id, f"transfer_id {t.transfer_id} is already in use",
                           recompute=False)

    def _params_error(self, t: Transfer, p: KVTransferParams, req: Request) -> str | None:
        """Why a request's params cannot start its transfer (None when they can)."""
        if t.role is not TransferRole.PRODUCER_READ and (
                t.peer_host is None or t.peer_handshake_port is None
                or t.peer_notify_port is None or t.peer_engine_id is None):
            return "kv_transfer_params lack the peer's engine id, host or ports"
        if t.role is TransferRole.CONSUMER_WRITE and (
                p.remote_block_ids is not None or p.remote_generation is not None):
            return ("kv_transfer_params carry a READ prefill's hold (remote_block_ids, "
                    "remote_generation) but ask for mode write: the prefill would never "
                    "write this decode's blocks")
        if t.role is not TransferRole.CONSUMER_READ:
            return None
        if p.remote_epoch is None or p.remote_generation is None or p.remote_block_ids is None \
                or p.remote_prompt_digest is None:
            return ("kv_transfer_params lack the prefill's epoch, generation, block ids or "
                    "prompt digest: that KV cannot be vouched for")
        if p.remote_prompt_digest != t.prompt_digest.hex():
            return ("kv_transfer_params belong to another prompt than this request's (the "
                    "prefill's prompt digest differs): its KV is not this request's")
        if p.remote_num_tokens != req.num_prompt_tokens:
            return (f"kv_transfer_params say the prefill computed {p.remote_num_tokens} "
                    f"tokens but this request has {req.num_prompt_tokens}")
        t.remote_block_ids = list(p.remote_block_ids)
        return None  # counted and bounded once the handshake gave the peer's pool

    def can_schedule(self, req: Request) -> bool:
        """A WRITE prefill waits for its destination or, with ``early_start`` (the default),
        starts within the early-start share of the pool (pd_admission.py). A layerwise one
        preempted with layer writes in flight waits for them to settle before it
        recomputes."""
        t = self.transfer_of(req.request_id)
        if t is None or t.terminal or t.role is not TransferRole.PRODUCER_WRITE:
            return True
        if t.handles:
            return False
        if destination_known(t):
            return True
        return self.cfg.early_start and self.early_starts.admit(t, req.num_prompt_tokens)

    def transfer_of(self, request_id: str) -> Transfer | None:
        """The live (or terminal, not yet forgotten) transfer of a request, if any."""
        return self.transfers.get(self._by_request.get(request_id, ""))

    def consumer_transfer(self, req: Request) -> Transfer | None:
        """The live consumer transfer of a request, if its KV comes from a peer."""
        t = self.transfer_of(req.request_id)
        if t is None or t.role.is_producer or t.terminal:
            return None
        return t

    def complete_without_data(self, t: Transfer) -> None:
        """Nothing to move (a one-token prompt; READ: also a request its first token ended):
        let the prefill free as soon as it can trust the message."""
        if t.role is TransferRole.CONSUMER_WRITE:
            self.peers.send(t, self._remote_blocks_msg(t, []))
            t.move(TransferState.DONE)
            self.outcomes.forget(t)
            return
        t.release_unread = True
        self._release_unread(t)

    def _release_unread(self, t: Transfer) -> None:
        """READ consumer that reads nothing: release once the handshake identified us to the
        producer (until then the release would be dropped as unidentified)."""
        if t.terminal or self.ops.peer(t) is None or t.terminal:
            return
        assert t.peer_generation is not None
        self.outcomes.report_first_token(t)  # the peer is identified now
        self.peers.send(t, Release(transfer_id=t.transfer_id, engine_id=self.engine_id,
                                   epoch=self.epoch, generation=t.peer_generation))
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
        # the wire counts all but the last prompt token (its block moves whole either way)
        t.num_tokens = min(req.num_external_tokens, req.num_prompt_tokens - 1)
        t.skip_blocks = min(req.num_cached_tokens // self.metadata.block_size, num_blocks)
        if t.role is TransferRole.CONSUMER_WRITE:
            self._try_announce(t, time.monotonic())
        else:
            self.ops.try_post(t)

    def _try_announce(self, t: Transfer, now: float) -> None:
        """WRITE consumer with blocks: announce them unless its producer is silent (fail) or
        holds its share of unacknowledged blocks already (wait: pd_exposure.py)."""
        if (refusal := self.exposure.refusal(t)) is not None:
            self.fail(t, refusal)
        elif self.exposure.may_announce(t):
            self._announce(t, now)

    def _announce(self, t: Transfer, now: float) -> None:
        """WRITE consumer: (re)send our destination blocks; the producer takes the first copy
        and ignores the rest, so a lost one is recovered by the next heartbeat."""
        if t.announced_s is None:
            t.announced_s = now
        t.announced, t.next_resend_s = True, now + self.timeouts.heartbeat_interval_s
        self.peers.send(t, self._remote_blocks_msg(t, t.local_block_ids))

    def _remote_blocks_msg(self, t: Transfer, blocks: list[int]) -> RemoteBlocks:
        m = self.metadata
        return RemoteBlocks(transfer_id=t.transfer_id, engine_id=self.engine_id,
                            epoch=self.epoch, generation=t.generation, block_ids=blocks,
                            num_tokens=t.num_tokens, host=m.host,
                            handshake_port=m.handshake_port, notify_port=m.notify_port,
                            skip=min(t.skip_blocks, len(blocks)),
                            prompt_digest=t.prompt_digest)

    def on_request_finished(self, req: Request) -> FinishAction:
        """Hold the blocks of a prefill whose KV a peer will consume (or that an op may still
        touch); a prefill whose transfer already failed ends with that error."""
        tid = self._by_request.pop(req.request_id, None)
        t = self.transfers.get(tid or "") or self._parked(tid)
        if t is None:
            return FinishAction()
        ok = req.status.value in _OK_FINISH
        if t.role.is_producer and t.terminal and ok:
            return FinishAction(error=f"{KV_TRANSFER_FAILED}: transfer {t.transfer_id} "
                                      f"{t.state.value}: {t.error}")
        if t.role.is_producer and not t.terminal and ok:
            t.start_clock(time.monotonic())
            t.request_finished, t.holds_blocks = True, True
            t.local_block_ids, t.num_tokens = list(req.block_ids), req.num_prompt_tokens
            t.first_token_id = req.output_token_ids[0] if req.output_token_ids else None
            if t.role is TransferRole.PRODUCER_WRITE:
                self.send_first_token(t)
            if self.cfg.verify_kv and t.role is TransferRole.PRODUCER_READ:
                t.digests = self.worker.digests(t.local_block_ids)
            # WRITE posts at the next update_connector_output: the scheduler moves the blocks
            # to this transfer's key only after this hook returns.
            if t.role is TransferRole.PRODUCER_READ:
                return FinishAction(hold_key=t.transfer_id, kv_transfer_params=self._read_params(t))
            return FinishAction(hold_key=t.transfer_id, await_transfer=True)
        if not t.role.is_producer and not t.terminal:
            return self._consumer_finished(t, req, ok)
        if not t.terminal:
            self.fail(t, req.error or f"request ended ({req.status.value}) before the KV "
                                      "transfer completed", notify_request=False)
        if t.handles and not t.holds_blocks and req.block_ids:
            t.holds_blocks, t.local_block_ids = True, list(req.block_ids)
            return FinishAction(hold_key=t.transfer_id)  # an op may still touch these blocks
        return FinishAction()

    def send_first_token(self, t: Transfer) -> None:
        """A finished WRITE prefill tells the decode its first token, so the decode streams it
        while the KV moves: at the finish, or when the decode's blocks arrive after it (the
        prefill started early)."""
        if t.first_token_id is not None and t.peer_generation is not None:
            self.peers.send(t, FirstToken(transfer_id=t.transfer_id, engine_id=self.engine_id,
                                          epoch=self.epoch, generation=t.peer_generation,
                                          token_id=t.first_token_id))

    def _consumer_finished(self, t: Transfer, req: Request, ok: bool) -> FinishAction:
        """A consumer request ended before its transfer did: its first token (from the
        prefill) ended it, or an abort or an error did. Blocks that a posted read or the
        producer's writes may still land in stay held under t's key until nothing can touch
        them (the transfer's end, or its parking after a failure, frees the hold)."""
        touched = bool(t.handles) or (t.role is TransferRole.CONSUMER_WRITE and t.announced)
        if ok and t.role is TransferRole.CONSUMER_READ and not touched \
                and t.verifying_s is None:
            self.complete_without_data(t)  # nothing read yet: P frees now
            return FinishAction()
        hold = touched and bool(req.block_ids)
        t.holds_blocks = t.holds_blocks or hold
        if not (ok and (touched or t.verifying_s is not None)):
            self.fail(t, req.error or f"request ended ({req.status.value}) before the KV "
                                      "transfer completed", notify_request=False)
        # else: ended by its first token while the KV still moves: the transfer finishes
        return FinishAction(hold_key=t.transfer_id) if hold else FinishAction()

    def _parked(self, tid: str | None) -> Transfer | None:
        p = self.outcomes.parked.get(tid or "")
        return None if p is None else p.transfer

    def _read_params(self, t: Transfer) -> KVTransferParams:
        return KVTransferParams(
            transfer_id=t.transfer_id, remote_engine_id=self.engine_id, remote_host=self.host,
            remote_handshake_port=self.handshake_port, remote_notify_port=self.notify_port,
            remote_block_ids=t.local_block_ids, remote_num_tokens=t.num_tokens,
            remote_epoch=self.epoch, remote_generation=t.generation, mode=TransferMode.READ,
            first_token_id=t.first_token_id, remote_prompt_digest=t.prompt_digest.hex())

    # ---- the step hook -------------------------------------------------------------------
    def update_connector_output(self) -> ConnectorOutput:
        """Notifications, posting deferred work, polling, expiry, leases: once per step.
        Returns what the scheduler must apply."""
        now = time.monotonic()
        for msg in self.control.drain():
            self.inbox.handle(msg, now)
        for t in list(self.transfers.values()):
            if t.terminal:
                continue
            if t.handles:
                self.ops.poll(t)
            if t.role is TransferRole.CONSUMER_READ and t.first_token_id is not None \
                    and not t.first_token_reported and not t.terminal \
                    and self.ops.peer(t) is not None:
                self.outcomes.report_first_token(t)  # never from an unidentified peer
            if t.release_unread:
                self._release_unread(t)
            if not t.terminal and not t.handles and t.role.posts_ops:
                self.ops.try_post(t)
            if t.role is TransferRole.CONSUMER_WRITE and t.peer_epoch is None \
                    and not t.terminal \
                    and (error := self.peers.resolve(t, connect=False)[1]) is not None:
                # its peer is identified once our handshake answered (its leases count from
                # then); a WRITE decode posts nothing: its transport needs no link to P
                self.fail(t, error)
            if t.announced and not t.terminal and now >= t.next_resend_s:
                self._announce(t, now)
            elif t.role is TransferRole.CONSUMER_WRITE and not t.announced \
                    and t.started_s is not None and not t.terminal:
                self._try_announce(t, now)  # held back for its producer's share
            if not t.terminal and (error := self.peers.hello_error(t)) is not None:
                self.fail(t, error)  # refused, incompatible, ourselves: no use waiting
            if not t.terminal and now > t.deadline_s(self.timeouts):
                self.fail(t, self._expiry_reason(t, now), state=TransferState.EXPIRED)

        self.outcomes.step_parked(now)
        self.exposure.review(now)
        for t in list(self.transfers.values()):
            if t.role is TransferRole.CONSUMER_WRITE and t.announced and not t.terminal \
                    and (refusal := self.exposure.refusal(t)) is not None:
                self.fail(t, refusal, state=TransferState.EXPIRED)  # its blocks stay parked
        self.peers.expire(now)
        self.peers.refresh_leases(self.transfers.values(), self.outcomes.draining_writes())
        return self.outcomes.take_output()

    def _expiry_reason(self, t: Transfer, now: float) -> str:
        where = f"peer {t.peer_engine_id} at {t.peer_host}:{t.peer_handshake_port}"
        if t.started_s is None:
            waited = now - (t.queued_s if t.queued_s is not None else t.created_s)
            return (f"transfer {t.transfer_id} expired: its request waited {waited:.1f} s in "
                    f"this decode's queue for free KV blocks or a seat ({where} held the "
                    "prompt's KV meanwhile)")
        if t.role is TransferRole.CONSUMER_WRITE and not t.announced:
            return (f"transfer {t.transfer_id} expired after {now - t.created_s:.1f} s: its "
                    f"blocks waited for {where} to acknowledge the "
                    f"{self.exposure.at_risk.get(t.peer_engine_id or '', 0)} blocks this "
                    "decode had announced to it already")
        return (f"transfer {t.transfer_id} expired after {now - t.created_s:.1f} s in state "
                f"{t.state.value} ({where})")

    # ---- posting and polling -------------------------------------------------------------
    # ---- the step's hooks (pd_ops.py) ------------------------------------------------------
    def layer_hook(self, out: SchedulerOutput) -> LayerHook | None:
        """Per-layer posts of this step's streaming WRITE prefills (None: none this step)."""
        return self.ops.layer_hook(out)

    def after_execute(self, out: SchedulerOutput) -> None:
        """The step's one post when a layer group spans every layer (pd_ops.py)."""
        self.ops.after_execute(out)

    def step_needs_hooks(self, out: SchedulerOutput) -> bool:
        """A step needs the hooks only when one of its requests has a live transfer (a
        prefill that streams or whose finish hands its blocks over, a consumer still loading):
        a decode batch of requests whose KV landed runs without any."""
        for chunk in out.chunks:
            t = self.transfer_of(chunk.request.request_id)
            if t is not None and not t.terminal:
                return True
        return False

    # ---- terminal states (pd_outcome.py) ------------------------------------------------
    def fail(self, t: Transfer, reason: str, *, state: TransferState = TransferState.FAILED,
             notify_peer: bool = True, notify_request: bool = True,
             refused: bool = False) -> None:
        """Terminal failure: tell the peer, settle the request, free what is safe to free."""
        self.outcomes.fail(t, reason, state=state, notify_peer=notify_peer,
                           notify_request=notify_request, refused=refused)

    # ---- KVConnector API -----------------------------------------------------------------
    def busy(self) -> bool:
        """Outstanding transfers, parked blocks or early notifications."""
        return bool(self.transfers or self.outcomes.parked or self.peers.early)

    def needs_polling(self) -> bool:
        """Posted one-sided ops (ours, or a layer poster's) settle only when polled; every
        other wait here ends with a message or a handshake, which ring the doorbell, or with
        a deadline measured in seconds."""
        return any(t.handles and not t.terminal for t in self.transfers.values())

    def set_wakeup(self, wake: Callable[[], None]) -> None:
        """A peer's message or a finished handshake rings the engine loop's doorbell."""
        self.control.wake = wake

    def metrics(self) -> dict[str, float]:
        """Counters plus gauges."""
        faults = self.cfg.faults
        return {**self.counters, "transfers_active": float(len(self.transfers)),
                "blocks_parked": float(self.outcomes.num_parked_blocks),
                "notifications_malformed_total": float(self.control.malformed),
                "control_errors_total": float(self.control.handler_errors),
                "handshakes_refused_total": float(self.control.refused),
                "faults_injected_total": float(faults.injected if faults else 0)}

    def set_faults(self, raw: Any) -> int:
        """Replace the fault-injection rules while running (connectors/faults.py)."""
        if self.cfg.faults is None:
            raise ValueError("fault injection is disabled; start the engine with "
                             "DISAGG_FAULT_INJECTION=1")
        plan = parse_faults(raw if raw is not None else [])
        assert plan is not None
        self.cfg.faults.replace(plan)
        return len(plan.faults)

    def fail_all(self, error: str) -> None:
        """The engine is going down: every live transfer fails and its peer is told."""
        for t in list(self.transfers.values()):
            self.fail(t, error)

    def abort_transfer(self, transfer_id: str) -> bool:
        """Proxy cleanup: fail a transfer (the request, if any, is aborted by the engine)."""
        self.peers.take_early(transfer_id)
        t = self.transfers.get(transfer_id)
        if t is None:
            return False
        self.fail(t, "aborted by the proxy")
        return True

    def close(self) -> None:
        """Stop the control plane and the transport."""
        self.control.close()
        self.worker.close()


def _rank_options(options: dict[str, Any], dp_rank: int, tp_rank: int) -> dict[str, Any]:
    """A rank's transport options: a fixed ``port`` moves per rank (protocol.transport_port)."""
    out = dict(options)
    if isinstance(out.get("port"), int):
        out["port"] = transport_port(out["port"], dp_rank, tp_rank)
    return out


def _worker_side(c: PDConnectorConfig, engine: Any, kv_cache: torch.Tensor) -> PDWorkerSide:
    """Rank 0's endpoint here, the other TP ranks' in their worker processes."""
    dp_rank = engine.cfg.parallel.data_parallel_rank
    local = RankKV(c.transport, engine.engine_id, c.host, kv_cache,
                   _rank_options(c.transport_options, dp_rank, 0),
                   ready_timeout_s=c.timeouts.transfer_timeout_s, faults=c.faults)
    ranks: list[Any] = [local]
    group = getattr(engine, "tp", None)
    if group is not None:
        descriptors = group.call_all("kv_init", engine.engine_id)
        ranks += [RemoteRank(group, r, d, local.block_bytes)
                  for r, d in enumerate(descriptors, start=1)]
    a = engine.arch
    geometry = RankGeometry(a.num_layers, engine.cfg.cache.block_size, kv_cache.shape[4],
                            kv_cache.shape[5] * kv_cache.element_size())
    return PDWorkerSide(ranks, a.num_kv_heads, geometry, faults=c.faults)
