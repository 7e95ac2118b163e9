"""The sampler's logit_bias, penalties and min_p: visible effects on small logits, greedy rows
included, and rows that use none of them sampled exactly as before."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from disagg.common.sampling_params import SamplingParams
from disagg.engine.sampler import Sampler

CPU = torch.device("cpu")
GREEDY = SamplingParams(temperature=0)
RANDOM = SamplingParams(temperature=1.0)


@dataclass
class History:
    prompt_token_ids: list[int]
    output_token_ids: list[int] = field(default_factory=list)
    eos_token_ids: tuple[int, ...] = ()


def _draw(sampler: Sampler, logits: torch.Tensor, sp: SamplingParams, rows: int,
          history: History | None = None) -> list[int]:
    """One step over ``rows`` requests with the same logits, params and history."""
    batch = logits[None].expand(rows, -1).contiguous()
    hists = [history or History([0])] * rows
    return sampler.sample(batch, [f"r{i}" for i in range(rows)], [sp] * rows, hists)[0]


def test_logit_bias_minus_100_bans_and_plus_100_forces_under_greedy() -> None:
    logits = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.1]))
    banned = SamplingParams(temperature=1.0, logit_bias=((0, -100.0),))
    assert 0 not in _draw(Sampler(CPU, 0), logits, banned, 3000)
    forced = SamplingParams(temperature=0, logit_bias=((3, 100.0),))
    tokens, lps = Sampler(CPU, 0).sample(logits[None], ["g"], [forced])
    assert tokens == [3]
    greedy_ban = SamplingParams(temperature=0, logit_bias=((0, -100.0),))
    assert Sampler(CPU, 0).sample(logits[None], ["g"], [greedy_ban])[0] == [1]


def test_frequency_and_presence_penalties_shift_the_distribution() -> None:
    logits = torch.zeros(4)
    sp = SamplingParams(temperature=1.0, frequency_penalty=0.25, presence_penalty=0.5)
    tokens = _draw(Sampler(CPU, 1), logits, sp, 20000, History([3], [0, 0]))
    freq = torch.bincount(torch.tensor(tokens), minlength=4).double() / len(tokens)
    p0 = math.exp(-1.0) / (math.exp(-1.0) + 3)  # logit 0 - (0.25 * 2 + 0.5)
    want = torch.tensor([p0, *[(1 - p0) / 3] * 3], dtype=torch.double)
    assert torch.allclose(freq, want, atol=0.015), freq


def test_penalties_apply_to_greedy_rows() -> None:
    logits = torch.tensor([[3.0, 2.5, 0.0]])
    hist = [History([1], [0, 0])]
    assert Sampler(CPU, 0).sample(logits, ["g"], [GREEDY], hist)[0] == [0]
    sp = SamplingParams(temperature=0, frequency_penalty=0.5)  # 3 - 2 * 0.5 = 2 < 2.5
    assert Sampler(CPU, 0).sample(logits, ["g"], [sp], hist)[0] == [1]
    rp = SamplingParams(temperature=0, repetition_penalty=2.0)  # 1.5 vs 1.25: still 0
    assert Sampler(CPU, 0).sample(logits, ["g"], [rp], hist)[0] == [0]
    rp_prompt = SamplingParams(temperature=0, repetition_penalty=2.0)  # only 0 seen
    assert Sampler(CPU, 0).sample(torch.tensor([[3.0, 2.0, 0.0]]), ["g"], [rp_prompt],
                                  [History([0])])[0] == [1]


def test_penalty_counts_follow_the_request_across_steps() -> None:
    """A greedy row with a strong frequency penalty cycles through the tokens: each step's
    counts include the token the previous step appended."""
    sampler = Sampler(CPU, 0)
    hist = History([2])
    sp = SamplingParams(temperature=0, frequency_penalty=2.0)
    logits = torch.tensor([[1.0, 0.5, 0.0]])
    for _ in range(6):
        hist.output_token_ids += sampler.sample(logits, ["g"], [sp], [hist])[0]
    assert hist.output_token_ids == [0, 1, 2, 0, 1, 2]
    sampler.forget("g")
    assert len(sampler.token_counts) == 0


def test_min_p_removes_exactly_the_tokens_below_the_scaled_floor() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    sampler = Sampler(CPU, 2)
    # floor 0.2 * 0.5 = 0.1: only token 3 (0.05) goes; 0.5 * 0.5 = 0.25: tokens 2 and 3 go
    assert set(_draw(sampler, logits, SamplingParams(min_p=0.2), 4000)) == {0, 1, 2}
    assert set(_draw(sampler, logits, SamplingParams(min_p=0.5), 4000)) == {0, 1}
    # after temperature: at T=2 the probs are ~[0.38, 0.29, 0.21, 0.12], floor 0.19
    hot = SamplingParams(temperature=2.0, min_p=0.5)
    assert set(_draw(sampler, logits, hot, 4000)) == {0, 1, 2}
    kept = _draw(sampler, logits, SamplingParams(min_p=0.2), 20000)
    freq = torch.bincount(torch.tensor(kept), minlength=4).double() / len(kept)
    want = torch.tensor([0.5, 0.3, 0.15, 0.0], dtype=torch.double) / 0.95
    assert torch.allclose(freq, want, atol=0.015), freq


def test_rows_without_features_sample_as_before_and_cost_nothing() -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 41, generator=gen)
    plain = [RANDOM, GREEDY, SamplingParams(temperature=0.7, top_k=5, top_p=0.9), RANDOM,
             SamplingParams(temperature=1.0, seed=11), GREEDY]
    featured = list(plain)
    featured[3] = SamplingParams(temperature=1.0, presence_penalty=1.0, min_p=0.1,
                                 logit_bias=((2, 3.0),))
    featured[5] = SamplingParams(temperature=0, repetition_penalty=1.5)
    ids = [f"x{i}" for i in range(6)]
    hists = [History([1, 2], [3])] * 6
    before, after = Sampler(CPU, 9), Sampler(CPU, 9)
    for _ in range(5):
        old = before.sample(logits, ids, plain)[0]
        new = after.sample(logits, ids, featured, hists)[0]
        assert [t for i, t in enumerate(old) if i not in (3, 5)] == \
            [t for i, t in enumerate(new) if i not in (3, 5)]
    # no row with a feature: the logits are used as they are (no copy, no counts)
    assert before._processed(logits, ids, plain, None) is logits
    assert len(before.token_counts) == 0


def test_logprobs_stay_those_of_the_raw_logits() -> None:
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]]))
    sp = SamplingParams(temperature=0, logprobs=1, logit_bias=((2, 100.0),))
    tokens, lps = Sampler(CPU, 0).sample(logits, ["g"], [sp])
    assert tokens == [2]
    lp = lps[0]
    assert lp is not None and math.isclose(lp.logprob, math.log(0.1), rel_tol=1e-5)
    assert lp.top[0][0] == 0


def test_min_tokens_bans_stop_tokens_and_eos_until_reached() -> None:
    """vLLM's min-tokens processor: EOS (unless ignore_eos) and stop_token_ids cannot be
    sampled while the request has fewer than min_tokens outputs; greedy and random alike."""
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    eos_first = History([0], [], eos_token_ids=(0,))
    sp = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=(1,))
    assert _draw(Sampler(CPU, 0), logits, sp, 1, eos_first) == [2]  # 0 and 1 banned
    assert 0 not in _draw(Sampler(CPU, 0), logits, SamplingParams(
        temperature=1.0, min_tokens=2), 2000, eos_first)
    one_out = History([0], [3], eos_token_ids=(0,))
    assert _draw(Sampler(CPU, 0), logits, sp, 1, one_out) == [2]  # 1 output < 2
    done = History([0], [3, 3], eos_token_ids=(0,))
    assert _draw(Sampler(CPU, 0), logits, sp, 1, done) == [0]  # reached: nothing banned
    ignore = SamplingParams(temperature=0, min_tokens=2, ignore_eos=True)
    assert _draw(Sampler(CPU, 0), logits, ignore, 1, eos_first) == [0]  # EOS not a stop
    past_vocab = SamplingParams(temperature=0, min_tokens=1, stop_token_ids=(10**6,))
    assert _draw(Sampler(CPU, 0), logits, past_vocab, 1, History([0])) == [0]


def test_min_tokens_in_the_engine_never_emits_a_stop_token_early() -> None:
    """The greedy first token made a stop token with min_tokens=3: the engine samples other
    tokens until it has 3, then may stop on it."""
    from disagg.llm import LLM

    prompt = list(range(5, 30))
    with LLM(device="cpu", kv_cache_memory_bytes=4 * 2**20, max_model_len=256) as llm:
        greedy = llm.generate([prompt], SamplingParams(max_tokens=4, temperature=0,
                                                       ignore_eos=True))[0].output_token_ids
        out = llm.generate([prompt], SamplingParams(
            max_tokens=6, temperature=0, min_tokens=3, stop_token_ids=(greedy[0],)))[0]
    assert len(out.output_token_ids) >= 3
    assert greedy[0] not in out.output_token_ids[:3]
    assert out.output_token_ids[0] != greedy[0]
