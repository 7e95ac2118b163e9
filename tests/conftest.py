"""Shared fixtures: real `disagg serve` processes on loopback, always cleaned up."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from support import Instance, start_instance  # noqa: E402


@pytest.fixture
def instance_factory(tmp_path: object) -> Iterator[object]:
    """Start instances; every one is stopped at teardown."""
    started: list[Instance] = []

    def make(args: list[str], **kw: object) -> Instance:
        inst = start_instance(args, tmp_path, **kw)  # type: ignore[arg-type]
        started.append(inst)
        return inst

    yield make
    for inst in started:
        inst.stop()
