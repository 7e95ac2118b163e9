"""Logits processors that change the argmax: logit_bias and the repetition penalties.

Order as vLLM V1's sampler: min_tokens (stop tokens banned until then), logit_bias, then
penalties (repetition, frequency, presence), then greedy argmax / temperature, min_p,
top-k/top-p (the last three live in sampler.py).

The penalties read each request's token counts, kept on the device by ``TokenCounts``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from disagg.common.sampling_params import SamplingParams


class TokenHistory(Protocol):
    """What the logits processors read of a request (``disagg.engine.request.Request`` is
    one)."""

    @property
    def prompt_token_ids(self) -> Sequence[int]: ...

    @property
    def output_token_ids(self) -> Sequence[int]: ...

    @property
    def eos_token_ids(self) -> Sequence[int]: ...


def min_tokens_bans(sp: SamplingParams, history: TokenHistory) -> list[int]:
    """The tokens a request may not sample yet: its stop tokens (EOS unless ``ignore_eos``,
    and ``stop_token_ids``) while it has fewer than ``min_tokens`` outputs, as vLLM's
    min-tokens processor. Empty when nothing is banned."""
    if len(history.output_token_ids) >= sp.min_tokens:
        return []
    eos = () if sp.ignore_eos else tuple(history.eos_token_ids)
    return sorted({*eos, *sp.stop_token_ids})


def ban_tokens(logits: torch.Tensor, rows: Sequence[int], banned: Sequence[Sequence[int]]
               ) -> None:
    """``logits[rows[i], banned[i]] = -inf`` in place (ids past the vocabulary are ignored)."""
    vocab = logits.shape[1]
    row_ids = [r for r, ids in zip(rows, banned, strict=True) for t in ids if 0 <= t < vocab]
    token_ids = [t for ids in banned for t in ids if 0 <= t < vocab]
    if row_ids:
        dev = logits.device
        logits.index_put_((to_device(row_ids, torch.long, dev),
                           to_device(token_ids, torch.long, dev)),
                          torch.tensor(float("-inf"), dtype=logits.dtype, device=dev))


def to_device(values: Sequence[int] | Sequence[float], dtype: torch.dtype,
              device: torch.device) -> torch.Tensor:
    """A small host list on ``device`` without a stream sync (a pageable copy is staged at once
    and queued behind the step's kernels)."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


def apply_logit_bias(logits: torch.Tensor, rows: Sequence[int],
                     bias: Sequence[tuple[tuple[int, float], ...]]) -> None:
    """Add each row's (token id, bias) pairs to ``logits`` [n, V] in place: one index_put for
    the whole batch. ``rows[k]`` is the row of ``bias[k]``; token ids are < V (checked when
    the request was admitted)."""
    row_ids = [r for r, pairs in zip(rows, bias, strict=True) for _ in pairs]
    token_ids = [t for pairs in bias for t, _ in pairs]
    values = [b for pairs in bias for _, b in pairs]
    dev = logits.device
    logits.index_put_((to_device(row_ids, torch.long, dev), to_device(token_ids, torch.long, dev)),
                      to_device(values, logits.dtype, dev), accumulate=True)


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, in_prompt: torch.Tensor,
                    presence: torch.Tensor, frequency: torch.Tensor,
                    repetition: torch.Tensor) -> torch.Tensor:
    """vLLM's penalties over ``logits`` [m, V] fp32, returned as a new tensor.

    counts [m, V] int32: times each token was generated; in_prompt [m, V] bool: the token is in
    the prompt; presence, frequency, repetition [m]. A token seen in the prompt or the output
    has its logit divided by ``repetition`` when positive, multiplied when not; then OpenAI's
    ``logit -= frequency * count + presence * (count > 0)`` over the generated tokens only.
    A row with repetition 1 and zero penalties comes out unchanged (x / 1 == x * 1 == x).
    """
    generated = counts > 0
    rp = repetition[:, None]
    scaled = torch.where(logits > 0, logits / rp, logits * rp)
    out = torch.where(generated | in_prompt, scaled, logits)
    out -= frequency[:, None] * counts
    out -= presence[:, None] * generated
    return out


@dataclass(slots=True)
class _Slot:
    index: int
    """Row of ``TokenCounts.counts`` / ``in_prompt`` this request owns."""
    num_counted: int = 0
    """Leading output tokens already added to its counts."""


class TokenCounts:
    """Per-request output-token counts and prompt-token flags on the device, one row (slot) per
    penalized request, brought up to date incrementally.

        counts    [slots, V] int32   times each token was generated
        in_prompt [slots, V] bool    the token appears in the prompt

    Why incremental rather than a [rows, V] count rebuilt each step by scatter_add from padded
    histories: a step adds one token per request, so only those new ids cross to the device
    (a few bytes a row), where a rebuild copies and scatters whole prompt + output histories
    every step (O(context) host work and transfer per row). The price is memory, V x 5 bytes
    a penalized request (0.6 MiB at V = 128k), held until ``forget``; slots are reused and the
    pool doubles when full. Self-correcting: each step counts whatever the request's output
    has beyond ``num_counted`` (a first token handed over by a prefill included).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._slots: dict[str, _Slot] = {}
        self._free: list[int] = []
        self.counts = torch.zeros(0, 0, dtype=torch.int32, device=device)
        self.in_prompt = torch.zeros(0, 0, dtype=torch.bool, device=device)

    def __len__(self) -> int:
        return len(self._slots)

    def forget(self, request_id: str) -> None:
        """Free a finished request's slot (zeroed when reused)."""
        slot = self._slots.pop(request_id, None)
        if slot is not None:
            self._free.append(slot.index)

    def gather(self, request_ids: Sequence[str], histories: Sequence[TokenHistory],
               vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows' (counts [m, V], in_prompt [m, V]), after adding what each row generated
        since the last call; a new request gets a slot and its prompt flags first."""
        fresh = [rid for rid in request_ids if rid not in self._slots]
        if fresh:
            self._admit(fresh, histories, request_ids, vocab_size)
        slot_ids: list[int] = []
        new_slots: list[int] = []
        new_tokens: list[int] = []
        for rid, hist in zip(request_ids, histories, strict=True):
            slot = self._slots[rid]
            out = hist.output_token_ids
            if len(out) > slot.num_counted:
                new = out[slot.num_counted:]
                new_slots += [slot.index] * len(new)
                new_tokens += new
                slot.num_counted = len(out)
            slot_ids.append(slot.index)
        if new_tokens:
            index = (to_device(new_slots, torch.long, self.device),
                     to_device(new_tokens, torch.long, self.device))
            self.counts.index_put_(index, torch.ones(len(new_tokens), dtype=torch.int32,
                                                     device=self.device), accumulate=True)
        rows = to_device(slot_ids, torch.long, self.device)
        return self.counts[rows], self.in_prompt[rows]

    def _admit(self, fresh: list[str], histories: Sequence[TokenHistory],
               request_ids: Sequence[str], vocab_size: int) -> None:
        """Slots for new requests: zeroed, prompt tokens flagged (one copy of each prompt)."""
        self._reserve(len(fresh), vocab_size)
        by_id = dict(zip(request_ids, histories, strict=True))
        slots = [self._free.pop() for _ in fresh]
        prompt_slots: list[int] = []
        prompt_tokens: list[int] = []
        for rid, index in zip(fresh, slots, strict=True):
            self._slots[rid] = _Slot(index)
            prompt = by_id[rid].prompt_token_ids
            prompt_slots += [index] * len(prompt)
            prompt_tokens += prompt
        rows = to_device(slots, torch.long, self.device)
        self.counts[rows] = 0
        self.in_prompt[rows] = False
        if prompt_tokens:
            self.in_prompt[to_device(prompt_slots, torch.long, self.device),
                           to_device(prompt_tokens, torch.long, self.device)] = True

    def _reserve(self, num_slots: int, vocab_size: int) -> None:
        """At least ``num_slots`` free slots: the pool doubles (rows copied over)."""
        if len(self._free) >= num_slots and self.counts.shape[1] == vocab_size:
            return
        old = self.counts.shape[0]
        if self.counts.shape[1] not in (0, vocab_size):
            raise ValueError(f"vocabulary changed from {self.counts.shape[1]} to {vocab_size}")
        size = max(8, 2 * old, old + num_slots - len(self._free))
        counts = torch.zeros(size, vocab_size, dtype=torch.int32, device=self.device)
        in_prompt = torch.zeros(size, vocab_size, dtype=torch.bool, device=self.device)
        if old:
            counts[:old] = self.counts
            in_prompt[:old] = self.in_prompt
        self.counts, self.in_prompt = counts, in_prompt
        self._free += range(old, size)
