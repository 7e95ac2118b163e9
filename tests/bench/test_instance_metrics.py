"""Prefix-cache and KV-transfer counters read from instances' /metrics around a run."""

from __future__ import annotations

import aiohttp
import pytest

from bench.instance_metrics import (
    KV_BYTES_MOVED,
    PREFIX_HITS,
    PREFIX_QUERIES,
    Readings,
    ScrapeError,
    Snapshot,
    cache_figures,
    parse_counters,
    scrape,
    scrape_settled,
)

PAGE = """# HELP disagg_prefix_cache_queries Prompt tokens looked up in the prefix cache
# TYPE disagg_prefix_cache_queries counter
disagg_prefix_cache_queries{model_name="m"} 100
disagg_prefix_cache_queries{model_name="other"} 20
disagg_prefix_cache_hits{model_name="m"} 64
disagg_prefix_cache_hits_extra 5
disagg_kv_connector_bytes_moved_total{model_name="m"} 1.5e3
disagg_num_requests_running 3
"""


def test_parse_sums_label_sets_and_skips_other_names():
    assert parse_counters(PAGE) == {PREFIX_QUERIES: 120.0, PREFIX_HITS: 64.0,
                                    KV_BYTES_MOVED: 1500.0}
    assert parse_counters("# nothing here\n") == {}


def test_figures_are_the_run_deltas_summed_over_instances():
    before: Snapshot = {"p": {PREFIX_QUERIES: 10, PREFIX_HITS: 0, KV_BYTES_MOVED: 0},
              "d": {PREFIX_QUERIES: 10, PREFIX_HITS: 0, KV_BYTES_MOVED: 500}}
    after: Snapshot = {"p": {PREFIX_QUERIES: 110, PREFIX_HITS: 40, KV_BYTES_MOVED: 0},
             "d": {PREFIX_QUERIES: 110, PREFIX_HITS: 60, KV_BYTES_MOVED: 4500}}
    fig = cache_figures(Readings(before, after), num_requests=4)
    assert fig["prefix_cache_queries"] == 200 and fig["prefix_cache_hits"] == 100
    assert fig["prefix_cache_hit_rate"] == pytest.approx(0.5)
    assert fig["kv_bytes_moved"] == 4000 and fig["kv_bytes_moved_per_request"] == 1000
    assert fig["instance_counters"]["d"]["prefix_cache_hit_rate"] == pytest.approx(0.6)
    assert fig["metrics_urls"] == ["p", "d"]


def test_caching_off_or_missing_counters_give_none():
    zero: Snapshot = {"p": {PREFIX_QUERIES: 0, PREFIX_HITS: 0}}
    fig = cache_figures(Readings(zero, zero), num_requests=3)
    assert fig["prefix_cache_hit_rate"] is None  # no lookups: not a 0% hit rate
    assert fig["kv_bytes_moved"] is None and fig["kv_bytes_moved_per_request"] is None
    moved = cache_figures(Readings({}, {"d": {KV_BYTES_MOVED: 9}}), num_requests=0)
    assert moved["kv_bytes_moved"] == 9 and moved["kv_bytes_moved_per_request"] is None


async def test_scrape_the_fake_server_and_fail_with_one_line(fake_server, unused_tcp_port):
    async with aiohttp.ClientSession() as session:
        snap = await scrape_settled(session, [fake_server.base_url])
        assert snap[fake_server.base_url] == {PREFIX_QUERIES: 0, PREFIX_HITS: 0,
                                              KV_BYTES_MOVED: 0}
        with pytest.raises(ScrapeError, match=f"cannot read http://127.0.0.1:{unused_tcp_port}"):
            await scrape(session, [f"http://127.0.0.1:{unused_tcp_port}"])
        with pytest.raises(ScrapeError, match="HTTP 404"):
            await scrape(session, [fake_server.base_url + "/nope"])
