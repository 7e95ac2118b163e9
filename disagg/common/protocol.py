"""Frontend <-> engine-core messages (ZMQ frames, msgpack via msgspec; no pickle).

Sockets per engine core (ipc:// paths chosen by the frontend):
  input  (frontend PUSH -> engine PULL): EngineCoreRequest | EngineCoreAbort | EngineCoreUtility
                                         | EngineCorePause | EngineCoreResume
                                         | EngineCoreStartWave | EngineCoreCollectiveRpc
  output (engine PUSH -> frontend PULL): first EngineCoreReadyResponse (after KV sizing) or
                                         EngineCoreStartupError, then EngineCoreOutputs batches,
                                         EngineCoreUtilityResult, EngineCorePauseStatus,
                                         EngineCoreNeedWave; and, on a socket of its own,
                                         EngineCoreHeartbeat every 0.25 s after the handshake

Ordering contract (DESIGN.md section 6): the frontend sends every message that can lead to a
collective (pause, resume, start-wave, collective RPC) to all ranks under one lock, so every rank
reads them in the same order; that, plus deciding wave ends only from the all-reduce, is what
keeps the ranks' collectives matched.
"""

from __future__ import annotations

from typing import Any

import msgspec

from disagg.common.kv_transfer_params import KVTransferParams
from disagg.common.pause import PauseMode, RankPauseState
from disagg.common.sampling_params import SamplingParams
from disagg.common.timings import EngineTimings

PROTOCOL_VERSION = "disagg-1"


class EngineCoreReadyResponse(msgspec.Struct, tag="ready", kw_only=True):
    """Sent once the engine core has sized its KV cache and may have changed its config."""

    max_model_len: int
    num_gpu_blocks: int
    block_size: int
    dtype: str
    version: str
    dp_rank: int
    dp_size: int
    max_num_seqs: int
    max_num_batched_tokens: int
    kv_role: str
    engine_id: str
    device: str
    model: str
    kv_host: str | None = None
    kv_handshake_port: int | None = None
    kv_notify_port: int | None = None
    kv_mode: str | None = None
    tp_size: int = 1
    """Tensor-parallel ranks behind this engine core (the KV sizing is the min over them)."""
    kv_cache_dtype: str | None = None
    """Element dtype of the KV cache (``float8_e4m3fn`` with --kv-cache-dtype fp8); None from
    an engine that predates it: the cache is in ``dtype``."""
    memory_bytes: dict[str, int] | None = None
    """The GPU memory split in bytes by part (disagg/common/memory_split.py: total, budget,
    weights, kv, graphs, activations, other, held), for the start-up line and /metrics; None
    on CPU."""


class EngineCoreStartupError(msgspec.Struct, tag="startup_error"):
    """The engine core could not start (bad config, no memory...): one readable line."""

    message: str


class EngineCoreRequest(msgspec.Struct, tag="add", kw_only=True):
    """A new request for the engine core."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    kv_transfer_params: KVTransferParams | None = None
    cache_salt: str | None = None
    """Roots the request's block hash chain (disagg/common/block_hash.py salted_seed)."""


class EngineCoreAbort(msgspec.Struct, tag="abort"):
    """Abort these requests (client gone, stop string hit)."""

    request_ids: list[str]


class EngineCoreUtility(msgspec.Struct, tag="utility", kw_only=True):
    """Call a named, whitelisted engine-core method (stats, kv abort by transfer id, ...)."""

    call_id: int
    method: str
    args: dict[str, Any] = {}


class EngineCoreUtilityResult(msgspec.Struct, tag="utility_result", kw_only=True):
    """Answer to an EngineCoreUtility."""

    call_id: int
    result: Any = None
    error: str | None = None


class EngineCoreCollectiveRpc(msgspec.Struct, tag="collective_rpc", kw_only=True):
    """Run a whitelisted method on every rank (``barrier``, ``stats``...); answered per rank
    with an EngineCoreUtilityResult. In lockstep mode a method that uses the DP group waits
    until the ranks stop stepping (end of a wave, or paused)."""

    call_id: int
    method: str
    args: dict[str, Any] = {}


class EngineCorePause(msgspec.Struct, tag="pause", kw_only=True):
    """Pause this rank (two-phase in lockstep mode); answered by EngineCorePauseStatus."""

    seq: int
    mode: PauseMode


class EngineCoreResume(msgspec.Struct, tag="resume", kw_only=True):
    """Resume this rank (held requests are queued again); answered by EngineCorePauseStatus."""

    seq: int


class EngineCoreStartWave(msgspec.Struct, tag="start_wave", kw_only=True):
    """Lockstep: start stepping wave ``wave`` (ignored when stale or paused)."""

    wave: int


class EngineCorePauseStatus(msgspec.Struct, tag="pause_status", kw_only=True):
    """A rank applied pause/resume command ``seq`` and is now in ``state``."""

    dp_rank: int
    seq: int
    state: RankPauseState


class EngineCoreNeedWave(msgspec.Struct, tag="need_wave", kw_only=True):
    """Lockstep: this idle rank has work; the frontend broadcasts EngineCoreStartWave(wave)."""

    dp_rank: int
    wave: int


class EngineCoreHeartbeat(msgspec.Struct, tag="heartbeat", kw_only=True):
    """This rank's process runs (sent by a thread of its own, so a long step does not stop it,
    a frozen process does); the frontend fails requests on a rank silent past its deadline."""

    dp_rank: int


class TokenLogprob(msgspec.Struct, array_like=True):
    """Logprob of the sampled token and the top alternatives as (token_id, logprob) pairs."""

    logprob: float
    top: list[tuple[int, float]]


class EngineCoreOutput(msgspec.Struct, array_like=True, omit_defaults=True):
    """New tokens for one request since the last output; finish_reason when it ended."""

    request_id: str
    new_token_ids: list[int]
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None
    kv_transfer_params: KVTransferParams | None = None
    error: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    """With the finish: prompt tokens this instance took from its prefix cache (not computed
    and not transferred): OpenAI's ``usage.prompt_tokens_details.cached_tokens``."""
    timings: EngineTimings | None = None
    """With a request's first output: its queue, compute and KV-transfer durations
    (disagg/common/timings.py)."""


class EngineStats(msgspec.Struct, kw_only=True):
    """Scheduler and cache gauges, sent with every output batch."""

    num_running: int
    num_waiting: int
    kv_blocks_total: int
    kv_blocks_free: int
    kv_blocks_held: int
    connector: dict[str, float] = {}
    num_requests_total: int = 0
    """Requests this rank has accepted since it started (shows how the frontend spreads load)."""
    num_held: int = 0
    """Requests that arrived while paused, waiting for resume (also counted in num_waiting)."""
    kv_blocks_cached: int = 0
    """Of the free blocks: those holding a cached prefix (reusable until evicted)."""
    prefix_cache_queries: int = 0
    """Prompt tokens looked up in the prefix cache (counter)."""
    prefix_cache_hits: int = 0
    """Of those, tokens found cached (counter)."""


class KVCacheEvents(msgspec.Struct, kw_only=True):
    """Prefix-cache changes of one rank, in order: (True, hash) stored, (False, hash) evicted.
    ``dropped``: events lost to the engine's bound since the last message; such a message
    carries ``snapshot`` (every hash held now) instead, which replaces the receiver's view."""

    changes: list[tuple[bool, int]] = []
    dropped: int = 0
    snapshot: list[int] | None = None


class EngineCoreOutputs(msgspec.Struct, tag="outputs", kw_only=True):
    """One batch of outputs from one engine core step."""

    dp_rank: int
    outputs: list[EngineCoreOutput]
    stats: EngineStats | None = None
    kv_events: KVCacheEvents | None = None
    """Block hashes this rank's prefix cache stored or evicted since its last message."""


EngineInbound = (EngineCoreRequest | EngineCoreAbort | EngineCoreUtility | EngineCorePause
                 | EngineCoreResume | EngineCoreStartWave | EngineCoreCollectiveRpc)
EngineOutbound = (EngineCoreReadyResponse | EngineCoreStartupError | EngineCoreOutputs
                  | EngineCoreUtilityResult | EngineCorePauseStatus | EngineCoreNeedWave
                  | EngineCoreHeartbeat)

encoder = msgspec.msgpack.Encoder()
inbound_decoder = msgspec.msgpack.Decoder(EngineInbound)
outbound_decoder = msgspec.msgpack.Decoder(EngineOutbound)
