"""Frontend side of the engine cores: start them, apply their ready handshakes, route traffic.

    EngineClient.start():  spawn N engine cores -> wait (deadline) for N ready messages
                           -> apply: max_model_len = min(frontend, each engine),
                                     num_gpu_blocks = sum, block_size = engines' (must agree)
    add_request() -> RequestHandle whose queue receives EngineCoreOutput items; the rank is
                     the least loaded by open requests and tokens (disagg/dp/balance.py)
    pause()/resume()/collective_rpc(): sent to every rank under one lock (_broadcast), so all
                     ranks read them, and lockstep start-wave messages, in the same order
    a dead engine core fails every open request and sets ``dead`` (the server then exits):
                     its process sentinel wakes _monitor at once; every send races the death,
                     since a PUSH socket whose engine is gone blocks its sender forever.
    prefix-cache events of every rank go to ``kv_view`` (disagg/server/kv_events.py), which
                     the registrar publishes to the proxy for KV-aware routing.
    a stalled engine core (frozen: alive, but no heartbeat or output past the stall deadline)
                     fails its open requests, and new ones, with EngineStalledError (503); the
                     watchdog aborts them in the engine, read once it runs again (their blocks
                     are freed), and the first message heard from it makes it usable again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import tempfile
import time
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from disagg.common import envs
from disagg.common.config import ConfigError, EngineConfig
from disagg.common.kv_transfer_params import KVTransferParams
from disagg.common.pause import FrontendPause, PauseMode
from disagg.common.protocol import (
    EngineCoreAbort,
    EngineCoreCollectiveRpc,
    EngineCoreHeartbeat,
    EngineCoreNeedWave,
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCorePause,
    EngineCorePauseStatus,
    EngineCoreReadyResponse,
    EngineCoreRequest,
    EngineCoreResume,
    EngineCoreStartupError,
    EngineCoreStartWave,
    EngineCoreUtility,
    EngineCoreUtilityResult,
    EngineStats,
    encoder,
    outbound_decoder,
)
from disagg.common.sampling_params import SamplingParams
from disagg.dp.balance import RankLoad, pick_rank, rank_loads
from disagg.dp.devices import child_env, rank_device_env
from disagg.server.engine_health import (
    DEFAULT_STALL_TIMEOUT_S,
    EngineDeadError,
    EngineStalledError,
    EngineStartupError,
    EngineUnavailableError,
    StallWatch,
    stall_timeout_s,
)
from disagg.server.kv_events import InstanceKVView

logger = logging.getLogger(__name__)
MONITOR_POLL_S = 0.25
"""Backstop poll of the engine processes; a sentinel normally reports an exit at once (it stays
unreadable only while a grandchild still holds the engine's end of the pipe)."""
EXIT_CODE_WAIT_S = 0.5
"""How long to wait for the exit code of a process whose sentinel fired (it is reaped a moment
after its descriptors close)."""
STALL_POLL_S = 0.25
"""How often the watchdog looks for silent ranks; also how long one abort send toward a stalled
rank may wait (a frozen engine does not drain its input), before it is tried again."""
LATE_TICK_S = 1.0
"""A watchdog tick this late means this process did not run either, so heartbeats may still
wait unread: that tick judges no rank."""
STALLED_LOAD = 1 << 62
"""Load given a stalled rank when balancing, so it gets a request only when every rank is."""


@dataclass(frozen=True, slots=True)
class SyncedConfig:
    """The values every frontend check and report uses, after the ready handshake."""

    max_model_len: int
    num_gpu_blocks: int
    block_size: int
    dtype: str
    ready: tuple[EngineCoreReadyResponse, ...]


def apply_ready_responses(frontend_max_model_len: int | None,
                          responses: list[EngineCoreReadyResponse]) -> SyncedConfig:
    """Combine every rank's handshake (min length, summed blocks, agreeing block size)."""
    if not responses:
        raise EngineStartupError("no engine core reported ready")
    sizes = {r.block_size for r in responses}
    if len(sizes) != 1:
        raise EngineStartupError(f"engine cores disagree on block_size: {sorted(sizes)}")
    lens = [r.max_model_len for r in responses]
    if frontend_max_model_len is not None and frontend_max_model_len > 0:
        lens.append(frontend_max_model_len)
    ordered = tuple(sorted(responses, key=lambda r: r.dp_rank))
    return SyncedConfig(min(lens), sum(r.num_gpu_blocks for r in responses), sizes.pop(),
                        responses[0].dtype, ordered)


@dataclass(slots=True)
class RequestHandle:
    """An in-flight request seen from the frontend."""

    request_id: str
    dp_rank: int
    num_prompt_tokens: int
    max_tokens: int = 0
    num_output_tokens: int = 0
    queue: asyncio.Queue[EngineCoreOutput | Exception] = field(default_factory=asyncio.Queue)


class EngineClient:
    """Async client over one or more engine-core processes."""

    def __init__(self, cfg: EngineConfig, ready_timeout_s: float) -> None:
        self.cfg = cfg
        self.ready_timeout_s = ready_timeout_s
        self.dp_size = cfg.parallel.data_parallel_size
        self._ctx = zmq.asyncio.Context()
        self._dir = tempfile.mkdtemp(prefix="disagg-")
        self._procs: list[Any] = []
        self._inputs: list[zmq.asyncio.Socket] = []
        self._output: zmq.asyncio.Socket | None = None
        self.synced: SyncedConfig | None = None
        self.handles: dict[str, RequestHandle] = {}
        self.stats: dict[int, EngineStats] = {}
        self.kv_view = InstanceKVView(self.dp_size)
        """Which block hashes the ranks' prefix caches hold (fed by every output message)."""
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self._call_ids = itertools.count(1)
        self._tasks: list[asyncio.Task[None]] = []
        self.dead: str | None = None
        self.dead_event = asyncio.Event()
        self.pause_state = FrontendPause(self.dp_size)
        self._bcast_lock = asyncio.Lock()
        self._wave_started = -1
        self._next_rank = 0
        self.stall_timeout_s = DEFAULT_STALL_TIMEOUT_S
        self._watch = StallWatch(self.dp_size, self.stall_timeout_s, time.monotonic())
        self._stall_aborts: dict[int, list[str]] = {rank: [] for rank in range(self.dp_size)}
        """Ids failed as stalled whose abort has not reached the rank's input socket yet."""

    # ---- start-up -------------------------------------------------------------------------
    async def start(self) -> SyncedConfig:
        """Spawn engine cores and wait for every ready handshake (bounded)."""
        try:
            self.stall_timeout_s = stall_timeout_s(self.cfg)
        except (ConfigError, ValueError) as exc:
            raise EngineStartupError(str(exc)) from exc
        out_addr = f"ipc://{self._dir}/out"
        self._output = self._ctx.socket(zmq.PULL)
        self._output.bind(out_addr)
        mp = multiprocessing.get_context("spawn")
        base = _dp_config(self.cfg)
        from disagg.dp.engine_process import run_engine_core

        for rank in range(self.dp_size):
            in_addr = f"ipc://{self._dir}/in{rank}"
            sock = self._ctx.socket(zmq.PUSH)
            sock.bind(in_addr)
            self._inputs.append(sock)
            rank_cfg = dataclasses.replace(base, parallel=dataclasses.replace(
                base.parallel, data_parallel_rank=rank))
            try:
                env = rank_device_env(rank, self.dp_size, self.cfg.model.device,
                                      self.cfg.parallel.tensor_parallel_size)
            except ConfigError as exc:
                raise EngineStartupError(str(exc)) from exc
            proc = mp.Process(target=run_engine_core, name=f"disagg-engine-dp{rank}",
                              args=(msgspec.msgpack.encode(rank_cfg), in_addr, out_addr),
                              daemon=True)
            with child_env(env):
                proc.start()
            self._procs.append(proc)
        responses = await self._wait_ready()
        self.synced = apply_ready_responses(self.cfg.model.max_model_len, responses)
        # silence counts from here: loading a model is not a stall
        self._watch = StallWatch(self.dp_size, self.stall_timeout_s, time.monotonic())
        self._tasks = [asyncio.create_task(self._output_loop(), name="output loop"),
                       asyncio.create_task(self._monitor(), name="engine monitor"),
                       asyncio.create_task(self._watchdog(), name="stall watchdog")]
        for task in self._tasks:
            task.add_done_callback(self._on_task_done)
        return self.synced

    async def _wait_ready(self) -> list[EngineCoreReadyResponse]:
        assert self._output is not None
        deadline = time.monotonic() + self.ready_timeout_s
        ready: dict[int, EngineCoreReadyResponse] = {}
        while len(ready) < self.dp_size:
            left = deadline - time.monotonic()
            if left <= 0:
                raise EngineStartupError(
                    f"engine core not ready after {self.ready_timeout_s:.0f} s "
                    f"({len(ready)}/{self.dp_size} ranks ready); raise "
                    "DISAGG_ENGINE_READY_TIMEOUT_S if model loading is slow")
            if await self._output.poll(int(min(left, 0.5) * 1000)):
                msg = outbound_decoder.decode(await self._output.recv())
                if isinstance(msg, EngineCoreStartupError):
                    raise EngineStartupError(msg.message)
                if isinstance(msg, EngineCoreReadyResponse):
                    ready[msg.dp_rank] = msg
                continue
            for rank, proc in enumerate(self._procs):
                if not proc.is_alive() and rank not in ready:
                    raise EngineStartupError(
                        f"engine core dp{rank} exited with code {proc.exitcode} during start-up")
        return list(ready.values())

    # ---- traffic --------------------------------------------------------------------------
    def _pick_rank(self) -> int:
        if self.dp_size == 1:
            return 0
        loads = rank_loads(self.dp_size, (
            (h.dp_rank, h.num_prompt_tokens + h.max_tokens - h.num_output_tokens)
            for h in self.handles.values()))
        for r in range(self.dp_size):
            if self._watch.stalled(r):  # its handles were failed: it would look idle
                loads[r] = RankLoad(num_requests=STALLED_LOAD)
        rank = pick_rank(loads, self.cfg.scheduler.max_num_batched_tokens, self._next_rank)
        self._next_rank = (rank + 1) % self.dp_size
        return rank

    async def add_request(self, request_id: str, prompt_token_ids: list[int],
                          params: SamplingParams,
                          kv_transfer_params: KVTransferParams | None = None,
                          cache_salt: str | None = None) -> RequestHandle:
        """Send a request to the least-loaded rank; outputs arrive on handle.queue."""
        self._check_alive()  # no handle is ever created after the death
        rank = self._pick_rank()
        if self._watch.stalled(rank):  # known stalled: fail at once
            raise self._watch.error(rank, time.monotonic())
        handle = RequestHandle(request_id, rank, len(prompt_token_ids), params.max_tokens)
        self.handles[request_id] = handle
        try:
            await self._send(self._inputs[rank], encoder.encode(EngineCoreRequest(
                request_id=request_id, prompt_token_ids=prompt_token_ids,
                sampling_params=params, kv_transfer_params=kv_transfer_params,
                cache_salt=cache_salt)), rank)
            # a death noticed during the send already failed the handle's queue, but the caller
            # gets a clear error rather than a handle that only ever yields one
            self._check_alive()
        except BaseException:
            self.handles.pop(request_id, None)
            raise
        return handle

    async def abort(self, request_id: str) -> None:
        """Abort a request (no-op if it already finished)."""
        handle = self.handles.pop(request_id, None)
        if handle is None or self.dead:
            return
        try:
            await self._send(self._inputs[handle.dp_rank],
                             encoder.encode(EngineCoreAbort([request_id])), handle.dp_rank)
        except EngineStalledError:  # the watchdog sends it once the rank's input moves again
            self._stall_aborts[handle.dp_rank].append(request_id)
        except EngineDeadError:  # a dead engine has nothing to abort
            pass

    async def utility(self, method: str, args: dict[str, Any] | None = None,
                      timeout_s: float = 10.0) -> list[Any]:
        """Call a utility on every rank; results in rank order. EngineUnavailableError when
        the engine is dead or stalled, or a rank does not answer within ``timeout_s``."""
        why = self.unavailable()
        if why:
            raise EngineUnavailableError(why)
        call_ids = [next(self._call_ids) for _ in self._inputs]
        futures = self._open_calls(call_ids)
        try:
            for rank, (sock, call_id) in enumerate(zip(self._inputs, call_ids, strict=True)):
                await self._send(sock, encoder.encode(EngineCoreUtility(
                    call_id=call_id, method=method, args=args or {})), rank)
            return await self._answers(futures, timeout_s)
        except asyncio.TimeoutError:
            raise EngineUnavailableError(f"the engine core did not answer {method!r} within "
                                         f"{timeout_s:g} s") from None
        finally:
            self._close_calls(call_ids, futures)

    def _open_calls(self, call_ids: list[int]) -> list[asyncio.Future[Any]]:
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Any]] = [loop.create_future() for _ in call_ids]
        self._calls.update(zip(call_ids, futures, strict=True))
        return futures

    def _close_calls(self, call_ids: list[int], futures: list[asyncio.Future[Any]]) -> None:
        """Forget a call's ids (an answer after it ended is dropped) and read every failure
        it got, so none is reported as never retrieved."""
        for call_id in call_ids:
            self._calls.pop(call_id, None)
        for fut in futures:
            if not fut.done():
                fut.cancel()
            elif not fut.cancelled():
                fut.exception()

    @staticmethod
    async def _answers(futures: list[asyncio.Future[Any]], timeout_s: float) -> list[Any]:
        """Every rank's answer in rank order; asyncio.TimeoutError past the deadline, a rank's
        error as raised. (Not asyncio.gather: a gather timed out or cancelled on 3.11 holds an
        exception nobody reads, logged as "_GatheringFuture exception was never retrieved".)"""
        _, pending = await asyncio.wait(futures, timeout=timeout_s)
        if pending:
            raise asyncio.TimeoutError
        return [fut.result() for fut in futures]

    async def _broadcast(self, msg: Any) -> None:
        """Send to every rank, in rank order, with no other broadcast in between; shielded, so
        a cancelled caller (an HTTP client gone) never leaves some ranks without it."""
        await self._send_all([encoder.encode(msg)] * len(self._inputs))

    async def _send_all(self, frames: list[bytes]) -> None:
        async def send() -> None:
            async with self._bcast_lock:
                for sock, frame in zip(self._inputs, frames):
                    await self._send(sock, frame)

        await asyncio.shield(asyncio.ensure_future(send()))

    async def pause(self, mode: PauseMode, timeout_s: float) -> bool:
        """Pause every rank; True once all are paused, False if the deadline passed first
        (the instance stays PAUSING). Raises PauseConflict while paused or pausing, or when
        a resume cancels it before every rank paused."""
        self._check_alive()
        self._check_none_stalled("a pause")
        seq = self.pause_state.begin_pause(mode)
        await self._broadcast(EngineCorePause(seq=seq, mode=mode))
        return await self._until_acked(seq, timeout_s)

    async def resume(self, timeout_s: float) -> bool:
        """Resume every rank (held requests run); True once all confirmed within the deadline.
        Raises PauseConflict when not paused, or when a pause comes before every rank
        confirmed."""
        self._check_alive()
        seq = self.pause_state.begin_resume()
        await self._broadcast(EngineCoreResume(seq=seq))
        return await self._until_acked(seq, timeout_s)

    async def _until_acked(self, seq: int, timeout_s: float) -> bool:
        """Whether every rank confirmed command ``seq`` in time; PauseConflict if a later
        command superseded it, EngineDeadError if the engine died meanwhile."""
        acked = asyncio.ensure_future(self.pause_state.wait(seq, timeout_s))
        dead = asyncio.ensure_future(self.dead_event.wait())
        try:
            await asyncio.wait({acked, dead}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            dead.cancel()
            if not acked.done():
                acked.cancel()
        if self.dead:
            raise EngineDeadError(self.dead)
        return bool(acked.result())

    async def collective_rpc(self, method: str, args: dict[str, Any],
                             timeout_s: float) -> list[Any]:
        """Run a whitelisted method on every rank (disagg/dp/rpc.py); results in rank order.
        Raises asyncio.TimeoutError past the deadline, RuntimeError with a rank's error."""
        self._check_alive()
        self._check_none_stalled(f"collective_rpc {method!r}")
        call_ids = [next(self._call_ids) for _ in self._inputs]
        futures = self._open_calls(call_ids)
        try:
            await self._send_all([encoder.encode(EngineCoreCollectiveRpc(
                call_id=call_id, method=method, args=args)) for call_id in call_ids])
            return await self._answers(futures, timeout_s)
        finally:
            self._close_calls(call_ids, futures)

    def _check_alive(self) -> None:
        if self.dead:
            raise EngineDeadError(self.dead)

    def _check_none_stalled(self, what: str) -> None:
        """EngineStalledError (503) when a rank is known stalled: a command every rank must
        confirm could only time out, and a barrier would hold the others until its timeout
        (and end them: a timed-out collective leaves the group unusable)."""
        now = time.monotonic()
        for rank in range(self.dp_size):
            if self._watch.stalled(rank):
                raise EngineStalledError(f"{what} needs every rank: "
                                         f"{self._watch.error(rank, now)}")

    async def _send(self, sock: zmq.asyncio.Socket, frame: bytes,
                    rank: int | None = None) -> None:
        """Send one frame, or raise EngineDeadError once an engine core is known dead (a PUSH
        socket whose peer is gone has no pipe to queue on, so its send never completes), or
        EngineStalledError once ``rank`` is known stalled (a frozen engine may fill the pipe)."""
        events = () if rank is None else (self._watch.events[rank],)
        if not await self._send_unless(sock, frame, events) and rank is not None:
            raise self._watch.error(rank, time.monotonic())

    async def _send_unless(self, sock: zmq.asyncio.Socket, frame: bytes,
                           events: tuple[asyncio.Event, ...],
                           timeout_s: float | None = None) -> bool:
        """Send one frame; False (the frame dropped) if one of ``events`` is set or timeout_s
        passes first; EngineDeadError once an engine core is known dead. No asyncio.wait_for:
        on 3.11 it can swallow a cancellation that arrives as the send completes."""
        self._check_alive()
        sent = asyncio.ensure_future(sock.send(frame))  # pyzmq's future, as it is
        if not sent.done():  # the usual case completes at once (pyzmq tries DONTWAIT first)
            waits = [asyncio.ensure_future(ev.wait()) for ev in (self.dead_event, *events)]
            try:
                await asyncio.wait({sent, *waits}, timeout=timeout_s,
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                for wait in waits:
                    wait.cancel()
                if not sent.done():
                    sent.cancel()  # pyzmq drops a cancelled send from its queue
            self._check_alive()
            if sent.cancelled():
                return False
        await sent
        return True

    async def _on_control(self, msg: Any) -> None:
        """Pause reports and lockstep wave requests from the ranks."""
        if isinstance(msg, EngineCorePauseStatus):
            self.pause_state.on_report(msg.dp_rank, msg.seq, msg.state)
        elif isinstance(msg, EngineCoreNeedWave) and msg.wave > self._wave_started:
            self._wave_started = msg.wave  # one start per wave, however many ranks ask
            await self._broadcast(EngineCoreStartWave(wave=msg.wave))

    async def _output_loop(self) -> None:
        assert self._output is not None
        while True:
            msg = outbound_decoder.decode(await self._output.recv())
            self._heard(msg)
            if isinstance(msg, EngineCoreHeartbeat):
                continue  # being heard was its whole job
            if isinstance(msg, EngineCoreOutputs):
                if msg.stats is not None:
                    self.stats[msg.dp_rank] = msg.stats
                if msg.kv_events is not None:
                    self.kv_view.apply(msg.dp_rank, msg.kv_events)
                for out in msg.outputs:
                    handle = self.handles.get(out.request_id)
                    if handle is not None:
                        handle.num_output_tokens += len(out.new_token_ids)
                        if out.finish_reason is not None:
                            self.handles.pop(out.request_id, None)
                        handle.queue.put_nowait(out)
            elif isinstance(msg, EngineCoreUtilityResult):
                fut = self._calls.pop(msg.call_id, None)
                if fut is not None and not fut.done():
                    if msg.error:
                        fut.set_exception(RuntimeError(msg.error))
                    else:
                        fut.set_result(msg.result)
            else:
                await self._on_control(msg)

    def _heard(self, msg: Any) -> None:
        """Note that the message's rank runs (a utility result names no rank; heartbeats and
        output batches do)."""
        rank = getattr(msg, "dp_rank", None)
        if not isinstance(rank, int):
            return
        silent = self._watch.heard(rank, time.monotonic())
        if silent is not None:
            logger.warning("engine core dp%d responds again after %.1f s of silence; it takes "
                           "new requests again", rank, silent)

    async def _watchdog(self) -> None:
        """Every tick: mark ranks silent past the stall deadline, fail their open requests, and
        send the aborts of failed requests (each send bounded by one tick)."""
        last_tick = time.monotonic()
        while not self.dead:
            await asyncio.sleep(STALL_POLL_S)
            now = time.monotonic()
            late, last_tick = now - last_tick > STALL_POLL_S + LATE_TICK_S, now
            if not late:
                for rank in range(self.dp_size):
                    if self._watch.overdue(rank, now):
                        self._fail_stalled(rank, now)
            await self._send_stall_aborts()

    def unavailable(self) -> str | None:
        """Why no request can be served now: the engine died, or every rank is stalled (a
        frozen engine: alive, silent past the stall deadline); None while one can."""
        if self.dead:
            return self.dead
        if all(self._watch.stalled(r) for r in range(self.dp_size)):
            return self._watch.error(0, time.monotonic()).args[0]
        return None

    def _fail_stalled(self, rank: int, now: float) -> None:
        """Mark ``rank`` stalled (not dead: it may resume) and fail its open requests."""
        failed = [h for h in self.handles.values() if h.dp_rank == rank]
        err = self._watch.error(rank, now)
        if not self._watch.stalled(rank):
            logger.error("%s; failing its %d open requests, and new ones until it responds",
                         err, len(failed))
            self._watch.events[rank].set()
        for handle in failed:
            del self.handles[handle.request_id]
            handle.queue.put_nowait(err)
            self._stall_aborts[rank].append(handle.request_id)

    async def _send_stall_aborts(self) -> None:
        """Abort failed requests in their engines, which read them when they run again (their
        blocks are then freed); a send that does not complete in a tick is tried again."""
        for rank, ids in self._stall_aborts.items():
            if not ids or self.dead:
                continue
            batch = list(ids)
            frame = encoder.encode(EngineCoreAbort(batch))
            with contextlib.suppress(EngineDeadError):  # a dead engine has nothing to abort
                if await self._send_unless(self._inputs[rank], frame, (), STALL_POLL_S):
                    del ids[:len(batch)]

    async def _monitor(self) -> None:
        """Mark the client dead as soon as an engine core exits (its sentinel turns readable),
        polling as a backstop."""
        exited = asyncio.Event()
        watched = self._watch_sentinels(exited)
        try:
            while not self.dead:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(exited.wait(), MONITOR_POLL_S)
                exited.clear()
                await self._check_exits()
        finally:
            loop = asyncio.get_running_loop()
            for fd in watched:
                loop.remove_reader(fd)

    def _watch_sentinels(self, exited: asyncio.Event) -> list[int]:
        """Set ``exited`` when any engine process ends; each reader fires once (a readable
        sentinel stays readable, and a level-triggered reader left on would spin the loop)."""
        loop = asyncio.get_running_loop()

        def on_readable(fd: int) -> None:
            loop.remove_reader(fd)
            exited.set()

        fds = [proc.sentinel for proc in self._procs]
        for fd in fds:
            loop.add_reader(fd, on_readable, fd)
        return fds

    async def _check_exits(self) -> None:
        """Mark the client dead if an engine process has exited."""
        for rank, proc in enumerate(self._procs):
            if proc.exitcode is None and not multiprocessing.connection.wait([proc.sentinel], 0):
                continue
            code = await _exit_code(proc, EXIT_CODE_WAIT_S)
            if code in (-signal.SIGTERM, -signal.SIGINT):  # a shutdown (a process group's
                # signal reaches the engine too), or an operator's stop: no crash
                self._mark_dead(f"engine core dp{rank} stopped by "
                                f"{signal.Signals(-code).name}", level=logging.WARNING)
                return
            self._mark_dead(f"engine core dp{rank} died (exit code "
                            f"{'unknown' if code is None else code})")
            return

    def _on_task_done(self, task: asyncio.Task[None]) -> None:
        """A background task that fails would leave every request waiting: treat it as a death."""
        if task.cancelled() or self.dead or task.exception() is None:
            return
        self._mark_dead(f"engine client {task.get_name()} failed: {task.exception()!r}")

    def _mark_dead(self, reason: str, level: int = logging.ERROR) -> None:
        """Fail every open request and call, refuse new ones, and wake whoever waits on it."""
        logger.log(level, "%s; failing %d open requests", reason, len(self.handles))
        self.dead = reason
        for handle in self.handles.values():
            handle.queue.put_nowait(EngineDeadError(reason))
        self.handles.clear()
        for fut in self._calls.values():
            if not fut.done():
                fut.set_exception(EngineDeadError(reason))
        self.dead_event.set()

    async def shutdown(self, timeout_s: float = 5.0) -> None:
        """Stop tasks and engine processes (terminate, then kill after the deadline)."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for proc in self._procs:
            if proc.is_alive():
                proc.terminate()
        deadline = time.monotonic() + timeout_s
        for proc in self._procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(1.0)
        for sock in [*self._inputs, *([self._output] if self._output else [])]:
            sock.close(linger=0)
        self._ctx.term()
        with contextlib.suppress(OSError):
            for name in os.listdir(self._dir):
                os.unlink(os.path.join(self._dir, name))
            os.rmdir(self._dir)


async def _exit_code(proc: BaseProcess, timeout_s: float) -> int | None:
    """The exit code of a process that is exiting, or None if it is not reaped in time."""
    deadline = time.monotonic() + timeout_s
    while proc.exitcode is None and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
    return proc.exitcode


def _free_port() -> int:
    """A TCP port on 127.0.0.1 free right now (rank 0 binds it for the gloo rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _dp_config(cfg: EngineConfig) -> EngineConfig:
    """The parallel settings every rank shares: lockstep (flag or DISAGG_DP_LOCKSTEP, only
    with 2+ ranks), the rendezvous port, the collective deadline."""
    par = cfg.parallel
    if par.data_parallel_size == 1:
        return dataclasses.replace(cfg, parallel=dataclasses.replace(
            par, data_parallel_lockstep=False))
    timeout_s = envs.dp_collective_timeout_s() or par.data_parallel_timeout_s
    return dataclasses.replace(cfg, parallel=dataclasses.replace(
        par, data_parallel_lockstep=par.data_parallel_lockstep or envs.dp_lockstep(),
        data_parallel_master_port=par.data_parallel_master_port or _free_port(),
        data_parallel_timeout_s=timeout_s))
