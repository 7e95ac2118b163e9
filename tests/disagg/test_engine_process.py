"""The engine-core loop survives every input message: a request whose admission raises fails
alone with an error output, malformed frames and failing commands are dropped, counted and
logged at most once a second per kind; an exception from a step still ends the loop. The
heartbeat thread beats through a long step and stops when told."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace

import pytest
import zmq

from disagg.common.config import ParallelConfig
from disagg.common.protocol import (
    EngineCoreAbort,
    EngineCoreHeartbeat,
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    EngineStats,
    encoder,
    outbound_decoder,
)
from disagg.common.sampling_params import SamplingParams
from disagg.dp import engine_process
from disagg.dp.engine_process import MALFORMED, EngineLoop, Heartbeat, MessageFailures
from disagg.models.expert_parallel import EPContext

POISON = [666]
"""A prompt whose admission raises (after half-adding the request, as a real bug might)."""
BAD_ABORT = "bad-abort"
"""An abort of this id raises."""


class _Stop(Exception):
    pass


class FakeEngine:
    """Just enough of EngineCore for a single-rank EngineLoop: one token per request per step."""

    def __init__(self, stop: threading.Event, step_error: Exception | None = None) -> None:
        self.cfg = SimpleNamespace(parallel=ParallelConfig())
        self.stop, self.step_error = stop, step_error
        self.device, self.num_held = "cpu", 0
        self.left: dict[str, int] = {}
        self.aborted: list[str] = []
        self.wake: Callable[[], None] | None = None
        self.steps = 0

    def set_wakeup(self, wake: Callable[[], None]) -> None:
        self.wake = wake

    def add_request(self, msg: EngineCoreRequest, hold: bool = False) -> str | None:
        self.left[msg.request_id] = msg.sampling_params.max_tokens
        if msg.prompt_token_ids == POISON:
            raise RuntimeError("boom")
        return None

    def abort(self, ids: list[str]) -> None:
        if BAD_ABORT in ids:
            raise KeyError(BAD_ABORT)
        self.aborted += ids
        for rid in ids:
            self.left.pop(rid, None)

    def has_inflight(self) -> bool:
        return bool(self.left)

    has_work = has_runnable_work = has_inflight

    def connector_busy(self) -> bool:
        return False

    def connector_needs_polling(self) -> bool:
        return False

    def step(self) -> list[EngineCoreOutput]:
        self.steps += 1
        if self.stop.is_set():
            raise _Stop
        if self.step_error is not None and self.left:
            raise self.step_error
        out = []
        for rid in list(self.left):
            self.left[rid] -= 1
            done = self.left[rid] == 0
            out.append(EngineCoreOutput(rid, [7], "length" if done else None))
            if done:
                del self.left[rid]
        return out

    connector_step = step

    tp_failure: str | None = None
    ep = EPContext()

    def take_kv_events(self) -> None:
        return None

    def stats(self) -> EngineStats:
        return EngineStats(num_running=len(self.left), num_waiting=0, kv_blocks_total=1,
                           kv_blocks_free=1, kv_blocks_held=0)


class Harness:
    """An EngineLoop in a thread over inproc sockets, and the frontend's two sockets."""

    def __init__(self, engine: FakeEngine) -> None:
        self.engine, self.ctx = engine, zmq.Context()
        self.to_engine, self.from_engine = self.ctx.socket(zmq.PUSH), self.ctx.socket(zmq.PULL)
        self.to_engine.bind("inproc://in")
        self.from_engine.bind("inproc://out")
        self.error: BaseException | None = None
        self.loop: EngineLoop | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        in_sock, out_sock = self.ctx.socket(zmq.PULL), self.ctx.socket(zmq.PUSH)
        in_sock.connect("inproc://in")
        out_sock.connect("inproc://out")
        try:
            self.loop = EngineLoop(self.engine, in_sock, out_sock, None)
            self.loop.run(os.getppid())
        except _Stop:
            pass
        except BaseException as exc:  # the test reads it
            self.error = exc
        finally:
            in_sock.close(0)
            out_sock.close(0)

    def send(self, frame: bytes) -> None:
        self.to_engine.send(frame)

    def request(self, rid: str, prompt: list[int], max_tokens: int = 3) -> None:
        self.send(encoder.encode(EngineCoreRequest(
            request_id=rid, prompt_token_ids=prompt,
            sampling_params=SamplingParams(max_tokens=max_tokens))))

    def finished(self, rids: set[str], timeout_s: float = 5.0) -> dict[str, EngineCoreOutput]:
        """The final output of each of rids (bounded wait)."""
        got: dict[str, EngineCoreOutput] = {}
        deadline = time.monotonic() + timeout_s
        while not rids <= got.keys():
            assert time.monotonic() < deadline, f"no final output for {rids - got.keys()}"
            if self.from_engine.poll(20):
                msg = outbound_decoder.decode(self.from_engine.recv())
                if isinstance(msg, EngineCoreOutputs):
                    got.update((o.request_id, o) for o in msg.outputs if o.finish_reason)
        return got

    def close(self) -> None:
        self.engine.stop.set()
        self.thread.join(5)
        self.to_engine.close(0)
        self.from_engine.close(0)
        self.ctx.term()


@pytest.fixture
def harness() -> Iterator[Harness]:
    h = Harness(FakeEngine(threading.Event()))
    yield h
    h.close()


def test_connector_doorbell_wakes_an_idle_loop_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A peer's message lands on the connector's thread while the loop blocks on its input
    socket: the connector's ring must start a step now, not at the next idle poll (a WRITE
    prefill waiting for the decode's blocks would sit out the rest of that poll)."""
    monkeypatch.setattr(engine_process, "IDLE_POLL_MS", 60_000)
    h = Harness(FakeEngine(threading.Event()))
    try:
        deadline = time.monotonic() + 5
        while h.engine.wake is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.1)  # the loop is up, blocked in its input poll
        assert h.engine.steps == 0
        before = h.engine.steps
        h.engine.wake()
        while h.engine.steps == before:
            assert time.monotonic() < deadline, "the doorbell did not wake the loop"
            time.sleep(0.001)
        assert h.engine.steps == before + 1  # one ring, one step: the bell was cleared
        time.sleep(0.05)
        assert h.engine.steps == before + 1
    finally:
        h.engine.stop.set()
        assert h.engine.wake is not None
        h.engine.wake()
        h.close()
    assert h.error is None
    h.engine.wake()  # after the loop closed its bell: a no-op


def test_request_whose_admission_raises_fails_alone(harness: Harness) -> None:
    harness.request("bad", POISON)
    harness.request("good", [1, 2], max_tokens=3)
    out = harness.finished({"bad", "good"})
    assert out["bad"].finish_reason == "error" and out["bad"].error is not None
    assert "RuntimeError: boom" in out["bad"].error
    assert out["good"].finish_reason == "length"
    assert "bad" in harness.engine.aborted  # the half-added request was undone
    assert harness.thread.is_alive() and harness.error is None
    assert harness.loop is not None and harness.loop.failures.counts == {"EngineCoreRequest": 1}


def test_malformed_frames_and_failing_commands_are_dropped_and_logged_once(
        harness: Harness, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="disagg.dp.engine_process")
    for _ in range(5):
        harness.send(b"\xc1 not msgpack")
        harness.send(encoder.encode(EngineCoreAbort([BAD_ABORT])))
    harness.request("after", [1], max_tokens=2)
    assert harness.finished({"after"})["after"].finish_reason == "length"
    assert harness.thread.is_alive() and harness.error is None
    assert harness.loop is not None
    assert harness.loop.failures.counts == {MALFORMED: 5, "EngineCoreAbort": 5}
    lines = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert len(lines) == 2, lines  # one per kind: the other four fell within the second


def test_failures_log_at_most_once_per_interval_per_kind(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="disagg.dp.engine_process")
    now = [100.0]
    failures = MessageFailures(rank=0, interval_s=1.0, clock=lambda: now[0])
    for t in (100.0, 100.4, 100.9, 101.2, 101.3):
        now[0] = t
        failures.record("EngineCoreAbort", KeyError("x"))
    failures.record("EngineCorePause", ValueError("y"))
    lines = [r.getMessage() for r in caplog.records]
    assert failures.counts == {"EngineCoreAbort": 5, "EngineCorePause": 1}
    assert len(lines) == 3, lines
    assert "dropped 1 EngineCoreAbort message(s) (1 in all)" in lines[0]
    assert "dropped 3 EngineCoreAbort message(s) (4 in all)" in lines[1]  # 100.4-101.2
    assert "EngineCorePause" in lines[2]
    assert caplog.records[0].exc_info is not None and caplog.records[1].exc_info is None


def test_an_exception_from_a_step_still_ends_the_loop() -> None:
    h = Harness(FakeEngine(threading.Event(), step_error=RuntimeError("kernel fault")))
    try:
        h.request("r", [1])
        h.thread.join(5)
        assert not h.thread.is_alive()
        assert isinstance(h.error, RuntimeError) and "kernel fault" in str(h.error)
    finally:
        h.close()


def test_heartbeat_thread_beats_through_a_long_step_and_stops() -> None:
    ctx = zmq.Context()
    beats = ctx.socket(zmq.PULL)
    beats.bind("inproc://beats")
    heartbeat = Heartbeat(ctx, "inproc://beats", interval_s=0.05)
    try:
        heartbeat.start(3)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 0.5:  # a long step holding the GIL between switches
            sum(range(1000))
        got = []
        while beats.poll(0):
            got.append(outbound_decoder.decode(beats.recv()))
        assert len(got) >= 4, got  # ~10 due; the thread ran while the main thread was busy
        assert all(b == EngineCoreHeartbeat(dp_rank=3) for b in got)
        assert heartbeat.stop(timeout_s=2.0)
        while beats.poll(100):  # what was sent before the stop
            beats.recv()
        assert not beats.poll(200)  # and nothing after it
    finally:
        heartbeat.stop(timeout_s=2.0)
        beats.close(0)
        ctx.term()
