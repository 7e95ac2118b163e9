"""Scheduler with a real block pool and no model: batching, chunking, preemption, ledger."""

from disagg.common.config import SchedulerConfig
from disagg.common.sampling_params import SamplingParams
from disagg.engine.kv_cache import BlockPool
from disagg.engine.request import Request, RequestStatus
from disagg.engine.scheduler import Scheduler


def make(num_blocks: int = 64, max_seqs: int = 8, max_tokens_step: int = 64,
         block_size: int = 4) -> Scheduler:
    cfg = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=max_tokens_step)
    return Scheduler(cfg, BlockPool(num_blocks), block_size, max_model_len=1024)


def req(rid: str, n_prompt: int, max_tokens: int = 4) -> Request:
    return Request(rid, list(range(1, n_prompt + 1)),
                   SamplingParams(max_tokens=max_tokens, temperature=0), eos_token_ids=())


def run_to_end(s: Scheduler, max_steps: int = 1000) -> list[int]:
    batch_sizes: list[int] = []
    for _ in range(max_steps):
        if not s.has_work():
            return batch_sizes
        out = s.schedule()
        batch_sizes.append(out.num_batched_tokens)
        sampled = {c.request.request_id: 7 for c in out.chunks if c.samples}
        s.update_from_output(out, sampled)
        s.pool.check()
    raise AssertionError("scheduler did not drain")


def test_chunked_prefill_respects_token_budget() -> None:
    s = make(max_tokens_step=10)
    r = req("a", 25)
    s.add_request(r)
    sizes = run_to_end(s)
    assert sizes[:3] == [10, 10, 5]  # 25 prompt tokens in three chunks, then decodes
    assert r.status is RequestStatus.FINISHED_LENGTH and len(r.output_token_ids) == 4
    assert s.pool.snapshot().free == 64


def test_max_num_seqs_limits_running() -> None:
    s = make(max_seqs=2)
    for i in range(5):
        s.add_request(req(f"r{i}", 3))
    out = s.schedule()
    assert len(out.chunks) == 2 and s.num_running == 2 and s.num_waiting == 3
    s.update_from_output(out, {c.request.request_id: 1 for c in out.chunks})
    run_to_end(s)
    assert s.pool.snapshot().free == 64


def test_preemption_by_recompute_frees_and_requeues() -> None:
    s = make(num_blocks=4, block_size=4, max_tokens_step=64)
    a, b = req("a", 7, max_tokens=6), req("b", 7, max_tokens=6)
    s.add_request(a)
    s.add_request(b)
    out = s.schedule()  # both prompts fit in 2 blocks each: pool is full
    s.update_from_output(out, {"a": 1, "b": 1})
    out = s.schedule()  # position 7 still fits the second block
    assert not out.preempted_ids
    s.update_from_output(out, {"a": 1, "b": 1})
    out = s.schedule()  # a grows into a third block -> b (newest) is preempted
    assert out.preempted_ids == ["b"]
    assert b.status is RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    assert not b.block_ids
    s.update_from_output(out, {c.request.request_id: 1 for c in out.chunks if c.samples})
    run_to_end(s)
    assert a.is_finished and b.is_finished
    assert len(b.output_token_ids) == 6
    assert s.pool.snapshot().free == 4


def test_abort_frees_blocks_everywhere() -> None:
    s = make()
    r1, r2 = req("r1", 9), req("r2", 9)
    s.add_request(r1)
    s.add_request(r2)
    s.schedule()
    s.abort_request("r1")
    s.abort_request("r2")
    s.abort_request("unknown")
    assert r1.status is RequestStatus.FINISHED_ABORTED
    assert s.pool.snapshot().free == 64 and not s.has_work()


def test_stop_token_and_eos() -> None:
    s = make()
    r = Request("e", [1, 2], SamplingParams(max_tokens=10, temperature=0, stop_token_ids=(9,)),
                eos_token_ids=(5,))
    s.add_request(r)
    out = s.schedule()
    s.update_from_output(out, {"e": 9})
    assert r.status is RequestStatus.FINISHED_STOPPED and r.output_token_ids == [9]


def test_finishing_never_formats_a_request(monkeypatch) -> None:
    """Finishing is on every request's path to its answer: a repr there (a deque.remove that
    missed builds its error from the item's repr) cost about 1 ms for a 4k-token prompt."""
    def _no_repr(self: Request) -> str:
        raise AssertionError("a request was formatted while finishing")

    s = make(num_blocks=256)
    done, aborted, waiting = req("done", 40, max_tokens=1), req("run", 40), req("wait", 40)
    for r in (done, aborted, waiting):
        s.add_request(r)
    s.schedule()
    monkeypatch.setattr(Request, "__repr__", _no_repr)
    s.abort_request("run")
    s.abort_request("wait")
    run_to_end(s)
    assert done.status is RequestStatus.FINISHED_LENGTH
    assert s.pool.snapshot().free == 256 and not s.has_work()


def test_a_requests_repr_is_one_short_line_whatever_its_length() -> None:
    r = req("long", 100_000)
    text = repr(r)
    assert "long" in text and "prompt=100000" in text and len(text) < 200
