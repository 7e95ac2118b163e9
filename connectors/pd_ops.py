"""The P/D connector's one-sided ops: when a transfer posts (deferred until its peer is
identified, its blocks known and, for a WRITE prefill, its destination and prefill ready),
polling what it posted, and the layerwise WRITE hooks (per-layer posts during the prefill,
or one post after the step: pd_stream.py). Terminal states go through the connector
(pd_outcome.py); the worker side (pd_worker.py) runs the ops.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from connectors.pd_stream import LayerPlan, LayerStreamer, layer_group, plan_chunk
from connectors.transfer import Transfer, TransferRole, TransferState
from connectors.transports.base import TransferOp, TransferStatus

if TYPE_CHECKING:
    from connectors.pd_connector import PDConnector
    from disagg.engine.scheduler import SchedulerOutput
    from disagg.models.layers import LayerHook


class Ops:
    """Posting and polling of one connector's transfers (engine thread)."""

    def __init__(self, connector: PDConnector) -> None:
        self._c = connector
        self._after_step: LayerStreamer | None = None
        """This step's post, issued by after_execute (layer_hook)."""

    def peer(self, t: Transfer) -> str | None:
        """The peer's engine id once its handshake succeeded and t's remote block ids fit its
        pool; fails t otherwise."""
        c = self._c
        peer, error = c.peers.resolve(t)
        if error is None and peer is not None:
            error = remote_blocks_error(t, c.metadata.block_size)
        if error is not None:
            c.fail(t, error)
            return None
        return peer

    def try_post(self, t: Transfer) -> None:
        """Post t's ops if it can move now (its peer identified, its blocks known, a WRITE
        prefill's destination and prefill ready); deferred otherwise."""
        c = self._c
        if t.terminal or t.handles or t.verifying_s is not None:
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
                c.outcomes.complete(t)
                return
        elif not t.local_block_ids:
            return
        peer = self.peer(t)
        if peer is None or t.terminal:
            return
        assert t.remote_block_ids is not None
        n = min(len(t.local_block_ids), len(t.remote_block_ids))
        skip = min(t.skip_blocks, n)
        if skip == n:  # the consumer's prefix cache holds every block: nothing moves
            t.move(TransferState.IN_FLIGHT)
            if t.role is TransferRole.CONSUMER_READ:
                c.inbox.landed(t)
            else:
                self._producer_done(t)
            return
        self._post_blocks(t, peer, skip, n)

    def _post_blocks(self, t: Transfer, peer: str, first: int, n: int) -> None:
        """Post one op moving whole blocks [first, n) of the transfer."""
        c = self._c
        assert t.remote_block_ids is not None
        op = TransferOp.WRITE if t.role is TransferRole.PRODUCER_WRITE else TransferOp.READ
        handle, nbytes = c.worker.post(op, peer, t.local_block_ids[first:n],
                                          t.remote_block_ids[first:n])
        t.handles, t.posted_s = [handle], time.monotonic()
        t.bytes_moved += nbytes
        if t.first_posted_s is None:
            t.first_posted_s = t.posted_s
        if t.state is not TransferState.IN_FLIGHT:  # a layerwise one may be in flight already
            t.move(TransferState.IN_FLIGHT)

    def _advance_stream(self, t: Transfer) -> None:
        """A layerwise WRITE with no op pending: resolve its peer (chunks run before that
        stream nothing); once its prefill finished, write whole what no layer post covered
        (the peer came late), then, when every write landed, it is done."""
        c = self._c
        if t.stream_peer is None:
            t.stream_peer = self.peer(t)
            if t.stream_peer is not None and not c.worker.streams_layers_to(t.stream_peer):
                t.stream_peer, t.layerwise = None, False  # one write once the prefill ended
                return
        if t.stream_peer is None or not t.request_finished:
            return
        assert t.remote_block_ids is not None
        n = min(len(t.local_block_ids), len(t.remote_block_ids))
        if t.stream_next < n:
            first, t.stream_next = t.stream_next, n
            self._post_blocks(t, t.stream_peer, first, n)
            return
        self._producer_done(t)

    def poll(self, t: Transfer) -> None:
        """Fail on any failed op; release the settled ones; a posted whole batch is done."""
        c = self._c
        states = [(h, c.worker.poll(h)) for h in t.handles]
        failed = [h for h, s in states if s is TransferStatus.FAILED]
        if failed:
            more = f" (and {len(failed) - 1} more failed ops)" if len(failed) > 1 else ""
            c.fail(t, f"one-sided op failed: {c.worker.error(failed[0])}{more}")
            return
        for h, s in states:
            if s is TransferStatus.DONE:
                c.worker.release(h)
        t.handles = [h for h, s in states if s is TransferStatus.PENDING]
        if t.handles or t.layerwise:
            return
        if t.role is TransferRole.CONSUMER_READ:
            c.inbox.landed(t)
        else:
            self._producer_done(t)

    def _producer_done(self, t: Transfer) -> None:
        """Every write landed: digests (verify_kv), then write_done."""
        c = self._c
        if c.cfg.verify_kv and t.remote_block_ids:
            n = min(len(t.local_block_ids), len(t.remote_block_ids))
            t.digests = c.worker.digests(t.local_block_ids[:n])
        c.outcomes.complete(t)

    # ---- layerwise WRITE -----------------------------------------------------------------
    def layer_hook(self, out: SchedulerOutput) -> LayerHook | None:
        """Per-layer posts of this step's streaming WRITE prefills (None: none this step)."""
        c = self._c
        self._after_step = None
        plans: list[LayerPlan] = []
        for chunk in out.chunks:
            t = c.transfer_of(chunk.request.request_id)
            if t is None or not t.layerwise or t.terminal or t.stream_peer is None:
                continue
            plan = plan_chunk(t, chunk.request, chunk.num_tokens, c.metadata.block_size)
            if plan is not None:
                plans.append(plan)
                if t.state is TransferState.WAITING_REMOTE:
                    t.move(TransferState.IN_FLIGHT)
        if not plans:
            return None
        num_layers = c.worker.geometry.num_layers
        group = layer_group(c.cfg.layer_group, num_layers,
                            fast_link=c.cfg.transport == "ipc")
        streamer = LayerStreamer(c.worker, plans, c.counters, group)
        if group >= num_layers:  # one post for the step: after it (its first token goes first)
            self._after_step = streamer
            return None
        return streamer

    def after_execute(self, out: SchedulerOutput) -> None:
        """The step's one post when a layer group spans every layer: issued after the step
        sampled and its finished prefills sent their first tokens, so neither waits on the
        post's host time (the model then runs without a per-layer callback as well)."""
        streamer, self._after_step = self._after_step, None
        if streamer is not None:
            streamer.post_all()


def remote_blocks_error(t: Transfer, block_size: int) -> str | None:
    """Why t's remote block ids cannot be used against its (handshaken) peer, else None:
    every id must lie in the peer's pool and none may repeat (a repeated destination would
    overlap two writes)."""
    ids = t.remote_block_ids or []
    if t.peer_num_blocks is not None and ids and max(ids) >= t.peer_num_blocks:
        return (f"block id {max(ids)} is outside peer {t.peer_engine_id}'s pool of "
                f"{t.peer_num_blocks} blocks")
    if len(set(ids)) != len(ids):
        return "the peer's block ids repeat"
    if t.role is TransferRole.PRODUCER_WRITE and t.num_tokens:
        need = -(-(t.num_tokens - 1) // block_size)
        if len(ids) != need:
            return (f"the decode announced {len(ids)} blocks for a prompt that needs {need}: "
                    "not the same prompt")
    if t.role is TransferRole.CONSUMER_READ and len(ids) < len(t.local_block_ids):
        return "the prefill returned fewer blocks than the prompt needs"
    return None
