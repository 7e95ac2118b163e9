"""Active health checks: an instance that dies leaves the rotation and rejoins when back."""

from __future__ import annotations

import asyncio
from typing import Any

from proxy.config import PolicyName, TransferMode
from proxy.registry import InstanceState, Pool


async def _wait_for(predicate: Any, timeout_s: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        assert loop.time() < deadline, "condition not met before the deadline"
        await asyncio.sleep(0.02)


async def _complete(http: Any, proxy: Any) -> int:
    async with http.post(proxy.url + "/v1/completions",
                         json={"model": "m", "prompt": "x", "max_tokens": 2}) as resp:
        await resp.read()
        return int(resp.status)


async def test_a_killed_prefill_loses_no_request_and_rejoins(fakes: Any, proxies: Any,
                                                             http: Any) -> None:
    p1, p2 = await fakes(role="kv_producer"), await fakes(role="kv_producer")
    d = await fakes(role="kv_consumer")
    proxy = await proxies(prefill_urls=(p1.url, p2.url), decode_urls=(d.url,))
    registry = proxy.state.registry
    port = int(p1.url.rsplit(":", 1)[1])
    await p1.stop()  # killed mid-run: requests that pick it must fail over to p2
    statuses = [await _complete(http, proxy) for _ in range(6)]
    assert statuses == [200] * 6
    assert len(p2.requests) == 6
    await _wait_for(lambda: registry.get(p1.url).state is InstanceState.UNHEALTHY)
    assert registry.healthy(Pool.PREFILL) == [registry.get(p2.url)]
    await p1.start(port=port)  # it comes back on the same address
    await _wait_for(lambda: len(registry.healthy(Pool.PREFILL)) == 2)
    for _ in range(4):
        assert await _complete(http, proxy) == 200
    assert len(p1.requests) >= 1


async def test_a_static_instance_with_the_wrong_mode_is_never_used(fakes: Any, proxies: Any,
                                                                   http: Any) -> None:
    p = await fakes(role="kv_producer", mode="write")
    d = await fakes(role="kv_consumer")
    proxy = await proxies(prefill_urls=(p.url,), decode_urls=(d.url,))
    inst = proxy.state.registry.get(p.url)
    assert inst is not None and inst.state is InstanceState.REJECTED
    assert inst.last_error == "instance runs KV mode write, the proxy runs read"
    assert await _complete(http, proxy) == 503
    assert p.requests == []


async def test_a_decode_in_the_prefill_pool_is_rejected(fakes: Any, proxies: Any) -> None:
    d = await fakes(role="kv_consumer")
    proxy = await proxies(prefill_urls=(d.url,))
    inst = proxy.state.registry.get(d.url)
    assert inst is not None and inst.state is InstanceState.REJECTED
    assert "kv_consumer cannot serve in the prefill pool" in str(inst.last_error)


async def test_an_empty_pool_is_probed_at_once_before_a_request_fails(
        fakes: Any, proxies: Any, http: Any) -> None:
    """The only decode was down at the last health round and is back now (a restart): a
    request probes the empty pool at once and is served, instead of a 503 until the next
    round (60 s away here). A pool that is still down answers 503 within the probe's short
    deadline."""
    p = await fakes(role="kv_producer")
    d = await fakes(role="kv_consumer")
    d.behavior.frozen = True
    proxy = await proxies(prefill_urls=(p.url,), decode_urls=(d.url,),
                          health_check_interval_s=60.0, probe_timeout_s=0.3,
                          unhealthy_after_failures=1)
    registry = proxy.state.registry
    await asyncio.sleep(0.5)  # the health loop's first round (at start) is over: unhealthy
    assert not registry.healthy(Pool.DECODE)
    body = {"model": "m", "prompt": "hi", "max_tokens": 2}
    async with http.post(proxy.url + "/v1/completions", json=body) as resp:
        assert resp.status == 503  # still frozen: the on-demand probe failed too
    await asyncio.sleep(0.6)  # that request's probes timed out; past the minimum interval
    assert not registry.healthy(Pool.DECODE)
    d.behavior.frozen = False
    async with http.post(proxy.url + "/v1/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
    assert registry.healthy(Pool.DECODE)


async def _write_pair(fakes: Any, proxies: Any) -> tuple[Any, Any, Any, Any]:
    """Two WRITE prefills and a decode; health rounds a minute apart (none during a test)."""
    p1 = await fakes(role="kv_producer", mode="write")
    p2 = await fakes(role="kv_producer", mode="write")
    d = await fakes(role="kv_consumer", mode="write", kv_handshake_port=18000)
    proxy = await proxies(prefill_urls=(p1.url, p2.url), decode_urls=(d.url,),
                          mode=TransferMode.WRITE, policy=PolicyName.ROUND_ROBIN,
                          health_check_interval_s=60.0, probe_timeout_s=0.3,
                          unhealthy_after_failures=3)
    return p1, p2, d, proxy


async def test_a_prefill_a_request_failed_on_leaves_the_rotation_when_its_probe_fails_too(
        fakes: Any, proxies: Any, http: Any) -> None:
    """P1 froze (a stopped process): the decode gives up the KV it waited for from P1, the
    pair is retried on P2, and P1 is probed at once: that probe times out too, so P1 leaves
    the rotation now, not after three health rounds, and no later request goes to it."""
    p1, p2, d, proxy = await _write_pair(fakes, proxies)
    registry = proxy.state.registry
    p1.behavior.frozen = True
    d.behavior.hang_s = 0.1
    d.behavior.fail_for_engine = p1.engine_id
    assert await _complete(http, proxy) == 200  # retried on P2
    await _wait_for(lambda: registry.get(p1.url).state is InstanceState.UNHEALTHY, 2.0)
    assert registry.healthy(Pool.PREFILL) == [registry.get(p2.url)]
    assert [await _complete(http, proxy) for _ in range(4)] == [200] * 4
    assert len(p1.requests) == 1 and len(p2.requests) == 5
    p1.behavior.frozen = False  # back: the next health round or revive restores it


async def test_a_prefill_a_request_failed_on_stays_when_its_probe_answers(
        fakes: Any, proxies: Any, http: Any) -> None:
    """The same failure on a prefill that answers its probe (its KV did not reach this decode,
    it is alive): it is probed and stays in the rotation. Suspicions of one instance within
    the check interval probe it once."""
    p1, p2, d, proxy = await _write_pair(fakes, proxies)
    registry = proxy.state.registry
    probes = p1.probes
    d.behavior.fail_for_engine = p1.engine_id
    assert [await _complete(http, proxy) for _ in range(4)] == [200] * 4
    await _wait_for(lambda: p1.probes > probes)
    await asyncio.sleep(0.4)  # every check answered
    inst = registry.get(p1.url)
    assert inst.state is InstanceState.HEALTHY and inst.consecutive_failures == 0
    assert len(p2.requests) == 4 and len(p1.requests) >= 1

    await asyncio.sleep(0.5)  # past the check interval
    probes = p1.probes
    for _ in range(5):
        proxy.state.reviver.suspect(inst)
    await asyncio.sleep(0.3)
    assert p1.probes == probes + 1


async def test_a_frozen_instance_holds_back_no_health_round(fakes: Any, proxies: Any) -> None:
    """A frozen instance's probes wait out their deadline (three intervals here) while the
    rounds keep their cadence: the healthy instance beside it is probed every interval, and
    the frozen one's failures count once per interval, so it leaves the rotation after about
    three intervals past the first deadline (rounds that waited for the slowest probe took an
    interval + the deadline each)."""
    p1, p2 = await fakes(role="kv_producer"), await fakes(role="kv_producer")
    d = await fakes(role="kv_consumer")
    proxy = await proxies(prefill_urls=(p1.url, p2.url), decode_urls=(d.url,),
                          health_check_interval_s=0.2, probe_timeout_s=0.6,
                          unhealthy_after_failures=3)
    registry = proxy.state.registry
    p1.behavior.frozen = True
    before = p2.probes
    await asyncio.sleep(1.6)
    assert p2.probes - before >= 5  # one every 0.2 s (waiting for p1: one every 0.8 s)
    await _wait_for(lambda: registry.get(p1.url).state is InstanceState.UNHEALTHY, 3.0)
    assert registry.get(p2.url).state is InstanceState.HEALTHY
    p1.behavior.frozen = False
    await _wait_for(lambda: registry.get(p1.url).state is InstanceState.HEALTHY, 3.0)
