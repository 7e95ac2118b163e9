"""The shape of a benchmark workload and of one request (bench/datasets.py and
bench/file_datasets.py build requests from it)."""

from __future__ import annotations

from dataclasses import dataclass

FILE_DATASETS = ("sharegpt", "custom", "hf")
"""Datasets whose prompts come from ``--dataset-path`` (bench/file_datasets.py)."""
DATASET_NAMES = ("random", "conversation", "shared-prefix", "multi-turn", *FILE_DATASETS)


@dataclass(frozen=True, slots=True)
class SampleRequest:
    """One benchmark request: the prompt text and its exact token counts."""

    prompt: str
    prompt_len: int
    """Tokens in ``prompt`` as the server's tokenizer counts them (with BOS)."""
    expected_output_len: int
    """Sent as ``max_tokens`` and ``min_tokens`` with ``ignore_eos``: exact output length."""


@dataclass(frozen=True, slots=True, kw_only=True)
class DatasetConfig:
    """Which workload to generate and its shape."""

    name: str = "random"
    """One of DATASET_NAMES."""
    num_prompts: int = 1000
    """How many requests to generate."""
    seed: int = 0
    """Seed for lengths and token ids: same seed, same prompts."""
    random_input_len: int = 1024
    """Mean prompt tokens after the prefix (random, shared-prefix)."""
    random_output_len: int = 128
    """Mean output tokens (random, shared-prefix)."""
    random_range_ratio: float = 0.0
    """Lengths are uniform in [len * (1 - r), len * (1 + r)]; 0 = fixed lengths."""
    random_prefix_len: int = 0
    """Tokens of one random prefix shared by every request (random)."""
    conv_input_mean: float = 217.0
    """Mean prompt tokens of the conversation workload (ShareGPT-like, vLLM's filter)."""
    conv_output_mean: float = 190.0
    """Mean output tokens of the conversation workload."""
    conv_sigma: float = 1.0
    """Log-space standard deviation of both lognormal length distributions."""
    conv_max_len: int = 1024
    """Clip each conversation length to [4, conv_max_len]."""
    shared_prefix_groups: int = 8
    """Distinct system prompts in the shared-prefix workload."""
    shared_prefix_len: int = 512
    """Tokens of each group's system prompt."""
    multi_turn_conversations: int = 16
    """Conversations of the multi-turn workload (each with its own system prompt)."""
    multi_turn_turns: int = 4
    """User turns per conversation; turn k's prompt holds turns 1..k-1 and their answers."""
    multi_turn_system_len: int = 256
    """Tokens of each conversation's system prompt."""
    multi_turn_user_len: int = 64
    """Mean tokens of one user message (``random_range_ratio`` spreads it)."""
    multi_turn_output_len: int = 64
    """Mean tokens of one answer (``random_range_ratio`` spreads it)."""
    dataset_path: str | None = None
    """sharegpt: a JSON file; custom: a JSONL file; hf: a saved dataset dir or a cached hub id."""
    sharegpt_output_len: int | None = None
    """Output tokens of every ShareGPT request; None: the first answer's token count."""
    custom_output_len: int = 256
    """Output tokens of a custom (or hf ``prompt``) row without ``output_tokens``."""
    hf_subset: str | None = None
    """Subset (config name) of a hub dataset."""
    hf_split: str = "train"
    """Split of the Hugging Face dataset."""
    hf_output_len: int | None = None
    """Output tokens of every hf request; None: from each row (answer or output_tokens)."""
    shuffle: bool = True
    """File datasets: draw prompts in a seeded random order (False: file order)."""
