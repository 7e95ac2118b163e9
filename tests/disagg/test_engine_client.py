"""Applying ready handshakes (min max_model_len, summed blocks, agreeing block_size), and the
death path: a killed engine process fails pending and new requests at once."""

import asyncio
import multiprocessing
import time
from multiprocessing.process import BaseProcess

import pytest
import zmq

from disagg.config import EngineConfig, ModelConfig
from disagg.engine_client import (
    EngineClient,
    EngineDeadError,
    EngineStartupError,
    RequestHandle,
    apply_ready_responses,
)
from disagg.protocol import EngineCoreReadyResponse
from disagg.sampling_params import SamplingParams


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
