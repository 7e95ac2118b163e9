"""Layerwise WRITE in one process: which blocks each chunk streams, the exact per-layer segments
the hook posts (fake transport, real control plane and scheduler), completion and failure."""

from __future__ import annotations

import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from fake_transport import FakeTransport

from connectors import pd_rank
from connectors.pd_connector import PDConnector
from connectors.pd_stream import blocks_to_stream, layer_group, plan_chunk
from connectors.protocol import RemoteBlocks
from connectors.transfer import TransferState, prompt_digest
from connectors.transports.base import Segment, TransferOp, TransferStatus, merge_array
from disagg.common.config import KVTransferConfig, SchedulerConfig
from disagg.common.kv_transfer_params import parse_kv_params
from disagg.common.sampling_params import SamplingParams
from disagg.engine.kv_cache import BlockPool
from disagg.engine.request import Request, RequestStatus
from disagg.engine.scheduler import Scheduler, SchedulerOutput

BLOCK_SIZE, NUM_LAYERS, NUM_BLOCKS = 4, 3, 16
LAYER_BYTES = 2 * BLOCK_SIZE * 1 * 2 * 4  # K and V, block_size tokens, 1 head, dim 2, fp32
BLOCK_BYTES = NUM_LAYERS * LAYER_BYTES


@pytest.mark.parametrize(("start", "end", "n", "r", "expected"), [
    (0, 11, 11, 3, [0, 1, 2]),      # one chunk: every transferred block
    (0, 6, 11, 3, [0]),             # block 1 is only partly computed: it waits
    (6, 11, 11, 3, [1, 2]),         # ... for the chunk that completes it
    (0, 8, 12, 3, [0, 1]),          # a chunk ending on a block boundary
    (8, 12, 12, 3, [2]),
    (0, 8, 9, 2, [0, 1]),           # prompt of 9: block 2 holds only the recomputed token
    (8, 9, 9, 2, []),
    (0, 1, 1, 0, []),               # one-token prompt: nothing transferred
    (11, 12, 11, 3, []),            # a decode step after the prompt
])
def test_blocks_to_stream_writes_each_block_once(start: int, end: int, n: int, r: int,
                                                  expected: list[int]) -> None:
    assert list(blocks_to_stream(start, end, n, r, BLOCK_SIZE)) == expected


def _engine(engine_id: str) -> Any:
    arch = SimpleNamespace(model_type="llama", vocab_size=64, hidden_size=8,
                           num_layers=NUM_LAYERS, num_heads=2, num_kv_heads=1, head_dim=2,
                           intermediate_size=16)
    parallel = SimpleNamespace(data_parallel_size=1, data_parallel_rank=0, tensor_parallel_size=1)
    return SimpleNamespace(engine_id=engine_id, arch=arch, cfg=SimpleNamespace(
        parallel=parallel, cache=SimpleNamespace(block_size=BLOCK_SIZE)))


def _connector(role: str, engine_id: str, layerwise: bool = True,
               **extra: Any) -> PDConnector:
    cfg = KVTransferConfig(kv_connector="PDConnector", kv_role=role, kv_connector_extra_config={
        "transport": "fake", "mode": "write", "layerwise": layerwise, "transfer_timeout": 5,
        **extra})
    kv = torch.zeros(NUM_BLOCKS, NUM_LAYERS, 2, BLOCK_SIZE, 1, 2)
    return PDConnector(cfg, _engine(engine_id), kv)


class Pair(SimpleNamespace):
    """A layerwise producer with its scheduler, a consumer answering handshakes, and the
    producer's fake transport."""

    p: PDConnector
    d: PDConnector
    sched: Scheduler
    transport: FakeTransport


@pytest.fixture
def pair(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Pair]:
    """Layerwise unless parametrized indirectly with False (or with a dict of more options)."""
    transports: list[FakeTransport] = []

    def make(name: str, **_: Any) -> FakeTransport:
        transports.append(FakeTransport())
        return transports[-1]

    monkeypatch.setattr(pd_rank, "make_transport", make)
    param = getattr(request, "param", True)
    p = _connector("kv_producer", "engine-P", **param) if isinstance(param, dict) else \
        _connector("kv_producer", "engine-P", param)
    d = _connector("kv_consumer", "engine-D")
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=6), BlockPool(NUM_BLOCKS),
                      BLOCK_SIZE, 64, p.scheduler)
    try:
        yield Pair(p=p, d=d, sched=sched, transport=transports[0])
    finally:
        p.close()
        d.close()


def _request(rid: str, n: int, params: dict[str, Any] | None) -> Request:
    return Request(rid, list(range(1, n + 1)), SamplingParams(max_tokens=1, temperature=0),
                   (), kv_transfer_params=None if params is None else parse_kv_params(params))


def _write_producer(pair: Pair, rid: str, n: int, remote: list[int]) -> Request:
    """A WRITE prefill whose decode announced ``remote``, ready to stream."""
    req = _write_request(pair, rid, n)
    _announce(pair, rid, n, remote)
    _until_streaming(pair, rid)
    return req


def _write_request(pair: Pair, rid: str, n: int) -> Request:
    """A WRITE prefill whose decode has not announced its blocks yet."""
    d = pair.d.metadata
    req = _request(rid, n, {"transfer_id": rid, "do_remote_decode": True, "mode": "write",
                            "remote_engine_id": d.engine_id, "remote_host": d.host,
                            "remote_handshake_port": d.handshake_port,
                            "remote_notify_port": d.notify_port})
    pair.sched.add_request(req)
    pair.p.on_request_arrival(req)
    return req


def _announce(pair: Pair, rid: str, n: int, remote: list[int]) -> None:
    """The decode's remote_blocks for ``rid`` arrive."""
    d = pair.d.metadata
    pair.p.control.inbox.put(RemoteBlocks(
        transfer_id=rid, engine_id=d.engine_id, epoch=d.epoch, generation=5,
        block_ids=remote, num_tokens=n - 1, host=d.host, handshake_port=d.handshake_port,
        notify_port=d.notify_port, prompt_digest=prompt_digest(range(1, n + 1))))


def _until_streaming(pair: Pair, rid: str) -> None:
    """Step the connector until the transfer knows its destination and, layerwise, its peer
    (the handshake with the consumer completed)."""
    deadline = time.monotonic() + 10
    while True:
        t = pair.p.transfers[rid]
        if t.remote_block_ids is not None and (t.stream_peer is not None or not t.layerwise):
            return
        assert time.monotonic() < deadline, "handshake did not complete"
        _update(pair)
        time.sleep(0.01)


def _update(pair: Pair) -> None:
    """The connector's step hook, applied by the scheduler (as the engine does)."""
    pair.sched.apply_connector_output(pair.p.update_connector_output())


def _step(pair: Pair) -> list[str]:
    """One engine step without a model: schedule, call the layer hook per layer, advance.
    Returns the ids of the requests that ran."""
    out = pair.sched.schedule()
    hook = pair.p.layer_hook(out)
    if hook is not None:
        for layer in range(NUM_LAYERS):
            hook(layer)
    sampled = {c.request.request_id: 0 for c in out.chunks if c.samples}
    pair.sched.update_from_output(out, sampled)
    pair.p.after_execute(out)
    return [c.request.request_id for c in out.chunks]


def _layer_runs(local: list[int], remote: list[int], layer: int) -> list[Segment]:
    off = layer * LAYER_BYTES
    return [Segment(lb * BLOCK_BYTES + off, rb * BLOCK_BYTES + off, LAYER_BYTES)
            for lb, rb in zip(local, remote)]


def test_hook_posts_each_layer_of_the_blocks_each_chunk_completes(pair: Pair) -> None:
    remote = [9, 3, 7]  # the decode's blocks for prompt[:-1] of an 11-token prompt
    req = _write_producer(pair, "w", 11, remote)
    plain = _request("plain", 5, None)
    read = _request("read", 9, {"transfer_id": "r", "do_remote_decode": True, "mode": "read"})
    for other in (plain, read):
        pair.sched.add_request(other)
        pair.p.on_request_arrival(other)
    # waiting on messages and handshakes only (they ring the engine loop's doorbell): the
    # loop need not poll; posted layer writes settle only when polled
    assert pair.p.busy() and not pair.p.needs_polling()
    assert _step(pair) == ["w"]  # chunk [0, 6): completes block 0 only
    assert pair.p.needs_polling()
    # chunk [6, 11): blocks 1 and 2 (2 is partial: the prompt's end); "plain" shares the step
    assert _step(pair) == ["w", "plain"]
    assert req.status is RequestStatus.FINISHED_LENGTH
    t = pair.p.transfers["w"]
    local = t.local_block_ids  # the prompt's blocks, held for the transfer
    assert len(local) == 3
    expected = ([_layer_runs(local[:1], remote[:1], layer) for layer in range(NUM_LAYERS)]
                + [_layer_runs(local[1:3], remote[1:3], layer) for layer in range(NUM_LAYERS)])
    assert [(op, peer) for op, peer, _ in pair.transport.posts] == \
        [(TransferOp.WRITE, "engine-D")] * 2 * NUM_LAYERS
    assert [segs for _, _, segs in pair.transport.posts] == expected
    steps = 0
    while pair.sched.has_work():  # the plain and READ-producer requests: no layer posts
        assert _step(pair) and steps < 20
        steps += 1
    assert len(pair.transport.posts) == 2 * NUM_LAYERS
    assert t.state is TransferState.IN_FLIGHT and len(t.handles) == 2 * NUM_LAYERS
    pair.transport.settle_all(TransferStatus.DONE)
    _update(pair)
    assert "w" not in pair.p.transfers  # done: write_done sent, blocks freed
    assert not pair.p.needs_polling()
    assert pair.p.counters["bytes_moved_total"] == 3 * BLOCK_BYTES
    assert pair.p.counters["layer_posts_total"] == 2 * NUM_LAYERS
    assert pair.p.counters["transfers_done_total"] == 1
    pair.p.abort_transfer("r")
    _update(pair)
    assert pair.sched.pool.snapshot().free == NUM_BLOCKS


@pytest.mark.parametrize("pair", [{"layer_group": 2}], indirect=True)
def test_layer_groups_post_every_group_of_layers_in_one_run_per_block(pair: Pair) -> None:
    """layer_group 2 of 3 layers: layers 0-1 posted after layer 1, layer 2 after the last; a
    block's layers are contiguous, so each post is one run per block spanning its layers."""
    remote = [9, 3, 7]
    req = _write_producer(pair, "w", 11, remote)
    assert _step(pair) == ["w"] and _step(pair) == ["w"]
    assert req.status is RequestStatus.FINISHED_LENGTH
    local = pair.p.transfers["w"].local_block_ids

    def runs(lo: list[int], re: list[int], first: int, count: int) -> list[Segment]:
        off = first * LAYER_BYTES
        return [Segment(lb * BLOCK_BYTES + off, rb * BLOCK_BYTES + off, count * LAYER_BYTES)
                for lb, rb in zip(lo, re)]

    assert [segs for _, _, segs in pair.transport.posts] == [
        runs(local[:1], remote[:1], 0, 2), runs(local[:1], remote[:1], 2, 1),
        runs(local[1:3], remote[1:3], 0, 2), runs(local[1:3], remote[1:3], 2, 1)]
    assert pair.p.counters["layer_posts_total"] == 4
    pair.transport.settle_all(TransferStatus.DONE)
    _update(pair)
    assert "w" not in pair.p.transfers
    assert pair.p.counters["bytes_moved_total"] == 3 * BLOCK_BYTES


@pytest.mark.parametrize("pair", [{"layer_group": NUM_LAYERS}], indirect=True)
def test_a_group_of_every_layer_posts_after_the_step_once_its_first_token_went(
        pair: Pair, monkeypatch: pytest.MonkeyPatch) -> None:
    """One post per step (ipc's auto): the model runs without a layer callback, and the post
    (every layer of the blocks the chunk completed) goes after the step sampled, after the
    finished prefill sent the decode its first token."""
    remote = [9, 3, 7]
    req = _write_producer(pair, "w", 11, remote)
    sent: list[str] = []
    real_send, real_post = pair.p.peers.send, pair.p.worker.post_layers

    def send(t: Any, msg: Any) -> None:
        sent.append(type(msg).__name__)
        real_send(t, msg)

    def post_layers(*args: Any) -> Any:
        sent.append("post")
        return real_post(*args)

    monkeypatch.setattr(pair.p.peers, "send", send)
    monkeypatch.setattr(pair.p.worker, "post_layers", post_layers)
    out = pair.sched.schedule()
    assert pair.p.layer_hook(out) is None
    pair.sched.update_from_output(out, {})
    assert pair.transport.posts == []  # nothing inside the forward
    pair.p.after_execute(out)
    assert _step(pair) == ["w"] and req.status is RequestStatus.FINISHED_LENGTH
    assert sent == ["post", "FirstToken", "post"]  # the last chunk's post after its token
    local = pair.p.transfers["w"].local_block_ids
    assert [segs for _, _, segs in pair.transport.posts] == [
        [Segment(lb * BLOCK_BYTES, rb * BLOCK_BYTES, BLOCK_BYTES)
         for lb, rb in zip(lo, re)] for lo, re in ((local[:1], remote[:1]),
                                                   (local[1:3], remote[1:3]))]
    assert pair.p.counters["layer_posts_total"] == 2
    pair.transport.settle_all(TransferStatus.DONE)
    _update(pair)
    assert "w" not in pair.p.transfers
    assert pair.p.counters["bytes_moved_total"] == 3 * BLOCK_BYTES


def test_layer_group_auto_is_eight_posts_per_step() -> None:
    assert [layer_group(0, n) for n in (1, 3, 8, 9, 32, 61, 80)] == [1, 1, 1, 2, 4, 8, 10]
    assert layer_group(3, 32) == 3 and layer_group(3, 32, fast_link=True) == 3
    assert layer_group(0, 32, fast_link=True) == 32  # ipc: one post per step


@pytest.mark.parametrize("pair", [{"early_start": True}], indirect=True)
def test_prefill_starts_before_the_decode_announced_and_the_stream_catches_up(
        pair: Pair) -> None:
    """The decode's blocks arrive after chunk [0, 6): that chunk streams nothing, and the next
    chunk's posts carry block 0 (complete already) with the blocks it completes."""
    remote = [9, 3, 7]
    req = _write_request(pair, "w", 11)
    assert pair.p.can_schedule(req)  # no destination yet: it starts anyway
    assert _step(pair) == ["w"]
    assert pair.transport.posts == []
    _announce(pair, "w", 11, remote)
    _until_streaming(pair, "w")
    assert _step(pair) == ["w"]
    assert req.status is RequestStatus.FINISHED_LENGTH
    local = pair.p.transfers["w"].local_block_ids
    assert [segs for _, _, segs in pair.transport.posts] == \
        [_layer_runs(local, remote, layer) for layer in range(NUM_LAYERS)]
    pair.transport.settle_all(TransferStatus.DONE)
    _update(pair)
    assert "w" not in pair.p.transfers
    assert pair.p.counters["bytes_moved_total"] == 3 * BLOCK_BYTES
    assert pair.sched.pool.snapshot().free == NUM_BLOCKS


@pytest.mark.parametrize("pair", [{"early_start": True}], indirect=True)
def test_prefill_finished_before_the_decode_announced_writes_every_block_whole(
        pair: Pair) -> None:
    remote = [4, 5]
    req = _write_request(pair, "w", 6)
    assert _step(pair) == ["w"]  # the whole prompt in one chunk, before any destination
    assert req.status is RequestStatus.FINISHED_LENGTH
    assert pair.transport.posts == [] and "w" in pair.p.transfers
    _announce(pair, "w", 6, remote)
    _until_streaming(pair, "w")
    _update(pair)
    local = pair.p.transfers["w"].local_block_ids
    assert len(pair.transport.posts) == 1  # one op, whole blocks (consecutive runs merged)
    rows = merge_array([Segment(lb * BLOCK_BYTES, rb * BLOCK_BYTES, BLOCK_BYTES)
                        for lb, rb in zip(local[:2], remote)])
    assert [tuple(seg) for seg in pair.transport.posts[0][2]] == \
        [tuple(int(x) for x in row) for row in rows]
    pair.transport.settle_all(TransferStatus.DONE)
    _update(pair)
    assert "w" not in pair.p.transfers
    assert pair.p.counters["bytes_moved_total"] == 2 * BLOCK_BYTES
    assert pair.sched.pool.snapshot().free == NUM_BLOCKS


def test_a_prefill_cache_hit_streams_the_cached_blocks_too(pair: Pair) -> None:
    """P's prefix cache gives the second request blocks 0-1 computed: its only chunk [8, 11)
    posts them with the block it completes (the decode has none of them)."""
    pair.sched = Scheduler(SchedulerConfig(max_num_batched_tokens=6),
                           BlockPool(NUM_BLOCKS, True), BLOCK_SIZE, 64, pair.p.scheduler)
    _write_producer(pair, "a", 11, [9, 3, 7])
    while pair.sched.has_work():
        _step(pair)
    pair.transport.settle_all(TransferStatus.DONE)
    _update(pair)
    assert "a" not in pair.p.transfers
    first = len(pair.transport.posts)
    req = _write_producer(pair, "b", 11, [10, 11, 12])
    assert _step(pair) == ["b"]
    assert req.num_cached_tokens == 8 and req.status is RequestStatus.FINISHED_LENGTH
    local = pair.p.transfers["b"].local_block_ids
    assert [segs for _, _, segs in pair.transport.posts[first:]] == \
        [_layer_runs(local, [10, 11, 12], layer) for layer in range(NUM_LAYERS)]


@pytest.mark.parametrize("pair", [{"early_start": False}], indirect=True)
def test_without_early_start_a_prefill_waits_for_its_destination(pair: Pair) -> None:
    req = _write_request(pair, "w", 11)
    assert not pair.p.can_schedule(req) and _step(pair) == []
    _announce(pair, "w", 11, [9, 3, 7])
    _until_streaming(pair, "w")
    assert pair.p.can_schedule(req) and _step(pair) == ["w"]


@pytest.mark.parametrize("pair", [{"early_start": True}], indirect=True)
def test_prefills_without_a_destination_take_at_most_half_the_pool(pair: Pair) -> None:
    """16 blocks: two 11-token prompts (3 blocks each) start early, a third would pass 8; it
    waits until one of the others learns its destination."""
    reqs = [_write_request(pair, f"w{i}", 11) for i in range(3)]
    assert pair.p.can_schedule(reqs[0]) and pair.p.can_schedule(reqs[1])
    assert not pair.p.can_schedule(reqs[2])
    assert pair.p.can_schedule(reqs[0])  # admitted once, admitted again
    _announce(pair, "w0", 11, [9, 3, 7])
    _until_streaming(pair, "w0")
    assert pair.p.can_schedule(reqs[2])


def test_plan_covers_the_blocks_a_prefill_cache_hit_left_unposted() -> None:
    """P's own prefix cache computed blocks 0-1: its first chunk [8, 11) posts them with the
    last block."""
    t = SimpleNamespace(remote_block_ids=[20, 21, 22], stream_peer="D", stream_next=0)
    req = SimpleNamespace(num_computed_tokens=8, num_prompt_tokens=11, block_ids=[5, 6, 7])
    plan = plan_chunk(t, req, 3, BLOCK_SIZE)  # type: ignore[arg-type]
    assert plan is not None
    assert (plan.local_blocks, plan.remote_blocks) == ([5, 6, 7], [20, 21, 22])
    assert t.stream_next == 3
    assert plan_chunk(t, req, 3, BLOCK_SIZE) is None  # type: ignore[arg-type]


def test_failed_layer_write_fails_the_prefill_and_frees_after_settling(pair: Pair) -> None:
    req = _write_producer(pair, "w", 11, [9, 3, 7])
    _step(pair)
    pair.transport.status[2] = TransferStatus.FAILED  # layer 1 of the first chunk
    _update(pair)
    assert req.status is RequestStatus.FINISHED_ERROR
    assert "layer 1 write to engine-D: link down" in (req.error or "")
    assert pair.p.counters["transfers_failed_total"] == 1
    held = pair.sched.pool.snapshot()
    assert held.free < NUM_BLOCKS  # the other layer writes still read the blocks
    pair.transport.settle_all(TransferStatus.DONE)
    _update(pair)
    assert pair.sched.pool.snapshot().free == NUM_BLOCKS
    assert not pair.p.busy()


def test_preempted_stream_restarts_only_after_its_writes_settled(pair: Pair) -> None:
    req = _write_producer(pair, "w", 11, [9, 3, 7])
    _step(pair)
    first = len(pair.transport.posts)
    pair.sched._preempt(req, SchedulerOutput())  # memory pressure took its blocks
    assert not pair.p.can_schedule(req)
    assert _step(pair) == []  # its old layer writes are still pending
    pair.transport.settle_all(TransferStatus.DONE)
    _update(pair)
    assert _step(pair) == ["w"]  # recomputed from position 0: block 0 landed before, and
    assert len(pair.transport.posts) == first  # is not written again (no second copy races)
    assert _step(pair) == ["w"]
    assert len(pair.transport.posts) == first + NUM_LAYERS  # blocks 1 and 2, layer by layer
    assert all(len(segs) == 2 for _, _, segs in pair.transport.posts[first:])
    pair.transport.settle_all(TransferStatus.DONE)
    _update(pair)
    assert pair.p.counters["transfers_done_total"] == 1
    assert pair.sched.pool.snapshot().free == NUM_BLOCKS


@pytest.mark.parametrize("pair", [False], indirect=True)
def test_whole_prompt_write_when_layerwise_is_off(pair: Pair) -> None:
    req = _write_producer(pair, "w", 11, [9, 3, 7])
    for _ in range(2):
        out = pair.sched.schedule()
        assert [c.request.request_id for c in out.chunks] == ["w"]
        assert pair.p.layer_hook(out) is None
        pair.sched.update_from_output(out, {"w": 0} if out.chunks[0].samples else {})
    assert req.status is RequestStatus.FINISHED_LENGTH and not pair.transport.posts
    local = pair.p.transfers["w"].local_block_ids
    _update(pair)  # the prefill ended: one WRITE of whole blocks
    assert pair.transport.posts == [(TransferOp.WRITE, "engine-D", [
        Segment(lb * BLOCK_BYTES, rb * BLOCK_BYTES, BLOCK_BYTES)
        for lb, rb in zip(local, [9, 3, 7])])]
    pair.transport.settle_all(TransferStatus.DONE)
    _update(pair)
    assert pair.p.counters["bytes_moved_total"] == 3 * BLOCK_BYTES
    assert pair.sched.pool.snapshot().free == NUM_BLOCKS
