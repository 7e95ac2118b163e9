"""Pause state machines: one rank (RankPause) and the instance (FrontendPause)."""

from __future__ import annotations

import asyncio

import pytest

from disagg.common.pause import (
    FrontendPause,
    InstancePauseState,
    PauseConflict,
    PauseMode,
    RankPause,
    RankPauseState,
)


@pytest.mark.parametrize("mode", list(PauseMode))
def test_rank_ready_rules(mode: PauseMode) -> None:
    p = RankPause()
    assert p.admits_new and p.may_schedule and not p.ready(has_inflight=False)
    p.begin(1, mode)
    assert p.state is RankPauseState.PENDING and not p.admits_new
    assert p.may_schedule is (mode is PauseMode.WAIT)  # only wait drains in-flight work
    assert p.ready(has_inflight=True) is (mode is not PauseMode.WAIT)
    assert p.ready(has_inflight=False)
    p.complete()
    assert p.state is RankPauseState.PAUSED and not p.may_schedule and not p.ready(False)
    p.resume(2)
    assert p.state is RankPauseState.RUNNING and p.mode is None and p.seq == 2


async def test_instance_paused_only_when_every_rank_reports() -> None:
    fp = FrontendPause(3)
    seq = fp.begin_pause(PauseMode.KEEP)
    assert fp.state is InstancePauseState.PAUSING
    fp.on_report(0, seq, RankPauseState.PAUSED)
    fp.on_report(1, seq - 1, RankPauseState.PAUSED)  # an older command: ignored
    fp.on_report(2, seq, RankPauseState.RUNNING)  # not what this command asked: ignored
    assert not await fp.wait(seq, 0.05)
    assert fp.missing() == [1, 2]
    fp.on_report(1, seq, RankPauseState.PAUSED)
    fp.on_report(2, seq, RankPauseState.PAUSED)
    assert await fp.wait(seq, 1.0)
    assert fp.as_json() == {"paused": True, "state": "paused", "mode": "keep"}


async def test_conflicts_have_clear_messages() -> None:
    fp = FrontendPause(1)
    with pytest.raises(PauseConflict, match="not paused"):
        fp.begin_resume()
    seq = fp.begin_pause(PauseMode.WAIT)
    with pytest.raises(PauseConflict, match="already in progress"):
        fp.begin_pause(PauseMode.ABORT)
    fp.on_report(0, seq, RankPauseState.PAUSED)
    with pytest.raises(PauseConflict, match="already paused.*mode=wait"):
        fp.begin_pause(PauseMode.KEEP)
    seq = fp.begin_resume()
    assert fp.state is InstancePauseState.RUNNING
    fp.on_report(0, seq, RankPauseState.RUNNING)
    assert await asyncio.wait_for(fp.wait(seq, 1.0), 2.0)


async def test_resume_cancels_a_pause_in_progress() -> None:
    fp = FrontendPause(2)
    old = fp.begin_pause(PauseMode.WAIT)
    fp.begin_resume()
    fp.on_report(0, old, RankPauseState.PAUSED)  # late report of the cancelled pause
    fp.on_report(1, old, RankPauseState.PAUSED)
    assert fp.state is InstancePauseState.RUNNING


async def test_a_superseded_command_ends_its_wait_at_once() -> None:
    """A pause cancelled by a resume (or a resume overtaken by a pause) ends the wait of
    whoever sent it at once with a conflict naming why; it waited out its whole deadline and
    answered 504 'ranks [] are still finishing'. A command every rank confirmed is done,
    whatever came after it."""
    fp = FrontendPause(2)
    pause = fp.begin_pause(PauseMode.WAIT)
    waiting = asyncio.ensure_future(fp.wait(pause, 30.0))
    await asyncio.sleep(0.01)
    resume = fp.begin_resume()
    with pytest.raises(PauseConflict, match="cancelled by POST /resume"):
        await asyncio.wait_for(waiting, 1.0)
    with pytest.raises(PauseConflict, match="cancelled by POST /resume"):
        await fp.wait(pause, 30.0)  # asked after it was superseded: the same at once
    waiting = asyncio.ensure_future(fp.wait(resume, 30.0))
    await asyncio.sleep(0.01)
    fp.begin_pause(PauseMode.KEEP)
    with pytest.raises(PauseConflict, match="came before every rank confirmed the resume"):
        await asyncio.wait_for(waiting, 1.0)

    fp = FrontendPause(1)
    pause = fp.begin_pause(PauseMode.ABORT)
    waiting = asyncio.ensure_future(fp.wait(pause, 30.0))
    fp.on_report(0, pause, RankPauseState.PAUSED)
    fp.begin_resume()  # before the waiter ran: the pause was still done
    assert await asyncio.wait_for(waiting, 1.0)
