"""Applying ready handshakes (min max_model_len, summed blocks, agreeing block_size), the
death path (a killed engine process fails pending and new requests at once) and the stall path
(a frozen engine fails them after the stall deadline, a slow one that heartbeats does not)."""

import asyncio
import gc
import multiprocessing
import threading
import time
from multiprocessing.process import BaseProcess

import pytest
import zmq

from disagg.common.config import ConfigError, EngineConfig, KVTransferConfig, ModelConfig
from disagg.common.protocol import (
    EngineCoreAbort,
    EngineCoreHeartbeat,
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreReadyResponse,
    EngineCoreRequest,
    EngineCoreUtility,
    EngineCoreUtilityResult,
    encoder,
    inbound_decoder,
)
from disagg.common.sampling_params import SamplingParams
from disagg.server.engine_client import (
    EngineClient,
    EngineDeadError,
    EngineStalledError,
    EngineStartupError,
    EngineUnavailableError,
    RequestHandle,
    StallWatch,
    apply_ready_responses,
    stall_timeout_s,
)


def ready(rank: int, max_len: int, blocks: int, block_size: int = 16) -> EngineCoreReadyResponse:
    return EngineCoreReadyResponse(
        max_model_len=max_len, num_gpu_blocks=blocks, block_size=block_size, dtype="float32",
        version="t", dp_rank=rank, dp_size=2, max_num_seqs=8, max_num_batched_tokens=64,
        kv_role="kv_both", engine_id=f"e{rank}", device="cpu", model="m")


def test_min_length_and_summed_blocks() -> None:
    synced = apply_ready_responses(None, [ready(1, 512, 10), ready(0, 2048, 30)])
    assert synced.max_model_len == 512
    assert synced.num_gpu_blocks == 40
    assert [r.dp_rank for r in synced.ready] == [0, 1]


def test_frontend_limit_counts_in_min() -> None:
    assert apply_ready_responses(256, [ready(0, 2048, 30)]).max_model_len == 256
    assert apply_ready_responses(-1, [ready(0, 2048, 30)]).max_model_len == 2048


def test_block_size_disagreement_is_startup_error() -> None:
    with pytest.raises(EngineStartupError, match="block_size"):
        apply_ready_responses(None, [ready(0, 64, 1, 16), ready(1, 64, 1, 32)])


# ---- death path: a killed engine process fails every pending and new request at once ---------
def _client() -> EngineClient:
    return EngineClient(EngineConfig(model=ModelConfig(model="builtin:tiny-llama",
                                                       served_model_name="tiny")), 5.0)


def _sleeper() -> BaseProcess:
    """A stand-in engine process (spawned like the real ones) that lives until killed."""
    proc = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(60,),
                                                        daemon=True)
    proc.start()
    return proc


def test_killed_engine_fails_open_blocked_and_new_requests_at_once() -> None:
    async def run() -> None:
        client, proc = _client(), _sleeper()
        try:
            client._procs = [proc]
            sock = client._ctx.socket(zmq.PUSH)
            sock.bind(f"ipc://{client._dir}/in0")  # no engine ever connects: sends block
            client._inputs = [sock]
            monitor = asyncio.create_task(client._monitor())
            open_handle = RequestHandle("open", 0, 1, 8)  # sent before the death
            client.handles["open"] = open_handle
            blocked = asyncio.create_task(client.add_request("blocked", [1],
                                                             SamplingParams(max_tokens=8)))
            await asyncio.sleep(0.2)
            assert not blocked.done() and "blocked" in client.handles
            t0 = time.monotonic()
            proc.kill()  # SIGKILL
            item = await asyncio.wait_for(open_handle.queue.get(), 1.0)
            assert isinstance(item, EngineDeadError)
            assert "engine core dp0 died (exit code -9)" in str(item)
            with pytest.raises(EngineDeadError, match="died"):
                await asyncio.wait_for(blocked, 1.0)
            assert time.monotonic() - t0 < 0.5  # the sentinel, not a slow poll
            with pytest.raises(EngineDeadError):
                await client.add_request("late", [1], SamplingParams(max_tokens=8))
            await client.abort("open")  # a dead engine: a no-op, never a hang
            assert client.handles == {} and client.dead_event.is_set()
            await asyncio.wait_for(monitor, 1.0)  # the monitor ends once dead
        finally:
            await client.shutdown(timeout_s=1.0)

    asyncio.run(run())


def test_failed_output_loop_counts_as_a_death() -> None:
    async def run() -> None:
        client, proc = _client(), _sleeper()
        peer = zmq.Context()
        try:
            client._procs = [proc]
            client._output = client._ctx.socket(zmq.PULL)
            client._output.bind(f"ipc://{client._dir}/out")
            handle = RequestHandle("open", 0, 1, 8)
            client.handles["open"] = handle
            task = asyncio.create_task(client._output_loop(), name="output loop")
            task.add_done_callback(client._on_task_done)
            push = peer.socket(zmq.PUSH)
            push.connect(f"ipc://{client._dir}/out")
            push.send(b"\xc1 not msgpack")
            item = await asyncio.wait_for(handle.queue.get(), 2.0)
            assert isinstance(item, EngineDeadError) and "output loop failed" in str(item)
            assert client.dead is not None and "output loop failed" in client.dead
            push.close(linger=0)
        finally:
            peer.term()
            await client.shutdown(timeout_s=1.0)

    asyncio.run(run())


# ---- stall path: a frozen engine (alive, silent) fails its requests; a slow one does not ------
def test_stall_deadline_from_env_then_lease_timeout_then_default(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DISAGG_ENGINE_STALL_TIMEOUT_S", raising=False)
    model = ModelConfig(model="builtin:tiny-llama", served_model_name="tiny")

    def cfg(extra: dict[str, object] | None) -> EngineConfig:
        kt = None if extra is None else KVTransferConfig(kv_connector="PDConnector",
                                                         kv_connector_extra_config=extra)
        return EngineConfig(model=model, kv_transfer=kt)

    assert stall_timeout_s(cfg(None)) == 30.0
    assert stall_timeout_s(cfg({})) == 5.0  # the connector's default lease_timeout
    assert stall_timeout_s(cfg({"lease_timeout": 2})) == 2.0
    for bad in (0, -1, True, "5", float("nan"), 1e9):
        with pytest.raises(ConfigError, match="lease_timeout"):
            stall_timeout_s(cfg({"lease_timeout": bad}))
    monkeypatch.setenv("DISAGG_ENGINE_STALL_TIMEOUT_S", "1.5")
    assert stall_timeout_s(cfg({"lease_timeout": 2})) == 1.5
    for bad_env in ("0", "-2", "nan", "soon"):
        monkeypatch.setenv("DISAGG_ENGINE_STALL_TIMEOUT_S", bad_env)
        with pytest.raises(ValueError, match="DISAGG_ENGINE_STALL_TIMEOUT_S"):
            stall_timeout_s(cfg(None))


def test_stall_watch_counts_silence_from_the_last_message() -> None:
    watch = StallWatch(2, deadline_s=2.0, now=100.0)
    assert not watch.overdue(0, 101.9)  # counted from the handshake, not from process start
    assert watch.heard(0, 101.0) is None  # never marked: nothing to report
    assert not watch.overdue(0, 102.9) and watch.overdue(1, 102.1)
    assert watch.overdue(0, 103.1)
    err = watch.error(0, 103.1)
    assert isinstance(err, EngineStalledError)
    assert str(err) == ("engine core dp0 is not responding: silent for 2.1 s "
                        "(stall deadline 2 s)")
    watch.events[1].set()
    assert watch.stalled(1) and not watch.stalled(0)
    assert watch.heard(1, 110.0) == pytest.approx(10.0)  # marked: how long it was silent
    assert not watch.stalled(1) and not watch.overdue(1, 111.0)
    assert watch.heard(7, 110.0) is None  # a rank that does not exist changes nothing


class FakeEngineThread:
    """A stand-in engine core in a thread, over the client's ipc sockets: heartbeats every
    50 ms and answers each request ``answer_after_s`` later (a long step); while ``frozen`` it
    neither beats nor reads, as under SIGSTOP."""

    def __init__(self, client_dir: str, answer_after_s: float) -> None:
        self.dir, self.answer_after_s = client_dir, answer_after_s
        self.frozen, self.stop = threading.Event(), threading.Event()
        self.mute_utilities = threading.Event()
        """Beat and step, but never answer a utility call (one stuck behind a long step)."""
        self.received: list[object] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        ctx = zmq.Context()
        inp, out = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
        inp.connect(f"ipc://{self.dir}/in0")
        out.connect(f"ipc://{self.dir}/out")
        due: dict[str, float] = {}
        next_beat = 0.0
        try:
            while not self.stop.is_set():
                if self.frozen.is_set():
                    time.sleep(0.01)
                    continue
                now = time.monotonic()
                if now >= next_beat:
                    out.send(encoder.encode(EngineCoreHeartbeat(dp_rank=0)))
                    next_beat = now + 0.05
                if inp.poll(10):
                    msg = inbound_decoder.decode(inp.recv())
                    self.received.append(msg)
                    if isinstance(msg, EngineCoreRequest):
                        due[msg.request_id] = now + self.answer_after_s
                    if isinstance(msg, EngineCoreUtility) and not self.mute_utilities.is_set():
                        out.send(encoder.encode(EngineCoreUtilityResult(
                            call_id=msg.call_id, result=msg.method)))
                for rid in [r for r, t in due.items() if now >= t]:
                    del due[rid]
                    out.send(encoder.encode(EngineCoreOutputs(
                        dp_rank=0, outputs=[EngineCoreOutput(rid, [7], "length")])))
        finally:
            inp.close(0)
            out.close(0)
            ctx.term()

    def aborted(self) -> list[str]:
        return [rid for m in list(self.received) if isinstance(m, EngineCoreAbort)
                for rid in m.request_ids]

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)


async def _wired_client(deadline_s: float) -> EngineClient:
    """A client whose output loop and watchdog run, with no engine process behind it."""
    client = _client()
    client._output = client._ctx.socket(zmq.PULL)
    client._output.bind(f"ipc://{client._dir}/out")
    sock = client._ctx.socket(zmq.PUSH)
    sock.bind(f"ipc://{client._dir}/in0")
    client._inputs = [sock]
    client._watch = StallWatch(1, deadline_s, time.monotonic())
    client._tasks = [asyncio.create_task(client._output_loop(), name="output loop"),
                     asyncio.create_task(client._watchdog(), name="stall watchdog")]
    return client


def test_slow_step_that_heartbeats_is_not_a_stall() -> None:
    async def run() -> None:
        client = await _wired_client(deadline_s=0.5)
        engine = FakeEngineThread(client._dir, answer_after_s=1.5)  # 3x the deadline
        try:
            handle = await client.add_request("slow", [1], SamplingParams(max_tokens=1))
            item = await asyncio.wait_for(handle.queue.get(), 5.0)
            assert isinstance(item, EngineCoreOutput) and item.finish_reason == "length"
            assert not client._watch.stalled(0) and engine.aborted() == []
            assert client.dead is None
        finally:
            engine.close()
            await client.shutdown(timeout_s=1.0)

    asyncio.run(run())


def test_frozen_engine_fails_requests_aborts_them_and_serves_again_once_heard() -> None:
    async def run() -> None:
        client = await _wired_client(deadline_s=0.5)
        engine = FakeEngineThread(client._dir, answer_after_s=30.0)  # never answers in time
        try:
            handle = await client.add_request("open", [1], SamplingParams(max_tokens=8))
            await asyncio.sleep(0.2)
            t0 = time.monotonic()
            engine.frozen.set()
            item = await asyncio.wait_for(handle.queue.get(), 3.0)
            assert isinstance(item, EngineStalledError) and "dp0" in str(item), item
            assert time.monotonic() - t0 < 0.5 + 0.5  # the deadline and a tick or two
            assert client.handles == {} and client.dead is None
            t1 = time.monotonic()
            with pytest.raises(EngineStalledError, match="silent for"):  # known: at once
                await client.add_request("new", [1], SamplingParams(max_tokens=8))
            assert time.monotonic() - t1 < 0.1
            engine.frozen.clear()  # SIGCONT: it reads the abort and beats again
            deadline = time.monotonic() + 3.0
            while (client._watch.stalled(0) or "open" not in engine.aborted()) \
                    and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert engine.aborted() == ["open"] and not client._watch.stalled(0)
            again = await client.add_request("again", [1], SamplingParams(max_tokens=8))
            assert again.dp_rank == 0 and "again" in client.handles
        finally:
            engine.close()
            await client.shutdown(timeout_s=1.0)

    asyncio.run(run())


def test_a_utility_call_has_a_deadline_and_a_stalled_engine_refuses_it_at_once() -> None:
    """A utility (the proxy's KV abort, the ledger) is answered; one the engine does not answer
    within its deadline fails as the engine being unavailable (HTTP 503), leaving no call
    behind and no error nobody reads (asyncio logged "_GatheringFuture exception was never
    retrieved" for each); once the engine is known stalled a call fails at once."""
    async def run() -> None:
        unread: list[dict[str, object]] = []
        asyncio.get_running_loop().set_exception_handler(lambda _, ctx: unread.append(ctx))
        client = await _wired_client(deadline_s=0.5)
        engine = FakeEngineThread(client._dir, answer_after_s=1.0)
        try:
            assert await client.utility("ledger", timeout_s=5.0) == ["ledger"]
            engine.mute_utilities.set()
            t0 = time.monotonic()
            with pytest.raises(EngineUnavailableError, match="did not answer 'kv_abort' "
                                                             "within 0.3 s"):
                await client.utility("kv_abort", {"transfer_id": "t"}, timeout_s=0.3)
            assert 0.3 <= time.monotonic() - t0 < 1.0 and client._calls == {}
            call = asyncio.ensure_future(client.utility("ledger", timeout_s=5.0))
            await asyncio.sleep(0.1)
            call.cancel()  # the HTTP client went away
            with pytest.raises(asyncio.CancelledError):
                await call
            assert client._calls == {}
            engine.frozen.set()
            while not client._watch.stalled(0):
                assert time.monotonic() - t0 < 5
                await asyncio.sleep(0.02)
            t1 = time.monotonic()
            with pytest.raises(EngineUnavailableError):
                await client.utility("ledger", timeout_s=5.0)
            assert time.monotonic() - t1 < 0.1
            gc.collect()
            await asyncio.sleep(0.05)
            assert unread == []
        finally:
            engine.close()
            await client.shutdown(timeout_s=1.0)

    asyncio.run(run())


def test_a_stalled_rank_refuses_pause_and_collectives_at_once() -> None:
    """While a rank is known stalled, a pause (every rank must confirm it) and a collective
    RPC (a barrier would hold the healthy ranks, then end them) are a 503 at once, naming
    the rank; they waited out their whole deadline before."""
    from disagg.common.pause import PauseMode

    async def run() -> None:
        client = await _wired_client(deadline_s=0.3)
        engine = FakeEngineThread(client._dir, answer_after_s=1.0)
        try:
            engine.frozen.set()
            t0 = time.monotonic()
            while not client._watch.stalled(0):
                assert time.monotonic() - t0 < 5
                await asyncio.sleep(0.02)
            t1 = time.monotonic()
            with pytest.raises(EngineStalledError, match="a pause needs every rank.*dp0"):
                await client.pause(PauseMode.KEEP, 30.0)
            with pytest.raises(EngineStalledError, match="collective_rpc 'barrier'"):
                await client.collective_rpc("barrier", {"timeout_s": 30.0}, 30.0)
            assert time.monotonic() - t1 < 0.1
            assert client.pause_state.as_json()["state"] == "running"  # nothing begun
        finally:
            engine.close()
            await client.shutdown(timeout_s=1.0)

    asyncio.run(run())


def test_an_engine_stopped_by_sigterm_is_no_crash_in_the_log(
        caplog: pytest.LogCaptureFixture) -> None:
    """A SIGTERM to the process group (a launcher's or systemd's stop) reaches the engine
    core too: the frontend still fails its requests and stops, but logs a warning naming the
    signal, not an error claiming a death."""
    async def run() -> None:
        client, proc = _client(), _sleeper()
        try:
            client._procs = [proc]
            monitor = asyncio.create_task(client._monitor())
            await asyncio.sleep(0.1)
            proc.terminate()  # SIGTERM
            await asyncio.wait_for(client.dead_event.wait(), 2.0)
            assert client.dead == "engine core dp0 stopped by SIGTERM"
            await asyncio.wait_for(monitor, 1.0)
        finally:
            await client.shutdown(timeout_s=1.0)

    caplog.set_level("WARNING")
    asyncio.run(run())
    assert [r.levelname for r in caplog.records if "dp0" in r.getMessage()] == ["WARNING"]
