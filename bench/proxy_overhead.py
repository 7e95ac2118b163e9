"""Proxy overhead: the proxy alone before instant fake instances, versus calling them directly.

    python -m bench.proxy_overhead [--requests 1000] [--concurrency 1 32] [--stream-tokens 8]

Three processes: fake upstreams (a prefill and a decode site that answer at once), the proxy
(``python -m proxy.launcher``), and this load generator. Each run is measured twice in the same
invocation, client -> decode site ("direct") and client -> proxy ("proxied"), for scenarios
``local`` (one hop: the proxy relays to decode alone) and ``read`` (two hops: P with
max_tokens=1, then D). Reported: latency p50/p90/p99 of both, the added latency, and requests/s
per proxy core (requests / CPU seconds the proxy process used). One JSON row is appended to
bench/results/proxy_overhead.jsonl.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psutil
from aiohttp import web

from bench import RESULTS_DIR
from bench.metadata import run_metadata
from bench.results import append_row

RESULT_FILE = RESULTS_DIR / "proxy_overhead.jsonl"
START_TIMEOUT_S = 30.0
REQUEST_TIMEOUT_S = 30.0


def _fake_app(role: str, stream_tokens: int) -> web.Application:
    """An instance that answers at once (kv params included when asked for a READ prefill)."""
    info = {"role": role, "mode": "read", "engine_id": f"fake-{role}", "http_url": "",
            "max_model_len": 4096, "block_size": 16, "dp_size": 1, "model": "builtin:tiny-llama",
            "kv_host": "127.0.0.1", "kv_handshake_port": 1, "kv_notify_port": 2}
    chunk = {"id": "c", "object": "text_completion", "created": 0, "model": "m",
             "choices": [{"index": 0, "text": " tok", "finish_reason": None}]}
    event = b"data: " + json.dumps(chunk).encode() + b"\n\n"

    async def generate(request: web.Request) -> web.StreamResponse:
        """Completions, streamed or not, at once."""
        body = await request.json()
        if body.get("stream"):
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            for _ in range(stream_tokens):
                await resp.write(event)
            await resp.write(b"data: [DONE]\n\n")
            return resp
        out: dict[str, Any] = {"id": "c", "object": "text_completion", "created": 0,
                               "model": "m", "choices": [{"index": 0, "text": " tok",
                                                          "finish_reason": "length"}]}
        params = body.get("kv_transfer_params") or {}
        if params.get("do_remote_decode"):
            out["kv_transfer_params"] = {"transfer_id": params["transfer_id"],
                                         "remote_engine_id": "fake", "remote_host": "127.0.0.1",
                                         "remote_handshake_port": 1, "remote_notify_port": 2,
                                         "remote_block_ids": [0], "remote_num_tokens": 4}
        return web.json_response(out)

    async def instance_info(request: web.Request) -> web.Response:
        """What the proxy probes."""
        return web.json_response(info)

    async def abort(request: web.Request) -> web.Response:
        """Nothing to abort."""
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/v1/completions", generate)
    app.router.add_get("/instance_info", instance_info)
    app.router.add_post("/v1/kv_transfer/abort", abort)
    return app


async def _serve_upstreams(stream_tokens: int) -> None:
    """Child mode: serve a prefill and a decode fake; print their ports; run until killed."""
    ports = []
    for role in ("kv_producer", "kv_consumer"):
        runner = web.AppRunner(_fake_app(role, stream_tokens), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0, backlog=1024).start()
        ports.append(runner.addresses[0][1])
    print(f"upstreams {ports[0]} {ports[1]}", flush=True)
    await asyncio.Event().wait()


async def _start(argv: list[str], ready_prefix: str) -> tuple[asyncio.subprocess.Process, str]:
    """Start a child and wait (bounded) for its ready line on stdout."""
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.DEVNULL)
    assert proc.stdout is not None
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        line = (await asyncio.wait_for(proc.stdout.readline(), START_TIMEOUT_S)).decode()
        if not line:
            break
        if line.startswith(ready_prefix):
            return proc, line.strip()
    proc.kill()
    raise RuntimeError(f"{argv[:4]} did not become ready")


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 10.0)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()


async def _one(session: aiohttp.ClientSession, url: str, body: bytes) -> float:
    """One request, read to the end; its latency in seconds."""
    started = time.perf_counter()
    async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
        await r.read()
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status} from {url}")
    return time.perf_counter() - started


async def _load(url: str, body: bytes, num_requests: int, concurrency: int) -> tuple[list[float],
                                                                                     float]:
    """``num_requests`` requests, ``concurrency`` at a time; latencies and wall seconds."""
    latencies: list[float] = []
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        for _ in range(min(20, num_requests)):  # warm connections and caches
            await _one(session, url, body)
        remaining = iter(range(num_requests))

        async def worker() -> None:
            """One client connection sending requests back to back."""
            for _ in remaining:
                latencies.append(await _one(session, url, body))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return latencies, time.perf_counter() - started


def _percentiles_ms(latencies: list[float]) -> dict[str, float]:
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    return {"p50_ms": round(cuts[49] * 1e3, 3), "p90_ms": round(cuts[89] * 1e3, 3),
            "p99_ms": round(cuts[98] * 1e3, 3)}


@dataclass(frozen=True)
class Case:
    """One measured configuration."""

    scenario: str
    stream: bool
    concurrency: int


async def _measure(case: Case, urls: dict[str, str], proxy_pid: int,
                   num_requests: int) -> dict[str, Any]:
    """Direct and proxied runs of one case, and their comparison."""
    body = json.dumps({"model": "m", "prompt": "hello proxy", "max_tokens": 8,
                       "stream": case.stream}).encode()
    direct, direct_wall = await _load(urls["decode"], body, num_requests, case.concurrency)
    proxy_proc = psutil.Process(proxy_pid)
    cpu_before = sum(proxy_proc.cpu_times()[:2])
    proxied, proxied_wall = await _load(urls[case.scenario], body, num_requests,
                                        case.concurrency)
    proxy_cpu_s = sum(proxy_proc.cpu_times()[:2]) - cpu_before
    d, p = _percentiles_ms(direct), _percentiles_ms(proxied)
    return {"scenario": case.scenario, "stream": case.stream, "concurrency": case.concurrency,
            "direct": {**d, "rps": round(num_requests / direct_wall, 1)},
            "proxied": {**p, "rps": round(num_requests / proxied_wall, 1)},
            "added_p50_ms": round(p["p50_ms"] - d["p50_ms"], 3),
            "added_p99_ms": round(p["p99_ms"] - d["p99_ms"], 3),
            "proxy_cpu_s": round(proxy_cpu_s, 3),
            "rps_per_proxy_core": round(num_requests / max(proxy_cpu_s, 1e-9), 1)}


async def _start_proxy(p_port: int, d_port: int,
                       extra: list[str]) -> tuple[asyncio.subprocess.Process, str]:
    argv = [sys.executable, "-m", "proxy.launcher", "--port", "0", "--policy", "round_robin",
            "--prefill", f"http://127.0.0.1:{p_port}", "--decode", f"http://127.0.0.1:{d_port}",
            "--model", "builtin:tiny-llama", *extra]
    proc, line = await _start(argv, "disagg-proxy: ready on ")
    return proc, line.rsplit(" ", 1)[1]


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    upstream, line = await _start([sys.executable, "-m", "bench.proxy_overhead",
                                   "--serve-upstreams", "--stream-tokens",
                                   str(args.stream_tokens)], "upstreams ")
    p_port, d_port = (int(x) for x in line.split()[1:])
    # Two proxies: one disaggregates every request, one sends everything to decode alone.
    read_proxy, read_url = await _start_proxy(p_port, d_port, [])
    local_proxy, local_url = await _start_proxy(p_port, d_port,
                                                ["--local-prefill-threshold", "1000000"])
    urls = {"decode": f"http://127.0.0.1:{d_port}/v1/completions",
            "read": read_url + "/v1/completions", "local": local_url + "/v1/completions"}
    pids = {"read": read_proxy.pid, "local": local_proxy.pid}
    results = []
    try:
        for concurrency in args.concurrency:
            for scenario in ("local", "read"):
                for stream in (False, True):
                    case = Case(scenario, stream, concurrency)
                    results.append(await _measure(case, urls, pids[scenario], args.requests))
                    print(json.dumps(results[-1]), flush=True)
    finally:
        for proc in (read_proxy, local_proxy, upstream):
            await _stop(proc)
    # Load, client and upstreams share the machine with the proxy: say how busy it was.
    load_1m = round(os.getloadavg()[0], 2)
    return {"bench": "proxy_overhead", **run_metadata(deployment="proxy + fake upstreams"),
            "config": {"requests": args.requests, "concurrency": args.concurrency,
                       "stream_tokens": args.stream_tokens, "proxy_policy": "round_robin",
                       "command": "python -m bench.proxy_overhead " + " ".join(args.argv)},
            "load_average_1m_at_end": load_1m, "results": results}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print each case, append one row to the result file."""
    parser = argparse.ArgumentParser(prog="python -m bench.proxy_overhead")
    parser.add_argument("--requests", type=int, default=1000, help="per run (default 1000)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--stream-tokens", type=int, default=8)
    parser.add_argument("--output", default=str(RESULT_FILE), help="JSON-lines file to append")
    parser.add_argument("--no-save", action="store_true", help="print only")
    parser.add_argument("--serve-upstreams", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.requests < 100 or min(args.concurrency) < 1:
        parser.error("--requests must be >= 100 and --concurrency >= 1")
    if args.serve_upstreams:
        asyncio.run(_serve_upstreams(args.stream_tokens))
        return 0
    row = asyncio.run(_run(args))
    if not args.no_save:
        append_row(Path(args.output), row)
        print(f"appended a row to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
