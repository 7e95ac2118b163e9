"""Which prompts skip the prefill pool: a fixed ``--local-prefill-threshold`` or ``auto``.

``auto`` learns from the phase timings of the P/D requests it routes:

    per_token_s  ~ P's prefill compute / prompt tokens          (moving average)
    handoff_s    ~ P answered -> D's first byte (READ), or D's first byte after P's
                   answer (WRITE), plus the proxy's two hops    (moving average)
    queue_s      = tokens already outstanding on the least loaded prefill x per_token_s
                   (live: it moves the moment the pool fills or drains)

    threshold    = (queue_s + handoff_s) / per_token_s, at most ``max_tokens``

A prompt goes to a decode alone when the time it occupies that decode (its tokens x
per_token_s: a stall for the decode's running streams) is below the wait the P/D path would
add before its first token (queue_s + handoff_s). When the prefill pool is saturated
``queue_s`` grows and short prompts move to the decodes; ``max_tokens`` bounds what a decode
may prefill whatever the wait.
Until ``min_samples`` P/D requests were seen the threshold stays 0 (everything goes P/D).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

DEFAULT_AUTO_MAX_TOKENS = 1024
"""Largest prompt ``auto`` ever sends to a decode alone (--local-prefill-max-tokens)."""


@dataclass(slots=True)
class _Average:
    """Exponential moving average; ``None`` until the first sample."""

    alpha: float
    value: float | None = None
    count: int = 0

    def add(self, sample: float) -> None:
        self.count += 1
        self.value = sample if self.value is None else \
            self.value + self.alpha * (sample - self.value)


class LocalPrefillThreshold:
    """The threshold in tokens below which a prompt is prefilled on a decode instance.

    One per proxy; the flows read it when they route and feed it what they measured. Only the
    event loop's thread touches it."""

    def __init__(self, fixed_tokens: int = 0, *, auto: bool = False,
                 max_tokens: int = DEFAULT_AUTO_MAX_TOKENS, min_samples: int = 8,
                 alpha: float = 0.1) -> None:
        if fixed_tokens < 0 or max_tokens < 0 or min_samples < 1 or not 0 < alpha <= 1:
            raise ValueError("local prefill threshold: tokens must be >= 0, min_samples >= 1 "
                             "and 0 < alpha <= 1")
        self.fixed_tokens = fixed_tokens
        self.auto = auto
        self.max_tokens = max_tokens
        self.min_samples = min_samples
        self._per_token = _Average(alpha)
        self._handoff = _Average(alpha)
        self.current_tokens = 0 if auto else fixed_tokens
        """The last threshold handed out (``/metrics``)."""

    def tokens(self, prefill_outstanding_tokens: Iterable[int]) -> int:
        """The threshold now, given each healthy prefill instance's outstanding tokens."""
        if not self.auto:
            return self.fixed_tokens
        per_token = self._per_token.value
        if self._per_token.count < self.min_samples or not per_token or per_token <= 0:
            self.current_tokens = 0
            return 0
        queue_s = min(prefill_outstanding_tokens, default=0) * per_token
        wait_s = queue_s + (self._handoff.value or 0.0)
        self.current_tokens = int(min(self.max_tokens, wait_s / per_token))
        return self.current_tokens

    def observe_prefill(self, num_prompt_tokens: int, compute_s: float) -> None:
        """A prefill's compute time as its instance reported it."""
        if num_prompt_tokens > 0 and compute_s >= 0:
            self._per_token.add(compute_s / num_prompt_tokens)

    def observe_handoff(self, seconds: float) -> None:
        """What the P/D path added after the prefill answered, up to D's first byte."""
        if seconds >= 0:
            self._handoff.add(seconds)
