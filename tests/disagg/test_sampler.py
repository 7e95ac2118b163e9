"""The batched sampler: the right distribution, the filters' support, seeds, logprobs."""

from __future__ import annotations

import math

import torch

from disagg.common.sampling_params import SamplingParams
from disagg.engine.sampler import Sampler

CPU = torch.device("cpu")


def _draw(sampler: Sampler, logits: torch.Tensor, sp: SamplingParams, rows: int,
          tag: str = "r") -> list[int]:
    """One step over ``rows`` copies of a single row of logits."""
    batch = logits[None].expand(rows, -1).contiguous()
    tokens, _ = sampler.sample(batch, [f"{tag}{i}" for i in range(rows)], [sp] * rows)
    return tokens


def test_temperature_sampling_follows_the_softmax() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    tokens = _draw(Sampler(CPU, 0), logits, SamplingParams(temperature=1.0), 20000)
    counts = torch.bincount(torch.tensor(tokens), minlength=4).double() / len(tokens)
    assert torch.allclose(counts, torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.double),
                          atol=0.015), counts


def test_low_temperature_sharpens_and_top_k_top_p_cut_the_support() -> None:
    logits = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.1]))
    sampler = Sampler(CPU, 1)
    assert set(_draw(sampler, logits, SamplingParams(temperature=1.0, top_k=2), 4000)) == {0, 1}
    # top_p 0.65: the prefix 0.4 + 0.3 first reaches it, so tokens 2 and 3 never appear
    assert set(_draw(sampler, logits, SamplingParams(temperature=1.0, top_p=0.65), 4000)) == {0, 1}
    assert set(_draw(sampler, logits, SamplingParams(temperature=1.0, top_p=0.01), 500)) == {0}
    cold = _draw(sampler, logits, SamplingParams(temperature=0.05), 2000)
    assert cold.count(0) / len(cold) > 0.99


def test_rows_with_different_filters_in_one_batch() -> None:
    logits = torch.log(torch.tensor([0.25, 0.25, 0.25, 0.25]))[None].expand(3, -1).contiguous()
    params = [SamplingParams(temperature=1.0, top_k=1), SamplingParams(temperature=0),
              SamplingParams(temperature=1.0, top_k=3)]
    seen: set[int] = set()
    sampler = Sampler(CPU, 2)
    for step in range(300):
        tokens, _ = sampler.sample(logits, [f"a{step}", f"b{step}", f"c{step}"], params)
        assert tokens[0] == 0 and tokens[1] == 0
        seen.add(tokens[2])
    assert seen == {0, 1, 2}


def test_a_seeded_request_draws_the_same_whatever_its_batch() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 50, generator=gen)
    seeded = SamplingParams(temperature=1.0, seed=7)
    other = SamplingParams(temperature=1.0)
    alone = [Sampler(CPU, 0).sample(logits[2:3], ["s"], [seeded])[0][0]]
    s = Sampler(CPU, 99)
    mixed = s.sample(logits, ["x0", "x1", "s", "x3", "x4"], [other, other, seeded, other, other])
    assert mixed[0][2] == alone[0]
    # the seeded request's generator continues across steps, as in one request's life
    a, b = Sampler(CPU, 0), Sampler(CPU, 5)
    seq_a = [a.sample(logits[:1], ["s"], [seeded])[0][0] for _ in range(20)]
    pair = torch.stack([logits[1], logits[0]])
    seq_b = [b.sample(pair, ["z", "s"], [other, seeded])[0][1] for _ in range(20)]
    assert seq_a == seq_b and len(set(seq_a)) > 1


def test_zero_probability_tokens_are_never_drawn() -> None:
    logits = torch.tensor([0.0, -math.inf, 1.0, -math.inf])
    tokens = _draw(Sampler(CPU, 3), logits, SamplingParams(temperature=1.0), 5000)
    assert set(tokens) <= {0, 2}


def test_logprobs_of_the_sampled_token_and_the_top_k() -> None:
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]]))
    tokens, lps = Sampler(CPU, 0).sample(logits, ["g"], [SamplingParams(temperature=0,
                                                                         logprobs=2)])
    assert tokens == [0]
    lp = lps[0]
    assert lp is not None and math.isclose(lp.logprob, math.log(0.6), rel_tol=1e-5)
    assert [t for t, _ in lp.top] == [0, 1]


def test_graph_logits_in_bf16_are_widened_unless_every_row_only_takes_the_argmax() -> None:
    """A decode graph hands the sampler logits in the model's dtype. Plain greedy rows read
    them as they are (argmax is the same on the exact fp32 widening); a batch with any row that
    samples, edits logits or wants logprobs sees fp32 logits everywhere, so its tokens and
    logprobs equal those from fp32 logits of the same values."""
    gen = torch.Generator().manual_seed(3)
    bf16 = (torch.randn(4, 50, generator=gen) * 3).bfloat16()
    bf16[1, [7, 30]] = bf16[1].max() + 1  # a tie: the first index wins either way
    seen: list[torch.dtype] = []

    def spy(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.dtype)
        return x.argmax(dim=-1)

    greedy = SamplingParams(temperature=0)
    for params, widened in (
            ([greedy] * 4, False),
            ([greedy, greedy, greedy, SamplingParams(temperature=0, logprobs=3)], True),
            ([greedy, greedy, greedy, SamplingParams(temperature=0, logit_bias=((5, 2.0),))], True),
            ([greedy, greedy, greedy, SamplingParams(temperature=0.8, seed=1)], True)):
        seen.clear()
        ids = [f"r{i}" for i in range(4)]
        got = Sampler(CPU, 0, spy).sample(bf16, ids, params)
        want = Sampler(CPU, 0, spy).sample(bf16.float(), ids, params)
        assert seen[0] == (torch.float32 if widened else torch.bfloat16)
        assert got == want
        assert got[0][1] == 7
