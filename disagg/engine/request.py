"""A request inside the engine core, and its explicit states."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from disagg.common.kv_transfer_params import KVTransferParams
from disagg.common.sampling_params import SamplingParams
from disagg.engine.request_times import RequestTimes


class RequestStatus(enum.Enum):
    """Where a request is in its life."""

    WAITING = "waiting"
    WAITING_FOR_REMOTE_KV = "waiting_for_remote_kv"
    """Blocks allocated; the prompt's KV is arriving from a remote prefill instance."""
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "finished_stopped"
    FINISHED_LENGTH = "finished_length"
    FINISHED_ABORTED = "finished_aborted"
    FINISHED_ERROR = "finished_error"


FINISHED_STATUSES = frozenset({RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                               RequestStatus.FINISHED_ABORTED, RequestStatus.FINISHED_ERROR})

FINISH_REASONS = {RequestStatus.FINISHED_STOPPED: "stop",
                  RequestStatus.FINISHED_LENGTH: "length",
                  RequestStatus.FINISHED_ABORTED: "abort",
                  RequestStatus.FINISHED_ERROR: "error"}


@dataclass(eq=False, repr=False, slots=True)
class Request:
    """Token state of one sequence. Blocks listed in ``block_ids`` are owned by this request.
    Its repr is a short line: the generated one printed every token list (a 4k-token prompt
    took about 1 ms to format, e.g. in a ``deque.remove`` that missed)."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: tuple[int, ...]
    """Ids that end generation unless ``ignore_eos`` (config.json's and generation_config's
    ``eos_token_id`` lists; empty with ignore_eos)."""
    kv_transfer_params: KVTransferParams | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    error: str | None = None
    num_external_tokens: int = 0
    """Prompt tokens whose KV comes from a remote instance (consumer side)."""
    block_hashes: list[int] = field(default_factory=list)
    """Hash chain of this request's full blocks known so far (disagg/engine/kv_cache.py)."""
    num_registered_blocks: int = 0
    """Leading blocks of ``block_ids`` already offered to the prefix cache."""
    num_cached_tokens: int = 0
    """Prompt tokens found in the prefix cache when it was last admitted (not computed)."""
    cache_salt: str | None = None
    """Only requests with the same salt share cached blocks (block_hash.salted_seed)."""
    awaiting_transfer: bool = False
    """Finished, but its answer waits until its KV transfer ends (a WRITE prefill: the proxy
    must learn from it whether the decode got the KV)."""
    times: RequestTimes = field(default_factory=RequestTimes)
    """First scheduled, first token, KV transfer: reported with its first output."""

    def __post_init__(self) -> None:
        if not self.all_token_ids:
            self.all_token_ids = list(self.prompt_token_ids)

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, {self.status.name}, prompt={self.num_prompt_tokens}"
                f", out={len(self.output_token_ids)}, computed={self.num_computed_tokens}"
                f", blocks={len(self.block_ids)})")

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens."""
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        """Prompt length."""
        return len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        """In a terminal state."""
        return self.status in FINISHED_STATUSES

    def append_token(self, token_id: int) -> None:
        """Record one sampled token."""
        if not self.output_token_ids:
            self.times.first_token_s = time.monotonic()
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
