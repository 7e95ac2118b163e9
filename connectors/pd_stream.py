"""Layerwise WRITE: which blocks a prefill chunk streams, and the hook that posts them per layer.

A WRITE producer whose destination is known (the decode's ``remote_blocks``) posts, right
after a group of layers wrote this step's K/V, one WRITE of those layers' run of every block the
chunk completes (byte layout: connectors/pd_worker.py), so the transfer overlaps the prefill.

Groups (``layer_group``): each post costs the forward's host thread ~0.3 ms on a server core
(rows, bounds checks, the copy calls), so a post per layer of a 32-layer model kept the GPU
waiting on the host (an H200's 4k prefill: 1.3x the monolithic TTFT). "auto" posts eight times
a step over a network transport (the transfer stays at most 1/8 of the forward behind its
compute) and once a step, after the last layer, over ipc (see layer_group).

Transferred blocks are the decode's, [0, R) with R = len(remote_block_ids): the KV of
prompt[:-1] rounded up to whole blocks (the decode recomputes the last prompt token), exactly
what the whole-prompt WRITE moves. Block b is posted once, by the first chunk after the one that
computes its last position min((b + 1) * block_size, N) - 1 (N prompt tokens) that runs with
the stream's peer known (usually that chunk itself): transports do not order separate batches
(tcp spreads them over connections, nixl and mori run them concurrently), so a block written
twice could end with its older, partial copy. Blocks the prefill completed before the peer was
known and no later chunk posted are written whole once it finished (pd_ops.Ops._advance_stream).

With ``early_start`` (the default) the prefill may start before the decode announced its blocks
(PDConnector.can_schedule: within half the pool, so announced prefills always find blocks and P
and D cannot deadlock). A chunk [start, end) with the peer known posts, from the stream's
frontier (``Transfer.stream_next``) on:

    start < N:   blocks [stream_next, min(R, end // bs))   if end < N
                 blocks [stream_next, R)                   if end >= N
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from connectors.pd_worker import PDWorkerSide
    from connectors.transfer import Transfer
    from disagg.engine.request import Request


def blocks_to_stream(start: int, end: int, num_prompt_tokens: int, num_remote_blocks: int,
                     block_size: int) -> range:
    """Indices of the transferred blocks that the chunk [start, end) completes."""
    if start >= num_prompt_tokens:
        return range(0)  # a decode step of the producer: its prompt was streamed already
    stop = num_remote_blocks if end >= num_prompt_tokens else end // block_size
    return range(start // block_size, min(stop, num_remote_blocks))


class LayerPlan(NamedTuple):
    """One transfer's share of a step: the block pairs it writes, layer by layer."""

    transfer: Transfer
    peer: str
    local_blocks: list[int]
    remote_blocks: list[int]


def plan_chunk(t: Transfer, req: Request, num_tokens: int, block_size: int) -> LayerPlan | None:
    """What a streaming transfer writes for this step's chunk of its request (None: nothing),
    and the stream's frontier moved past it: the blocks this chunk completes plus every
    complete block before them not posted yet (chunks computed before the decode's blocks or
    its handshake were known, or the prefill's own prefix-cache hit). A block posted before a
    preemption is not posted again: its write settled before the recompute began."""
    assert t.remote_block_ids is not None and t.stream_peer is not None
    start = req.num_computed_tokens
    num_remote = len(t.remote_block_ids)
    stop = blocks_to_stream(0, start + num_tokens, req.num_prompt_tokens, num_remote,
                            block_size).stop if start < req.num_prompt_tokens else num_remote
    blocks = range(t.stream_next, stop)
    if not blocks:
        return None
    t.stream_next = stop
    return LayerPlan(t, t.stream_peer, [req.block_ids[b] for b in blocks],
                     [t.remote_block_ids[b] for b in blocks])


POSTS_PER_STEP = 8
"""``layer_group`` "auto" over a network transport: this many layer posts per step."""


def layer_group(configured: int, num_layers: int, fast_link: bool = False) -> int:
    """Layers per post: the configured number (>= 1), or for 0 ("auto") ceil(layers / 8), or
    all of them (one post per step, issued after the step: pd_ops.Ops.after_execute) over a
    ``fast_link`` (ipc: same host, NVLink / xGMI or one GPU), where the copy takes ~1 % of the
    prefill and each post's host time costs more than the overlap saves. H200, 4k prompt, ipc
    on one GPU (TTFT over monolithic): a post per layer 1.32x; with early_start on, 8 posts
    per step 1.040x, 4 1.040x, 1 1.014x."""
    if configured >= 1:
        return configured
    if fast_link:
        return max(1, num_layers)
    return max(1, -(-num_layers // POSTS_PER_STEP))


class LayerStreamer:
    """The layer hook of one step: posts each plan's run of a group of layers once the group's
    last layer is cached (and whatever is left at the last layer)."""

    def __init__(self, worker: PDWorkerSide, plans: list[LayerPlan],
                 counters: dict[str, float], group: int = 1) -> None:
        self._worker = worker
        self._plans = plans
        self._counters = counters
        self._group = group
        self._num_layers = worker.geometry.num_layers
        self._next = 0
        """The first layer not posted yet."""

    def __call__(self, layer: int) -> None:
        """Layer ``layer`` is cached (called by the model, inside the forward, in layer order):
        post the layers since the last post when a group is complete or at the last layer."""
        if layer + 1 - self._next < self._group and layer + 1 < self._num_layers:
            return
        self._post(self._next, layer + 1 - self._next)
        self._next = layer + 1

    def post_all(self) -> None:
        """Every layer at once, after the step (pd_ops.Ops.after_execute), skipping the plans
        whose transfer ended during the step."""
        self._plans = [p for p in self._plans if not p.transfer.terminal]
        if self._plans:
            self._post(0, self._num_layers)

    def _post(self, first: int, count: int) -> None:
        now = time.monotonic()
        for p in self._plans:
            op_id, nbytes = self._worker.post_layers(p.peer, first, count, p.local_blocks,
                                                     p.remote_blocks)
            t = p.transfer
            t.handles.append(op_id)
            t.bytes_moved += nbytes
            t.posted_s = now
            if t.first_posted_s is None:
                t.first_posted_s = now
        self._counters["layer_posts_total"] += len(self._plans)
