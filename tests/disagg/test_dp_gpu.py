"""Data parallelism on GPUs: each rank gets its own GPU; pause/barrier/request/barrier holds."""

from __future__ import annotations

import os
import time
from typing import Any

import pytest
import requests  # type: ignore[import-untyped]
import torch

pytestmark = pytest.mark.multi_gpu

KEY = "gpu-admin"
AUTH = {"Authorization": f"Bearer {KEY}"}


def _post(url: str, path: str, **kw: Any) -> dict[str, Any]:
    r = requests.post(url + path, headers=AUTH, timeout=60, **kw)
    assert r.status_code == 200, r.text
    return dict(r.json())


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_each_rank_on_its_own_gpu_and_pause_barrier_holds(instance_factory,
                                                          monkeypatch) -> None:
    monkeypatch.setenv("DISAGG_DP_LOCKSTEP", "1")
    inst = instance_factory(["builtin:tiny-llama", "--device", "cuda", "-dp", "2",
                             "--kv-cache-memory-bytes", "64MiB", "--admin-key", KEY],
                            ready_timeout_s=240)
    ranks = _post(inst.url, "/collective_rpc", json={"method": "dp_state"})["results"]
    user = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = user.split(",") if user else ["0", "1"]
    assert [r["visible_devices"] for r in ranks] == ids[:2]
    assert all(r["device"].startswith("cuda") for r in ranks)
    body: dict[str, Any] = {"prompt": "gpu ranks", "max_tokens": 8, "ignore_eos": True}
    for _ in range(4):
        assert requests.post(inst.url + "/v1/completions", json=body, timeout=60).ok
    for mode in ("keep", "wait", "abort"):
        _post(inst.url, f"/pause?mode={mode}")
        _post(inst.url, "/collective_rpc", json={"method": "barrier"})
        _post(inst.url, "/collective_rpc", json={"method": "barrier",
                                                 "args": {"stagger_s": 0.1}})
        _post(inst.url, "/resume")
    t0 = time.monotonic()
    assert requests.post(inst.url + "/v1/completions", json=body, timeout=60).ok
    assert time.monotonic() - t0 < 30
    stats = _post(inst.url, "/collective_rpc", json={"method": "stats"})["results"]
    assert all(s["num_requests_total"] >= 2 for s in stats)
