"""Shared by the model tests: Hugging Face greedy generation and random prompts."""

from __future__ import annotations

import random
from typing import Any

import torch

MAX_NEW = 12


def hf_greedy(model: Any, prompts: list[list[int]], max_new: int) -> list[list[int]]:
    """transformers' greedy continuation of each prompt (no EOS stop)."""
    outs = []
    for p in prompts:
        g = model.generate(torch.tensor([p]), max_new_tokens=max_new, do_sample=False,
                           eos_token_id=None, pad_token_id=0)
        outs.append(g[0, len(p):].tolist())
    return outs


def mixed_prompts(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    """Random prompts of the given lengths over ids [3, vocab)."""
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]
