"""Shared fixtures: real `disagg serve` processes on loopback, always cleaned up."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from typing import Any

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from support import Instance, start_instance, start_instances  # noqa: E402


class InstanceFactory:
    """``factory(args)`` starts one instance; ``factory.many(args1, args2, ...)`` starts
    several whose start-ups overlap. Every instance started is stopped at teardown."""

    def __init__(self, tmp_path: object) -> None:
        self.tmp_path = tmp_path
        self.started: list[Instance] = []

    def __call__(self, args: list[str], **kw: Any) -> Instance:
        inst = start_instance(args, self.tmp_path, **kw)
        self.started.append(inst)
        return inst

    def many(self, *arg_lists: list[str], **kw: Any) -> list[Instance]:
        insts = start_instances(arg_lists, self.tmp_path, **kw)
        self.started.extend(insts)
        return insts


@pytest.fixture
def instance_factory(tmp_path: object) -> Iterator[InstanceFactory]:
    """Start instances; every one is stopped at teardown."""
    factory = InstanceFactory(tmp_path)
    yield factory
    for inst in factory.started:
        inst.stop()
