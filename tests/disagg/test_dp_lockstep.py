"""Lockstep waves and the two-phase pause.

Unit tests of Lockstep, then the real EngineLoop of 3 ranks in threads (fake engines, inproc
ZMQ, a fake group that fails loudly when ranks issue different collectives), driven through
hundreds of randomized pause / barrier / request / barrier / resume rounds.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
import zmq

from disagg.common.config import ParallelConfig
from disagg.common.pause import PAUSE_ABORT_ERROR, PauseMode
from disagg.common.protocol import (
    EngineCoreCollectiveRpc,
    EngineCoreNeedWave,
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCorePause,
    EngineCorePauseStatus,
    EngineCoreRequest,
    EngineCoreResume,
    EngineCoreStartWave,
    EngineCoreUtilityResult,
    EngineStats,
    encoder,
    outbound_decoder,
)
from disagg.common.sampling_params import SamplingParams
from disagg.dp.engine_process import EngineLoop
from disagg.dp.group import DPGroupError
from disagg.dp.lockstep import SYNC_INTERVAL_STEPS, Lockstep, WaveEnd
from disagg.models.expert_parallel import EPContext


class _Sums:
    def __init__(self, answers: list[tuple[int, int]]) -> None:
        self.answers = answers
        self.calls: list[tuple[bool, bool]] = []

    def sync_state(self, has_unfinished: bool, pending_pause: bool) -> tuple[int, int]:
        self.calls.append((has_unfinished, pending_pause))
        return self.answers.pop(0)


def _run_to_sync(ls: Lockstep, unfinished: bool = False, ready: bool = False) -> WaveEnd:
    for _ in range(SYNC_INTERVAL_STEPS - 1):
        assert ls.after_step(unfinished, ready) is WaveEnd.CONTINUE
    return ls.after_step(unfinished, ready)


def test_waves_start_only_on_request_and_end_on_agreement() -> None:
    group = _Sums([(1, 0), (0, 1), (0, 0)])
    ls = Lockstep(group, dp_size=2)
    assert ls.wave_to_request(has_work=True) == 0
    assert ls.wave_to_request(has_work=True) is None  # asked once per wave
    assert ls.on_start_wave(0, paused=False) and ls.running
    assert _run_to_sync(ls, unfinished=True) is WaveEnd.CONTINUE  # work somewhere
    assert _run_to_sync(ls) is WaveEnd.CONTINUE  # one rank wants to pause, not all
    assert _run_to_sync(ls) is WaveEnd.DONE
    assert (ls.running, ls.wave) == (False, 1)
    assert group.calls == [(True, False), (False, False), (False, False)]
    assert not ls.on_start_wave(0, paused=False) and not ls.running  # stale
    assert ls.wave_to_request(has_work=True) == 1


def test_pause_consensus_stops_and_stale_starts_are_ignored() -> None:
    ls = Lockstep(_Sums([(1, 3)]), dp_size=3)
    ls.start_for_pause()
    assert _run_to_sync(ls, unfinished=True, ready=True) is WaveEnd.PAUSED
    assert (ls.running, ls.wave) == (False, 1)
    assert not ls.on_start_wave(1, paused=True)  # a wave start while paused never wakes us
    assert not ls.on_start_wave(0, paused=False)
    assert ls.stale_starts == 2 and not ls.running


# ---- three real EngineLoops in threads ------------------------------------------------------
class _Stop(Exception):
    pass


class FakeGroup:
    """In-process DPGroup for threads: SUM all-reduce and barrier, and a loud failure when the
    ranks of one round issued different collectives (real gloo might pair them silently)."""

    def __init__(self, size: int, timeout_s: float) -> None:
        self.size = size
        self._barrier = threading.Barrier(size, timeout=timeout_s)
        self._kinds: list[str] = [""] * size
        self._vals: list[tuple[int, int]] = [(0, 0)] * size
        self.rounds = 0

    def view(self, rank: int) -> _RankView:
        return _RankView(self, rank)

    def _collective(self, rank: int, kind: str, vals: tuple[int, int]) -> tuple[int, int]:
        self._kinds[rank], self._vals[rank] = kind, vals
        try:
            self._barrier.wait()
            kinds, sums = set(self._kinds), (sum(v[0] for v in self._vals),
                                             sum(v[1] for v in self._vals))
            if rank == 0:
                self.rounds += 1
            self._barrier.wait()
        except threading.BrokenBarrierError as exc:
            raise DPGroupError(f"dp{rank}: {kind} timed out or was aborted") from exc
        if len(kinds) != 1:
            raise DPGroupError(f"dp{rank}: mismatched collectives {sorted(kinds)}")
        return sums

    def abort(self) -> None:
        self._barrier.abort()


class _RankView:
    """What one rank's EngineLoop sees of the FakeGroup (DPGroup's two collectives)."""

    def __init__(self, group: FakeGroup, rank: int) -> None:
        self.group, self.rank = group, rank

    def sync_state(self, has_unfinished: bool, pending_pause: bool) -> tuple[int, int]:
        return self.group._collective(self.rank, "sync", (int(has_unfinished),
                                                           int(pending_pause)))

    def barrier(self, timeout_s: float | None = None) -> float:
        self.group._collective(self.rank, "barrier", (0, 0))
        return 0.0


class FakeEngine:
    """Just enough of EngineCore for EngineLoop: a request needs max_tokens real steps."""

    def __init__(self, rank: int, size: int, stop: threading.Event) -> None:
        self.cfg = SimpleNamespace(parallel=ParallelConfig(
            data_parallel_size=size, data_parallel_rank=rank, data_parallel_lockstep=True))
        self.stop = stop
        self.device = "cpu"
        self.left: dict[str, int] = {}
        self.held: list[tuple[str, int]] = []
        self.done: list[EngineCoreOutput] = []
        self.num_requests_total = 0
        self.expert_joins = 0
        """Steps without tokens here that joined the MoE exchange (EngineCore._join_experts)."""

    def set_wakeup(self, wake: object) -> None:
        pass  # nothing here rings: lockstep waves come on the input socket

    def _check(self) -> None:
        if self.stop.is_set():
            raise _Stop

    def add_request(self, msg: EngineCoreRequest, hold: bool = False) -> None:
        item = (msg.request_id, msg.sampling_params.max_tokens)
        if hold:
            self.held.append(item)
        else:
            self.left[item[0]] = item[1]
        self.num_requests_total += 1

    def abort(self, ids: list[str]) -> None:
        for rid in ids:
            self.left.pop(rid, None)

    def abort_all(self, error: str) -> int:
        n = len(self.left)
        self.done += [EngineCoreOutput(rid, [], "error", error=error) for rid in self.left]
        self.left.clear()
        return n

    def release_held(self) -> int:
        self.left.update(self.held)
        n, self.held = len(self.held), []
        return n

    @property
    def num_held(self) -> int:
        return len(self.held)

    def has_inflight(self) -> bool:
        return bool(self.left)

    has_work = has_runnable_work = has_inflight

    def connector_busy(self) -> bool:
        return False

    def connector_needs_polling(self) -> bool:
        return False

    def step(self) -> list[EngineCoreOutput]:
        self._check()
        out = []
        for rid in list(self.left):
            self.left[rid] -= 1
            finished = self.left[rid] == 0
            out.append(EngineCoreOutput(rid, [1], "length" if finished else None))
            if finished:
                del self.left[rid]
        return out + self.connector_step()

    def connector_step(self, join_experts: bool = False) -> list[EngineCoreOutput]:
        self._check()
        self.expert_joins += join_experts
        out, self.done = self.done, []
        return out

    tp_failure: str | None = None
    ep = EPContext()

    def take_kv_events(self) -> None:
        return None

    def stats(self) -> EngineStats:
        return EngineStats(num_running=len(self.left), num_waiting=len(self.held),
                           kv_blocks_total=1, kv_blocks_free=1, kv_blocks_held=0)


class Frontend:
    """One thread plays EngineClient: broadcasts in one order, starts waves on request."""

    def __init__(self, ctx: zmq.Context, size: int) -> None:
        self.out = ctx.socket(zmq.PULL)
        self.out.bind("inproc://out")
        self.ins = []
        for r in range(size):
            s = ctx.socket(zmq.PUSH)
            s.setsockopt(zmq.SNDTIMEO, 10_000)  # a rank thread that died fails the test
            s.bind(f"inproc://in{r}")
            self.ins.append(s)
        self.size, self.started, self.seq, self.call_id = size, -1, 0, 0
        self.tokens: dict[str, int] = {}
        self.finished: dict[str, EngineCoreOutput] = {}
        self.reports: dict[int, set[int]] = {}
        self.results: dict[int, Any] = {}

    def pump_for(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if self.out.poll(max(1, int(left * 1000))):
                self._handle(outbound_decoder.decode(self.out.recv()))

    def broadcast(self, msg: Any) -> None:
        for s in self.ins:
            s.send(encoder.encode(msg))

    def request(self, rank: int, rid: str, steps: int) -> None:
        self.tokens[rid] = 0
        self.ins[rank].send(encoder.encode(EngineCoreRequest(
            request_id=rid, prompt_token_ids=[1], sampling_params=SamplingParams(
                max_tokens=steps))))

    def pump(self, until: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not until():
            assert time.monotonic() < deadline, f"deadlock? no {what} in {timeout_s} s"
            if self.out.poll(20):
                self._handle(outbound_decoder.decode(self.out.recv()))

    def _handle(self, msg: Any) -> None:
        if isinstance(msg, EngineCoreOutputs):
            for o in msg.outputs:
                self.tokens[o.request_id] = self.tokens.get(o.request_id, 0) + len(
                    o.new_token_ids)
                if o.finish_reason:
                    self.finished[o.request_id] = o
        elif isinstance(msg, EngineCoreNeedWave) and msg.wave > self.started:
            self.started = msg.wave
            self.broadcast(EngineCoreStartWave(wave=msg.wave))
        elif isinstance(msg, EngineCorePauseStatus):
            self.reports.setdefault(msg.seq, set()).add(msg.dp_rank)
        elif isinstance(msg, EngineCoreUtilityResult):
            assert msg.error is None, msg.error
            self.results[msg.call_id] = msg.result

    def command(self, msg_for_seq: Callable[[int], Any], what: str) -> None:
        self.seq += 1
        self.broadcast(msg_for_seq(self.seq))
        self.pump(lambda: len(self.reports.get(self.seq, ())) == self.size, what)

    def barrier(self) -> None:
        ids = list(range(self.call_id + 1, self.call_id + 1 + self.size))
        self.call_id = ids[-1]
        for call_id, s in zip(ids, self.ins):
            s.send(encoder.encode(EngineCoreCollectiveRpc(call_id=call_id, method="barrier")))
        self.pump(lambda: all(i in self.results for i in ids), "barrier")


def _rank_thread(ctx: zmq.Context, engine: FakeEngine, group: Any,
                 errors: list[BaseException]) -> threading.Thread:
    def run() -> None:
        rank = engine.cfg.parallel.data_parallel_rank
        in_sock, out_sock = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
        in_sock.connect(f"inproc://in{rank}")
        out_sock.connect("inproc://out")
        try:
            EngineLoop(engine, in_sock, out_sock, group).run(os.getppid())
        except _Stop:
            pass
        except BaseException as exc:  # reported by the test (teardown aborts the group)
            if not engine.stop.is_set():
                errors.append(exc)
        finally:
            in_sock.close(0)
            out_sock.close(0)

    return threading.Thread(target=run, daemon=True)


def _round(fe: Frontend, rng: random.Random, i: int) -> None:
    """pause (random mode), barrier, a new request, barrier, resume: everything finishes."""
    inflight = [f"r{i}-{k}" for k in range(rng.randint(0, 4))]
    for rid in inflight:
        fe.request(rng.randrange(fe.size), rid, rng.randint(1, 300))
    if rng.random() < 0.2:
        fe.barrier()  # while stepping: every rank defers it to the same wave end
    fe.pump_for(rng.uniform(0, 0.01))
    mode = rng.choice(list(PauseMode))
    fe.command(lambda s: EngineCorePause(seq=s, mode=mode), f"pause {mode.value}")
    if mode is not PauseMode.KEEP:  # abort ended them, wait let them finish: before PAUSED
        assert all(r in fe.finished for r in inflight)
    if mode is PauseMode.WAIT:
        assert all(fe.finished[r].finish_reason == "length" for r in inflight)
    frozen = dict(fe.tokens)
    fe.barrier()
    fe.request(rng.randrange(fe.size), f"new{i}", rng.randint(1, 50))
    if rng.random() < 0.5:  # wave starts while paused: an old one, or the next one (as a
        # frontend that starts waves eagerly on a new request would send): both ignored
        fe.broadcast(EngineCoreStartWave(wave=fe.started + rng.randint(0, 1)))
    fe.barrier()
    assert f"new{i}" not in fe.finished, "a request ran while paused"
    assert {k: v for k, v in fe.tokens.items() if k in frozen} == frozen, "stepped while paused"
    fe.command(lambda s: EngineCoreResume(seq=s), "resume")
    fe.pump(lambda: all(r in fe.finished for r in [*inflight, f"new{i}"]), "completion")
    for rid in inflight:
        reason, err = fe.finished[rid].finish_reason, fe.finished[rid].error
        assert reason == "length" or (mode is PauseMode.ABORT and err == PAUSE_ABORT_ERROR)


@pytest.mark.parametrize("size", [2, 3])
def test_randomized_pause_barrier_request_barrier_never_mismatches(size: int) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    ctx, stop = zmq.Context(), threading.Event()
    errors: list[BaseException] = []
    group = FakeGroup(size, timeout_s=10.0)
    fe = Frontend(ctx, size)
    engines = [FakeEngine(r, size, stop) for r in range(size)]
    threads = [_rank_thread(ctx, e, group.view(r), errors) for r, e in enumerate(engines)]
    for t in threads:
        t.start()
    try:
        for i in range(150):
            _round(fe, rng, i)
            assert not errors, f"seed {seed}: {errors}"
    finally:
        stop.set()
        group.abort()
        for t in threads:
            t.join(10)
        for s in [fe.out, *fe.ins]:
            s.close(0)
        ctx.term()
    assert not any(t.is_alive() for t in threads)
    assert not errors, f"seed {seed}: {errors}"
    assert group.rounds > 150  # the all-reduce and barriers really ran
    assert sum(e.num_requests_total for e in engines) == len(fe.tokens)
    assert all(e.num_requests_total > 0 for e in engines)
    # a rank without tokens in a running wave still joined the (expert-parallel) MoE exchange
    assert all(e.expert_joins > 0 for e in engines), [e.expert_joins for e in engines]
