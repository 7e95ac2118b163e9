"""Per-request sampling parameters (validated at the frontend, carried to the engine)."""

from __future__ import annotations

import msgspec


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
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables), got {self.top_k}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs must be between 0 and 20, got {self.logprobs}")
        if self.min_tokens < 0 or self.min_tokens > self.max_tokens:
            raise ValueError("min_tokens must be between 0 and max_tokens")

    @property
    def greedy(self) -> bool:
        """True when sampling reduces to argmax."""
        return self.temperature == 0.0 or self.top_k == 1
