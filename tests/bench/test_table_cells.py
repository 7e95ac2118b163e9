"""README table cells for every row kind, including other benchmarks' row shapes."""

from __future__ import annotations

from bench import table_cells as cells

TRANSFER = {"bench": "transfer",
            "hardware": {"cpu": "Xeon", "num_cpus": 2, "gpu": "NVIDIA H200", "num_gpus": 2},
            "config": {"transport": "nixl", "mode": "read", "num_blocks": 256,
                       "block_bytes": 16384, "device": "cuda", "layout": "contiguous"},
            "gb_per_s": 250.5, "ratio_to_ceiling": 0.636,
            "ceiling": {"what": "torch copy_ peer", "gb_per_s": 394.0}}
PROXY = {"bench": "proxy_overhead", "hardware": {"summary": "Xeon (2 cores)"},
         "deployment": "proxy + fake upstreams",
         "config": {"requests": 1000, "concurrency": [1, 32], "stream_tokens": 8,
                    "proxy_policy": "round_robin"},
         "results": [{"scenario": "read", "stream": True, "concurrency": 32,
                      "added_p50_ms": 25.131, "added_p99_ms": 17.007}]}


def test_transfer_row_cells():
    assert cells.kind(TRANSFER) == "transfer" and cells.model(TRANSFER) == "-"
    assert cells.hardware(TRANSFER) == "2x NVIDIA H200"
    assert cells.workload(TRANSFER) == "nixl read, 256 x 16 KiB blocks (contiguous, cuda)"
    assert cells.figures(TRANSFER) == ("250.50 GB/s p50 = 64% of torch copy_ peer "
                                       "(394.0 GB/s)")
    assert cells.command(TRANSFER) == ("disagg bench transfer --transport nixl --mode read "
                                       "--num-blocks 256 --block-bytes 16384 --device cuda")


def test_proxy_overhead_row_cells():
    assert cells.workload(PROXY) == ("proxy + fake upstreams; 1000 requests, concurrency "
                                     "[1, 32], 8 streamed tokens, round_robin")
    assert cells.figures(PROXY) == "added p50/p99: read stream c32 +25.13/17.01 ms"
    assert cells.command(PROXY) == "python -m bench.proxy_overhead"


def test_generic_figures_and_unknown_rows():
    row = {"kind": "kernel", "figures": {"TFLOP/s": 512.345, "arch": "gfx942"}}
    assert cells.figures(row) == "TFLOP/s 512, arch gfx942"
    assert cells.figures({}) == "?" and cells.workload({}) == "?" and cells.command({}) == ""
    assert cells.hardware({"hardware": "8x MI300X"}) == "8x MI300X"


def test_serve_figures_show_prefix_hit_rate_and_kv_moved_when_measured():
    row = {"kind": "serve", "output_throughput": 100.0, "request_throughput": 2.0,
           "median_ttft_ms": 50.0, "p99_ttft_ms": 90.0, "median_tpot_ms": 5.0,
           "p99_itl_ms": 9.0, "prefix_cache_hit_rate": 0.6234,
           "kv_bytes_moved_per_request": 371370.7}
    assert cells.figures(row).endswith("prefix hit rate 62.3%, 362.7 KiB KV moved/request")
    off = dict(row, prefix_cache_hit_rate=None, kv_bytes_moved_per_request=2 * 2**20)
    assert cells.figures(off).endswith("prefix hit rate n/a, 2.0 MiB KV moved/request")
    assert "prefix" not in cells.figures({"kind": "serve"})
