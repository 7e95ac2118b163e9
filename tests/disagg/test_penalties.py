"""logit_bias and the repetition penalties against plain per-row torch references, and the
device token counts they read (kept up to date step by step, slots reused)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from disagg.common.sampling_params import SamplingParams
from disagg.engine.penalties import TokenCounts, apply_logit_bias, apply_penalties
from disagg.llm import LLM

CPU = torch.device("cpu")


@dataclass
class History:
    prompt_token_ids: list[int]
    output_token_ids: list[int] = field(default_factory=list)
    eos_token_ids: tuple[int, ...] = ()


def _penalties_ref(logits: torch.Tensor, prompt: list[int], output: list[int], presence: float,
                   frequency: float, repetition: float) -> torch.Tensor:
    """One row, token by token, straight from the definitions (vLLM's and OpenAI's)."""
    out = logits.clone().double()
    for tok in range(out.shape[0]):
        if tok in prompt or tok in output:
            out[tok] = out[tok] / repetition if out[tok] > 0 else out[tok] * repetition
        count = output.count(tok)
        out[tok] -= frequency * count + presence * (count > 0)
    return out


def test_penalties_match_the_reference_row_by_row() -> None:
    gen = torch.Generator().manual_seed(0)
    vocab = 37  # odd on purpose
    logits = torch.randn(3, vocab, generator=gen) * 3
    histories = [History([1, 2, 2, 30], [5, 5, 5, 2, 36]), History([0], []),
                 History([4, 9], [9, 9, 1])]
    params = [(0.5, 0.25, 1.3), (-1.0, 2.0, 0.7), (0.0, 0.0, 1.0)]
    counts = TokenCounts(CPU)
    c, p = counts.gather(["a", "b", "c"], histories, vocab)
    pres, freq, rep = torch.tensor(params).T
    got = apply_penalties(logits, c, p, pres, freq, rep)
    for row, (h, (pr, fr, rp)) in enumerate(zip(histories, params, strict=True)):
        want = _penalties_ref(logits[row], h.prompt_token_ids, h.output_token_ids, pr, fr, rp)
        assert torch.allclose(got[row].double(), want, atol=1e-5), row
    assert torch.equal(got[2], logits[2])  # no penalty: the row is untouched


def test_a_penalized_tokens_probability_drops_by_the_formula() -> None:
    logits = torch.zeros(1, 4)
    counts = TokenCounts(CPU)
    c, p = counts.gather(["r"], [History([3], [0, 0])], 4)
    out = apply_penalties(logits, c, p, torch.tensor([0.5]), torch.tensor([0.25]),
                          torch.tensor([1.0]))
    probs = torch.softmax(out[0], dim=-1)
    penalized = torch.exp(torch.tensor(-(0.25 * 2 + 0.5)))  # e^-(frequency * 2 + presence)
    assert torch.isclose(probs[0], penalized / (penalized + 3), atol=1e-6)
    assert torch.isclose(probs[3], 1 / (penalized + 3), atol=1e-6)  # prompt-only, rp 1


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits() -> None:
    logits = torch.tensor([[2.0, -1.0, 2.0, -1.0]])
    counts = TokenCounts(CPU)
    c, p = counts.gather(["r"], [History([0], [1])], 4)  # 0 in the prompt, 1 generated
    out = apply_penalties(logits, c, p, torch.zeros(1), torch.zeros(1), torch.tensor([2.0]))
    assert out.tolist() == [[1.0, -2.0, 2.0, -1.0]]


def test_logit_bias_adds_per_row_in_one_call() -> None:
    logits = torch.zeros(3, 5)
    apply_logit_bias(logits, [0, 2], [((1, 5.0), (4, -100.0)), ((0, 0.5),)])
    want = torch.zeros(3, 5)
    want[0, 1], want[0, 4], want[2, 0] = 5.0, -100.0, 0.5
    assert torch.equal(logits, want)


def test_token_counts_follow_the_outputs_step_by_step() -> None:
    counts = TokenCounts(CPU)
    a, b = History([1, 1, 2]), History([7])
    for step in range(12):
        a.output_token_ids.append(step % 3)
        if step % 2:
            b.output_token_ids += [step % 5, 6]  # two at once (a handed-over first token, say)
        c, p = counts.gather(["a", "b"], [a, b], 8)
        for row, h in enumerate((a, b)):
            want = torch.bincount(torch.tensor(h.output_token_ids, dtype=torch.long), minlength=8)
            assert torch.equal(c[row], want.int())
            assert p[row].nonzero().flatten().tolist() == sorted(set(h.prompt_token_ids))


def test_forgotten_slots_are_reused_clean_and_the_pool_grows() -> None:
    counts = TokenCounts(CPU)
    hist = [History([i], [i, i]) for i in range(20)]
    counts.gather([f"r{i}" for i in range(20)], hist, 32)
    assert counts.counts.shape[0] >= 20 and len(counts) == 20
    size = counts.counts.shape[0]
    counts.forget("r3")
    c, p = counts.gather(["new"], [History([9], [])], 32)
    assert counts.counts.shape[0] == size  # reused r3's slot
    assert c.sum() == 0 and p[0].nonzero().flatten().tolist() == [9]
    c, _ = counts.gather(["r4"], [hist[4]], 32)  # others untouched
    assert c[0, 4] == 2 and c.sum() == 2


def test_the_engine_refuses_bias_ids_past_its_vocabulary_and_counts_its_tokens() -> None:
    with LLM(device="cpu", kv_cache_memory_bytes=2 * 2**20, max_model_len=128) as llm:
        try:
            llm.generate([[1, 2, 3]], SamplingParams(logit_bias=((320, 1.0),)))
        except ValueError as exc:
            assert "logit_bias token id 320 is out of range [0, 320)" in str(exc)
        else:
            raise AssertionError("an id past the vocabulary was accepted")
        # a prompt id past the model's vocabulary (a tokenizer larger than the model, or none
        # at all) is refused, not looked up in the embedding (that killed the engine core)
        try:
            llm.generate([[1, 320, 3]], SamplingParams(max_tokens=2))
        except ValueError as exc:
            assert "prompt token id 320 is out of range [0, 320)" in str(exc)
        else:
            raise AssertionError("a prompt id past the vocabulary was accepted")
        assert llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2))[0].output_token_ids
        # 65 and 66 forced above the rest; the penalty sees each appended token, so they mix
        sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, frequency_penalty=2.0,
                            logit_bias=((65, 100.0), (66, 100.0)))
        out = llm.generate([[1, 2, 3]], sp)[0].output_token_ids
        assert set(out) == {65, 66}
        assert len(llm.engine.runner.sampler.token_counts) == 0  # forgotten at the finish
