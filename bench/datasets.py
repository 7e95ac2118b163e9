"""Benchmark workloads: random, synthetic conversation lengths, shared prefix, multi-turn chat,
and prompts read from files (ShareGPT, custom JSONL, Hugging Face datasets: bench/file_datasets.py).

Input lengths are token-exact: a prompt's ``prompt_len`` is ``len(tokenizer.encode(prompt))``
*with* the tokenizer's special tokens (BOS), i.e. the number of tokens the server prefills on
``/v1/completions``. On ``/v1/chat/completions`` the server's chat template adds a few more.

``multi-turn`` is not a list of prompts but of conversation scripts (``sample_conversations``):
each turn's prompt holds the real answers to the earlier turns, so it is assembled while the
benchmark runs (bench/multi_turn.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from bench.dataset_config import DATASET_NAMES, FILE_DATASETS, DatasetConfig, SampleRequest
from bench.file_datasets import sample_file_requests
from disagg.common.tokenizer import Tokenizer

__all__ = ["DATASET_NAMES", "FILE_DATASETS", "DatasetConfig", "SampleRequest",
           "sample_conversations", "sample_requests"]

_MAX_ADJUST_ROUNDS = 64
_MAX_PROBE_IDS = 4096


@dataclass(frozen=True, slots=True)
class ConversationScript:
    """One multi-turn conversation before it runs: everything but the model's answers."""

    system_prompt: str
    """Exactly ``multi_turn_system_len`` tokens (no special tokens)."""
    user_messages: tuple[str, ...]
    """One message per turn, each token-exact (no special tokens)."""
    output_lens: tuple[int, ...]
    """Answer tokens of each turn (sent as max_tokens = min_tokens)."""


def safe_token_ids(tokenizer: Tokenizer, rng: np.random.Generator) -> np.ndarray:
    """Ids that decode to printable text and encode back to themselves alone."""
    vocab_size = int(tokenizer.vocab_size)
    probe = np.arange(vocab_size)
    if vocab_size > _MAX_PROBE_IDS:
        probe = rng.choice(vocab_size, size=_MAX_PROBE_IDS, replace=False)
    specials = {tokenizer.bos_token_id, tokenizer.eos_token_id}
    safe = []
    for token_id in probe.tolist():
        if token_id in specials:
            continue
        text = tokenizer.decode([token_id])
        if text and text.isprintable() and \
                tokenizer.encode(text, add_special_tokens=False) == [token_id]:
            safe.append(token_id)
    if not safe:
        raise ValueError("the tokenizer has no printable single-token ids to build prompts from")
    return np.asarray(sorted(safe), dtype=np.int64)


def build_exact_prompt(tokenizer: Tokenizer, rng: np.random.Generator, safe_ids: np.ndarray,
                       num_tokens: int, prefix: str = "", add_special_tokens: bool = True) -> str:
    """Random text after ``prefix`` whose encoding has exactly ``num_tokens`` ids."""
    count = lambda text: len(tokenizer.encode(text, add_special_tokens=add_special_tokens))
    base_tokens = count(prefix)
    if num_tokens < base_tokens:
        raise ValueError(f"a length of {num_tokens} tokens is shorter than the prefix and "
                         f"special tokens ({base_tokens})")
    body = rng.choice(safe_ids, size=num_tokens - base_tokens).tolist()
    # Decoding then re-encoding can merge or split tokens at the seams: trim or pad the body
    # until the round trip lands on the exact count.
    for _ in range(_MAX_ADJUST_ROUNDS):
        text = prefix + tokenizer.decode(body)
        diff = num_tokens - count(text)
        if diff == 0:
            return text
        if diff > 0:
            body += rng.choice(safe_ids, size=diff).tolist()
        else:
            body = body[:max(0, len(body) + diff)]
    raise ValueError(f"could not build a prompt of exactly {num_tokens} tokens with this "
                     "tokenizer")


def _uniform_lens(rng: np.random.Generator, mean_len: int, range_ratio: float,
                  size: int, min_len: int) -> list[int]:
    """Integer lengths uniform in [mean * (1 - r), mean * (1 + r)], at least ``min_len``."""
    low = max(min_len, int(mean_len * (1 - range_ratio)))
    high = max(low, int(mean_len * (1 + range_ratio)))
    return rng.integers(low, high + 1, size=size).tolist()


def _lognormal_lens(rng: np.random.Generator, mean_len: float, sigma: float, size: int,
                    max_len: int) -> list[int]:
    """Lognormal lengths with the given mean, clipped to [4, max_len] like ShareGPT filters."""
    mu = math.log(mean_len) - sigma * sigma / 2
    lens = rng.lognormal(mu, sigma, size=size)
    return np.clip(np.rint(lens), 4, max_len).astype(np.int64).tolist()


def _prefixed_requests(tokenizer: Tokenizer, rng: np.random.Generator, safe_ids: np.ndarray,
                       prefixes: list[tuple[str, int]], body_lens: list[int],
                       output_lens: list[int]) -> list[SampleRequest]:
    """One request per (body, output) length; request i uses prefix i mod len(prefixes)."""
    requests = []
    for i, (body_len, output_len) in enumerate(zip(body_lens, output_lens, strict=True)):
        prefix_text, prefix_len = prefixes[i % len(prefixes)]
        prompt_len = prefix_len + body_len
        prompt = build_exact_prompt(tokenizer, rng, safe_ids, prompt_len, prefix=prefix_text)
        requests.append(SampleRequest(prompt, prompt_len, int(output_len)))
    return requests


def _special_tokens(tokenizer: Tokenizer) -> int:
    """How many ids the tokenizer adds around any text (BOS, ...)."""
    return len(tokenizer.encode("", add_special_tokens=True))


def _make_prefixes(tokenizer: Tokenizer, rng: np.random.Generator, safe_ids: np.ndarray,
                   num_prefixes: int, prefix_len: int) -> list[tuple[str, int]]:
    """``num_prefixes`` random texts of exactly ``prefix_len`` tokens (no special tokens)."""
    if prefix_len == 0:
        return [("", 0)]
    return [(build_exact_prompt(tokenizer, rng, safe_ids, prefix_len, add_special_tokens=False),
             prefix_len) for _ in range(num_prefixes)]


def sample_requests(cfg: DatasetConfig, tokenizer: Tokenizer) -> list[SampleRequest]:
    """Generate ``cfg.num_prompts`` requests of the named workload (seeded, reproducible)."""
    _validate(cfg)
    if cfg.name == "multi-turn":
        raise ValueError("multi-turn prompts depend on the answers: use sample_conversations")
    if cfg.name in FILE_DATASETS:

        return sample_file_requests(cfg, tokenizer)
    rng = np.random.default_rng(cfg.seed)
    safe_ids = safe_token_ids(tokenizer, rng)
    min_body = _special_tokens(tokenizer) + 1
    n = cfg.num_prompts
    if cfg.name == "conversation":
        body_lens = [max(min_body, x) for x in
                     _lognormal_lens(rng, cfg.conv_input_mean, cfg.conv_sigma, n, cfg.conv_max_len)]
        output_lens = _lognormal_lens(rng, cfg.conv_output_mean, cfg.conv_sigma, n,
                                      cfg.conv_max_len)
        prefixes = [("", 0)]
    else:
        body_lens = _uniform_lens(rng, cfg.random_input_len, cfg.random_range_ratio, n, min_body)
        output_lens = _uniform_lens(rng, cfg.random_output_len, cfg.random_range_ratio, n, 1)
        if cfg.name == "shared-prefix":
            prefixes = _make_prefixes(tokenizer, rng, safe_ids, cfg.shared_prefix_groups,
                                      cfg.shared_prefix_len)
        else:
            prefixes = _make_prefixes(tokenizer, rng, safe_ids, 1, cfg.random_prefix_len)
    requests = _prefixed_requests(tokenizer, rng, safe_ids, prefixes, body_lens, output_lens)
    if cfg.name == "shared-prefix":
        # Interleave groups in a seeded random order, as a real multi-tenant mix arrives.
        requests = [requests[i] for i in rng.permutation(len(requests)).tolist()]
    return requests


def sample_conversations(cfg: DatasetConfig, tokenizer: Tokenizer) -> list[ConversationScript]:
    """``cfg.multi_turn_conversations`` seeded scripts, each with its own system prompt."""
    _validate(cfg)
    rng = np.random.default_rng(cfg.seed)
    safe_ids = safe_token_ids(tokenizer, rng)
    turns = cfg.multi_turn_turns
    scripts = []
    for _ in range(cfg.multi_turn_conversations):
        system = _make_prefixes(tokenizer, rng, safe_ids, 1, cfg.multi_turn_system_len)[0][0]
        user_lens = _uniform_lens(rng, cfg.multi_turn_user_len, cfg.random_range_ratio, turns, 1)
        users = tuple(build_exact_prompt(tokenizer, rng, safe_ids, n, add_special_tokens=False)
                      for n in user_lens)
        outs = _uniform_lens(rng, cfg.multi_turn_output_len, cfg.random_range_ratio, turns, 1)
        scripts.append(ConversationScript(system, users, tuple(outs)))
    return scripts


def _validate(cfg: DatasetConfig) -> None:
    """Raise ValueError with a user-facing message for an impossible workload."""
    if cfg.name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {cfg.name!r}; choose one of {', '.join(DATASET_NAMES)}")
    if cfg.num_prompts < 1:
        raise ValueError(f"--num-prompts must be at least 1, got {cfg.num_prompts}")
    if not 0 <= cfg.random_range_ratio < 1:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {cfg.random_range_ratio}")
    if cfg.random_input_len < 1 or cfg.random_output_len < 1:
        raise ValueError("--random-input-len and --random-output-len must be at least 1")
    if cfg.random_prefix_len < 0 or cfg.shared_prefix_len < 0:
        raise ValueError("prefix lengths must be >= 0")
    if cfg.shared_prefix_groups < 1:
        raise ValueError("--shared-prefix-groups must be at least 1")
    if cfg.conv_input_mean < 4 or cfg.conv_output_mean < 4 or cfg.conv_sigma <= 0:
        raise ValueError("conversation means must be >= 4 tokens and --conv-sigma > 0")
    if min(cfg.multi_turn_conversations, cfg.multi_turn_turns, cfg.multi_turn_user_len,
           cfg.multi_turn_output_len) < 1 or cfg.multi_turn_system_len < 0:
        raise ValueError("--multi-turn-conversations, --multi-turn-turns, --multi-turn-user-len "
                         "and --multi-turn-output-len must be at least 1, "
                         "--multi-turn-system-len >= 0")
    if cfg.name in FILE_DATASETS and not cfg.dataset_path:
        raise ValueError(f"--dataset-name {cfg.name} needs --dataset-path")
    if min(cfg.sharegpt_output_len or 1, cfg.custom_output_len, cfg.hf_output_len or 1) < 1:
        raise ValueError("--sharegpt-output-len, --custom-output-len and --hf-output-len must "
                         "be at least 1")
