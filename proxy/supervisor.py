"""Local instances as child processes: start, wait until ready, watch, stop.

Children run in their own process group, so a terminal's Ctrl-C reaches only the launcher,
which then stops them in order (SIGTERM, a deadline, SIGKILL). Their output is forwarded to
the launcher's stderr, one ``[name] `` prefix per line, and the last lines are kept for the
one-line report when a child dies.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import logging
import os
import signal
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field

from disagg.common.envs import PARENT_PID_ENV
from proxy.registration import KVRole

logger = logging.getLogger(__name__)

READY_MARKER = "disagg: ready on "
"""What ``disagg serve`` prints to stdout once it serves."""
TAIL_LINES = 20
EXIT_POLL_S = 0.1
"""How often a child's exit is checked for."""


class LaunchError(Exception):
    """Local instances could not be started; the message is the one line to print."""


class ChildState(enum.Enum):
    """Lifecycle of one child process."""

    STARTING = "starting"
    READY = "ready"
    EXITED = "exited"


@dataclass(frozen=True, slots=True)
class InstanceSpec:
    """How to run one local instance."""

    name: str
    role: KVRole
    port: int
    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    """Extra environment (GPU selection); the launcher's own environment is inherited."""

    @property
    def url(self) -> str:
        """The instance's HTTP address."""
        return f"http://127.0.0.1:{self.port}"


class Child:
    """One running instance process and the task reading its output."""

    def __init__(self, spec: InstanceSpec, process: asyncio.subprocess.Process) -> None:
        self.spec = spec
        self.process = process
        self.state = ChildState.STARTING
        self.ready = asyncio.Event()
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self.restarts = 0
        self._reader = asyncio.ensure_future(self._read_output())

    async def _read_output(self) -> None:
        assert self.process.stdout is not None
        while True:
            raw = await self.process.stdout.readline()
            if not raw:
                return
            line = raw.decode("utf-8", errors="replace").rstrip()
            self.tail.append(line)
            sys.stderr.write(f"[{self.spec.name}] {line}\n")
            if self.state is ChildState.STARTING and READY_MARKER in line:
                self.state = ChildState.READY
                self.ready.set()

    async def wait_exit(self) -> int:
        """Wait for the process to end; its exit code.

        Polls the return code: ``Process.wait()`` also waits for the output pipe to close,
        which an orphaned grandchild (an engine core) may hold open long after a crash.
        """
        while self.process.returncode is None:
            await asyncio.sleep(EXIT_POLL_S)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._reader), 0.5)  # its last words
        self.state = ChildState.EXITED
        return self.process.returncode

    def describe_exit(self) -> str:
        """One line: who died, how, and its last output line."""
        code = self.process.returncode
        how = f"signal {-code}" if code is not None and code < 0 else f"code {code}"
        last = next((line for line in reversed(self.tail) if line.strip()), "")
        suffix = f" (last output: {last})" if last else ""
        return f"{self.spec.name} (pid {self.process.pid}) exited with {how}{suffix}"

    def _signal_group(self, sig: signal.Signals) -> None:
        # The child leads its own process group: this reaches its engine cores too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, sig)

    async def _exited_within(self, timeout_s: float) -> bool:
        try:
            await asyncio.wait_for(self.wait_exit(), timeout_s)
        except asyncio.TimeoutError:
            return False
        return True

    def _group_alive(self) -> bool:
        try:
            os.killpg(self.process.pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    async def _kill_group_after(self, grace_s: float) -> None:
        """SIGKILL what is left of the group after ``grace_s`` (a crash's orphaned cores)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while self._group_alive() and loop.time() < deadline:
            await asyncio.sleep(EXIT_POLL_S)
        self._signal_group(signal.SIGKILL)

    async def stop(self, timeout_s: float) -> None:
        """SIGTERM the child's process group, wait up to ``timeout_s``, then SIGKILL it."""
        self._signal_group(signal.SIGTERM)
        if not await self._exited_within(timeout_s):
            logger.warning("%s did not stop in %g s; killing it", self.spec.name, timeout_s)
        await self._kill_group_after(min(timeout_s, 2.0))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.process.wait(), timeout_s)
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


async def spawn(spec: InstanceSpec) -> Child:
    """Start one instance process (stdout and stderr merged into one pipe)."""
    try:
        process = await asyncio.create_subprocess_exec(
            *spec.argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            stdin=asyncio.subprocess.DEVNULL,
            # the instance shuts down once this process is gone, even SIGKILLed
            env={**os.environ, **spec.env, PARENT_PID_ENV: str(os.getpid())},
            start_new_session=True)
    except OSError as exc:
        raise LaunchError(f"cannot start {spec.name} ({spec.argv[0]}): {exc}") from None
    return Child(spec, process)


class Supervisor:
    """All local instances: start together, ready together, stopped together."""

    def __init__(self, specs: list[InstanceSpec]) -> None:
        self.specs = specs
        self.children: list[Child] = []

    async def start(self) -> None:
        """Spawn every instance."""
        for spec in self.specs:
            self.children.append(await spawn(spec))

    async def wait_ready(self, timeout_s: float) -> None:
        """Until every child printed its ready line; a death or the deadline raises LaunchError."""
        pending = {c for c in self.children if not c.ready.is_set()}
        waits = {asyncio.ensure_future(c.ready.wait()): c for c in pending}
        deaths = {asyncio.ensure_future(c.wait_exit()): c for c in self.children}
        try:
            remaining = set(waits)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout_s
            while remaining:
                done, _ = await asyncio.wait(remaining | set(deaths),
                                             timeout=max(0.0, deadline - loop.time()),
                                             return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    names = ", ".join(waits[t].spec.name for t in remaining)
                    raise LaunchError(f"not ready after {timeout_s:g} s: {names}")
                for task in done:
                    if task in deaths:
                        raise LaunchError(deaths[task].describe_exit() + " before it was ready")
                remaining -= done
        finally:
            for task in [*waits, *deaths]:
                task.cancel()

    async def wait_any_exit(self) -> Child:
        """The first child that exits."""
        waits = {asyncio.ensure_future(c.wait_exit()): c for c in self.children}
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            return waits[done.pop()]
        finally:
            for task in waits:
                task.cancel()

    async def respawn(self, child: Child) -> Child:
        """Start a fresh process for a child that exited (same spec, same ports)."""
        await child.stop(timeout_s=1.0)
        fresh = await spawn(child.spec)
        fresh.restarts = child.restarts + 1
        self.children[self.children.index(child)] = fresh
        return fresh

    async def shutdown(self, timeout_s: float) -> None:
        """Stop every child concurrently, each within ``timeout_s`` (then killed)."""
        await asyncio.gather(*(c.stop(timeout_s) for c in self.children))
