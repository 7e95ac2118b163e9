"""Async scheduling (EngineCore._step_ahead) gives exactly the synchronous path's outputs:
requests stopping on a token the step behind already computed on, arrivals and aborts while a
step is launched, preemption under a small pool, sampling that must stay synchronous, a pause
that settles the launched step. The CPU runs the same bookkeeping as a GPU (the launch is
eager there and the read-back immediate): only the overlap is missing."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch

from disagg.common.protocol import EngineCoreOutput, EngineCoreRequest
from disagg.common.sampling_params import SamplingParams
from disagg.engine.model_runner import ModelRunner
from disagg.engine.scheduler import Scheduler
from disagg.llm import LLM

Event = tuple[int, str, Any]
"""(step index, what, argument): a request to add, a request id to abort."""


def _prompt(i: int, n: int) -> list[int]:
    return [3 + (11 * i + 7 * j) % 200 for j in range(n)]


def _req(rid: str, prompt: list[int], sp: SamplingParams) -> EngineCoreRequest:
    return EngineCoreRequest(request_id=rid, prompt_token_ids=prompt, sampling_params=sp)


def _run(async_on: bool, requests: list[tuple[str, list[int], SamplingParams]],
         events: Sequence[Event] = (), kv_bytes: int = 16 * 2**20,
         watch: Callable[[LLM], None] | None = None, max_model_len: int | None = None,
         device: str = "cpu", max_num_seqs: int = 8,
         ) -> dict[str, tuple[list[int], str | None]]:
    """Drive the engine step by step; the tokens and finish reason per request."""
    llm = LLM("builtin:tiny-llama", device=device, kv_cache_memory_bytes=kv_bytes,
              async_scheduling=async_on, max_num_seqs=max_num_seqs,
              max_model_len=max_model_len)
    if watch is not None:
        watch(llm)
    eng = llm.engine
    for rid, prompt, sp in requests:
        assert eng.add_request(_req(rid, prompt, sp)) is None
    got: dict[str, list[int]] = {}
    reasons: dict[str, str | None] = {}
    pending = list(events)
    for step in range(400):
        for ev in [e for e in pending if e[0] == step]:
            pending.remove(ev)
            if ev[1] == "add":
                rid, prompt, sp = ev[2]
                assert eng.add_request(_req(rid, prompt, sp)) is None
            else:
                eng.abort([ev[2]])
        outs: list[EngineCoreOutput] = eng.step()
        for o in outs:
            got.setdefault(o.request_id, []).extend(o.new_token_ids)
            if o.finish_reason is not None:
                reasons[o.request_id] = o.finish_reason
        if not pending and not eng.has_runnable_work() and not eng.scheduler.has_work():
            break
    else:
        raise AssertionError("the engine did not drain")
    assert llm.ledger()["free"] == llm.ledger()["total"]
    return {rid: (got.get(rid, []), reasons.get(rid)) for rid in set(got) | set(reasons)}


def _greedy(max_tokens: int, **kw: object) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, **kw)  # type: ignore[arg-type]


class _Count:
    """How often the engine launched ahead (a launch with a previous step behind it)."""

    def __init__(self, llm: LLM) -> None:
        self.launches = self.ahead = 0
        runner = llm.engine.runner
        real = runner.launch_decode

        def launch(chunks, prev=None, rows=None):  # type: ignore[no-untyped-def]
            self.launches += 1
            self.ahead += prev is not None
            return real(chunks, prev, rows)

        runner.launch_decode = launch  # type: ignore[method-assign]


def test_greedy_outputs_equal_the_synchronous_path_and_it_runs_ahead() -> None:
    # a stop token id that greedy decoding hits early for some prompts, EOS left on, and
    # max_tokens from 1 (the launched token is the last) to 24
    reqs = [(f"r{i}", _prompt(i, n), _greedy(mt, stop_token_ids=(st,) if st else ()))
            for i, (n, mt, st) in enumerate([(5, 24, 0), (17, 1, 0), (40, 9, 0), (3, 2, 0),
                                             (23, 16, 0), (8, 20, 0)])]
    sync = _run(False, reqs)
    # stop tokens picked from the synchronous outputs, so the async run stops mid-batch
    stops = {rid: toks[len(toks) // 2] for rid, (toks, _) in sync.items() if len(toks) > 4}
    reqs = [(rid, p, _greedy(sp.max_tokens, stop_token_ids=(stops[rid],)) if rid in stops
             else sp) for rid, p, sp in reqs]
    sync = _run(False, reqs)
    counter: list[_Count] = []
    got = _run(True, reqs, watch=lambda llm: counter.append(_Count(llm)))
    assert got == sync
    assert any(reason == "stop" for _, reason in sync.values())
    assert counter[0].ahead >= 8  # the decode steps did run ahead


def test_with_every_seat_taken_a_queue_does_not_stop_running_ahead() -> None:
    # 12 requests for 4 seats: while the queue cannot be admitted the steps run ahead, and a
    # request takes a freed seat at the next normal schedule
    reqs = [(f"q{i}", _prompt(i, 5 + 3 * i), _greedy(6 + (5 * i) % 11, ignore_eos=True))
            for i in range(12)]
    counter: list[_Count] = []
    got = _run(True, reqs, max_num_seqs=4, watch=lambda llm: counter.append(_Count(llm)))
    assert got == _run(False, reqs, max_num_seqs=4)
    assert all(reason == "length" for _, reason in got.values()) and len(got) == 12
    assert counter[0].ahead >= 20  # 25 here; 9 when any queue stopped it


def test_arrivals_and_aborts_while_a_step_is_launched() -> None:
    reqs = [(f"a{i}", _prompt(i, 6 + 5 * i), _greedy(30, ignore_eos=True)) for i in range(3)]
    events: list[Event] = [
        (3, "add", ("late1", _prompt(9, 12), _greedy(10, ignore_eos=True))),
        (6, "abort", "a1"),
        (7, "add", ("late2", _prompt(10, 33), _greedy(5, ignore_eos=True))),
        (9, "abort", "late1"),
        (12, "abort", "nobody"),
    ]
    got, sync = _run(True, reqs, events), _run(False, reqs, events)
    assert got.keys() == sync.keys()
    for rid, (tokens, reason) in got.items():
        if rid in ("a1", "late1"):  # aborted: what was out by then (async runs a step behind)
            assert reason == sync[rid][1] == "abort"
            assert tokens == sync[rid][0][:len(tokens)]
        else:
            assert (tokens, reason) == sync[rid]


def test_preemption_under_a_small_pool_is_never_speculative() -> None:
    # 8 requests growing to 60 tokens each (4 blocks of 16) against a pool of 24 blocks: the
    # normal schedule preempts; a step launched ahead never does
    reqs = [(f"p{i}", _prompt(i, 20), _greedy(40, ignore_eos=True)) for i in range(8)]
    counter: list[_Count] = []
    llm = LLM("builtin:tiny-llama", device="cpu", kv_cache_memory_bytes=16 * 2**20)
    kv_bytes = 24 * llm.engine.plan.bytes_per_block
    small = _run(False, reqs, kv_bytes=kv_bytes, max_model_len=256)
    got = _run(True, reqs, kv_bytes=kv_bytes, max_model_len=256,
               watch=lambda llm: counter.append(_Count(llm)))
    assert got == small and counter[0].ahead > 0


def test_sampling_that_needs_the_host_stays_synchronous_and_equal() -> None:
    reqs = [("seeded", _prompt(1, 9), SamplingParams(max_tokens=12, temperature=0.8, seed=3)),
            ("lp", _prompt(2, 9), _greedy(12, logprobs=2)),
            ("pen", _prompt(3, 9), _greedy(12, repetition_penalty=1.3)),
            ("mint", _prompt(4, 9), _greedy(12, min_tokens=6)),
            ("plain", _prompt(5, 9), _greedy(12))]
    counter: list[_Count] = []
    got = _run(True, reqs, watch=lambda llm: counter.append(_Count(llm)))
    assert got == _run(False, reqs)
    assert counter[0].launches == 0  # a batch with any of them is not launched


def test_a_pause_settles_the_launched_step(monkeypatch: pytest.MonkeyPatch) -> None:
    llm = LLM("builtin:tiny-llama", device="cpu", kv_cache_memory_bytes=16 * 2**20)
    eng = llm.engine
    eng.add_request(_req("x", _prompt(1, 7), _greedy(8, ignore_eos=True)))
    tokens: list[int] = []
    for _ in range(3):  # the prefill, then decode steps that launch
        tokens += [t for o in eng.step() for t in o.new_token_ids]
    assert eng._launched is not None and eng.has_runnable_work()
    tokens += [t for o in eng.connector_step() for t in o.new_token_ids]  # what a pause runs
    assert eng._launched is None
    while eng.has_runnable_work():
        tokens += [t for o in eng.step() for t in o.new_token_ids]
    sync = LLM("builtin:tiny-llama", device="cpu", kv_cache_memory_bytes=16 * 2**20,
               async_scheduling=False)
    [want] = sync.generate([_prompt(1, 7)], _greedy(8, ignore_eos=True))
    assert tokens == want.output_token_ids


def test_schedule_ahead_declines_what_only_a_normal_schedule_decides() -> None:
    llm = LLM("builtin:tiny-llama", device="cpu", kv_cache_memory_bytes=16 * 2**20)
    eng = llm.engine
    eng.add_request(_req("y", _prompt(2, 5), _greedy(8, ignore_eos=True)))
    eng.step()  # prefill
    eng.step()  # the first decode step, launched
    launched = eng._launched
    assert launched is not None
    sched: Scheduler = eng.scheduler
    eng.add_request(_req("z", _prompt(3, 5), _greedy(2)))
    assert sched.schedule_ahead(launched.chunks) is None  # someone is waiting
    assert isinstance(eng.runner, ModelRunner)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_a_gpu_graph_replays_launched_ahead_equal_the_synchronous_path() -> None:
    """The overlap itself: decode graphs replayed with device input ids, tokens read back
    through pinned memory after an event, double-buffered staging."""
    reqs = [(f"g{i}", _prompt(i, n), _greedy(mt)) for i, (n, mt) in
            enumerate([(5, 40), (17, 3), (40, 25), (70, 33), (9, 1), (33, 40)])]
    sync = _run(False, reqs, device="cuda")
    stops = {rid: toks[len(toks) // 2] for rid, (toks, _) in sync.items() if len(toks) > 4}
    reqs = [(rid, p, _greedy(sp.max_tokens, stop_token_ids=(stops[rid],)) if rid in stops
             else sp) for rid, p, sp in reqs]
    sync = _run(False, reqs, device="cuda")
    counter: list[_Count] = []
    got = _run(True, reqs, device="cuda", watch=lambda llm: counter.append(_Count(llm)))
    assert got == sync and counter[0].ahead > 10
    assert counter[0].launches > counter[0].ahead  # and some launched fresh


def test_failing_everything_still_answers_what_the_launched_step_finished() -> None:
    llm = LLM("builtin:tiny-llama", device="cpu", kv_cache_memory_bytes=16 * 2**20)
    eng = llm.engine
    eng.add_request(_req("last", _prompt(1, 6), _greedy(2, ignore_eos=True)))
    eng.add_request(_req("more", _prompt(2, 6), _greedy(10, ignore_eos=True)))
    firsts = eng.step()  # the prefills: each request's first token
    assert {o.request_id for o in firsts} == {"last", "more"}
    assert eng.step() == [] and eng._launched is not None and eng.has_work()
    outs = {o.request_id: o for o in eng.fail_all("the instance went down")}
    assert outs["last"].finish_reason == "length" and len(outs["last"].new_token_ids) == 1
    assert outs["more"].finish_reason == "error"
    assert not eng.has_work() and llm.ledger()["free"] == llm.ledger()["total"]
