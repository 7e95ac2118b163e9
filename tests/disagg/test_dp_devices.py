"""One GPU per DP rank from the user's visible list; CPU ranks share the cores."""

from __future__ import annotations

import os

import pytest

from disagg.common import platform
from disagg.common.config import ConfigError
from disagg.dp.devices import child_env, cpu_threads_per_rank, rank_device_env


@pytest.fixture
def four_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = platform.PlatformInfo(platform.PlatformKind.CUDA, 4, "sm_90", 32, "H200", "t",
                                 None, "13.0")
    monkeypatch.setattr(platform, "current_platform", lambda: fake)


def test_ranks_take_entries_of_the_users_list(four_gpus: None,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    assert [rank_device_env(r, 2, "auto") for r in range(2)] == [
        {"CUDA_VISIBLE_DEVICES": "4"}, {"CUDA_VISIBLE_DEVICES": "5"}]
    with pytest.raises(ConfigError, match="needs 3 GPUs, but only 2 are visible"):
        rank_device_env(0, 3, "auto")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert rank_device_env(3, 4, "cuda") == {"CUDA_VISIBLE_DEVICES": "3"}
    assert rank_device_env(1, 2, "cpu") == {} and rank_device_env(0, 1, "auto") == {}


def test_tensor_parallel_ranks_take_contiguous_gpus(four_gpus: None,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert [rank_device_env(r, 2, "auto", tp_size=2) for r in range(2)] == [
        {"CUDA_VISIBLE_DEVICES": "0,1"}, {"CUDA_VISIBLE_DEVICES": "2,3"}]
    assert rank_device_env(0, 1, "cuda", tp_size=4) == {"CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    with pytest.raises(ConfigError, match="--data-parallel-size 2 x --tensor-parallel-size 4 "
                                          "needs 8 GPUs, but only 4"):
        rank_device_env(0, 2, "auto", tp_size=4)


def test_child_env_restores_the_parent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")
    monkeypatch.delenv("HIP_VISIBLE_DEVICES", raising=False)
    with child_env({"CUDA_VISIBLE_DEVICES": "1", "HIP_VISIBLE_DEVICES": "2"}):
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "1"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "7" and "HIP_VISIBLE_DEVICES" not in os.environ


def test_cpu_ranks_split_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(8)), raising=False)
    assert cpu_threads_per_rank(3, "cpu") == 2
    assert cpu_threads_per_rank(16, "cpu") == 1
    assert cpu_threads_per_rank(1, "cpu") is None
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert cpu_threads_per_rank(2, "cpu") is None  # the user's choice wins
