"""Per-request sampling parameters (validated at the frontend, carried to the engine)."""

from __future__ import annotations

import math

import msgspec

SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
"""Seeds are signed 64-bit (vLLM's range; torch.Generator.manual_seed takes all of it)."""
_SEED_SPAN = SEED_MAX - SEED_MIN + 1


def child_seed(seed: int | None, index: int) -> int | None:
    """Choice ``index``'s seed of an ``n > 1`` request: ``seed + index``, wrapped into the
    signed 64-bit range (None stays None), so choice 0 draws what the request with n=1 draws.
    The instance (disagg/server/parallel_sampling.py) and the proxy's fan-out use it alike."""
    if seed is None:
        return None
    return (seed + index - SEED_MIN) % _SEED_SPAN + SEED_MIN


MAX_TOKEN_ID = 2**31 - 1
"""Token ids fit in int32 (the model checks its own vocab; this bounds the wire)."""
MAX_LOGPROBS = 1024
"""Hard bound of a request's logprobs on the wire; --max-logprobs (default 20) is the limit
the API server enforces (disagg/common/config.py MAX_LOGPROBS_LIMIT is the same number)."""
"""Most top alternatives a request may ask for (OpenAI's limit)."""
MAX_STOP_STRINGS = 16
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGIT_BIAS = 300
"""Most ``logit_bias`` entries a request may give (OpenAI's limit)."""
MAX_ABS_BIAS = 100.0
"""``logit_bias`` values lie in [-100, 100] (OpenAI's range)."""
MAX_ABS_PENALTY = 2.0
"""presence_penalty and frequency_penalty lie in [-2, 2] (OpenAI's range)."""
REPETITION_PENALTY_MIN, REPETITION_PENALTY_MAX = 0.01, 100.0
"""vLLM takes any repetition_penalty > 0; bounded here so a penalized logit stays finite in
fp32 (a logit of 1e3 divided by 1e-40 would overflow to inf and the softmax to NaN)."""


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
    presence_penalty: float = 0.0
    """OpenAI's: subtracted once from the logit of every token generated so far."""
    frequency_penalty: float = 0.0
    """OpenAI's: subtracted from a token's logit once per time it was generated so far."""
    repetition_penalty: float = 1.0
    """vLLM's (HF's): the logit of a token seen in the prompt or the output is divided by it
    when positive, multiplied when not; 1 disables."""
    min_p: float = 0.0
    """Drop tokens whose probability (after temperature) is below min_p x the top one's."""
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token id, bias) pairs added to the logits before penalties and sampling (OpenAI's
    ``logit_bias``; ids unique)."""

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
        self._validate_logits_processing()

    def _validate_stops(self) -> None:
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are allowed")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids are allowed")
        if any(not 0 <= t <= MAX_TOKEN_ID for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be in [0, {MAX_TOKEN_ID}]")

    def _validate_logits_processing(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not (math.isfinite(value) and abs(value) <= MAX_ABS_PENALTY):
                raise ValueError(f"{name} must be in [-2, 2], got {value}")
        rp = self.repetition_penalty
        if not (math.isfinite(rp) and REPETITION_PENALTY_MIN <= rp <= REPETITION_PENALTY_MAX):
            raise ValueError(f"repetition_penalty must be in [{REPETITION_PENALTY_MIN}, "
                             f"{REPETITION_PENALTY_MAX}], got {rp}")
        if not (math.isfinite(self.min_p) and 0 <= self.min_p <= 1):
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        bias = self.logit_bias
        if len(bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} logit_bias entries are allowed")
        if any(not 0 <= t <= MAX_TOKEN_ID for t, _ in bias):
            raise ValueError(f"logit_bias token ids must be in [0, {MAX_TOKEN_ID}]")
        if any(not (math.isfinite(b) and abs(b) <= MAX_ABS_BIAS) for _, b in bias):
            raise ValueError(f"logit_bias values must be in [-{MAX_ABS_BIAS:g}, "
                             f"{MAX_ABS_BIAS:g}]")
        if len({t for t, _ in bias}) != len(bias):
            raise ValueError("logit_bias names a token id twice")

    @property
    def has_penalties(self) -> bool:
        """Presence, frequency or repetition penalty asked for (the sampler then needs the
        request's token counts)."""
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)

    @property
    def processes_logits(self) -> bool:
        """Logits change before the argmax (penalties or logit_bias): greedy rows too."""
        return self.has_penalties or bool(self.logit_bias)

    @property
    def greedy(self) -> bool:
        """True when sampling reduces to argmax."""
        return self.temperature == 0.0 or self.top_k == 1
