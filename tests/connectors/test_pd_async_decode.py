"""A P/D decode instance runs its decode batches ahead (async scheduling with a KV connector):
the host schedules step n+1 while step n runs, as a colocated instance does, and still gives
exactly the monolithic greedy tokens while other prompts' KV lands, requests stop mid-batch on
a token the step behind already computed on, requests are aborted, and a dead prefill's
transfers fail. No block is handed to a transfer while a launched step may still write it.
Engines in this process over loopback TCP (READ and WRITE)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pytest
from pd_helpers import engine_remote, pd_engine

from disagg.common.kv_transfer_params import KVTransferParams, TransferMode
from disagg.common.protocol import EngineCoreRequest
from disagg.common.sampling_params import SamplingParams
from disagg.engine.engine_core import EngineCore
from disagg.engine.kv_connector import KVConnector
from disagg.engine.scheduler import ScheduledChunk, SchedulerOutput
from disagg.llm import LLM

FAST = {"transfer_timeout": 1, "defer_timeout": 1, "lease_timeout": 1,
        "heartbeat_interval": 0.25}


def _prompt(i: int, n: int) -> list[int]:
    return [(13 * i + 7 * j) % 240 + 3 for j in range(n)]


def _greedy(max_tokens: int, stop: int | None = None) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0,
                          stop_token_ids=(stop,) if stop is not None else ())


@pytest.fixture
def make() -> Iterator[Any]:
    made: list[EngineCore] = []

    def engine(role: str, mode: str, *, async_on: bool = True, **options: Any) -> EngineCore:
        e = pd_engine(role, mode, async_scheduling=async_on, **FAST, **options)
        made.append(e)
        return e

    yield engine
    for e in made:
        e.close()


@dataclass
class _PD:
    """Drives one prefill and one decode engine step by step, as the proxy would: READ sends
    the prefill first and the decode its answer's params; WRITE sends both at once."""

    prefill: EngineCore
    decode: EngineCore
    mode: str
    tokens: dict[str, list[int]] = field(default_factory=dict)
    reasons: dict[str, str | None] = field(default_factory=dict)
    errors: dict[str, str | None] = field(default_factory=dict)
    waiting_prefill: dict[str, tuple[list[int], SamplingParams]] = field(default_factory=dict)
    prefill_alive: bool = True
    launches: int = 0
    ahead: int = 0
    alloc_while_launched: int = 0

    def __post_init__(self) -> None:
        runner, real = self.decode.runner, self.decode.runner.launch_decode

        def launch(chunks: Any, prev: Any = None, rows: Any = None) -> Any:
            self.launches += 1
            self.ahead += prev is not None
            return real(chunks, prev, rows)

        runner.launch_decode = launch  # type: ignore[method-assign]
        sc = self.decode.scheduler.connector
        assert sc is not None
        real_alloc = sc.update_state_after_alloc

        def after_alloc(req: Any) -> None:
            # a block a launched step may still write must never receive a transfer
            self.alloc_while_launched += self.decode._launched is not None
            real_alloc(req)

        sc.update_state_after_alloc = after_alloc  # type: ignore[method-assign]

    def submit(self, rid: str, prompt: list[int], sp: SamplingParams) -> None:
        tid = uuid.uuid4().hex
        mode = TransferMode(self.mode)
        p_params = KVTransferParams(transfer_id=tid, do_remote_decode=True, mode=mode,
                                    **(engine_remote(self.decode) if self.mode == "write" else {}))
        self.prefill.add_request(EngineCoreRequest(
            request_id=rid, prompt_token_ids=prompt,
            sampling_params=msgspec.structs.replace(sp, max_tokens=1),
            kv_transfer_params=p_params))
        if self.mode == "read":
            self.waiting_prefill[rid] = (prompt, sp)
            return
        self._add_decode(rid, prompt, sp, KVTransferParams(
            transfer_id=tid, do_remote_prefill=True, mode=mode, **engine_remote(self.prefill)))

    def _add_decode(self, rid: str, prompt: list[int], sp: SamplingParams,
                    params: KVTransferParams) -> None:
        assert self.decode.add_request(EngineCoreRequest(
            request_id=rid, prompt_token_ids=prompt, sampling_params=sp,
            kv_transfer_params=params)) is None

    def step(self) -> None:
        for out in self.prefill.step() if self.prefill_alive else ():
            pending = self.waiting_prefill.pop(out.request_id, None)
            if pending is not None and out.finish_reason is not None:
                assert out.kv_transfer_params is not None, out.error
                self._add_decode(out.request_id, *pending, msgspec.structs.replace(
                    out.kv_transfer_params, do_remote_prefill=True))
        for out in self.decode.step():
            self.tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finish_reason is not None:
                self.reasons[out.request_id] = out.finish_reason
                self.errors[out.request_id] = out.error

    def run(self, expected: int, events: dict[int, Any] | None = None,
            timeout_s: float = 60.0) -> None:
        """Step until ``expected`` decode requests finished; ``events[i]()`` before step i."""
        deadline = time.monotonic() + timeout_s
        i = 0
        while len(self.reasons) < expected:
            assert time.monotonic() < deadline, f"only {len(self.reasons)} of {expected} ended"
            if events and i in events:
                events[i]()
            self.step()
            i += 1
            time.sleep(0.001)
        while self.decode._launched is not None:
            self.step()

    def assert_clean(self, timeout_s: float = 15.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            d = self.decode.pool.snapshot()
            p = self.prefill.pool.snapshot() if self.prefill_alive else d
            if p.free == p.total and d.free == d.total and p.held == d.held == 0:
                return
            assert time.monotonic() < deadline, (p, d)
            self.step()
            time.sleep(0.01)


def _monolithic(reqs: list[tuple[str, list[int], SamplingParams]]) -> dict[str, list[int]]:
    llm = LLM("builtin:tiny-llama", device="cpu", kv_cache_memory_bytes=4 * 2**20,
              max_model_len=256, async_scheduling=False, enable_prefix_caching=False)
    try:
        outs = llm.generate([p for _, p, _ in reqs], [sp for _, _, sp in reqs])
    finally:
        llm.close()
    return {rid: o.output_token_ids for (rid, _, _), o in zip(reqs, outs, strict=True)}


def _requests() -> list[tuple[str, list[int], SamplingParams]]:
    shapes = [(5, 24), (17, 12), (40, 20), (3, 2), (23, 16), (33, 18), (9, 30), (48, 1)]
    reqs = [(f"r{i}", _prompt(i, n), _greedy(mt)) for i, (n, mt) in enumerate(shapes)]
    # stop tokens taken from the monolithic outputs: some requests stop mid-batch, on a token
    # the step launched behind it already computed on
    mono = _monolithic(reqs)
    return [(rid, p, _greedy(sp.max_tokens, mono[rid][len(mono[rid]) // 2]))
            if len(mono[rid]) > 6 and int(rid[1:]) % 2 == 0 else (rid, p, sp)
            for rid, p, sp in reqs]


@pytest.mark.parametrize("mode", ["read", "write"])
def test_decode_runs_ahead_and_equals_monolithic_while_kv_lands(make: Any, mode: str) -> None:
    reqs = _requests()
    expected = _monolithic(reqs)
    pd = _PD(make("kv_producer", mode), make("kv_consumer", mode), mode)
    for rid, prompt, sp in reqs[:3]:
        pd.submit(rid, prompt, sp)
    # the rest arrive one by one while the first ones decode ahead: their KV lands mid-chain
    late = {10 + 6 * k: (lambda r=r: pd.submit(*r)) for k, r in enumerate(reqs[3:])}
    pd.run(len(reqs), late)
    assert pd.errors == dict.fromkeys(expected)
    assert pd.tokens == expected
    assert "stop" in pd.reasons.values()
    assert pd.ahead >= 10, (pd.launches, pd.ahead)  # the decode instance did run ahead
    assert pd.alloc_while_launched == 0
    pd.assert_clean()


@pytest.mark.parametrize(("mode", "why"), [("read", "--no-async-scheduling"),
                                         ("write", "a connector that does not say")])
def test_a_synchronous_decode_instance_gives_the_same_tokens(make: Any, mode: str,
                                                             why: str) -> None:
    """The decode stepped synchronously, turned off or because its connector keeps the base
    class's answer (hooks needed): nothing is launched ahead, and the tokens are the same."""
    reqs = _requests()[:4]
    decode = make("kv_consumer", mode, async_on=why != "--no-async-scheduling")
    pd = _PD(make("kv_producer", mode), decode, mode)
    if why == "a connector that does not say":
        connector = decode.connector
        connector.step_needs_hooks = (  # type: ignore[method-assign]
            lambda out: KVConnector.step_needs_hooks(connector, out))
    for r in reqs:
        pd.submit(*r)
    pd.run(len(reqs))
    assert pd.tokens == _monolithic(reqs)
    assert pd.launches == 0
    pd.assert_clean()


@pytest.mark.parametrize("mode", ["read", "write"])
def test_a_request_whose_kv_lands_joins_while_the_chain_runs(make: Any, mode: str) -> None:
    """Nothing arrives or ends while three long requests run ahead, so the chain never breaks
    on its own: a request whose KV lands in the meantime still gets its first tokens out and
    joins the batch long before they end (the connector's report is read between launched
    steps), and the batch keeps running ahead once it joined."""
    long = [(f"l{i}", _prompt(i, 10 + i), SamplingParams(max_tokens=150, temperature=0,
                                                          ignore_eos=True)) for i in range(3)]
    pd = _PD(make("kv_producer", mode), make("kv_consumer", mode), mode)
    for r in long:
        pd.submit(*r)
    deadline = time.monotonic() + 30
    while not (len(pd.decode.scheduler.running) == 3 and pd.decode._launched is not None):
        assert time.monotonic() < deadline
        pd.step()
    late = ("late", _prompt(7, 30), SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    pd.submit(*late)
    while "late" not in pd.reasons:
        assert time.monotonic() < deadline
        pd.step()
    assert len(pd.tokens["late"]) == 3 and pd.errors["late"] is None
    assert max(len(pd.tokens[rid]) for rid, _, _ in long) < 100  # they were still running
    ahead = pd.ahead
    pd.run(4)
    assert pd.ahead > ahead + 20
    assert pd.tokens == _monolithic([*long, late])
    pd.assert_clean()


def test_aborts_and_a_dead_prefill_while_running_ahead(make: Any) -> None:
    """While the decode runs ahead: one running request is aborted, and the prefill goes
    away after answering, with another request's KV unread. The aborted request ends as
    aborted; the one whose KV cannot be loaded recomputes (policy recompute); every other
    request's tokens are the monolithic ones, and every decode block ends free."""
    reqs = _requests()[:4]
    # the first three run long, so all three are running together however late their KV lands
    # (a short one could end before a slow transfer landed the last); the first is still
    # running when it is aborted
    for i in range(3):
        reqs[i] = (reqs[i][0], reqs[i][1], SamplingParams(max_tokens=150, temperature=0,
                                                          ignore_eos=True))
    expected = _monolithic(reqs)
    prefill = make("kv_producer", "read")
    decode = make("kv_consumer", "read", kv_load_failure_policy="recompute")
    pd = _PD(prefill, decode, "read")
    for r in reqs[:3]:
        pd.submit(*r)
    deadline = time.monotonic() + 30
    while not (len(decode.scheduler.running) == 3 and decode._launched is not None):
        assert time.monotonic() < deadline
        pd.step()
    victim, prompt, sp = reqs[3]
    pd.submit(victim, prompt, sp)
    while victim in pd.waiting_prefill:  # the prefill answers; the decode keeps running ahead
        assert time.monotonic() < deadline
        pd.step()
    prefill.close()  # ... and goes away before the decode read the victim's KV
    pd.prefill_alive = False
    decode.abort([reqs[0][0]])
    pd.run(len(reqs))
    assert pd.reasons[reqs[0][0]] == "abort"
    got = pd.tokens[reqs[0][0]]
    assert 0 < len(got) < 150 and got == expected[reqs[0][0]][:len(got)]
    assert pd.errors[victim] is None  # recomputed here after the load failed
    assert decode.connector.metrics()["transfers_done_total"] == 3
    for rid, _, _ in reqs[1:]:
        assert pd.tokens[rid] == expected[rid], rid
    assert pd.ahead > 0 and pd.alloc_while_launched == 0
    pd.assert_clean()


def test_a_step_with_a_live_transfer_needs_the_hooks(make: Any) -> None:
    """A prefill whose finish hands its blocks over (its transfer is live) is never stepped
    without the hooks; a request with no transfer is."""
    prefill = make("kv_producer", "read")
    prefill.add_request(EngineCoreRequest(
        request_id="p", prompt_token_ids=_prompt(1, 20), sampling_params=_greedy(4),
        kv_transfer_params=KVTransferParams(transfer_id=uuid.uuid4().hex,
                                            do_remote_decode=True, mode=TransferMode.READ)))
    prefill.add_request(EngineCoreRequest(request_id="local", prompt_token_ids=_prompt(2, 20),
                                          sampling_params=_greedy(4)))
    reqs = prefill.scheduler.requests
    one = [ScheduledChunk(reqs["p"], 1)]
    assert prefill.connector.step_needs_hooks(SchedulerOutput(chunks=one))
    assert prefill.connector.step_needs_hooks(
        SchedulerOutput(chunks=[ScheduledChunk(reqs["local"], 1), *one]))
    assert not prefill.connector.step_needs_hooks(
        SchedulerOutput(chunks=[ScheduledChunk(reqs["local"], 1)]))
