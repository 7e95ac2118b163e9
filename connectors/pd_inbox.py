"""What the P/D connector does with each message a peer sends, and with KV that landed.

A notification counts only when its sender is identified: its (engine id, epoch) answered or
sent a handshake this engine accepted, it is not this engine, and it is the transfer's peer (a
READ producer binds the first identified peer that speaks for the transfer). Anything else is
counted and dropped. ``remote_blocks`` is the one message accepted before identification: the
producer then handshakes the announced address itself and writes only if the engine there is
the one that sent it.

Landed KV (READ: our op finished; WRITE: ``write_done``) is used only when the producer vouches
for it: READ waits for ``release_ack(held=true)`` of the hold's generation, WRITE checks the
generation ``write_done`` echoes, and with ``verify_kv`` the per-block digests must match.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from connectors.control_plane import PeerHello
from connectors.protocol import (
    EngineMetadata,
    FirstToken,
    Lease,
    Notification,
    Quiesce,
    Quiesced,
    Release,
    ReleaseAck,
    RemoteBlocks,
    TransferFailed,
    WriteDone,
)
from connectors.transfer import Transfer, TransferRole
from disagg.common.kv_transfer_params import PEER_GAVE_UP

if TYPE_CHECKING:
    from connectors.pd_connector import PDConnector



class Inbox:
    """Incoming messages of one connector (engine thread)."""

    def __init__(self, connector: PDConnector) -> None:
        self._c = connector

    def handle(self, msg: Notification | PeerHello, now: float) -> None:
        """Dispatch one message from the control plane's queue."""
        c = self._c
        if isinstance(msg, PeerHello):
            c.peers.hello_from(msg.metadata)
        elif isinstance(msg, RemoteBlocks):
            self._remote_blocks(msg, now)
        elif isinstance(msg, Lease):
            self._lease(msg, now)
        elif isinstance(msg, Release):
            self._release(msg)
        elif isinstance(msg, Quiesce):
            self._quiesce(msg, now)
        elif self._identified(msg) is None:
            return
        elif isinstance(msg, Quiesced):
            c.outcomes.on_quiesced(msg.transfer_id, msg.engine_id, msg.epoch)
        else:
            self._for_transfer(msg, now)

    def _identified(self, msg: Notification) -> EngineMetadata | None:
        meta = self._c.peers.identify(msg.engine_id, msg.epoch)
        if meta is None or msg.engine_id == self._c.engine_id:
            self._c.counters["notifications_unidentified_total"] += 1
            return None
        return meta

    def _from_peer(self, t: Transfer, meta: EngineMetadata) -> bool:
        """True if ``meta`` is t's peer (a READ producer's first identified speaker becomes
        it); counted otherwise."""
        if t.peer_engine_id is None and t.role is TransferRole.PRODUCER_READ:
            t.peer_engine_id, t.peer_epoch, t.peer_host = meta.engine_id, meta.epoch, meta.host
            t.peer_handshake_port, t.peer_notify_port = meta.handshake_port, meta.notify_port
            return True
        if t.peer_engine_id == meta.engine_id and t.peer_epoch in (None, meta.epoch):
            t.peer_epoch = meta.epoch
            return True
        self._c.counters["notifications_wrong_peer_total"] += 1
        return False

    def _lease(self, msg: Lease, now: float) -> None:
        sender = self._identified(msg)
        if sender is None:
            return
        for tid in msg.transfer_ids:
            t = self._c.transfers.get(tid)
            if t is None:
                continue
            if not self._from_peer(t, sender):
                self._c.counters["leases_ignored_total"] += 1
                continue
            t.acknowledged = True
            if not msg.received:  # an acknowledgement keeps no transfer alive
                t.last_lease_s = now

    def _for_transfer(self, msg: Notification, now: float) -> None:
        """write_done, release_ack, transfer_failed from an identified sender."""
        c = self._c
        tid = getattr(msg, "transfer_id", "")
        t = c.transfers.get(tid)
        if t is None:
            if isinstance(msg, TransferFailed):
                self._failed_unknown(msg, now)
            elif isinstance(msg, WriteDone):
                c.outcomes.on_quiesced(tid, msg.engine_id, msg.epoch)
            else:
                c.counters["notifications_unknown_total"] += 1
            return
        sender = c.peers.identify(msg.engine_id, msg.epoch)
        if sender is None or not self._from_peer(t, sender):
            return
        t.last_lease_s, t.acknowledged = now, True
        if isinstance(msg, WriteDone) and t.role is TransferRole.CONSUMER_WRITE:
            self._write_done(t, msg)
        elif isinstance(msg, FirstToken) and t.role is TransferRole.CONSUMER_WRITE:
            if msg.generation == t.generation and not t.terminal and t.takes_first_token:
                t.first_token_id = msg.token_id
                c.outcomes.report_first_token(t)
        elif isinstance(msg, ReleaseAck) and t.role is TransferRole.CONSUMER_READ:
            self._release_ack(t, msg)
        elif isinstance(msg, TransferFailed):
            c.fail(t, f"{PEER_GAVE_UP} (engine {msg.engine_id}): {msg.reason}",
                   notify_peer=False)
            if msg.quiesced:
                c.outcomes.on_quiesced(t.transfer_id, msg.engine_id, msg.epoch)
        else:
            c.counters["notifications_unknown_total"] += 1

    def _failed_unknown(self, msg: TransferFailed, now: float) -> None:
        """The peer gave up on a transfer this side does not run (any more)."""
        c = self._c
        if msg.quiesced and c.outcomes.on_quiesced(msg.transfer_id, msg.engine_id, msg.epoch):
            return
        c.peers.bury(msg.transfer_id, msg.reason, now)

    # ---- WRITE ---------------------------------------------------------------------------
    def _remote_blocks(self, msg: RemoteBlocks, now: float) -> None:
        c = self._c
        t = c.transfers.get(msg.transfer_id)
        if msg.engine_id == c.engine_id:
            c.counters["notifications_unidentified_total"] += 1
        elif t is None:
            if msg.transfer_id in c.peers.tombstones:
                self._refuse_resend(msg)
                return
            if not c.peers.stash_early(msg, now):  # D raced ahead of P's request
                c.counters["notifications_unknown_total"] += 1  # bounded: a flood is dropped
            else:
                self._acknowledge(msg)
        elif t.role is TransferRole.PRODUCER_WRITE and t.remote_block_ids is None:
            self.on_remote_blocks(t, msg)
            if t.remote_block_ids is not None and not t.terminal:
                self._acknowledge(msg)
        elif t.role is not TransferRole.PRODUCER_WRITE or t.peer_generation != msg.generation:
            c.counters["notifications_unknown_total"] += 1  # a resent copy is not counted

    def _refuse_resend(self, msg: RemoteBlocks) -> None:
        """Blocks (re)sent for a transfer this prefill failed, or whose decode gave it up:
        tell the decode again (an identified one, at its own address), since its first
        transfer_failed may be lost and the decode waits for it."""
        c = self._c
        addr = c.peers.known_address(msg.engine_id, msg.epoch)
        if addr is None:
            return
        reason = c.peers.tombstones[msg.transfer_id][0]
        c.control.send(addr, TransferFailed(
            transfer_id=msg.transfer_id, engine_id=c.engine_id, epoch=c.epoch,
            reason=reason[:2000], quiesced=not c.outcomes.draining(msg.transfer_id)))

    def _acknowledge(self, msg: RemoteBlocks) -> None:
        """Lease the decode's blocks at once (it bounds what it announces to a prefill that has
        not acknowledged: pd_exposure.py), when the decode is identified: an unidentified
        sender's address gets nothing (the heartbeat leases follow our handshake to it)."""
        c = self._c
        addr = c.peers.known_address(msg.engine_id, msg.epoch)
        if addr is not None:
            c.control.send(addr, Lease(engine_id=c.engine_id, epoch=c.epoch,
                                       transfer_ids=[msg.transfer_id], received=True))

    def on_remote_blocks(self, t: Transfer, msg: RemoteBlocks) -> None:
        """The decode's destination: remember it, handshake the announced address (the
        engine there must be the sender) and write once the prefill allows."""
        c = self._c
        if t.peer_engine_id not in (None, msg.engine_id):
            c.counters["notifications_wrong_peer_total"] += 1
            return
        t.remote_block_ids = list(msg.block_ids)
        t.skip_blocks = min(msg.skip, len(t.remote_block_ids))
        if not t.remote_block_ids or t.skip_blocks:
            # a one-token prompt: nothing to stream, done at its end; a decode-side prefix
            # hit: the blocks after it go in one write once the prefill finished
            t.layerwise = False
        t.peer_engine_id, t.peer_epoch, t.peer_generation = (msg.engine_id, msg.epoch,
                                                             msg.generation)
        t.peer_host, t.peer_handshake_port = msg.host, msg.handshake_port
        t.peer_notify_port = msg.notify_port
        if msg.num_tokens + 1 != t.num_tokens and t.remote_block_ids:
            c.fail(t, f"the decode expects {msg.num_tokens + 1} prompt tokens, this prefill "
                      f"has {t.num_tokens}: not the same prompt")
            return
        if msg.prompt_digest != t.prompt_digest:
            c.fail(t, "the decode's prompt is not this prefill's (its digest differs): its "
                      "blocks get no KV of another prompt")
            return
        c.peers.start_hello(t)
        if t.request_finished:
            c.send_first_token(t)  # the prefill ended before the decode's blocks arrived
        c.ops.try_post(t)

    def _write_done(self, t: Transfer, msg: WriteDone) -> None:
        c = self._c
        if msg.generation != t.generation:
            c.fail(t, "write_done names another generation of this transfer's blocks",
                   refused=True)
            return
        if t.takes_first_token and not t.first_token_reported:
            t.first_token_id = msg.first_token_id
        if c.cfg.faults is not None and t.local_block_ids and c.cfg.faults.fire("landed"):
            c.worker.flip_byte(t.local_block_ids[0])
        if not self._verify_and_use(t, msg.digests):  # the producer is done writing all the same
            c.outcomes.on_quiesced(t.transfer_id, msg.engine_id, msg.epoch)

    def _quiesce(self, msg: Quiesce, now: float) -> None:
        """A WRITE consumer gave up: stop writing its blocks; answer once nothing can."""
        c = self._c
        sender = self._identified(msg)
        if sender is None:
            return
        t = c.transfers.get(msg.transfer_id)
        if t is not None:
            if not self._from_peer(t, sender):
                return
            c.fail(t, f"{PEER_GAVE_UP}: the decode asked to quiesce it", notify_peer=False)
        elif msg.transfer_id not in c.outcomes.parked:
            # our answer lets the decode free those blocks: a request for this transfer that
            # reaches us later must not write them (its remote_blocks may be queued already)
            c.peers.bury(msg.transfer_id, "the decode asked to quiesce it", now)
        if not c.outcomes.draining(msg.transfer_id):
            c.peers.reply(sender, Quiesced(transfer_id=msg.transfer_id,
                                           engine_id=c.engine_id, epoch=c.epoch))

    # ---- READ ----------------------------------------------------------------------------
    def landed(self, t: Transfer) -> None:
        """Our READ finished: ask the producer whether its hold was live all along."""
        c = self._c
        if c.cfg.faults is not None and c.cfg.faults.fire("landed"):
            c.worker.flip_byte(t.local_block_ids[0])
        assert t.peer_generation is not None
        t.verifying_s = time.monotonic()
        c.peers.send(t, Release(transfer_id=t.transfer_id, engine_id=c.engine_id,
                                epoch=c.epoch, generation=t.peer_generation))

    def _release(self, msg: Release) -> None:
        """Producer: answer whether the hold ``msg`` read was live until now, then free it."""
        c = self._c
        sender = self._identified(msg)
        if sender is None:
            return
        t = c.transfers.get(msg.transfer_id)
        held = (t is not None and t.role is TransferRole.PRODUCER_READ and t.holds_blocks
                and not t.terminal and t.generation == msg.generation
                and self._from_peer(t, sender))
        c.peers.reply(sender, ReleaseAck(
            transfer_id=msg.transfer_id, engine_id=c.engine_id, epoch=c.epoch,
            generation=msg.generation, held=held, digests=t.digests if held and t else None,
            block_ids=t.local_block_ids if held and t else [],
            prompt_digest=t.prompt_digest if held and t else b""))
        if held and t is not None:
            c.outcomes.complete(t)

    def _release_ack(self, t: Transfer, msg: ReleaseAck) -> None:
        c = self._c
        if t.verifying_s is None or msg.generation != t.peer_generation:
            c.counters["notifications_unknown_total"] += 1
            return
        if not msg.held:
            c.fail(t, "the prefill no longer held this KV when the read was confirmed (its "
                      "hold expired or was freed): refused", notify_peer=False, refused=True)
            return
        if msg.block_ids != t.remote_block_ids:
            c.fail(t, "the blocks read are not the prefill's hold for this transfer (the "
                      "kv_transfer_params' remote_block_ids were altered): refused",
                   notify_peer=False, refused=True)
            return
        if msg.prompt_digest != t.prompt_digest:
            c.fail(t, "the prefill's KV belongs to another prompt than this request's: "
                      "refused", notify_peer=False, refused=True)
            return
        self._verify_and_use(t, msg.digests)

    def _verify_and_use(self, t: Transfer, digests: list[bytes] | None) -> bool:
        """verify_kv: every received block's digest equals the producer's; then the request
        may use its KV. False if the KV was refused."""
        c = self._c
        if c.cfg.verify_kv:  # the blocks that moved (not the ones our prefix cache had)
            skip = t.skip_blocks
            mine = c.worker.digests(t.local_block_ids[skip:])
            if digests is None or list(digests[skip:skip + len(mine)]) != mine:
                why = "sent no digests (enable verify_kv on both sides)" if digests is None \
                    else "digests differ from the bytes that landed"
                c.fail(t, f"KV from {t.peer_engine_id} refused: the producer {why}",
                       refused=True)
                return False
        c.outcomes.complete(t)
        return True
