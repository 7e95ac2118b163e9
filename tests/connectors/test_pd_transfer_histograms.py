"""Per-transfer KV histograms from a real READ transfer (two engines in this process over
loopback TCP) up to the instance's /metrics: the connector counts each finished transfer in its
stats dict, which crosses the engine -> frontend boundary in EngineStats, and the page shows it
as ``disagg_kv_transfer_duration_seconds`` / ``disagg_kv_transfer_bytes`` by mode and role."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
from metrics_pages import fake_engine
from pd_helpers import pd_engine
from prom_text import families, value

from disagg.common.kv_transfer_histograms import transfer_histograms
from disagg.common.kv_transfer_params import KVTransferParams, TransferMode
from disagg.common.protocol import EngineCoreRequest, EngineStats
from disagg.common.sampling_params import SamplingParams
from disagg.engine.engine_core import EngineCore
from disagg.server.metrics import ServerMetrics
from disagg.server.metrics_render import render_instance_metrics

PROMPT = [(5 * i + 11) % 250 + 1 for i in range(40)]
GREEDY = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)


@pytest.fixture
def pair() -> Iterator[tuple[EngineCore, EngineCore]]:
    """A READ prefill and decode engine, closed at teardown."""
    made = []
    for role in ("kv_producer", "kv_consumer"):
        made.append(pd_engine(role, "read", kv_cache_memory_bytes=2 * 2**20))
    yield made[0], made[1]
    for engine in made:
        engine.close()


def _finish(engines: list[EngineCore], request_id: str, timeout_s: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for engine in engines:
            for out in engine.step():
                if out.request_id == request_id and out.finish_reason is not None:
                    return out
        time.sleep(0.001)
    raise AssertionError(f"{request_id} did not finish within {timeout_s} s")


def test_a_read_transfer_reaches_the_page_as_one_observation(pair: Any) -> None:
    prefill, decode = pair
    prefill.add_request(EngineCoreRequest(
        request_id="p", prompt_token_ids=PROMPT,
        sampling_params=msgspec.structs.replace(GREEDY, max_tokens=1),
        kv_transfer_params=KVTransferParams(transfer_id=uuid.uuid4().hex,
                                            do_remote_decode=True, mode=TransferMode.READ)))
    done = _finish([prefill], "p")
    assert done.kv_transfer_params is not None, done.error
    params = msgspec.structs.replace(done.kv_transfer_params, do_remote_prefill=True)
    decode.add_request(EngineCoreRequest(request_id="d", prompt_token_ids=PROMPT,
                                         sampling_params=GREEDY, kv_transfer_params=params))
    assert _finish([decode, prefill], "d").error is None
    counters = decode.connector.metrics()
    (hist, *_) = [h for h in transfer_histograms(counters) if h.name == "bytes"]
    assert (hist.mode, hist.role, hist.cumulative[-1][1]) == ("read", "consumer", 1)
    assert hist.total == counters["bytes_moved_total"] > 0
    assert not transfer_histograms(prefill.connector.metrics())  # the side that posts counts
    # across the process boundary as the frontend receives it, then on the page
    wire = msgspec.msgpack.decode(msgspec.msgpack.encode(decode.stats()), type=EngineStats)
    text = render_instance_metrics(fake_engine({0: wire}), ServerMetrics("m"), "m")
    labels = {"mode": "read", "role": "consumer", "model_name": "m"}
    assert value(text, "disagg_kv_transfer_duration_seconds_count", **labels) == 1
    assert value(text, "disagg_kv_transfer_bytes_sum", **labels) == counters["bytes_moved_total"]
    assert value(text, "disagg_kv_connector_transfer_seconds_sum") == \
        value(text, "disagg_kv_transfer_duration_seconds_sum", **labels)
    assert families(text)["disagg_kv_connector_bytes_moved"] == "counter"
