"""Workloads: token-exact input lengths, shared prefixes, length distributions."""

from __future__ import annotations

import numpy as np
import pytest

from bench.datasets import (
    DatasetConfig,
    build_exact_prompt,
    safe_token_ids,
    sample_conversations,
    sample_requests,
)
from disagg.common.tokenizer import DEFAULT_CHAT, ByteTokenizer, ChatOptions


class _BPETokenizer:
    """A small byte-level BPE: decoded random ids re-merge, so naive token counts drift."""

    def __init__(self) -> None:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["[BOS]"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        corpus = ["the quick brown fox jumps over the lazy dog " * 5,
                  "pack my box with five dozen liquor jugs " * 5,
                  "sphinx of black quartz judge my vow " * 5]
        tok.train_from_iterator(corpus, trainer)
        self._tok = tok
        bos = tok.token_to_id("[BOS]")
        assert bos is not None
        self._bos: int = bos
        self.bos_token_id: int | None = bos
        self.eos_token_id: int | None = None
        self.vocab_size = tok.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids: list[int] = self._tok.encode(text, add_special_tokens=False).ids
        return [self._bos, *ids] if add_special_tokens else ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]],
                            options: ChatOptions = DEFAULT_CHAT) -> str:
        return ""

    def chat_ids(self, messages: list[dict[str, str]],
                 options: ChatOptions = DEFAULT_CHAT) -> list[int]:
        return []


def test_random_prompts_have_exact_token_lengths_with_the_byte_tokenizer():
    tok = ByteTokenizer()
    cfg = DatasetConfig(num_prompts=50, random_input_len=100, random_output_len=20, seed=3)
    reqs = sample_requests(cfg, tok)
    assert len(reqs) == 50
    for r in reqs:
        assert r.prompt_len == 100 == len(tok.encode(r.prompt))
        assert r.expected_output_len == 20


def test_range_ratio_and_shared_prefix_stay_exact():
    tok = ByteTokenizer()
    cfg = DatasetConfig(num_prompts=200, random_input_len=64, random_output_len=32,
                        random_range_ratio=0.5, random_prefix_len=16, seed=1)
    reqs = sample_requests(cfg, tok)
    prefixes = {r.prompt[:16] for r in reqs}
    assert len(prefixes) == 1  # one prefix shared by every request
    for r in reqs:
        assert r.prompt_len == len(tok.encode(r.prompt))
        assert 16 + 32 <= r.prompt_len <= 16 + 96
        assert 16 <= r.expected_output_len <= 48
    assert len({r.prompt_len for r in reqs}) > 10  # the range is actually used


def test_exact_lengths_with_a_merging_bpe_tokenizer():
    tok = _BPETokenizer()
    rng = np.random.default_rng(0)
    safe = safe_token_ids(tok, rng)
    draws = [rng.choice(safe, size=40).tolist() for _ in range(50)]
    # decoding then re-encoding random ids changes the count: the adjust loop is needed
    assert any(len(tok.encode(tok.decode(ids), add_special_tokens=False)) != 40
               for ids in draws)
    cfg = DatasetConfig(num_prompts=30, random_input_len=40, random_range_ratio=0.5,
                        random_prefix_len=8, seed=0)
    for r in sample_requests(cfg, tok):
        assert r.prompt_len == len(tok.encode(r.prompt))


def test_same_seed_same_prompts_other_seed_other_prompts():
    tok = ByteTokenizer()
    cfg = DatasetConfig(num_prompts=5, random_input_len=32, seed=7)
    assert sample_requests(cfg, tok) == sample_requests(cfg, tok)
    other = DatasetConfig(num_prompts=5, random_input_len=32, seed=8)
    assert sample_requests(cfg, tok) != sample_requests(other, tok)


def test_conversation_lengths_are_lognormal_and_clipped():
    tok = ByteTokenizer()
    cfg = DatasetConfig(name="conversation", num_prompts=2000, conv_max_len=512, seed=0)
    reqs = sample_requests(cfg, tok)
    ins = np.array([r.prompt_len for r in reqs])
    outs = np.array([r.expected_output_len for r in reqs])
    assert ins.min() >= 2 and ins.max() <= 512 and outs.min() >= 4 and outs.max() <= 512
    assert 150 < np.mean(ins) < 260 and 130 < np.mean(outs) < 230  # means ~217 / ~190
    assert np.median(ins) < np.mean(ins)  # right-skewed like real conversations
    assert all(r.prompt_len == len(tok.encode(r.prompt)) for r in reqs[:200])


def test_shared_prefix_groups():
    tok = ByteTokenizer()
    cfg = DatasetConfig(name="shared-prefix", num_prompts=64, shared_prefix_groups=4,
                        shared_prefix_len=32, random_input_len=16, random_output_len=8)
    reqs = sample_requests(cfg, tok)
    groups = {r.prompt[:32] for r in reqs}
    assert len(groups) == 4
    assert all(r.prompt_len == 48 == len(tok.encode(r.prompt)) for r in reqs)


def test_build_exact_prompt_rejects_impossible_lengths():
    tok = ByteTokenizer()
    rng = np.random.default_rng(0)
    safe = safe_token_ids(tok, rng)
    assert all(32 <= i < 127 for i in safe.tolist())  # printable ASCII only
    with pytest.raises(ValueError, match="shorter than the prefix"):
        build_exact_prompt(tok, rng, safe, 3, prefix="0123456789")


def _multi_turn(**kwargs) -> DatasetConfig:
    shape = {"multi_turn_conversations": 6, "multi_turn_turns": 3, "multi_turn_system_len": 40,
             "multi_turn_user_len": 12, "multi_turn_output_len": 5, "seed": 2}
    return DatasetConfig(name="multi-turn", **{**shape, **kwargs})


def test_multi_turn_scripts_have_exact_lengths_and_own_system_prompts():
    tok = _BPETokenizer()
    scripts = sample_conversations(_multi_turn(random_range_ratio=0.5), tok)
    assert len(scripts) == 6 and len({s.system_prompt for s in scripts}) == 6
    for s in scripts:
        assert len(tok.encode(s.system_prompt, add_special_tokens=False)) == 40
        assert len(s.user_messages) == len(s.output_lens) == 3
        for msg in s.user_messages:
            assert 6 <= len(tok.encode(msg, add_special_tokens=False)) <= 18
        assert all(2 <= n <= 7 for n in s.output_lens)


def test_multi_turn_is_deterministic_with_a_seed():
    tok = ByteTokenizer()
    assert sample_conversations(_multi_turn(), tok) == sample_conversations(_multi_turn(), tok)
    assert sample_conversations(_multi_turn(), tok) != \
        sample_conversations(_multi_turn(seed=3), tok)


def test_multi_turn_prompts_are_not_a_flat_list():
    with pytest.raises(ValueError, match="sample_conversations"):
        sample_requests(_multi_turn(), ByteTokenizer())
    with pytest.raises(ValueError, match="multi-turn-turns"):
        sample_conversations(_multi_turn(multi_turn_turns=0), ByteTokenizer())


@pytest.mark.parametrize("kwargs, match", [
    ({"name": "lmsys"}, "unknown dataset"),
    ({"name": "sharegpt"}, "--dataset-name sharegpt needs --dataset-path"),
    ({"name": "custom", "dataset_path": "x.jsonl", "custom_output_len": 0},
     "--custom-output-len"),
    ({"random_range_ratio": 1.0}, "range-ratio"),
    ({"num_prompts": 0}, "num-prompts"),
    ({"random_input_len": 0}, "random-input-len"),
])
def test_invalid_configs_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample_requests(DatasetConfig(**kwargs), ByteTokenizer())
