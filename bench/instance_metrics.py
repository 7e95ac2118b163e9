"""Counters scraped from the instances' ``/metrics`` around a timed run: prefix cache, KV moved.

``disagg bench serve --metrics-url URL`` (one per instance) reads the counters just before
the timed run and again once they settle after it; the difference is the run's own:

* prefix hit rate = Δ ``disagg_prefix_cache_hits`` / Δ ``disagg_prefix_cache_queries`` (prompt
  tokens found cached / looked up, summed over every instance: in 1P1D both the prefill and the
  decode look each prompt up), also per instance;
* KV bytes moved per request = Δ ``disagg_kv_connector_bytes_moved_total`` / completed requests
  (the decode counts it in READ mode, the prefill in WRITE mode, so the sum counts each once).

A counter no instance reports gives None, as does a hit rate over zero queries (caching off).
"""

from __future__ import annotations

import asyncio
import re
from typing import Any, NamedTuple

import aiohttp

PREFIX_QUERIES = "disagg_prefix_cache_queries"
PREFIX_HITS = "disagg_prefix_cache_hits"
KV_BYTES_MOVED = "disagg_kv_connector_bytes_moved_total"
COUNTERS = (PREFIX_QUERIES, PREFIX_HITS, KV_BYTES_MOVED)
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{[^}]*\})?\s+(\S+)")
_SCRAPE_TIMEOUT_S = 10.0
_SETTLE_POLL_S = 0.2
_SETTLE_TIMEOUT_S = 5.0

Snapshot = dict[str, dict[str, float]]
"""Instance URL -> counter name -> value (summed over label sets)."""


class Readings(NamedTuple):
    """The counters just before and just after one timed run."""

    before: Snapshot
    after: Snapshot


class ScrapeError(RuntimeError):
    """An instance's /metrics could not be read (user-facing one-line message)."""


def parse_counters(text: str, names: tuple[str, ...] = COUNTERS) -> dict[str, float]:
    """The named samples of a Prometheus text page, each summed over its label sets; names the
    page does not carry are left out."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m and m.group(1) in names:
            values[m.group(1)] = values.get(m.group(1), 0.0) + float(m.group(2))
    return values


async def _scrape_one(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    target = url.rstrip("/") + "/metrics"
    try:
        async with session.get(target, timeout=aiohttp.ClientTimeout(
                total=_SCRAPE_TIMEOUT_S)) as resp:
            if resp.status != 200:
                raise ScrapeError(f"GET {target} answered HTTP {resp.status}")
            return parse_counters(await resp.text())
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        raise ScrapeError(f"cannot read {target}: {type(exc).__name__}: {exc}") from None


async def scrape(session: aiohttp.ClientSession, urls: list[str]) -> Snapshot:
    """One reading of every instance's counters."""
    values = await asyncio.gather(*(_scrape_one(session, url) for url in urls))
    return dict(zip(urls, values, strict=True))


async def scrape_settled(session: aiohttp.ClientSession, urls: list[str],
                         timeout_s: float = _SETTLE_TIMEOUT_S) -> Snapshot:
    """A reading once two in a row agree: an instance's counters come from its engine's last
    stats message, which can trail the answer the client already got by a step."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    last = await scrape(session, urls)
    while loop.time() < deadline:
        await asyncio.sleep(_SETTLE_POLL_S)
        now = await scrape(session, urls)
        if now == last:
            break
        last = now
    return last


def _delta(before: Snapshot, after: Snapshot, url: str, name: str) -> float | None:
    if name not in after.get(url, {}):
        return None
    return after[url][name] - before.get(url, {}).get(name, 0.0)


def _sum(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def _rate(hits: float | None, queries: float | None) -> float | None:
    return hits / queries if hits is not None and queries else None


def cache_figures(readings: Readings, num_requests: int) -> dict[str, Any]:
    """Result keys of the run between two readings: totals, rates and a per-instance split."""
    before, after = readings
    by_url: dict[str, dict[str, float | None]] = {}
    for url in after:
        queries, hits = (_delta(before, after, url, n) for n in (PREFIX_QUERIES, PREFIX_HITS))
        by_url[url] = {"prefix_cache_queries": queries, "prefix_cache_hits": hits,
                       "prefix_cache_hit_rate": _rate(hits, queries),
                       "kv_bytes_moved": _delta(before, after, url, KV_BYTES_MOVED)}
    queries = _sum([v["prefix_cache_queries"] for v in by_url.values()])
    hits = _sum([v["prefix_cache_hits"] for v in by_url.values()])
    moved = _sum([v["kv_bytes_moved"] for v in by_url.values()])
    return {
        "metrics_urls": list(after),
        "prefix_cache_queries": queries,
        "prefix_cache_hits": hits,
        "prefix_cache_hit_rate": _rate(hits, queries),
        "kv_bytes_moved": moved,
        "kv_bytes_moved_per_request": moved / num_requests
        if moved is not None and num_requests else None,
        "instance_counters": by_url,
    }
