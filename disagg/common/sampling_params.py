"""Per-request sampling parameters (validated at the frontend, carried to the engine)."""

from __future__ import annotations

import math

import msgspec

SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
"""Seeds are signed 64-bit (vLLM's range; torch.Generator.manual_seed takes all of it)."""
MAX_TOKEN_ID = 2**31 - 1
"""Token ids fit in int32 (the model checks its own vocab; this bounds the wire)."""
MAX_LOGPROBS = 20
"""Most top alternatives a request may ask for (OpenAI's limit)."""
MAX_STOP_STRINGS = 16
MAX_STOP_TOKEN_IDS = 1024


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """How to pick tokens and when to stop. ``temperature == 0`` means greedy."""

    max_tokens: int = 16
    """Upper bound on generated tokens."""
    temperature: float = 1.0
    """Softmax temperature; 0 selects the argmax (greedy)."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1]."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 disables."""
    seed: int | None = None
    """Per-request RNG seed: same seed, same output."""
    stop: tuple[str, ...] = ()
    """Stop strings (checked on detokenized text at the frontend; not included in the output)."""
    stop_token_ids: tuple[int, ...] = ()
    """Extra token ids that end generation (the token is part of the output ids)."""
    ignore_eos: bool = False
    """Keep generating past EOS until max_tokens."""
    logprobs: int | None = None
    """Return the sampled token's logprob plus this many top alternatives."""
    min_tokens: int = 0
    """EOS and stop token ids are ignored until this many tokens exist."""

    def validate(self) -> None:
        """Raise ValueError with a user-facing message for out-of-range values."""
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables), got {self.top_k}")
        if self.seed is not None and not SEED_MIN <= self.seed <= SEED_MAX:
            raise ValueError(f"seed must be a signed 64-bit integer, got {self.seed}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be between 0 and {MAX_LOGPROBS}, "
                             f"got {self.logprobs}")
        if self.min_tokens < 0 or self.min_tokens > self.max_tokens:
            raise ValueError("min_tokens must be between 0 and max_tokens")
        self._validate_stops()

    def _validate_stops(self) -> None:
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are allowed")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids are allowed")
        if any(not 0 <= t <= MAX_TOKEN_ID for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be in [0, {MAX_TOKEN_ID}]")

    @property
    def greedy(self) -> bool:
        """True when sampling reduces to argmax."""
        return self.temperature == 0.0 or self.top_k == 1
