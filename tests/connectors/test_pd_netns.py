"""A full P/D pair on two "hosts": network namespaces joined by a veth pair, ``tcp`` transport.

The prefill instance (``kv_producer``) runs in namespace A, the decode instance
(``kv_consumer``) in namespace B. Their connectors bind and advertise the data-link addresses
(``kv_connector_extra_config.host``), so both the ZMQ control plane and the tcp transport's KV
bytes cross the A-B veth, never loopback; the test checks that the link's counters grew by at
least the KV bytes moved. The greedy P/D output must equal a monolithic instance's (root
namespace, 127.0.0.1), and afterwards both ledgers must be clean (free == total, none held)::

                     root namespace: pytest, monolithic instance on 127.0.0.1
              mgmt veth |  10.231.M.1/30                  10.231.M.5/30  | mgmt veth
                        |  10.231.M.2 (HTTP)          (HTTP) 10.231.M.6  |
        ns A: prefill --+-- 10.231.9.1 ==== data veth ==== 10.231.9.2 --+-- ns B: decode

How the test reaches the HTTP servers: each namespace also gets a management veth to the root
namespace and its instance's HTTP server listens on that link's address, so the test process
drives both instances with the same in-process helpers as the loopback P/D tests
(``pd_helpers``). HTTP thus never shares the data link whose counters are checked, and the
namespaces have no route to each other except the data link. The data-link addresses live only
inside the namespaces; the management octet ``M`` is derived from the pid so that two test runs
at once do not put the same address on two root-namespace links.

Needs root and ``ip netns``; skipped with the reason otherwise. Instances are killed (process
group) and namespaces deleted in finalizers, also when a test fails.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from netns import ip, netns_unavailable
from pd_helpers import BASE, info, kv_config, metric, pd_request, wait_clean
from support import Instance, start_instance, stop_all

MAX_MODEL_LEN = 128
MAX_TOKENS = 6
_HTTP_TIMEOUT_S = 60.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Host:
    """One namespace: its name, its data-link end and address, its management address."""

    ns: str
    """Network namespace name."""
    data_dev: str
    """The data veth end inside this namespace."""
    data_addr: str
    """Address on the data link (what the connector binds and advertises)."""
    http_addr: str
    """Address on the management link to the root namespace (the HTTP server's)."""

    def prefix(self) -> list[str]:
        """Command prefix that runs a program inside this namespace (exec, no fork)."""
        return ["ip", "netns", "exec", self.ns]


def _setup_steps(a: Host, b: Host, mgmt: tuple[str, str], octet: int) -> list[tuple[str, ...]]:
    """`ip` invocations building the picture in the module docstring."""
    mgmt_a, mgmt_b = mgmt
    steps: list[tuple[str, ...]] = [
        ("netns", "add", a.ns), ("netns", "add", b.ns),
        ("link", "add", a.data_dev, "type", "veth", "peer", "name", b.data_dev),
        ("link", "set", a.data_dev, "netns", a.ns), ("link", "set", b.data_dev, "netns", b.ns),
    ]
    for host, dev, root_addr in ((a, mgmt_a, f"10.231.{octet}.1"),
                                 (b, mgmt_b, f"10.231.{octet}.5")):
        steps += [
            ("link", "add", dev, "type", "veth", "peer", "name", dev + "n"),
            ("link", "set", dev + "n", "netns", host.ns),
            ("addr", "add", f"{root_addr}/30", "dev", dev), ("link", "set", dev, "up"),
            ("-n", host.ns, "addr", "add", f"{host.http_addr}/30", "dev", dev + "n"),
            ("-n", host.ns, "addr", "add", f"{host.data_addr}/30", "dev", host.data_dev),
            ("-n", host.ns, "link", "set", dev + "n", "up"),
            ("-n", host.ns, "link", "set", host.data_dev, "up"),
            ("-n", host.ns, "link", "set", "lo", "up"),
        ]
    return steps


@pytest.fixture(scope="module")
def two_hosts() -> Iterator[tuple[Host, Host]]:
    """(prefill host, decode host): two namespaces, a data veth between them, mgmt veths."""
    reason = netns_unavailable("dgpdprobe")
    if reason is not None:
        pytest.skip(f"network namespaces unavailable: {reason}")
    tag = os.getpid() % 100000
    octet = 10 + os.getpid() % 240
    a = Host(ns=f"dg-pd-a-{tag}", data_dev=f"dgpa{tag}", data_addr="10.231.9.1",
             http_addr=f"10.231.{octet}.2")
    b = Host(ns=f"dg-pd-b-{tag}", data_dev=f"dgpb{tag}", data_addr="10.231.9.2",
             http_addr=f"10.231.{octet}.6")
    mgmt = (f"dgma{tag}", f"dgmb{tag}")
    try:
        for step in _setup_steps(a, b, mgmt, octet):
            result = ip(*step)
            assert result.returncode == 0, f"ip {' '.join(step)}: {result.stderr}"
        yield a, b
    finally:
        # Deleting a namespace deletes the veth ends inside it and with them their peers.
        for ns in (a.ns, b.ns):
            ip("netns", "del", ns)
        for dev in (a.data_dev, *mgmt):
            ip("link", "del", dev)


@pytest.fixture(scope="module")
def instances(two_hosts: tuple[Host, Host],
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Instance]]:
    """[monolithic (root namespace, the reference output), prefill in A, decode in B], started
    at the same time. Both tests share them: each request names its mode (``pd_request``),
    the connectors' configured mode is only a default."""
    a, b = two_hosts
    tmp = tmp_path_factory.mktemp("netns")
    common = [*BASE, "--max-model-len", str(MAX_MODEL_LEN)]
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(start_instance, common, tmp)] + [
            pool.submit(start_instance, [*common, "--kv-transfer-config",
                                         kv_config(role, "read", host=host.data_addr)],
                        tmp, host=host.http_addr, prefix=host.prefix())
            for role, host in (("kv_producer", a), ("kv_consumer", b))]
    started = [f.result() for f in futures if f.exception() is None]
    try:
        for f in futures:  # the first failure to start, once the others are owned here
            f.result()
        yield started
    finally:
        stop_all(started)


def _tx_bytes(host: Host) -> int:
    """Bytes sent so far by the host's data veth end."""
    result = ip("-n", host.ns, "-s", "-j", "link", "show", "dev", host.data_dev)
    assert result.returncode == 0, result.stderr
    return int(json.loads(result.stdout)[0]["stats64"]["tx"]["bytes"])


def _prompts(block_size: int, mode: str) -> list[list[int]]:
    """One token, and one block + 1 (a partial last block); other tokens per mode, since both
    modes share the pair and its prefix caches (a decode-side hit would move nothing)."""
    k = ("read", "write").index(mode)
    return [[(7 * i + n + k) % 250 + 1 for i in range(n)] for n in (1, block_size + 1)]


async def _equal_outputs(mono_url: str, p_url: str, d_url: str, mode: str,
                         prompts: list[list[int]]) -> None:
    """Each prompt's greedy P/D tokens equal the monolithic instance's."""
    p_info, d_info = info(p_url), info(d_url)
    async with aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=_HTTP_TIMEOUT_S)) as s:
        for prompt in prompts:
            body: dict[str, Any] = {"prompt": prompt, "max_tokens": MAX_TOKENS,
                                    "temperature": 0, "ignore_eos": True,
                                    "return_token_ids": True}
            async with s.post(mono_url + "/v1/completions", json=body) as r:
                assert r.status == 200, await r.text()
                expected = (await r.json())["choices"][0]["token_ids"]
            status, out = await pd_request(s, p_url, d_url, body, mode, p_info, d_info)
            assert status == 200, out
            assert out["choices"][0]["token_ids"] == expected, f"prompt of {len(prompt)} tokens"


@pytest.mark.parametrize("mode", ["read", "write"])
def test_pd_across_namespaces_equals_monolithic(
        two_hosts: tuple[Host, Host], instances: list[Instance], mode: str) -> None:
    a, b = two_hosts
    monolithic, p, d = instances
    assert (info(p.url)["kv_host"], info(d.url)["kv_host"]) == (a.data_addr, b.data_addr)
    prompts = _prompts(int(info(p.url)["block_size"]), mode)
    moved_side = d.url if mode == "read" else p.url  # the side that posts the one-sided ops
    # the pair is shared by both modes: count this test's transfers only
    moved_before = metric(moved_side, "disagg_kv_connector_bytes_moved_total")
    done_before = metric(moved_side, "disagg_kv_connector_transfers_done_total")
    sent_before = _tx_bytes(a)

    asyncio.run(_equal_outputs(monolithic.url, p.url, d.url, mode, prompts))

    moved = metric(moved_side, "disagg_kv_connector_bytes_moved_total") - moved_before
    assert moved > 0
    # A one-token prompt has no KV to move: the decode recomputes the last prompt token.
    done = metric(moved_side, "disagg_kv_connector_transfers_done_total") - done_before
    assert done >= len(prompts) - 1
    # Either way the KV flows from the prefill host to the decode host, over the data veth.
    assert _tx_bytes(a) - sent_before >= moved
    wait_clean(p.url)
    wait_clean(d.url)
