"""The engine-core process: a ZMQ loop around EngineCore, with pause and data parallelism.

    frontend PUSH --input--> [this process] --output--> frontend PULL
                             [heartbeat thread] --own PUSH--^  EngineCoreHeartbeat every 0.25 s
    first output message: EngineCoreReadyResponse (or EngineCoreStartupError), then batches.

Start-up: join the DP group (dp_size > 1), build the engine, then the ready handshake.
The loop blocks on input only while idle (100 ms at most, so connector deadlines are reaped
and a dead parent is noticed), and never blocks while it may step requests. A paused rank keeps
running its KV connector. In lockstep mode the stepping follows disagg/dp/lockstep.py. A
collective that fails (peer dead or hung) ends this process with EXIT_DP_GROUP_FAILED.
No input message ends it: a frame that does not decode is dropped, a message whose handling
raises is dropped (a request is answered with an error output), each counted and logged at most
once a second per kind (MessageFailures). An exception from a step still ends it (see run).
The heartbeat thread starts after the ready handshake; a long step does not stop it, a frozen
process (SIGSTOP, a host that does not run it) does, so the frontend can tell the two apart.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from typing import Any

import msgspec
import zmq

from disagg.common import envs
from disagg.common.config import ConfigError, EngineConfig
from disagg.common.logging_setup import configure_logging
from disagg.common.pause import PAUSE_ABORT_ERROR, PauseMode, RankPause, RankPauseState
from disagg.common.platform import visible_devices_env
from disagg.common.protocol import (
    EngineCoreAbort,
    EngineCoreCollectiveRpc,
    EngineCoreHeartbeat,
    EngineCoreNeedWave,
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCorePause,
    EngineCorePauseStatus,
    EngineCoreRequest,
    EngineCoreResume,
    EngineCoreStartupError,
    EngineCoreStartWave,
    EngineCoreUtility,
    EngineCoreUtilityResult,
    encoder,
    inbound_decoder,
)
from disagg.dp.devices import cpu_threads_per_rank
from disagg.dp.group import DPGroup, DPGroupError
from disagg.dp.lockstep import Lockstep, WaveEnd
from disagg.dp.rpc import (
    COLLECTIVE_METHODS,
    RPC_METHODS,
    UTILITY_METHODS,
    RpcArgError,
    RpcContext,
    run_rpc,
    validate_rpc,
)
from disagg.engine.tp import EXIT_TP_WORKER_FAILED, TPWorkerError
from disagg.models.expert_parallel import EPContext, ExpertExchangeError

logger = logging.getLogger(__name__)
IDLE_POLL_MS = 100
CONNECTOR_POLL_MS = 1
"""Poll interval while one-sided KV ops are in flight (no spinning on a paused rank)."""
CONNECTOR_WAIT_MS = 20
"""Poll interval while KV transfers only wait for peers' messages (the connector rings the
doorbell for those) or for their second-scale deadlines. A 1 ms loop here spent a core's
share on a decode waiting for a co-located prefill, whose kernel launches it slowed."""
STATS_INTERVAL_S = 0.05
EXIT_DP_GROUP_FAILED = 3
FAILURE_LOG_INTERVAL_S = 1.0
"""At most one log line per kind of failed input message in this long."""
MALFORMED = "malformed frame"
"""The kind under which frames that do not decode are counted."""
HEARTBEAT_INTERVAL_S = 0.25
"""How often the heartbeat thread says this process runs (well under any stall deadline)."""
HEARTBEAT_STOP_S = 1.0
"""How long stopping waits for the heartbeat thread (it wakes every interval)."""


class Heartbeat:
    """A daemon thread sending EngineCoreHeartbeat every interval on a PUSH socket of its own
    (zmq sockets are not thread-safe). Torch releases the GIL and Python switches threads, so a
    long model step does not stop it; SIGSTOP does."""

    def __init__(self, ctx: zmq.Context, address: str,
                 interval_s: float = HEARTBEAT_INTERVAL_S) -> None:
        self.ctx, self.address, self.interval_s = ctx, address, interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, rank: int) -> None:
        """Start beating for ``rank``; call it after the ready handshake."""
        frame = encoder.encode(EngineCoreHeartbeat(dp_rank=rank))
        self._thread = threading.Thread(target=self._run, args=(frame,),
                                        name=f"heartbeat-dp{rank}", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = HEARTBEAT_STOP_S) -> bool:
        """Stop the thread; True once it has ended and closed its socket."""
        self._stop.set()
        if self._thread is None:
            return True
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def _run(self, frame: bytes) -> None:
        sock = self.ctx.socket(zmq.PUSH)
        try:
            sock.connect(self.address)
            while True:
                # never block: a frontend that does not read has no use for a queue of beats
                with contextlib.suppress(zmq.Again):
                    sock.send(frame, zmq.NOBLOCK)
                if self._stop.wait(self.interval_s):
                    return
        except zmq.ZMQError as exc:  # the frontend then sees silence, as for a frozen process
            logger.error("heartbeat thread stopped: %s", exc)
        finally:
            sock.close(linger=0)


class MessageFailures:
    """Input messages whose handling failed, counted by kind; each kind is logged at most once
    per interval, so a client bug repeated on every request neither floods the log nor slows
    the loop. The first failure of a kind is logged with its traceback."""

    def __init__(self, rank: int, interval_s: float = FAILURE_LOG_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rank, self.interval_s, self.clock = rank, interval_s, clock
        self.counts: dict[str, int] = {}
        self._unlogged: dict[str, int] = {}
        self._logged_at: dict[str, float] = {}

    def record(self, kind: str, exc: Exception) -> None:
        """Count one failure of ``kind``; log it unless that kind was logged within the
        interval (the next line then says how many it stood for)."""
        self.counts[kind] = self.counts.get(kind, 0) + 1
        self._unlogged[kind] = self._unlogged.get(kind, 0) + 1
        now, last = self.clock(), self._logged_at.get(kind)
        if last is not None and now - last < self.interval_s:
            return
        logger.error("dp%d: dropped %d %s message(s) (%d in all); last error: %s: %s",
                     self.rank, self._unlogged[kind], kind, self.counts[kind],
                     type(exc).__name__, exc, exc_info=exc if last is None else None)
        self._logged_at[kind], self._unlogged[kind] = now, 0


class Doorbell:
    """Wakes the loop out of its input poll from another thread: a non-blocking pipe the
    poll watches beside the input socket. A full pipe is a bell already rung."""

    def __init__(self) -> None:
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        os.set_blocking(self._write_fd, False)
        self._lock = threading.Lock()
        """Orders a ring against close: a closed fd's number may be reused by then."""
        self._closed = False

    def fileno(self) -> int:
        """The end the loop polls."""
        return self._read_fd

    def ring(self) -> None:
        """Any thread, never blocks; after close() a no-op."""
        with self._lock, contextlib.suppress(BlockingIOError, OSError):
            if not self._closed:
                os.write(self._write_fd, b"\0")

    def clear(self) -> None:
        """Empty the pipe (the loop then steps, acting on whatever rang)."""
        with contextlib.suppress(BlockingIOError, OSError):
            while os.read(self._read_fd, 4096):
                pass

    def close(self) -> None:
        """Close both ends."""
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self._write_fd)
                os.close(self._read_fd)


class EngineLoop:
    """Reads inputs, applies pause / wave / RPC commands, steps, sends outputs."""

    def __init__(self, engine: Any, in_sock: zmq.Socket, out_sock: zmq.Socket,
                 group: DPGroup | None) -> None:
        self.engine, self.in_sock, self.out_sock, self.group = engine, in_sock, out_sock, group
        par = engine.cfg.parallel
        self.rank = par.data_parallel_rank
        self.pause = RankPause()
        self.lockstep = Lockstep(group, par.data_parallel_size) \
            if group is not None and par.data_parallel_lockstep else None
        self.deferred: deque[EngineCoreCollectiveRpc] = deque()
        self._errors: list[EngineCoreOutput] = []
        self._reports: list[EngineCorePauseStatus] = []
        """Sent after the step's outputs, so the frontend sees what a pause ended first."""
        self._last_beat = self._last_stats = time.monotonic()
        self._was_busy = False
        self.failures = MessageFailures(self.rank)
        self.doorbell = Doorbell()
        self._poller = zmq.Poller()
        self._poller.register(in_sock, zmq.POLLIN)
        self._poller.register(self.doorbell.fileno(), zmq.POLLIN)
        engine.set_wakeup(self.doorbell.ring)

    # ---- the loop -------------------------------------------------------------------------
    def run(self, parent: int) -> int:
        """Step forever; stats go out at least every second; returns the exit code when
        orphaned (0) or when a tensor-parallel worker died (EXIT_TP_WORKER_FAILED)."""
        try:
            return self._run(parent)
        finally:
            self.doorbell.close()

    def _run(self, parent: int) -> int:
        if getattr(self.engine, "tp", None) is not None:
            self.engine.tp.arm_exit()
        while True:
            try:
                for frame in self._read(self._block_ms()):
                    self._handle_frame(frame)
                # Only input handling is guarded. An exception from a step (model, scheduler,
                # KV connector) leaves the batch and block ownership in an unknown state, where
                # going on could stream wrong tokens for every request; it ends the process
                # instead (_serve logs the traceback), the frontend sees the exit at once
                # through the process sentinel, answers every open request 503 and exits to be
                # restarted.
                if self.engine.tp_failure is not None:
                    raise TPWorkerError(self.engine.tp_failure)
                outputs = self._errors + self._advance()
            except TPWorkerError as exc:
                self._tp_down(str(exc))
                return EXIT_TP_WORKER_FAILED
            except ExpertExchangeError as exc:  # the ranks are out of step for good
                self._fail_all_and_report(str(exc))
                return EXIT_DP_GROUP_FAILED
            self._errors = []
            if not self._send_outputs(outputs, parent):
                return 0

    def _tp_down(self, line: str) -> None:
        """A TP worker died: every request ends with that line (their peers' transfers fail
        and free at once), the frontend gets the answers, then this process exits."""
        self._fail_all_and_report(f"the instance lost a tensor-parallel worker: {line}")

    def _fail_all_and_report(self, error: str) -> None:
        """End every request with ``error`` and send the answers before this process exits."""
        logger.error("dp%d: %s; failing every request and exiting", self.rank, error)
        try:
            outputs = self._errors + self.engine.fail_all(error)
            self._send(EngineCoreOutputs(dp_rank=self.rank, outputs=outputs,
                                         stats=self.engine.stats()))
        except Exception as exc:  # the exit still happens; the frontend answers 503 then
            logger.error("dp%d: failing the requests failed too: %s: %s", self.rank,
                         type(exc).__name__, exc)
        self._errors = []

    def _block_ms(self) -> int:
        ls = self.lockstep
        if ls is not None and ls.running:
            return 0
        if ls is None and self.pause.may_schedule and self.engine.has_runnable_work():
            return 0
        # requests waiting for remote KV, or frozen by a pause, need no spinning: the connector
        # (polled often while it has transfers) or an input message moves them on
        if not self.engine.connector_busy():
            return IDLE_POLL_MS
        return CONNECTOR_POLL_MS if self.engine.connector_needs_polling() else CONNECTOR_WAIT_MS

    def _read(self, block_ms: int) -> list[bytes]:
        """Every frame waiting on the input socket, blocking up to block_ms for the first."""
        ready = dict(self._poller.poll(block_ms))
        if self.doorbell.fileno() in ready:
            self.doorbell.clear()
        if self.in_sock not in ready:
            return []
        frames = []
        while True:
            try:
                frames.append(self.in_sock.recv(zmq.NOBLOCK))
            except zmq.Again:
                return frames

    def _advance(self) -> list[EngineCoreOutput]:
        """One iteration's step: real, connector-only (paused, idle) or a lockstep dummy."""
        ls, engine = self.lockstep, self.engine
        if ls is None:
            outputs = engine.step() if self.pause.may_schedule else engine.connector_step()
            if self.pause.ready(engine.has_inflight()):
                self._pause_done()
            return list(outputs)
        if not ls.running:
            wave = ls.wave_to_request(self.pause.state is not RankPauseState.PAUSED and (
                engine.has_inflight() or self.pause.state is RankPauseState.PENDING))
            if wave is not None:
                self._send(EngineCoreNeedWave(dp_rank=self.rank, wave=wave))
            return list(engine.connector_step())
        real = self.pause.may_schedule and engine.has_inflight()
        outputs = engine.step() if real else engine.connector_step(join_experts=True)
        inflight = engine.has_inflight()
        end = ls.after_step(inflight, self.pause.ready(inflight))
        if end is WaveEnd.PAUSED:
            self._pause_done()
        if end is not WaveEnd.CONTINUE:
            self._run_deferred()
        return list(outputs)

    def _send_outputs(self, outputs: list[EngineCoreOutput], parent: int) -> bool:
        """Outputs at once; stats with them, every STATS_INTERVAL_S while work is in flight (a
        rank waiting on a peer must not flood its frontend), once more when the work ends (so
        the final counters are fresh), and with the 1 s beat."""
        now = time.monotonic()
        beat = now - self._last_beat >= 1.0
        busy = self.engine.has_work()
        fresh = (busy and now - self._last_stats >= STATS_INTERVAL_S) or (self._was_busy
                                                                          and not busy)
        self._was_busy = busy
        kv_events = self.engine.take_kv_events()
        if outputs or fresh or beat or self._reports or kv_events is not None:
            self._send(EngineCoreOutputs(dp_rank=self.rank, outputs=outputs,
                                         stats=self.engine.stats(), kv_events=kv_events))
            self._last_stats = now
        for report in self._reports:
            self._send(report)
        self._reports = []
        if beat:
            self._last_beat = now
            if os.getppid() != parent:  # orphaned: the frontend died, maybe by SIGKILL
                logger.error("frontend process is gone; engine core exits")
                return False
        return True

    def _send(self, msg: Any) -> None:
        self.out_sock.send(encoder.encode(msg))

    # ---- commands -------------------------------------------------------------------------
    def _handle_frame(self, frame: bytes) -> None:
        """Decode and apply one input message; a failure costs that message, never the loop."""
        try:
            msg = inbound_decoder.decode(frame)
        except Exception as exc:  # decoding touches no engine state: drop the frame
            self.failures.record(MALFORMED, exc)
            return
        try:
            self._dispatch(msg)
        except (DPGroupError, zmq.ZMQError):
            raise  # a broken DP group or socket: this process cannot serve anyone any more
        except Exception as exc:
            self.failures.record(type(msg).__name__, exc)
            if isinstance(msg, EngineCoreRequest):
                self._fail_request(msg.request_id, exc)

    def _fail_request(self, request_id: str, exc: Exception) -> None:
        """Answer a request whose admission raised with an error output, after undoing whatever
        part of the admission happened (its later abort output finds no frontend handle)."""
        with contextlib.suppress(Exception):  # the failure is logged; the answer matters more
            self.engine.abort([request_id])
        self._errors.append(EngineCoreOutput(
            request_id, [], "error",
            error=f"engine core could not add the request: {type(exc).__name__}: {exc}"))

    def _dispatch(self, msg: Any) -> None:
        if isinstance(msg, EngineCoreRequest):
            err = self.engine.add_request(msg, hold=not self.pause.admits_new)
            if err is not None:
                self._errors.append(EngineCoreOutput(msg.request_id, [], "error", error=err))
        elif isinstance(msg, EngineCoreAbort):
            self.engine.abort(msg.request_ids)
        elif isinstance(msg, EngineCoreUtility):
            self._send(self._call(msg.call_id, msg.method, msg.args, UTILITY_METHODS))
        elif isinstance(msg, EngineCoreCollectiveRpc):
            if msg.method in COLLECTIVE_METHODS and self.lockstep and self.lockstep.running:
                self.deferred.append(msg)  # runs when every rank has stopped stepping
            else:
                self._run_collective(msg)
        elif isinstance(msg, EngineCorePause):
            self._on_pause(msg.seq, msg.mode)
        elif isinstance(msg, EngineCoreResume):
            self._on_resume(msg.seq)
        elif isinstance(msg, EngineCoreStartWave) and self.lockstep is not None:
            self.lockstep.on_start_wave(msg.wave,
                                        paused=self.pause.state is RankPauseState.PAUSED)

    def _on_pause(self, seq: int, mode: PauseMode) -> None:
        if self.pause.state is not RankPauseState.RUNNING:
            logger.warning("dp%d: pause while %s; restarting the pause", self.rank,
                           self.pause.state.value)
        self.pause.begin(seq, mode)
        if mode is PauseMode.ABORT:
            n = self.engine.abort_all(PAUSE_ABORT_ERROR)
            logger.info("dp%d: pause (abort) ended %d in-flight requests", self.rank, n)
        else:
            self.engine.pause_queue_clocks()
        if self.lockstep is not None:
            self.lockstep.start_for_pause()

    def _on_resume(self, seq: int) -> None:
        self.pause.resume(seq)
        n = self.engine.release_held()
        logger.info("dp%d: resumed; %d held requests queued", self.rank, n)
        self._send(EngineCorePauseStatus(dp_rank=self.rank, seq=seq,
                                         state=RankPauseState.RUNNING))

    def _pause_done(self) -> None:
        self.pause.complete()
        self._reports.append(EngineCorePauseStatus(dp_rank=self.rank, seq=self.pause.seq,
                                                   state=RankPauseState.PAUSED))

    def _run_deferred(self) -> None:
        while self.deferred:
            self._run_collective(self.deferred.popleft())

    def _run_collective(self, msg: EngineCoreCollectiveRpc) -> None:
        self._send(self._call(msg.call_id, msg.method, msg.args, RPC_METHODS))

    def _call(self, call_id: int, method: str, args: dict[str, Any],
              allowed: frozenset[str]) -> EngineCoreUtilityResult:
        """Run a whitelisted method; errors go back to the caller, except a broken DP group,
        which ends this process."""
        try:
            validate_rpc(method, args, allowed)
            result = run_rpc(RpcContext(self.engine, self.group, self.rank, self._dp_state()),
                             method, args)
        except DPGroupError:
            raise
        except RpcArgError as exc:
            return EngineCoreUtilityResult(call_id=call_id, error=str(exc))
        except Exception as exc:  # reported to the caller, engine keeps serving
            return EngineCoreUtilityResult(call_id=call_id,
                                           error=f"{type(exc).__name__}: {exc}")
        return EngineCoreUtilityResult(call_id=call_id, result=result)

    def _dp_state(self) -> dict[str, Any]:
        mode = self.pause.mode

        state: dict[str, Any] = {"pid": os.getpid(), "device": str(self.engine.device),
                                 "visible_devices": os.environ.get(visible_devices_env()),
                                 "pause_state": self.pause.state.value,
                                 "pause_mode": mode.value if mode else None,
                                 "num_held": self.engine.num_held,
                                 "lockstep": self.lockstep is not None,
                                 "expert_parallel_size": self.engine.ep.size}
        if self.lockstep is not None:
            state.update(self.lockstep.as_json())
        return state


# ---- process entry --------------------------------------------------------------------------
def _for_this_rank(cfg: EngineConfig) -> EngineConfig:
    """Apply the test-only per-rank KV budget (envs.rank_kv_bytes_for_tests)."""
    budget = envs.rank_kv_bytes_for_tests().get(cfg.parallel.data_parallel_rank)
    if budget is None:
        return cfg
    return dataclasses.replace(cfg, cache=dataclasses.replace(cfg.cache,
                                                              kv_cache_memory_bytes=budget))


def _share_cpu(cfg: EngineConfig) -> None:
    threads = cpu_threads_per_rank(cfg.parallel.data_parallel_size, cfg.model.device,
                                   cfg.parallel.tensor_parallel_size)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def _expert_parallel(cfg: EngineConfig, group: DPGroup | None) -> EPContext:
    """This rank's expert-parallel context: the DP ranks, exchanging over their own group."""
    par = cfg.parallel
    if not par.enable_expert_parallel or group is None:
        return EPContext()
    from disagg.engine.model_runner import resolve_device

    exchange = group.expert_group(resolve_device(cfg.model.device))
    return EPContext(par.data_parallel_rank, par.data_parallel_size, exchange)


def _join_group(cfg: EngineConfig) -> DPGroup | None:
    par = cfg.parallel
    if par.data_parallel_size == 1:
        return None
    if par.data_parallel_master_port is None:
        raise ConfigError("data_parallel_master_port is not set (the frontend picks it)")
    return DPGroup(par.data_parallel_rank, par.data_parallel_size,
                   par.data_parallel_master_port, par.data_parallel_timeout_s,
                   rendezvous_timeout_s=envs.engine_ready_timeout_s())


def run_engine_core(cfg_bytes: bytes, input_addr: str, output_addr: str) -> None:
    """Process entry point (multiprocessing spawn target)."""
    configure_logging(process="engine")  # the frontend's level and format (its environment)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the frontend decides when we stop
    parent = os.getppid()
    ctx = zmq.Context()
    in_sock = ctx.socket(zmq.PULL)
    in_sock.connect(input_addr)
    out_sock = ctx.socket(zmq.PUSH)
    out_sock.setsockopt(zmq.LINGER, 2000)
    out_sock.connect(output_addr)
    heartbeat = Heartbeat(ctx, output_addr)
    try:
        code = _serve(cfg_bytes, in_sock, out_sock, parent, heartbeat)
    finally:
        stopped = heartbeat.stop()
        out_sock.close(linger=1000)
        in_sock.close(linger=0)
        if stopped:  # term() waits for every socket, the heartbeat's too
            ctx.term()
    sys.exit(code)


def _serve(cfg_bytes: bytes, in_sock: zmq.Socket, out_sock: zmq.Socket, parent: int,
           heartbeat: Heartbeat) -> int:
    """Join the group, build the engine, hand-shake, beat, loop; returns the exit code."""
    engine = group = None
    started = False
    try:
        cfg = _for_this_rank(msgspec.msgpack.decode(cfg_bytes, type=EngineConfig))
        _share_cpu(cfg)
        group = _join_group(cfg)
        from disagg.engine.engine_core import build_engine

        ep = _expert_parallel(cfg, group)
        engine = build_engine(cfg, ep)
        out_sock.send(encoder.encode(engine.ready_response()))
        started = True
        heartbeat.start(cfg.parallel.data_parallel_rank)  # no silence counts before the ready
        return EngineLoop(engine, in_sock, out_sock, group).run(parent)
    except ConfigError as exc:
        out_sock.send(encoder.encode(EngineCoreStartupError(str(exc))))
        return 2
    except DPGroupError as exc:
        logger.error("%s; engine core exits", exc)
        if not started:
            out_sock.send(encoder.encode(EngineCoreStartupError(str(exc))))
        return EXIT_DP_GROUP_FAILED
    except Exception as exc:
        logger.error("engine core failed: %s", traceback.format_exc())
        out_sock.send(encoder.encode(EngineCoreStartupError(f"{type(exc).__name__}: {exc}")))
        return 1
    finally:
        if engine is not None:
            engine.close()
        if group is not None:
            group.close()
