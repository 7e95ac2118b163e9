"""HandleTable: one transition per handle, deadlines, cancel hooks, peer failure."""

from __future__ import annotations

import time

import pytest

from connectors.transports import TransferStatus
from connectors.transports.handles import HandleTable


def test_finish_happens_once() -> None:
    table = HandleTable(op_timeout_s=None)
    handle = table.new("p")
    assert table.status(handle) is TransferStatus.PENDING
    assert table.finish(handle)
    assert not table.finish(handle, "late failure")  # a late error cannot flip DONE
    assert table.status(handle) is TransferStatus.DONE
    assert table.error(handle) is None


def test_deadline_fails_pending_on_poll() -> None:
    table = HandleTable(op_timeout_s=0.05)
    handle = table.new("p")
    time.sleep(0.1)
    assert table.status(handle) is TransferStatus.FAILED
    assert "op_timeout_s" in (table.error(handle) or "")


def test_cancel_hooks_run_on_failure_and_release_only() -> None:
    table = HandleTable(op_timeout_s=None)
    calls: list[str] = []
    done, failed, released = table.new("p"), table.new("p"), table.new("p")
    for name, handle in (("done", done), ("failed", failed), ("released", released)):
        assert table.add_cancel_hook(handle, lambda n=name: calls.append(n))
    table.finish(done)
    table.finish(failed, "boom")
    table.pop(released)
    assert calls == ["failed", "released"]
    assert not table.add_cancel_hook(done, lambda: None)
    with pytest.raises(KeyError, match="unknown or released"):
        table.get(released)


def test_fail_peer_touches_only_that_peer() -> None:
    table = HandleTable(op_timeout_s=None)
    a1, a2, b1 = table.new("a"), table.new("a"), table.new("b")
    table.finish(a2)
    assert table.fail_peer("a", "gone") == [a1]
    assert table.status(a1) is TransferStatus.FAILED
    assert table.status(a2) is TransferStatus.DONE
    assert table.status(b1) is TransferStatus.PENDING
    table.fail_all("closing")
    assert table.status(b1) is TransferStatus.FAILED and table.error(b1) == "closing"
