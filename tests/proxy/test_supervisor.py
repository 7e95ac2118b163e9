"""Child-process supervision: readiness, deaths, deadlines, and stopping stubborn children."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import pytest

from proxy.registration import KVRole
from proxy.supervisor import InstanceSpec, LaunchError, Supervisor

READY = "import time; print('disagg: ready on http://127.0.0.1:1', flush=True); time.sleep(60)"


def _spec(name: str, code: str) -> InstanceSpec:
    return InstanceSpec(name=name, role=KVRole.PRODUCER, port=1,
                        argv=(sys.executable, "-c", code), env={"PYTHONUNBUFFERED": "1"})


async def test_ready_children_then_a_clean_shutdown() -> None:
    sup = Supervisor([_spec("prefill-0", READY), _spec("decode-0", READY)])
    await sup.start()
    try:
        await sup.wait_ready(timeout_s=20)
        assert all(c.ready.is_set() for c in sup.children)
    finally:
        await sup.shutdown(timeout_s=5)
    assert all(c.process.returncode is not None for c in sup.children)


async def test_a_child_dying_before_ready_is_reported_in_one_line() -> None:
    code = "import sys; print('no GPU here', flush=True); sys.exit(4)"
    sup = Supervisor([_spec("prefill-0", READY), _spec("decode-0", code)])
    await sup.start()
    try:
        with pytest.raises(LaunchError) as info:
            await sup.wait_ready(timeout_s=20)
    finally:
        await sup.shutdown(timeout_s=5)
    message = str(info.value)
    assert message.startswith("decode-0 (pid ")
    assert "exited with code 4 (last output: no GPU here) before it was ready" in message


async def test_readiness_has_a_deadline() -> None:
    sup = Supervisor([_spec("decode-0", "import time; time.sleep(60)")])
    await sup.start()
    try:
        with pytest.raises(LaunchError, match="not ready after 0.5 s: decode-0"):
            await sup.wait_ready(timeout_s=0.5)
    finally:
        await sup.shutdown(timeout_s=5)


async def test_wait_any_exit_and_killing_a_child_that_ignores_sigterm() -> None:
    stubborn = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                "print('disagg: ready on x', flush=True); time.sleep(60)")
    quitter = "import time; time.sleep(0.3)"
    sup = Supervisor([_spec("prefill-0", stubborn), _spec("decode-0", quitter)])
    await sup.start()
    try:
        child = await sup.wait_any_exit()
        assert child.spec.name == "decode-0" and "exited with code 0" in child.describe_exit()
        fresh = await sup.respawn(child)
        assert fresh.restarts == 1 and sup.children[1] is fresh
    finally:
        await sup.shutdown(timeout_s=0.5)
    assert sup.children[0].process.returncode == -9  # SIGKILL after the deadline


async def test_a_missing_program_is_a_launch_error() -> None:
    sup = Supervisor([InstanceSpec(name="decode-0", role=KVRole.CONSUMER, port=1,
                                   argv=("/nonexistent/disagg",))])
    with pytest.raises(LaunchError, match="cannot start decode-0"):
        await sup.start()


async def test_a_killed_child_is_noticed_and_its_orphans_are_reaped() -> None:
    # The child starts a grandchild that keeps the output pipe open, like an engine core.
    code = ("import subprocess, sys, time; "
            "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            "print('grandchild', g.pid, flush=True); "
            "print('disagg: ready on x', flush=True); time.sleep(60)")
    sup = Supervisor([_spec("prefill-0", code)])
    await sup.start()
    try:
        await sup.wait_ready(timeout_s=20)
        child = sup.children[0]
        grandchild_pid = int(next(t for t in child.tail if t.startswith("grandchild")).split()[1])
        os.kill(child.process.pid, signal.SIGKILL)
        dead = await asyncio.wait_for(sup.wait_any_exit(), 5.0)
        assert "exited with signal 9" in dead.describe_exit()
        os.kill(grandchild_pid, 0)  # the orphan is still there...
    finally:
        await sup.shutdown(timeout_s=2)
    await asyncio.sleep(0.2)
    with pytest.raises(ProcessLookupError):  # ...until shutdown reaps the group
        os.kill(grandchild_pid, 0)
