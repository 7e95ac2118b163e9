"""A decode request that ends while its KV still moves keeps the blocks a posted read (READ)
or the producer's writes (WRITE) may still land in: held under the transfer's key (never
free, never another request's) until nothing can touch them any more, then freed. Engines
in this process over loopback TCP."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any, cast

import msgspec
import pytest
from pd_helpers import engine_remote, pd_engine

from connectors.pd_outcome import Outcomes, Parked
from connectors.protocol import HandshakeResponse
from connectors.transfer import Timeouts, Transfer, TransferRole
from disagg.common.kv_transfer_params import KVTransferParams, TransferMode
from disagg.common.protocol import EngineCoreRequest
from disagg.common.sampling_params import SamplingParams
from disagg.engine.engine_core import EngineCore
from disagg.engine.kv_cache import Owner, OwnerKind

PROMPT = [(5 * i + 2) % 250 + 1 for i in range(40)]
GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
FAST = {"transfer_timeout": 1, "defer_timeout": 1, "lease_timeout": 1,
        "heartbeat_interval": 0.25}


@pytest.fixture
def engines(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    monkeypatch.setenv("DISAGG_FAULT_INJECTION", "1")
    made: list[EngineCore] = []

    def make(role: str, faults: list[dict[str, Any]] | None = None,
             mode: str = "read", **options: Any) -> EngineCore:
        extra: dict[str, Any] = {"layerwise": False, **FAST, **options}
        if faults:
            extra["faults"] = faults
        engine = pd_engine(role, mode, kv_cache_memory_bytes=2 * 2**20, **extra)
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.close()


def _step_until(engines: list[EngineCore], done: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, "condition not reached"
        for engine in engines:
            engine.step()
        time.sleep(0.002)


def test_aborted_decode_keeps_blocks_a_stalled_read_may_land_in(engines: Any) -> None:
    prefill = engines("kv_producer")
    decode = engines("kv_consumer", faults=[{"at": "post", "action": "stall"}])
    tid = uuid.uuid4().hex
    params = msgspec.structs.replace(_read_prefill(prefill, tid), do_remote_prefill=True)
    decode.add_request(EngineCoreRequest(request_id="d", prompt_token_ids=PROMPT,
                                         sampling_params=GREEDY, kv_transfer_params=params))
    t = decode.connector.transfers[tid]
    _step_until([decode, prefill], lambda: bool(t.handles))  # the read is posted, and stalls
    # the stalled op is given up on after its drain deadline; then, and only then, they free
    _abort_holds_then_frees(decode, prefill, len(t.local_block_ids))


def _abort_holds_then_frees(decode: Any, prefill: Any, num_blocks: int) -> None:
    """Abort D's request "d": its blocks stay held while an op may land in them, then free."""
    decode.abort(["d"])
    decode.step()
    snap = decode.pool.snapshot()
    assert snap.held >= num_blocks and snap.free <= snap.total - num_blocks, snap
    _step_until([decode, prefill], lambda: decode.pool.snapshot().free == snap.total
                and decode.pool.snapshot().held == 0)


def test_aborted_write_decode_keeps_its_blocks_until_the_producer_quiesced(engines: Any) -> None:
    """WRITE: P's write into D's blocks stalls; D's request is aborted. D keeps the blocks
    until P says nothing of its can land any more (quiesced), then frees them."""
    prefill = engines("kv_producer", faults=[{"at": "post", "action": "stall"}], mode="write")
    decode = engines("kv_consumer", mode="write")
    tid = uuid.uuid4().hex
    decode.add_request(EngineCoreRequest(
        request_id="d", prompt_token_ids=PROMPT, sampling_params=GREEDY,
        kv_transfer_params=KVTransferParams(transfer_id=tid, do_remote_prefill=True,
                                            mode=TransferMode.WRITE, **engine_remote(prefill))))
    prefill.add_request(EngineCoreRequest(
        request_id="p", prompt_token_ids=PROMPT,
        sampling_params=msgspec.structs.replace(GREEDY, max_tokens=1),
        kv_transfer_params=KVTransferParams(transfer_id=tid, do_remote_decode=True,
                                            mode=TransferMode.WRITE, **engine_remote(decode))))
    p_t = prefill.connector.transfers[tid]
    d_t = decode.connector.transfers[tid]
    _step_until([decode, prefill], lambda: bool(p_t.handles))  # P's write is posted, stalls
    _abort_holds_then_frees(decode, prefill, len(d_t.local_block_ids))


class _Freeze:
    """Stops a connector's control thread the way SIGSTOP stops its process: it answers no
    handshake and reads no notification until thawed, and the handshakes that arrived while
    it was frozen are lost (their askers closed their sockets long before)."""

    def __init__(self, engine: EngineCore) -> None:
        self.thawed = threading.Event()
        control = engine.connector.control
        real = control._hello_reply

        def frozen_reply(raw: bytes) -> Any:
            if self.thawed.is_set():
                return real(raw)
            self.thawed.wait(30)
            return HandshakeResponse(error="lost while frozen")

        control._hello_reply = frozen_reply  # type: ignore[method-assign]


@pytest.mark.parametrize("request_first", [True, False])
@pytest.mark.parametrize("early_start", [True, False])
def test_write_decode_frees_its_blocks_after_a_frozen_prefill_thaws(
        engines: Any, request_first: bool, early_start: bool) -> None:
    """P is frozen before the request: D's handshake times out, its transfer fails and its
    announced blocks stay parked. After the thaw D's blocks are freed once P says it cannot
    write them (D must identify P for that, although its own handshake failed and P never
    handshook it). P's request reaching its engine first may write D's parked blocks; reaching
    it after D freed them, it fails without moving a byte."""
    prefill = engines("kv_producer", mode="write", early_start=early_start)
    decode = engines("kv_consumer", mode="write")
    freeze = _Freeze(prefill)
    tid = uuid.uuid4().hex
    decode.add_request(EngineCoreRequest(
        request_id="d", prompt_token_ids=PROMPT, sampling_params=GREEDY,
        kv_transfer_params=KVTransferParams(transfer_id=tid, do_remote_prefill=True,
                                            mode=TransferMode.WRITE, **engine_remote(prefill))))
    failed: list[Any] = []

    def decode_failed() -> bool:
        failed.extend(o for o in decode.step() if o.finish_reason is not None)
        return bool(failed)

    _step_until([], decode_failed, timeout_s=15)
    assert failed[0].error and decode.connector.outcomes.parked  # parked: P may still write
    p_request = EngineCoreRequest(
        request_id="p", prompt_token_ids=PROMPT,
        sampling_params=msgspec.structs.replace(GREEDY, max_tokens=1),
        kv_transfer_params=KVTransferParams(transfer_id=tid, do_remote_decode=True,
                                            mode=TransferMode.WRITE, **engine_remote(decode)))
    if request_first:
        prefill.add_request(p_request)
    freeze.thawed.set()
    total = decode.pool.snapshot().total
    p_out: list[Any] = []

    def both_until(done: Any) -> Any:
        def step() -> bool:
            decode.step()
            p_out.extend(o for o in prefill.step() if o.finish_reason is not None)
            return bool(done())
        return step

    _step_until([], both_until(lambda: not decode.connector.outcomes.parked
                               and decode.pool.snapshot().free == total), timeout_s=15)
    if not request_first:
        prefill.add_request(p_request)
    _step_until([], both_until(lambda: p_out and not prefill.connector.busy()), timeout_s=15)
    if not request_first:  # D had freed its blocks: P must not write them
        assert p_out[0].error and "gave up" in p_out[0].error, p_out
        assert prefill.connector.counters["bytes_moved_total"] == 0
    assert decode.pool.snapshot().free == total


def _read_prefill(prefill: EngineCore, tid: str, request_id: str = "p") -> Any:
    """P computes PROMPT for a READ decode; its answer's kv_transfer_params."""
    prefill.add_request(EngineCoreRequest(
        request_id=request_id, prompt_token_ids=PROMPT,
        sampling_params=msgspec.structs.replace(GREEDY, max_tokens=1),
        kv_transfer_params=KVTransferParams(transfer_id=tid, do_remote_decode=True,
                                            mode=TransferMode.READ)))
    answered: list[Any] = []

    def prefill_answered() -> bool:
        answered.extend(o for o in prefill.step() if o.finish_reason is not None)
        return bool(answered)

    _step_until([], prefill_answered)
    return answered[0].kv_transfer_params


def _fill_pool(engine: EngineCore) -> tuple[Owner, list[int]]:
    """Every free block of ``engine`` taken by a stand-in owner (free them to let requests
    in)."""
    filler = Owner(OwnerKind.REQUEST, "filler")
    taken = engine.pool.allocate(engine.pool.num_free, filler)
    assert taken
    return filler, taken


def _monolithic(engines: Any) -> list[int]:
    engine = engines("kv_both")
    engine.add_request(EngineCoreRequest(request_id="m", prompt_token_ids=PROMPT,
                                         sampling_params=GREEDY))
    out: list[int] = []
    done: list[Any] = []

    def finished() -> bool:
        for o in engine.step():
            out.extend(o.new_token_ids)
            done.extend([o] if o.finish_reason is not None else [])
        return bool(done)

    _step_until([], finished)
    return out


@pytest.mark.parametrize("mode", ["read", "write"])
@pytest.mark.parametrize("policy", ["fail", "recompute"])
def test_decode_request_waiting_for_blocks_gives_up_the_remote_kv_after_defer_timeout(
        engines: Any, mode: str, policy: str) -> None:
    """D's pool is full (here: a stand-in owner takes every block) and its request for P's KV
    waits in D's queue. That wait is bounded: after defer_timeout D gives the transfer up and
    P frees its hold (READ) or its waiting prefill (WRITE) at once, without waiting on D's
    queue; D's request fails with that reason, or is computed by D once blocks free, equal to
    monolithic: with ``recompute``, or (READ) when P's first token already went out with the
    READ answer (the request can only go on)."""
    expected = _monolithic(engines)
    prefill = engines("kv_producer", mode=mode)
    decode = engines("kv_consumer", mode=mode, kv_load_failure_policy=policy)
    filler, taken = _fill_pool(decode)
    tid = uuid.uuid4().hex
    if mode == "read":
        params = msgspec.structs.replace(_read_prefill(prefill, tid), do_remote_prefill=True)
        assert prefill.pool.snapshot().held > 0
    else:
        params = KVTransferParams(transfer_id=tid, do_remote_prefill=True,
                                  mode=TransferMode.WRITE, **engine_remote(prefill))
        prefill.add_request(EngineCoreRequest(
            request_id="p", prompt_token_ids=PROMPT,
            sampling_params=msgspec.structs.replace(GREEDY, max_tokens=1),
            kv_transfer_params=KVTransferParams(transfer_id=tid, do_remote_decode=True,
                                                mode=TransferMode.WRITE,
                                                **engine_remote(decode))))
    decode.add_request(EngineCoreRequest(request_id="d", prompt_token_ids=PROMPT,
                                         sampling_params=GREEDY, kv_transfer_params=params))
    t = decode.connector.transfers[tid]
    d_out: list[Any] = []
    p_out: list[Any] = []

    def step_both() -> bool:
        d_out.extend(decode.step())
        p_out.extend(o for o in prefill.step() if o.finish_reason is not None)
        return False

    t0 = time.monotonic()
    _step_until([], lambda: step_both() or t.terminal, timeout_s=10)
    assert t.state.value == "expired" and "free KV blocks" in (t.error or ""), t.error
    assert time.monotonic() - t0 >= FAST["defer_timeout"] - 0.2
    assert not t.local_block_ids and not decode.connector.outcomes.parked  # nothing announced
    # P learns at once (transfer_failed), not after its own deadline
    _step_until([], lambda: step_both() or not prefill.connector.busy(), timeout_s=3)
    assert prefill.pool.snapshot().held == 0
    if mode == "write":
        assert p_out and p_out[0].error and "expired" in p_out[0].error, p_out
    if policy == "fail" and mode == "write":
        _step_until([], lambda: step_both() or any(o.finish_reason for o in d_out))
        assert "free KV blocks" in (d_out[-1].error or ""), d_out
        decode.pool.free(taken, filler)
    else:
        assert not any(o.finish_reason for o in d_out)  # still queued for blocks
        decode.pool.free(taken, filler)
        _step_until([], lambda: step_both() or any(o.finish_reason for o in d_out))
        assert [tok for o in d_out for tok in o.new_token_ids] == expected
    assert decode.pool.snapshot().free == decode.pool.snapshot().total


def _write_request(decode: EngineCore, prefill: EngineCore, rid: str) -> str:
    """D's side of one WRITE transfer from ``prefill``; its transfer id."""
    tid = uuid.uuid4().hex
    decode.add_request(EngineCoreRequest(
        request_id=rid, prompt_token_ids=PROMPT, sampling_params=GREEDY,
        kv_transfer_params=KVTransferParams(transfer_id=tid, do_remote_prefill=True,
                                            mode=TransferMode.WRITE, **engine_remote(prefill))))
    return tid


def _prefill_request(prefill: EngineCore, decode: EngineCore, rid: str, tid: str) -> None:
    prefill.add_request(EngineCoreRequest(
        request_id=rid, prompt_token_ids=PROMPT,
        sampling_params=msgspec.structs.replace(GREEDY, max_tokens=1),
        kv_transfer_params=KVTransferParams(transfer_id=tid, do_remote_decode=True,
                                            mode=TransferMode.WRITE, **engine_remote(decode))))


class _Outputs:
    """Steps engines and keeps each request's outputs."""

    def __init__(self, *engines: EngineCore) -> None:
        self.engines = engines
        self.out: dict[str, list[Any]] = {}

    def step(self) -> bool:
        for engine in self.engines:
            for o in engine.step():
                self.out.setdefault(o.request_id, []).append(o)
        return False

    def finished(self, rid: str) -> Any:
        done = [o for o in self.out.get(rid, []) if o.finish_reason is not None]
        return done[-1] if done else None

    def tokens(self, rid: str) -> list[int]:
        return [tok for o in self.out.get(rid, []) for tok in o.new_token_ids]


def test_write_decode_gives_no_more_blocks_to_a_prefill_that_never_answers(
        engines: Any) -> None:
    """A frozen WRITE prefill says nothing, so the blocks announced to it end up parked (it
    may still write them). Once it has owed D an answer for lease_timeout without a word
    (here: its failed transfer's quiesce), D announces no more blocks to it: later requests
    naming it fail before D gives it a block (or are computed by D), so one frozen peer
    cannot drain D's pool into parking."""
    prefill = engines("kv_producer", mode="write")
    decode = engines("kv_consumer", mode="write", kv_load_failure_policy="recompute")
    freeze = _Freeze(prefill)
    run = _Outputs(decode)
    first = _write_request(decode, prefill, "d1")
    _step_until([], lambda: run.step() or first in decode.connector.outcomes.parked,
                timeout_s=15)
    parked = decode.connector.outcomes.num_parked_blocks
    assert parked > 0
    time.sleep(FAST["lease_timeout"] + 0.1)
    run.step()
    second = _write_request(decode, prefill, "d2")
    _step_until([], lambda: run.step() or run.finished("d2"))
    assert second not in decode.connector.outcomes.parked
    assert decode.connector.outcomes.num_parked_blocks == parked
    assert run.finished("d2").error is None  # recompute: D computed it
    freeze.thawed.set()
    total = decode.pool.snapshot().total
    _step_until([decode, prefill], lambda: not decode.connector.outcomes.parked
                and decode.pool.snapshot().free == total, timeout_s=15)


def test_a_silent_prefill_is_judged_before_any_transfer_to_it_failed(engines: Any) -> None:
    """The judgement does not wait for a failure: a prefill that said nothing for
    lease_timeout after D announced blocks to it (its engine stopped, not stepped here; its
    handshakes still answered) gets no more, and that first transfer is given up then, not at
    its defer_timeout (its blocks stay parked: the prefill may still write them)."""
    prefill = engines("kv_producer", mode="write")
    decode = engines("kv_consumer", mode="write", defer_timeout=30)
    run = _Outputs(decode)
    first = _write_request(decode, prefill, "d1")
    t1 = decode.connector.transfers[first]
    _step_until([], lambda: run.step() or t1.announced)
    deadline = time.monotonic() + FAST["lease_timeout"] + 0.3
    while time.monotonic() < deadline:
        run.step()
        time.sleep(0.01)
    _write_request(decode, prefill, "d2")
    _step_until([], lambda: run.step() or run.finished("d2"))
    error = run.finished("d2").error
    assert error and f"prefill {prefill.engine_id} has not answered this decode" in error
    assert t1.state.value == "expired" and "has not answered" in (t1.error or "")
    assert first in decode.connector.outcomes.parked
    assert run.finished("d1") is not None  # failed well before defer_timeout (30 s)
    total = decode.pool.snapshot().total
    _step_until([decode, prefill], lambda: not decode.connector.outcomes.parked
                and decode.pool.snapshot().free == total, timeout_s=15)


def test_a_live_prefill_whose_requests_are_late_is_not_silent(engines: Any) -> None:
    """A live prefill acknowledges and leases the blocks of requests it has not received yet
    (it knows the decode): however late its requests come, D keeps announcing to it, and the
    transfers complete with the monolithic tokens."""
    expected = _monolithic(engines)
    prefill = engines("kv_producer", mode="write")
    decode = engines("kv_consumer", mode="write", defer_timeout=30)
    run = _Outputs(decode, prefill)
    first = _write_request(decode, prefill, "d1")
    t1 = decode.connector.transfers[first]
    _step_until([], lambda: run.step() or t1.acknowledged)
    deadline = time.monotonic() + 3 * FAST["lease_timeout"]
    while time.monotonic() < deadline:
        run.step()
        time.sleep(0.01)
    assert not decode.connector.exposure.silent
    second = _write_request(decode, prefill, "d2")
    t2 = decode.connector.transfers[second]
    _step_until([], lambda: run.step() or t2.announced)
    _prefill_request(prefill, decode, "p1", first)
    _prefill_request(prefill, decode, "p2", second)
    _step_until([], lambda: run.step() or (run.finished("d1") and run.finished("d2")))
    for rid in ("d1", "d2"):
        assert run.finished(rid).error is None
        assert run.tokens(rid) == expected


def test_a_lost_transfer_failed_is_told_again_at_the_decodes_next_resend(
        engines: Any) -> None:
    """P fails the transfer at once (the decode's prompt differs) and its transfer_failed is
    lost: the decode's next resend of its blocks gets that failure again, so the decode ends
    the request within heartbeats, not at its defer_timeout."""
    prefill = engines("kv_producer", mode="write",
                      faults=[{"at": "transfer_failed", "nth": 1, "action": "drop"}])
    decode = engines("kv_consumer", mode="write", defer_timeout=30, lease_timeout=30)
    run = _Outputs(decode, prefill)
    tid = _write_request(decode, prefill, "d")
    t = decode.connector.transfers[tid]
    _step_until([], lambda: run.step() or t.peer_epoch is not None)  # P identified
    prefill.add_request(EngineCoreRequest(
        request_id="p", prompt_token_ids=PROMPT[::-1],
        sampling_params=msgspec.structs.replace(GREEDY, max_tokens=1),
        kv_transfer_params=KVTransferParams(transfer_id=tid, do_remote_decode=True,
                                            mode=TransferMode.WRITE, **engine_remote(decode))))
    _step_until([], lambda: run.step() or run.finished("p"))
    assert prefill.connector.metrics()["faults_injected_total"] == 1
    _step_until([], lambda: run.step() or run.finished("d"), timeout_s=5)
    error = run.finished("d").error
    assert error and "digest differs" in error, error


def test_blocks_a_prefill_has_not_acknowledged_are_capped(engines: Any) -> None:
    """A burst for a prefill that acknowledges nothing (frozen): D announces at most its
    share of the pool to it; the other requests' blocks wait unannounced and, when their
    transfers expire, are freed at once instead of parked."""
    prefill = engines("kv_producer", mode="write")
    decode = engines("kv_consumer", mode="write", defer_timeout=2, lease_timeout=30)
    freeze = _Freeze(prefill)
    exposure = decode.connector.exposure
    per_request = -(-len(PROMPT) // decode.connector.metadata.block_size)
    count = 2 * exposure.cap_blocks // per_request + 2
    run = _Outputs(decode)
    tids = [_write_request(decode, prefill, f"d{i}") for i in range(count)]
    transfers = [decode.connector.transfers[tid] for tid in tids]
    _step_until([], lambda: run.step() or all(t.started_s is not None for t in transfers))
    announced = [t for t in transfers if t.announced]
    assert announced and len(announced) < count
    assert sum(len(t.local_block_ids) for t in announced) <= exposure.cap_blocks + per_request
    _step_until([], lambda: run.step() or all(run.finished(f"d{i}") for i in range(count)))
    parked = set(decode.connector.outcomes.parked)
    assert parked == {t.transfer_id for t in announced}
    snap = decode.pool.snapshot()
    assert snap.total - snap.free == decode.connector.outcomes.num_parked_blocks
    freeze.thawed.set()
    _step_until([decode, prefill], lambda: not decode.connector.outcomes.parked
                and decode.pool.snapshot().free == snap.total, timeout_s=15)


def test_parked_blocks_gauge_counts_a_shared_block_once() -> None:
    """Parked transfers of prompts with a common prefix share its blocks: the gauge counts
    distinct blocks (it showed 13,629 parked on an 8,192-block pool)."""
    outcomes = Outcomes("D", 1, cast(Any, None), cast(Any, None), {}, timeouts=Timeouts(),
                        recompute=False, counters={})
    for tid, blocks in (("a", [0, 1, 2]), ("b", [0, 1, 5]), ("c", [])):
        t = Transfer(tid, TransferRole.CONSUMER_WRITE, "r-" + tid, 0.0, local_block_ids=blocks)
        outcomes.parked[tid] = Parked(t, 0.0, needs_quiesce=True, parked_s=0.0)
    assert outcomes.num_parked_blocks == 4


def test_a_request_expiring_in_the_decode_queue_leaves_other_transfers_to_that_prefill(
        engines: Any) -> None:
    """Decode request A expires while queued for blocks (its own queue: the prefill is fine),
    so the handshake with that prefill stays good: B, queued for the same prefill, reads its KV
    at once when blocks free (it used to find the handshake forgotten and expire too)."""
    prefill = engines("kv_producer", defer_timeout=20, lease_timeout=20)
    decode = engines("kv_consumer", defer_timeout=2)
    filler, taken = _fill_pool(decode)
    ta, tb = uuid.uuid4().hex, uuid.uuid4().hex
    pa = msgspec.structs.replace(_read_prefill(prefill, ta), do_remote_prefill=True)
    pb = msgspec.structs.replace(_read_prefill(prefill, tb, "p2"), do_remote_prefill=True)
    out: list[Any] = []

    def step() -> bool:
        out.extend(decode.step())
        prefill.step()
        return False

    decode.add_request(EngineCoreRequest(request_id="a", prompt_token_ids=PROMPT,
                                         sampling_params=GREEDY, kv_transfer_params=pa))
    t_a = decode.connector.transfers[ta]
    deadline = time.monotonic() + 1.0  # A's handshake completes; B arrives later
    while time.monotonic() < deadline:
        step()
        time.sleep(0.002)
    decode.add_request(EngineCoreRequest(request_id="b", prompt_token_ids=PROMPT,
                                         sampling_params=GREEDY, kv_transfer_params=pb))
    t_b = decode.connector.transfers[tb]
    _step_until([], lambda: step() or t_a.terminal)
    assert t_a.state.value == "expired" and not t_b.terminal
    decode.pool.free(taken, filler)
    _step_until([], lambda: step() or t_b.terminal)
    assert t_b.state.value == "done", t_b.error  # it expired, stranded, before


def test_a_request_held_during_a_pause_starts_its_queue_deadline_at_resume(
        engines: Any) -> None:
    """A pause does not count toward the queue deadline: neither for a request that arrives
    during it (held, its transfer leased) nor for one queued before it (a pause longer than
    defer_timeout, a weight update, must fail neither); at resume both read their KV."""
    prefill = engines("kv_producer", defer_timeout=20, lease_timeout=20)
    decode = engines("kv_consumer", defer_timeout=1)
    filler, taken = _fill_pool(decode)
    tq, tid = uuid.uuid4().hex, uuid.uuid4().hex
    queued = msgspec.structs.replace(_read_prefill(prefill, tq, "pq"), do_remote_prefill=True)
    params = msgspec.structs.replace(_read_prefill(prefill, tid), do_remote_prefill=True)
    # one request queued (for blocks) before the pause, one arriving during it (held)
    assert decode.add_request(EngineCoreRequest(request_id="q", prompt_token_ids=PROMPT,
                                                sampling_params=GREEDY,
                                                kv_transfer_params=queued)) is None
    decode.pause_queue_clocks()
    assert decode.add_request(EngineCoreRequest(request_id="d", prompt_token_ids=PROMPT,
                                                sampling_params=GREEDY,
                                                kv_transfer_params=params), hold=True) is None
    t, t_q = decode.connector.transfers[tid], decode.connector.transfers[tq]
    deadline = time.monotonic() + 2.0  # twice defer_timeout, paused
    while time.monotonic() < deadline:
        decode.connector_step()
        prefill.step()
        time.sleep(0.01)
    assert not t.terminal and not t_q.terminal, (t.error, t_q.error)
    decode.pool.free(taken, filler)
    decode.release_held()
    out: list[Any] = []

    def finished() -> bool:
        out.extend(decode.step())
        prefill.step()
        return sum(1 for o in out if o.finish_reason) == 2

    _step_until([], finished)
    assert t.state.value == "done" and t_q.state.value == "done"
    assert all(o.error is None for o in out)
