"""WRITE under pool pressure: prefills may start before the decode announced its blocks
(PDConnector.can_schedule), within half the prefill's pool, so a burst larger than either pool
neither deadlocks P and D (a prefill pool full of prefills waiting for destinations while the
decode's pool is full of requests waiting for those prefills) nor loses a block, and every
answer equals monolithic."""

from __future__ import annotations

import concurrent.futures
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import requests  # type: ignore[import-untyped]
from pd_helpers import info, kv_config, metric, remote_of, wait_clean
from support import Instance, start_instances

SMALL = ["builtin:tiny-llama", "--device", "cpu", "--num-gpu-blocks-override", "12",
         "--max-model-len", "64", "--no-enable-prefix-caching"]
"""12 blocks of 16 tokens: four 40-token prompts fill a pool; half of it takes two."""
FAILED = "disagg_kv_connector_transfers_failed_total"
TIMEOUTS = {"transfer_timeout": 8, "defer_timeout": 8, "early_start": True}
"""A stall ends in expired transfers (failed requests) well inside the test's deadline."""


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Instance, Instance]]:
    started = start_instances(
        [[*SMALL, "--kv-transfer-config", kv_config("kv_producer", "write", **TIMEOUTS)],
         [*SMALL, "--kv-transfer-config", kv_config("kv_consumer", "write", **TIMEOUTS)]],
        tmp_path_factory.mktemp("pool-pressure"))
    try:
        yield started[0], started[1]
    finally:
        for inst in started:
            inst.stop()


def _body(i: int) -> dict[str, Any]:
    prompt = [(7 * i + 3 * j) % 250 + 1 for j in range(40)]
    return {"prompt": prompt, "max_tokens": 4, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}


def _tokens(reply: requests.Response) -> list[int]:
    assert reply.status_code == 200, reply.text
    return list(reply.json()["choices"][0]["token_ids"])


def _write(p: Instance, d: Instance, body: dict[str, Any], lag_s: float) -> list[int]:
    """One WRITE request as the proxy runs it, P and D called at once, except that one side's
    call lags by |lag_s| (positive: D's; negative: P's); D's token ids."""
    tid = uuid.uuid4().hex
    p_params = {"transfer_id": tid, "do_remote_decode": True, "mode": "write",
                **remote_of(info(d.url))}
    d_params = {"transfer_id": tid, "do_remote_prefill": True, "mode": "write",
                **remote_of(info(p.url))}

    def call_p() -> requests.Response:
        time.sleep(max(0.0, -lag_s))
        return requests.post(p.url + "/v1/completions", timeout=120, json={
            **body, "max_tokens": 1, "stream": False, "kv_transfer_params": p_params})

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        p_reply = pool.submit(call_p)
        time.sleep(max(0.0, lag_s))
        tokens = _tokens(requests.post(d.url + "/v1/completions", timeout=120,
                                       json={**body, "kv_transfer_params": d_params}))
        assert p_reply.result().status_code == 200
    return tokens


def test_a_burst_larger_than_both_pools_completes_equal_to_monolithic(pair) -> None:
    """Half the requests reach P well before D, the other half D before P: P's pool fills
    with prefills the decode has no blocks for yet while the decode's fills with requests the
    prefill has not computed, unless early prefills leave room (with the whole pool open to
    them this stalls until transfers expire, and requests fail)."""
    p, d = pair
    bodies = [_body(i) for i in range(24)]  # 72 blocks of prompts against 12 on each side
    mono = [_tokens(requests.post(d.url + "/v1/completions", json=b, timeout=60))
            for b in bodies]
    lags = [0.5 if i % 2 else -0.5 for i in range(len(bodies))]
    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        got = list(pool.map(lambda b, lag: _write(p, d, b, lag), bodies, lags, timeout=180))
    assert got == mono
    assert metric(p.url, FAILED) == 0 and metric(d.url, FAILED) == 0
    wait_clean(p.url)
    wait_clean(d.url)
