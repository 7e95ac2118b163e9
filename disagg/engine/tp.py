"""Tensor parallelism of one engine core: rank 0 is the engine-core process itself, ranks
1..N-1 are worker processes it starts (``python -m disagg.engine.tp_worker``), one GPU each.

    rank 0 (engine core: scheduler, sampler, KV connector control)   rank r (worker)
      socketpair  -- init (config, rank, rendezvous port) --------->  join the group, load shard
      "call"  (kv budget, allocate, KV connector calls) ----------->  ("ok", value) | ("error", s)
      "step"  (the step's host inputs, no reply) ------------------>  the same forward; the
                                                                      collectives keep it in step
Collectives (all-reduce, all-gather of logits) run in torch.distributed's default group: nccl
on CUDA and ROCm (RCCL answers to the same name), gloo on CPU, each with the group's deadline.
Every wait has one: the rendezvous and worker start (``tensor_parallel_timeout_s``), every call
(its reply), every collective (the group's timeout; NCCL's watchdog on GPU).

A dead or hung worker is the end of the instance: the ranks are out of step for good. The
watch thread sees a worker exit at once and records why (``failure``); the engine loop reads it,
fails every request with that line and exits (disagg/dp/engine_process.py). A call or a step
that finds a worker gone raises TPWorkerError with the same line. If the engine thread is stuck
in a collective that cannot fail (NCCL waiting for a dead peer), the watch thread ends the
process itself after ``EXIT_GRACE_S``: the frontend sees the exit and answers 503.
The channel is a local socketpair between processes of this instance (pickled tuples), never a
network input.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

from disagg.common.config import ConfigError, EngineConfig
from disagg.models.parallel import TPContext

logger = logging.getLogger(__name__)
EXIT_TP_WORKER_FAILED = 4
"""Exit code of an engine core whose tensor-parallel worker died or hung."""
EXIT_GRACE_S = 10.0
"""How long the watch thread lets the engine loop fail its requests before ending the process."""
WATCH_INTERVAL_S = 0.2
SHUTDOWN_WAIT_S = 5.0


class TPCallError(RuntimeError):
    """A worker's call failed (its answer was an error); the group itself is fine."""


def _torch_threads() -> int:
    import torch

    return int(torch.get_num_threads())


class TPWorkerError(RuntimeError):
    """A tensor-parallel worker died, hung or failed: this engine core must go down."""


def backend_for(device_type: str) -> str:
    """nccl on a GPU (RCCL on ROCm answers to the same name), gloo on CPU."""
    return "nccl" if device_type == "cuda" else "gloo"


def make_store(rank: int, size: int, port: int, timeout_s: float, *,
               wait_for_workers: bool = False) -> Any:
    """A group's rendezvous store on loopback: rank 0 hosts it (``port`` 0: one the OS picks,
    no race for a port picked earlier), the other ranks connect to it. Rank 0 binds the
    listening socket itself, to 127.0.0.1: torch's own binds every interface, which would
    let anyone on the network write the group's keys."""
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    if rank != 0:
        return dist.TCPStore("127.0.0.1", port, size, False, timeout=timeout,
                             wait_for_workers=wait_for_workers)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(max(64, size))
        port = sock.getsockname()[1]
    except OSError:
        sock.close()
        raise
    fd = sock.detach()  # the store owns the socket from here
    try:
        return dist.TCPStore("127.0.0.1", port, size, True, timeout=timeout,
                             wait_for_workers=wait_for_workers, master_listen_fd=fd)
    except BaseException:
        os.close(fd)
        raise


def join_group(rank: int, size: int, store: Any, device_type: str, timeout_s: float) -> None:
    """Join this engine core's TP group (the process's default group). On a GPU the process's
    device is set first and NCCL starts eagerly on it, so its buffers exist before the KV
    budget is measured."""
    import torch
    import torch.distributed as dist

    kw: dict[str, Any] = {}
    if device_type == "cuda":
        kw["device_id"] = torch.device("cuda", torch.cuda.current_device())
    try:
        dist.init_process_group(backend_for(device_type), store=store, world_size=size,
                                rank=rank, timeout=datetime.timedelta(seconds=timeout_s), **kw)
    except Exception as exc:
        raise TPWorkerError(f"tp{rank}: cannot join the tensor-parallel group of {size} ranks "
                            f"within {timeout_s:.0f} s: {exc}") from exc


class _Worker:
    """One worker process and rank 0's end of its channel."""

    def __init__(self, rank: int, proc: subprocess.Popen[bytes], conn: Connection) -> None:
        self.rank, self.proc, self.conn = rank, proc, conn

    def exit_line(self) -> str | None:
        code = self.proc.poll()
        if code is None:
            return None
        how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        return f"tensor-parallel worker tp{self.rank} (pid {self.proc.pid}) died ({how})"


class TPGroup:
    """Rank 0's view of the group: starts the workers, sends steps and calls, watches them."""

    def __init__(self, cfg: EngineConfig, device_type: str) -> None:
        import msgspec

        self.size = cfg.parallel.tensor_parallel_size
        self.timeout_s = cfg.parallel.tensor_parallel_timeout_s
        self.device_type = device_type
        self.failure: str | None = None
        """Why the group is broken (a worker died); set by the watch thread or a call."""
        self._workers: list[_Worker] = []
        self._stop = threading.Event()
        self._closing = False
        self._acknowledged = threading.Event()
        self._armed = False
        self._step_started: float | None = None
        cfg_bytes = msgspec.msgpack.encode(cfg)
        try:
            store = make_store(0, self.size, 0, self.timeout_s)
            for rank in range(1, self.size):
                self._workers.append(self._spawn(rank, int(store.port), cfg_bytes))
        except (OSError, RuntimeError) as exc:
            self.close()
            raise ConfigError(f"cannot start tensor-parallel workers: {exc}") from exc
        self._watch = threading.Thread(target=self._watch_loop, name="tp-watch", daemon=True)
        self._watch.start()
        try:
            join_group(0, self.size, store, device_type, self.timeout_s)
        except TPWorkerError as exc:
            self.close()
            raise ConfigError(self.failure or str(exc)) from exc
        self.context = TPContext(rank=0, size=self.size)
        logger.info("tp0: joined the %s group of %d ranks", backend_for(device_type), self.size)

    def _spawn(self, rank: int, port: int, cfg_bytes: bytes) -> _Worker:
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        if self.device_type == "cuda":
            env["DISAGG_TP_LOCAL_DEVICE"] = str(rank)
        proc = subprocess.Popen(
            [sys.executable, "-m", "disagg.engine.tp_worker", str(theirs.fileno())],
            pass_fds=(theirs.fileno(),), env=env, start_new_session=False)
        theirs.close()
        conn = Connection(ours.detach())
        conn.send(("init", {"cfg": cfg_bytes, "rank": rank, "size": self.size, "port": port,
                            "device_type": self.device_type, "timeout_s": self.timeout_s,
                            "parent": os.getpid(), "threads": _torch_threads()}))
        return _Worker(rank, proc, conn)

    # ---- liveness ------------------------------------------------------------------------
    def _watch_loop(self) -> None:
        while not self._stop.wait(WATCH_INTERVAL_S):
            if self._closing:
                return
            line = next((x for w in self._workers if (x := w.exit_line()) is not None), None)
            started = self._step_started
            if line is None and started is not None and \
                    time.monotonic() - started > self.timeout_s:
                line = (f"a tensor-parallel step did not finish within {self.timeout_s:.0f} s "
                        "(--tp-timeout): a worker hung")
            if line is None:
                continue
            if self.failure is None:
                self.failure = line
                logger.error("%s; the instance goes down", line)
            # The engine loop fails every request and exits; if it is stuck in a collective
            # that cannot fail (NCCL waiting for a dead peer), end the process here. Armed
            # only once serving (before that, start-up reports the failure; an in-process LLM
            # raises it from its next call).
            if self._armed and not self._acknowledged.wait(EXIT_GRACE_S) and not self._closing:
                logger.error("%s and the engine did not stop within %.0f s (stuck in a "
                             "collective); exiting", line, EXIT_GRACE_S)
                os._exit(EXIT_TP_WORKER_FAILED)
            return

    def arm_exit(self) -> None:
        """Serving: a broken group that the engine loop cannot act on ends the process."""
        self._armed = True

    def acknowledge(self) -> None:
        """The engine loop took ``failure`` up and is failing its requests and exiting."""
        self._acknowledged.set()

    def fail(self, line: str) -> TPWorkerError:
        """Record the group broken (the first reason wins) and return the error to raise."""
        if self.failure is None:
            self.failure = line
        return TPWorkerError(self.failure)

    def collective_failed(self, exc: BaseException) -> TPWorkerError:
        """A collective raised: name the dead worker when one exited (gloo often sees the
        closed connection before the exit is reaped), else the collective's error."""
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            line = next((x for w in self._workers if (x := w.exit_line()) is not None), None)
            if line is not None:
                return self.fail(line)
            time.sleep(0.05)
        return self.fail(f"a tensor-parallel collective failed: {str(exc)[:300]}")

    def step_begin(self) -> None:
        """Rank 0 starts a step (the watch thread enforces the deadline on it)."""
        self._step_started = time.monotonic()

    def step_end(self) -> None:
        """Rank 0's step returned."""
        self._step_started = None

    def check(self) -> None:
        """Raise TPWorkerError if a worker is known dead."""
        for w in self._workers:
            line = w.exit_line()
            if line is not None and self.failure is None:
                self.failure = line
        if self.failure is not None:
            raise TPWorkerError(self.failure)

    def _broken(self, w: _Worker, what: str, exc: BaseException | None = None) -> TPWorkerError:
        time.sleep(0.05)  # a worker that just closed its end has usually exited too
        return self.fail(w.exit_line() or f"tensor-parallel worker tp{w.rank} {what}" + (
            f": {exc}" if exc else ""))

    # ---- traffic -------------------------------------------------------------------------
    def send_step(self, payload: Any) -> None:
        """Hand every worker this step's inputs (rank 0 then runs the same forward)."""
        self.check()
        for w in self._workers:
            try:
                w.conn.send(("step", payload))
            except OSError as exc:
                raise self._broken(w, "stopped taking steps", exc) from exc

    def _recv(self, w: _Worker, what: str) -> Any:
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                if w.conn.poll(min(WATCH_INTERVAL_S, max(0.0, deadline - time.monotonic()))):
                    kind, value = w.conn.recv()
                    break
            except (OSError, EOFError) as exc:
                raise self._broken(w, f"closed its channel during {what}", exc) from exc
            if w.exit_line() is not None:
                raise self._broken(w, f"died during {what}")
            if time.monotonic() >= deadline:
                raise self._broken(w, f"did not answer {what} within {self.timeout_s:.0f} s")
        if kind == "error":
            raise TPCallError(f"tensor-parallel worker tp{w.rank}: {what} failed: {value}")
        return value

    def post_all(self, method: str, *args: Any) -> None:
        """Send a call to every worker without waiting (collect with ``collect``)."""
        self.check()
        for w in self._workers:
            try:
                w.conn.send(("call", method, args))
            except OSError as exc:
                raise self._broken(w, f"could not take {method}", exc) from exc

    def collect(self, method: str) -> list[Any]:
        """Every worker's answer to the call ``post_all`` sent, in rank order (ranks 1..N-1)."""
        return [self._recv(w, method) for w in self._workers]

    def call_all(self, method: str, *args: Any) -> list[Any]:
        """Run a call on every worker; their answers in rank order (ranks 1..N-1). A call that
        runs collectives must be matched by rank 0 between ``post_all`` and ``collect``."""
        self.post_all(method, *args)
        return self.collect(method)

    def call(self, rank: int, method: str, *args: Any) -> Any:
        """Run a call on worker ``rank`` (1..N-1) and return its answer."""
        self.check()
        w = self._workers[rank - 1]
        try:
            w.conn.send(("call", method, args))
        except OSError as exc:
            raise self._broken(w, f"could not take {method}", exc) from exc
        return self._recv(w, method)

    def close(self) -> None:
        """Stop the workers (politely, then by force) and leave the group."""
        self._closing = True
        self._stop.set()
        for w in self._workers:
            try:
                w.conn.send(("shutdown",))
            except OSError:
                pass
        deadline = time.monotonic() + SHUTDOWN_WAIT_S
        for w in self._workers:
            try:
                w.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait()
            w.conn.close()
        self._workers = []
        import torch.distributed as dist

        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception as exc:  # the workers are gone either way
                logger.debug("destroy_process_group: %s", exc)
