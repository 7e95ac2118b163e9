"""X-Request-Id through a real 1P1D behind the proxy, and what the operator reads meanwhile:
the id on the answer and in both instances' logs (the KV connector's transfer line included),
JSON log lines (the prefill logs JSON, the decode text), request and stats lines."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from proxy.config import TransferMode

RID = "client-req-42"
INSTANCE = ["builtin:tiny-llama", "--kv-cache-memory-bytes", "16MiB", "--device", "cpu",
            "--log-level", "debug", "--enable-log-requests"]
DONE = re.compile(r"KV transfers: [1-9]\d* done")


def _kv_config(role: str) -> str:
    return json.dumps({"kv_connector": "PDConnector", "kv_role": role,
                       "kv_connector_extra_config": {"transport": "tcp", "mode": "read"}})


async def _eventually(check: Callable[[], bool], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.1)


def _json_records(log: str) -> list[dict[str, Any]]:
    """Every line of a --log-format json instance, parsed; the only other lines are the
    server's own prints on stdout (``disagg: ready on ...``)."""
    records = []
    for line in log.splitlines():
        if line.startswith("disagg: "):
            continue
        record = json.loads(line)
        assert {"ts", "level", "logger", "msg"} <= record.keys(), record
        records.append(record)
    return records


async def _ask(http: aiohttp.ClientSession, url: str, stream: bool,
               headers: dict[str, str]) -> tuple[str, str]:
    """(the answer's X-Request-Id, the id in its body)."""
    body = {"prompt": "The quick brown fox jumps over the lazy dog. " * 3, "max_tokens": 4,
            "stream": stream}
    async with http.post(url + "/v1/completions", json=body, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        if not stream:
            return resp.headers["X-Request-Id"], (await resp.json())["id"]
        first = next(line for line in (await resp.text()).splitlines()
                     if line.startswith("data: {"))
        return resp.headers["X-Request-Id"], json.loads(first[6:])["id"]


async def test_request_id_and_logs_through_a_real_1p1d(
        instance_factory: Any, proxies: Any, http: aiohttp.ClientSession,
        caplog: pytest.LogCaptureFixture) -> None:
    p, d = instance_factory.many(
        [*INSTANCE, "--log-format", "json", "--kv-transfer-config", _kv_config("kv_producer")],
        [*INSTANCE, "--kv-transfer-config", _kv_config("kv_consumer")],
        env={"DISAGG_LOG_STATS_INTERVAL_S": "0.3"})
    proxy = await proxies(prefill_urls=(p.url,), decode_urls=(d.url,), mode=TransferMode.READ,
                          log_stats_interval_s=0.1)
    with caplog.at_level(logging.INFO, logger="proxy.app"):
        assert await _ask(http, proxy.url, True, {"X-Request-Id": RID}) == (RID, f"cmpl-{RID}")
        generated, body_id = await _ask(http, proxy.url, False, {"X-Request-Id": "not valid"})
        assert re.fullmatch(r"[0-9a-f]{32}", generated) and body_id == f"cmpl-{generated}"
        await _eventually(lambda: "Avg request throughput" in caplog.text)
    line = next(r.getMessage() for r in caplog.records if "request throughput" in r.getMessage())
    assert "In flight:" in line and "Retries: prefill" in line and "failed" in line

    engine_id = re.escape(f"cmpl-{RID}-") + r"[0-9a-f]{8}"
    transfer = re.compile(rf"KV transfer xfer-[0-9a-f]+ for request {engine_id}: (\w+)")
    # the decode logs text: its lines name the id, the connector's too, and stats come
    await _eventually(lambda: DONE.search(d.log()) is not None)
    text = d.log()
    assert f"[{RID}]: Received request cmpl-{RID}-" in text, text
    assert re.search(rf"Finished request {engine_id}: finish_reason=(length|stop)", text), text
    assert [m.group(1) for m in transfer.finditer(text)] == ["consumer_read"], text
    assert "Avg prompt throughput: " in text and "Prefix cache hit rate: " in text
    # the prefill logs JSON: every line parses, and the same facts are there
    await _eventually(lambda: DONE.search(p.log()) is not None)
    records = _json_records(p.log())
    received = [r for r in records if r["msg"].startswith(f"Received request cmpl-{RID}-")]
    assert [r.get("request_id") for r in received] == [RID], received
    assert "kv_transfer=producer (read, xfer-" in received[0]["msg"]
    connector = [r for r in records if transfer.search(r["msg"])]
    assert len(connector) == 1 and connector[0]["process"] == "engine", connector
    assert transfer.findall(connector[0]["msg"]) == ["producer_read"]
    assert any(r["logger"] == "disagg.stats" for r in records)
