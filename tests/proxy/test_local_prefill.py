"""--local-prefill-threshold: fixed, and auto (learned from the flows' phase timings)."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from proxy.config import PolicyName, TransferMode
from proxy.launcher import parse_args, proxy_config
from proxy.local_prefill import LocalPrefillThreshold

SHORT = "hi there"
LONG = "a prompt long enough to be worth a prefill instance " * 3


def _learned(per_token_s: float, handoff_s: float, n: int = 8, **kw: Any) -> LocalPrefillThreshold:
    t = LocalPrefillThreshold(auto=True, **kw)
    for _ in range(n):
        t.observe_prefill(100, per_token_s * 100)
        t.observe_handoff(handoff_s)
    return t


def test_fixed_threshold_ignores_load() -> None:
    t = LocalPrefillThreshold(32)
    assert t.tokens([10_000]) == 32 and t.tokens([]) == 32


def test_auto_is_zero_until_it_has_seen_enough_prefills() -> None:
    t = _learned(0.001, 0.01, n=7)
    assert t.tokens([0]) == 0
    t.observe_prefill(100, 0.1)
    assert t.tokens([0]) == 10  # 10 ms of hand-off is worth 10 tokens of compute


def test_auto_rises_with_the_least_loaded_prefill_queue_and_is_capped() -> None:
    t = _learned(0.001, 0.0, max_tokens=500)
    assert t.tokens([0, 300]) == 0  # an idle prefill: no wait to save
    assert t.tokens([200, 300]) == 200  # 200 tokens ahead on the best prefill
    assert t.tokens([5_000]) == 500 and t.current_tokens == 500
    assert t.tokens([]) == 0  # no prefill at all: the flow's own 503 decides


def test_auto_follows_a_slower_prefill() -> None:
    t = _learned(0.001, 0.02)
    before = t.tokens([0])
    for _ in range(50):
        t.observe_prefill(100, 0.4)  # 4 ms per token now
    assert t.tokens([0]) < before


@pytest.mark.parametrize("value", ["-1", "lots"])
def test_launcher_refuses_a_bad_threshold(value: str, capsys: Any) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args(["--prefill", "http://p", "--decode", "http://d",
                    "--local-prefill-threshold", value])
    assert exc.value.code == 2
    assert "--local-prefill-threshold" in capsys.readouterr().err


def test_launcher_auto_threshold_config() -> None:
    cfg = proxy_config(parse_args(["--prefill", "http://p", "--decode", "http://d",
                                   "--local-prefill-threshold", "auto",
                                   "--local-prefill-max-tokens", "64"]))
    assert cfg.local_prefill_auto and cfg.local_prefill_max_tokens == 64
    assert cfg.local_prefill_threshold_tokens == 0


async def _complete(http: aiohttp.ClientSession, url: str, prompt: str) -> int:
    async with http.post(url + "/v1/completions",
                         json={"model": "m", "prompt": prompt, "max_tokens": 2}) as resp:
        await resp.read()
        return resp.status


async def test_auto_moves_short_prompts_to_decode_when_the_prefill_pool_is_saturated(
        fakes: Any, proxies: Any, http: Any) -> None:
    """Idle pool: short prompts go P/D (the hand-off costs less than their compute). With the
    one prefill busy on many long prompts, short ones go to the decode alone, and /metrics
    shows the threshold in use; once the pool drains they go P/D again."""
    p = await fakes(role="kv_producer", mode="read")
    d = await fakes(role="kv_consumer", mode="read", kv_handshake_port=18000)
    proxy = await proxies(prefill_urls=(p.url,), decode_urls=(d.url,),
                          mode=TransferMode.READ, policy=PolicyName.ROUND_ROBIN,
                          model="builtin:tiny-llama", local_prefill_auto=True)
    p.behavior.compute_s = 0.2  # ~4 ms per token of LONG: the hand-off is worth ~1 token
    for _ in range(8):
        assert await _complete(http, proxy.url, LONG) == 200
    assert await _complete(http, proxy.url, SHORT) == 200
    assert "kv_transfer_params" in d.requests[-1] and len(p.requests) == 9

    p.behavior.hang_s = 2.0  # the prefill pool fills up
    busy = [asyncio.ensure_future(_complete(http, proxy.url, LONG)) for _ in range(6)]
    await asyncio.sleep(0.3)
    assert await _complete(http, proxy.url, SHORT) == 200
    assert "kv_transfer_params" not in d.requests[-1]
    async with http.get(proxy.url + "/metrics") as resp:
        text = await resp.text()
    line = next(x for x in text.splitlines()
                if x.startswith("disagg_proxy_local_prefill_threshold_tokens"))
    assert float(line.split()[-1]) > len(SHORT.split()) + 1
    assert await asyncio.gather(*busy) == [200] * 6
    assert [r["prompt"] for r in p.requests].count(SHORT) == 1  # only the idle-pool one

    p.behavior.hang_s = 0.0
    assert await _complete(http, proxy.url, SHORT) == 200
    assert "kv_transfer_params" in d.requests[-1]
