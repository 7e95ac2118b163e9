"""Helpers used by every launcher."""

from __future__ import annotations

import torch

from hip_kernels.triton_compat import (
    HAS_TRITON,
    cdiv,
    interpreter_upcasts_dot,
    next_power_of_2,
)


def test_next_power_of_2():
    assert [next_power_of_2(n) for n in (0, 1, 2, 3, 17, 128, 129)] == [1, 1, 2, 4, 32, 128, 256]


def test_cdiv():
    assert [cdiv(n, 16) for n in (0, 1, 16, 17)] == [0, 1, 1, 2]


def test_triton_is_importable_on_the_test_machine():
    assert HAS_TRITON


def test_dot_upcast_only_for_bf16_under_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not interpreter_upcasts_dot(torch.bfloat16)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert interpreter_upcasts_dot(torch.bfloat16)
    assert not interpreter_upcasts_dot(torch.float16)
