"""Automatic prefix caching: the hash chain, the ledger with cached blocks, LRU eviction that
never touches an owned block, and requests that compute only the suffix of a cached prefix while
giving the same tokens as with caching off."""

from __future__ import annotations

import random

import pytest

from disagg.common.block_hash import salted_seed
from disagg.common.sampling_params import SamplingParams
from disagg.engine.kv_cache import (
    BlockPool,
    LedgerError,
    Owner,
    OwnerKind,
    block_hashes,
    model_seed,
)
from disagg.llm import LLM

A, B = Owner(OwnerKind.REQUEST, "a"), Owner(OwnerKind.REQUEST, "b")
T = Owner(OwnerKind.TRANSFER, "t")
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


def test_hash_chain_depends_on_every_earlier_token_and_the_model() -> None:
    seed = model_seed("builtin:tiny-llama")
    toks = list(range(40))
    h = block_hashes(toks, 16, seed)
    assert len(h) == 2 and h == block_hashes(toks, 16, seed)  # full blocks only, stable
    assert block_hashes(toks[:32], 16, seed, start=h[:1]) == h  # extends a known chain
    other = block_hashes([99, *toks[1:]], 16, seed)
    assert other[0] != h[0] and other[1] != h[1]  # block 1 differs through its parent
    assert block_hashes(toks, 16, model_seed("another-model")) != h
    assert block_hashes(toks, 16, salted_seed(seed, "s")) != h
    assert all(0 <= x < 2**63 for x in h)


def test_cached_blocks_are_shared_reused_and_evicted_lru() -> None:
    pool = BlockPool(4, enable_caching=True)
    a = pool.allocate(2, A)
    assert a is not None
    assert pool.cache(a[0], 11, A) and pool.cache(a[1], 12, A)
    assert not pool.cache(a[1], 13, A)  # a block's hash is set once
    pool.share(pool.lookup([11, 12, 99]), B)  # the prefix both blocks stand for
    assert pool.lookup([11, 12, 99]) == a and pool.lookup([12]) == [a[1]]
    pool.free(a, A)
    snap = pool.snapshot()
    assert (snap.free, snap.cached, snap.requests) == (2, 0, 2)  # b still owns them
    pool.free(a, B)
    pool.check()
    assert pool.snapshot().cached == 2 and pool.snapshot().free == 4
    fresh = pool.allocate(3, A)  # 2 free ones first, then evicts the least recently used
    assert fresh is not None and a[0] in fresh and a[1] not in fresh
    assert pool.lookup([11, 12]) == [] and pool.evictions == 1
    assert pool.take_events() == [(True, 11), (True, 12), (False, 11)]
    pool.check()


def test_owned_and_held_blocks_are_never_evicted() -> None:
    pool = BlockPool(3, enable_caching=True)
    a = pool.allocate(3, A)
    assert a is not None
    for i, b in enumerate(a):
        pool.cache(b, 100 + i, A)
    pool.transfer_ownership(a[:1], A, T)  # a producer holds block 0 for its peer
    pool.free(a[1:2], A)  # block 1 cached and free, block 2 still a's
    assert pool.allocate(2, B) is None  # only block 1 can be evicted
    got = pool.allocate(1, B)
    assert got == [a[1]] and pool.lookup([100]) == [a[0]]
    with pytest.raises(LedgerError):
        pool.free(a[:1], A)  # a no longer owns it
    assert pool.snapshot().held == 1
    pool.check()


def test_share_refuses_a_block_without_a_cached_prefix() -> None:
    pool = BlockPool(2, enable_caching=True)
    with pytest.raises(LedgerError):
        pool.share([0], A)


def _generate(prompts: list[list[int]], caching: bool) -> tuple[list[list[int]], LLM]:
    llm = LLM(device="cpu", kv_cache_memory_bytes=4 * 2**20, max_model_len=512,
              enable_prefix_caching=caching)
    computed: list[int] = []
    execute = llm.engine.runner.execute

    def counting(out, layer_hook=None):  # type: ignore[no-untyped-def]
        computed.append(sum(c.num_tokens for c in out.chunks))
        return execute(out, layer_hook)

    llm.engine.runner.execute = counting  # type: ignore[method-assign]
    launch = llm.engine.runner.launch_decode

    def counting_launch(chunks, prev=None, rows=None):  # type: ignore[no-untyped-def]
        computed.append(len(chunks))  # a decode step of async scheduling: one token each
        return launch(chunks, prev, rows)

    llm.engine.runner.launch_decode = counting_launch  # type: ignore[method-assign]
    tokens = []
    for p in prompts:  # one at a time: the second finds the first's blocks cached
        tokens.append(llm.generate([p], GREEDY)[0].output_token_ids)
        llm.engine.pool.check()
    llm.computed = computed  # type: ignore[attr-defined]
    return tokens, llm


def test_a_shared_prefix_is_computed_once() -> None:
    system = [(13 * i) % 250 + 1 for i in range(64)]  # 4 full blocks
    prompts = [system + [7, 8, 9], system + [200, 201], system[:40] + [5]]
    want, off = _generate(prompts, caching=False)
    got, on = _generate(prompts, caching=True)
    assert got == want
    # each prompt computes its tokens and 5 decode steps (6 tokens, the first from the prefill)
    prefill_off = sum(off.computed) - 5 * len(prompts)  # type: ignore[attr-defined]
    prefill_on = sum(on.computed) - 5 * len(prompts)  # type: ignore[attr-defined]
    assert prefill_off == sum(len(p) for p in prompts)
    # the 2nd finds 4 blocks (64 tokens), the 3rd 2 blocks (32 tokens) of the 1st's prompt
    assert prefill_on == prefill_off - 64 - 32
    s = on.engine.scheduler
    assert (s.prefix_cache_queries, s.prefix_cache_hits) == (sum(len(p) for p in prompts), 96)
    stats = on.engine.stats()
    assert stats.prefix_cache_hits == 96 and stats.kv_blocks_cached > 0
    snap = on.engine.pool.snapshot()
    assert snap.free == snap.total and snap.held == 0


def test_a_prompt_that_is_all_cached_still_computes_its_last_token() -> None:
    p = list(range(1, 33))  # exactly 2 blocks
    want, _ = _generate([p, p], caching=False)
    got, on = _generate([p, p], caching=True)
    assert got == want
    assert on.engine.scheduler.prefix_cache_hits == 16  # block 1 holds the last token


def test_eviction_under_pressure_keeps_tokens_and_the_ledger_right() -> None:
    """A pool of 10 blocks, 12 requests of 2-4 blocks (3 at a time) with shared prefixes:
    blocks are evicted (and requests preempted) while others are shared; every step the
    ledger holds."""
    rng = random.Random(0)
    stems = [[rng.randrange(1, 250) for _ in range(32)] for _ in range(3)]
    prompts = [rng.choice(stems)[:rng.choice([16, 32])]
               + [rng.randrange(1, 250) for _ in range(rng.randrange(1, 20))] for _ in range(12)]
    ref = LLM(device="cpu", max_model_len=128, enable_prefix_caching=False,
              num_gpu_blocks_override=10, max_num_seqs=3)
    want = [o.output_token_ids for o in ref.generate(prompts, GREEDY)]
    llm = LLM(device="cpu", max_model_len=128, enable_prefix_caching=True,
              num_gpu_blocks_override=10, max_num_seqs=3)
    step = llm.engine.step

    def checked_step():  # type: ignore[no-untyped-def]
        out = step()
        llm.engine.pool.check()
        return out

    llm.engine.step = checked_step  # type: ignore[method-assign]
    for _ in range(2):  # the second round finds the first round's prefixes, some evicted
        assert [o.output_token_ids for o in llm.generate(prompts, GREEDY)] == want
    assert llm.engine.pool.evictions > 0 and llm.engine.scheduler.prefix_cache_hits > 0
    snap = llm.engine.pool.snapshot()
    assert snap.free == snap.total
