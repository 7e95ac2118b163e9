"""Arrival process statistics (seeded, loose bounds) and the concurrency cap."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from bench.client import RequestInput, RequestOutput
from bench.load import (
    LoadConfig,
    arrival_offsets_s,
    make_session,
    raise_open_file_limit,
    run_chains,
    run_load,
)
from bench.metrics import max_concurrent_requests


def _gaps(rate: float, burstiness: float, n: int = 4000, seed: int = 0) -> np.ndarray:
    return np.diff(arrival_offsets_s(n, rate, burstiness, seed))


def test_infinite_rate_sends_everything_at_once():
    assert arrival_offsets_s(5, math.inf, 1.0, 0) == [0.0] * 5


def test_poisson_gaps_have_the_right_mean_and_unit_cv():
    gaps = _gaps(rate=20.0, burstiness=1.0)
    assert np.mean(gaps) == pytest.approx(0.05, rel=0.08)
    assert np.std(gaps) / np.mean(gaps) == pytest.approx(1.0, abs=0.1)  # exponential: CV 1


@pytest.mark.parametrize("burstiness, cv", [(4.0, 0.5), (0.25, 2.0)])
def test_burstiness_sets_the_gamma_shape(burstiness, cv):
    gaps = _gaps(rate=10.0, burstiness=burstiness)
    assert np.mean(gaps) == pytest.approx(0.1, rel=0.12)  # the rate does not change
    assert np.std(gaps) / np.mean(gaps) == pytest.approx(cv, rel=0.15)  # CV = 1/sqrt(shape)


def test_arrivals_are_seeded_and_start_at_zero():
    a = arrival_offsets_s(10, 5.0, 1.0, seed=1)
    assert a == arrival_offsets_s(10, 5.0, 1.0, seed=1)
    assert a != arrival_offsets_s(10, 5.0, 1.0, seed=2)
    assert a[0] == 0.0 and all(x < y for x, y in zip(a, a[1:], strict=False))


def test_invalid_rate_is_rejected():
    with pytest.raises(ValueError, match="request-rate"):
        arrival_offsets_s(3, 0.0, 1.0, 0)


def _inputs(base_url: str, n: int, output_len: int) -> list[RequestInput]:
    return [RequestInput(api_url=f"{base_url}/v1/completions", model="m", prompt="hi",
                         prompt_len=3, output_len=output_len) for _ in range(n)]


async def test_concurrency_cap_is_respected_and_filled(fake_server_factory):
    server = fake_server_factory("--token-delay-s", "0.01", "--no-record")
    async with make_session(4) as session:
        outcome = await run_load(session, _inputs(server.base_url, 16, 5),
                                 LoadConfig(max_concurrency=4, show_progress=False))
    assert all(o.success for o in outcome.outputs)
    assert max_concurrent_requests(outcome.outputs) == 4
    assert outcome.client_cpu_s > 0 and outcome.loop_lag_ms


async def test_rate_limited_run_follows_the_schedule(fake_server_factory):
    server = fake_server_factory("--no-record")
    load = LoadConfig(request_rate=50.0, seed=0, show_progress=False)
    offsets = arrival_offsets_s(20, 50.0, 1.0, 0)
    async with make_session(None) as session:
        outcome = await run_load(session, _inputs(server.base_url, 20, 2), load)
    starts = sorted(o.start_s - outcome.bench_start_s for o in outcome.outputs)
    assert outcome.duration_s >= offsets[-1]
    # each request leaves no earlier than its arrival time, and not much later
    for start, due in zip(starts, offsets, strict=True):
        assert due - 1e-3 <= start <= due + 0.1


class _Echo:
    """A chain whose next prompt is the last answer: it cannot be sent before that arrives."""

    def __init__(self, base_url: str, name: str, num_requests: int) -> None:
        self.num_requests = num_requests
        self._req = RequestInput(api_url=f"{base_url}/v1/completions", model="m", prompt=name,
                                 prompt_len=1, output_len=2)
        self._sent = 1

    def first(self) -> RequestInput:
        return self._req

    def next(self, out: RequestOutput) -> RequestInput | None:
        if self._sent == self.num_requests:
            return None
        self._sent += 1
        self._req = replace(self._req, prompt=self._req.prompt + "|" + out.generated_text)
        return self._req


async def test_chains_send_in_order_and_the_cap_counts_chains(fake_server_factory):
    server = fake_server_factory("--token-delay-s", "0.01")
    chains = [_Echo(server.base_url, f"c{i}", 3) for i in range(4)]
    async with make_session(2) as session:
        outcome = await run_chains(session, list(chains),
                                   LoadConfig(max_concurrency=2, show_progress=False))
    outs = outcome.outputs
    assert len(outs) == 12 and all(o.success for o in outs)
    for i in range(4):  # outputs chain by chain; each turn left after the last one ended
        turns = outs[3 * i:3 * i + 3]
        assert all(a.end_s <= b.start_s for a, b in zip(turns, turns[1:], strict=False))
    assert max_concurrent_requests(outs) == 2  # two chains in flight, one request each
    prompts = [b["prompt"] for b in server.requests()]
    assert "c0|t0 t1 |t0 t1 " in prompts  # the third turn holds both earlier answers


def test_open_file_limit_is_raised_for_many_streams():
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(soft + 10, hard) if hard != resource.RLIM_INFINITY else soft + 10
    assert raise_open_file_limit(wanted) >= wanted
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= wanted
    assert raise_open_file_limit(1) >= wanted  # never lowered
