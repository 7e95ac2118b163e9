"""Continuous batching with chunked prefill and preemption by recompute. Imports no torch.

Each step: running requests first (decodes and unfinished prefill chunks, oldest first), then
waiting requests while the token budget, ``max_num_seqs`` and free blocks allow. A running
request that needs a block when none is free preempts the newest running request (its blocks
are freed, it goes back to the front of the queue and recomputes later).

Block ownership: a request owns ``request.block_ids`` from allocation until it finishes or is
preempted; then the scheduler frees them, unless a KV connector asks to hold them under a
transfer key (``holds``), which the scheduler frees when the connector reports the hold over.
The connector reports, the scheduler acts: only this module changes a request's state or a
block's owner in answer to the connector (``apply_connector_output``).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from disagg.common.block_hash import salted_seed
from disagg.common.config import SchedulerConfig
from disagg.engine.kv_cache import BlockPool, Owner, OwnerKind, block_hashes
from disagg.engine.request import Request, RequestStatus

if TYPE_CHECKING:
    from disagg.engine.kv_connector import ConnectorOutput, SchedulerConnector


@dataclass(slots=True)
class ScheduledChunk:
    """``num_tokens`` tokens of ``request`` computed this step, starting at num_computed."""

    request: Request
    num_tokens: int

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the end of the known tokens (a token is sampled)."""
        return self.request.num_computed_tokens + self.num_tokens == self.request.num_tokens


@dataclass(slots=True)
class SchedulerOutput:
    """What the model runner computes this step."""

    chunks: list[ScheduledChunk] = field(default_factory=list)
    num_batched_tokens: int = 0
    preempted_ids: list[str] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        """Nothing to compute."""
        return not self.chunks


_OK_FINISH = frozenset({RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH})


def _blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class Scheduler:
    """Decides, each step, which tokens of which requests to compute."""

    def __init__(self, cfg: SchedulerConfig, pool: BlockPool, block_size: int,
                 max_model_len: int, connector: SchedulerConnector | None = None,
                 hash_seed: int = 0) -> None:
        self.cfg = cfg
        self.pool = pool
        self.hash_seed = hash_seed
        """Root of every block hash chain (kv_cache.model_seed: the model's identity)."""
        self.prefix_cache_queries = 0
        """Prompt tokens looked up in the prefix cache at admission (vLLM's name)."""
        self.prefix_cache_hits = 0
        """Of those, tokens found cached (not computed)."""
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.connector = connector
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.remote_wait: dict[str, Request] = {}
        self.requests: dict[str, Request] = {}
        self.finished_this_step: list[Request] = []
        self.given_first_token: list[Request] = []
        """Requests that took a remote prefill's first token since the engine last looked
        (their output goes out before the model runs)."""
        self.holds: dict[str, list[int]] = {}
        """Blocks held under a connector's transfer key (owner TRANSFER in the pool)."""

    # ---- queue management -------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        """Queue a new request."""
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def abort_request(self, request_id: str) -> None:
        """Finish a request as aborted wherever it is (unknown ids are ignored)."""
        req = self.requests.get(request_id)
        if req is not None and not req.is_finished:
            self.finish(req, RequestStatus.FINISHED_ABORTED)

    def finish(self, req: Request, status: RequestStatus, error: str | None = None) -> None:
        """Move a request to a terminal state and release (or hand over) its blocks."""
        req.status, req.error = status, error
        if req in self.running:
            self.running.remove(req)
        self.remote_wait.pop(req.request_id, None)
        if req in self.waiting:  # (a remove that misses formats the request for its error)
            self.waiting.remove(req)
        action = self.connector.request_finished(req) if self.connector else None
        if action is not None and action.error is not None and status in _OK_FINISH:
            req.status, req.error = RequestStatus.FINISHED_ERROR, action.error
        if action is not None and action.kv_transfer_params is not None:
            req.kv_transfer_params = action.kv_transfer_params
        req.awaiting_transfer = action is not None and action.await_transfer
        if action is not None and action.hold_key is not None:
            self._hold(req, action.hold_key)
        elif req.block_ids:
            self.pool.free(req.block_ids, Owner(OwnerKind.REQUEST, req.request_id))
        req.block_ids = []
        self.requests.pop(req.request_id, None)
        self.finished_this_step.append(req)

    def has_work(self) -> bool:
        """Anything waiting, running or expecting remote KV."""
        return bool(self.waiting or self.running or self.remote_wait)

    @property
    def num_running(self) -> int:
        """Requests in the running set."""
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        """Requests queued or waiting for remote KV."""
        return len(self.waiting) + len(self.remote_wait)

    # ---- scheduling ---------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        """Pick this step's work."""
        out = SchedulerOutput()
        budget = self.cfg.max_num_batched_tokens
        budget = self._schedule_running(out, budget)
        if not out.preempted_ids:
            self._schedule_waiting(out, budget)
        out.num_batched_tokens = sum(c.num_tokens for c in out.chunks)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        scheduled: set[str] = set()
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if not self.cfg.enable_chunked_prefill and n < req.num_tokens - req.num_computed_tokens:
                break
            if not self._ensure_blocks(req, req.num_computed_tokens + n, out, scheduled):
                break  # req itself was preempted
            out.chunks.append(ScheduledChunk(req, n))
            scheduled.add(req.request_id)
            budget -= n
            i += 1
        return budget

    def schedule_ahead(self, launched: list[ScheduledChunk]) -> tuple[SchedulerOutput,
                                                                      list[int]] | None:
        """Async scheduling: the next decode step of a launched decode batch before its tokens
        are known, assuming none of them stops (one that does computes one token for nothing;
        its answer is unchanged). Each running request of the batch that cannot end by length
        on the launched token gets one more token's slot (position num_computed_tokens + 1).
        Returns the step and each chunk's row in the launched batch, or None when only a
        normal schedule can decide (requests waiting that could be admitted now, requests
        running outside the batch, a block that is not free: preemption is never
        speculative). With every seat taken (``max_num_seqs``) a waiting request could not be
        admitted anyway: it is admitted at the first normal schedule after a seat frees, one
        step later than without async scheduling. Requests waiting for remote KV need no
        schedule until it lands (the connector's report then queues them in ``waiting``), so
        a P/D decode instance keeps running ahead while other prompts' KV moves."""
        admissible = self.waiting and len(self.running) < self.cfg.max_num_seqs
        if admissible or len(self.running) != len(launched):
            return None
        out, rows = SchedulerOutput(), []
        for row, chunk in enumerate(launched):
            req = chunk.request
            if req.is_finished or req.status is not RequestStatus.RUNNING:
                return None
            if (len(req.output_token_ids) + 1 >= req.sampling_params.max_tokens
                    or req.num_tokens + 1 >= self.max_model_len):
                continue  # the launched token is its last
            need = _blocks_for(req.num_computed_tokens + 2, self.block_size) - len(req.block_ids)
            if need > 0:
                got = self.pool.allocate(need, Owner(OwnerKind.REQUEST, req.request_id))
                if got is None:
                    return None  # the blocks taken so far stay with their requests (needed next)
                req.block_ids.extend(got)
            out.chunks.append(ScheduledChunk(req, 1))
            rows.append(row)
        if not out.chunks or len(out.chunks) > self.cfg.max_num_batched_tokens:
            return None
        out.num_batched_tokens = len(out.chunks)
        return out, rows

    def _ensure_blocks(self, req: Request, num_tokens: int, out: SchedulerOutput,
                       scheduled: set[str]) -> bool:
        """Grow req's blocks to cover num_tokens, preempting newer requests if needed."""
        need = _blocks_for(num_tokens, self.block_size) - len(req.block_ids)
        while need > 0:
            got = self.pool.allocate(need, Owner(OwnerKind.REQUEST, req.request_id))
            if got is not None:
                req.block_ids.extend(got)
                return True
            victim = self.running[-1]
            self._preempt(victim, out)
            if victim is req:
                return False
            if victim.request_id in scheduled:
                out.chunks = [c for c in out.chunks if c.request is not victim]
        return True

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        self.running.remove(req)
        self.pool.free(req.block_ids, Owner(OwnerKind.REQUEST, req.request_id))
        req.block_ids = []
        req.num_computed_tokens = req.num_registered_blocks = 0
        req.status = RequestStatus.PREEMPTED
        self.waiting.appendleft(req)
        out.preempted_ids.append(req.request_id)

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        skipped: list[Request] = []
        try:
            self._admit(out, budget, skipped)
        finally:
            self.waiting.extendleft(reversed(skipped))  # keep their place in the queue

    def _admit(self, out: SchedulerOutput, budget: int, skipped: list[Request]) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.cfg.max_num_seqs:
            req = self.waiting[0]
            if self.connector is not None and not self.connector.can_schedule(req):
                skipped.append(self.waiting.popleft())
                continue
            remote = self._try_remote(req)
            if remote is None:
                break  # its remote KV needs blocks that are not free: wait, never prefill it
            if remote:
                continue
            owner = Owner(OwnerKind.REQUEST, req.request_id)
            fresh = not req.block_ids and not req.num_computed_tokens
            hits = self._share_prefix(req, owner)
            remaining = req.num_tokens - req.num_computed_tokens
            n = min(remaining, budget) if self.cfg.enable_chunked_prefill else remaining
            need = max(0, _blocks_for(req.num_computed_tokens + n, self.block_size)
                       - len(req.block_ids))
            got = None if n > budget else self.pool.allocate(need, owner)
            if got is None:
                self._unshare_prefix(req, owner, hits)
                break
            if fresh and self.pool.enable_caching:
                self.prefix_cache_queries += req.num_prompt_tokens
                self.prefix_cache_hits += len(hits) * self.block_size
            req.block_ids.extend(got)
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            if req.times.first_scheduled_s is None:
                req.times.first_scheduled_s = time.monotonic()
            self.running.append(req)
            out.chunks.append(ScheduledChunk(req, n))
            budget -= n

    # ---- prefix cache -------------------------------------------------------------------
    def _share_prefix(self, req: Request, owner: Owner,
                      limit_tokens: int | None = None) -> list[int]:
        """A request admitted from scratch takes the cached blocks of its longest cached
        prefix and starts computing after them (at least its last prompt token is computed:
        it needs that token's logits). Returns the shared blocks."""
        if not self.pool.enable_caching or req.num_computed_tokens or req.block_ids:
            return []
        req.block_hashes = self._hashes(req, req.num_tokens)
        num_tokens = req.num_tokens if limit_tokens is None else limit_tokens
        hits = self.pool.lookup(req.block_hashes[:(num_tokens - 1) // self.block_size])
        if hits:
            self.pool.share(hits, owner)
            req.block_ids = list(hits)
            req.num_registered_blocks = len(hits)
            req.num_computed_tokens = len(hits) * self.block_size
        req.num_cached_tokens = len(hits) * self.block_size
        return hits

    def _unshare_prefix(self, req: Request, owner: Owner, hits: list[int]) -> None:
        """Undo ``_share_prefix`` for a request that could not be admitted after all."""
        if hits:
            self.pool.free(hits, owner)
            req.block_ids, req.num_computed_tokens, req.num_registered_blocks = [], 0, 0

    def _hashes(self, req: Request, num_tokens: int) -> list[int]:
        return block_hashes(req.all_token_ids[:num_tokens], self.block_size,
                            salted_seed(self.hash_seed, req.cache_salt), req.block_hashes)

    def _cache_computed(self, req: Request) -> None:
        """Offer the request's newly computed full blocks to the prefix cache."""
        full = min(req.num_computed_tokens // self.block_size, len(req.block_ids))
        if not self.pool.enable_caching or full <= req.num_registered_blocks:
            return
        req.block_hashes = self._hashes(req, full * self.block_size)
        owner = Owner(OwnerKind.REQUEST, req.request_id)
        for i in range(req.num_registered_blocks, full):
            self.pool.cache(req.block_ids[i], req.block_hashes[i], owner)
        req.num_registered_blocks = full

    def _try_remote(self, req: Request) -> bool | None:
        """Park a request whose prompt KV comes from elsewhere: True if it left the queue,
        None if its blocks do not fit now (it stays first in the queue: admitting it as a
        local prefill would leave its transfer posting nothing until it expired), False if
        its KV is not remote."""
        if self.connector is None or req.status is not RequestStatus.WAITING:
            return False
        if req.num_computed_tokens or req.num_external_tokens:
            return False
        num_external = self.connector.get_num_new_matched_tokens(req)
        if not num_external:
            return False
        owner = Owner(OwnerKind.REQUEST, req.request_id)
        # the connector moves only the blocks after the hits (a given first token does not
        # extend the lookup: the last prompt token is computed here, never shared)
        hits = self._share_prefix(req, owner, req.num_prompt_tokens)
        need = _blocks_for(req.num_tokens, self.block_size) - len(req.block_ids)
        got = self.pool.allocate(need, owner)
        if got is None:
            self._unshare_prefix(req, owner, hits)
            return None
        if self.pool.enable_caching:
            self.prefix_cache_queries += req.num_prompt_tokens
            self.prefix_cache_hits += len(hits) * self.block_size
        req.block_ids.extend(got)
        req.num_external_tokens = num_external
        req.status = RequestStatus.WAITING_FOR_REMOTE_KV
        self.waiting.popleft()
        self.remote_wait[req.request_id] = req
        self.connector.update_state_after_alloc(req)
        return True

    # ---- results ------------------------------------------------------------------------
    def update_from_output(self, out: SchedulerOutput, sampled: dict[str, int]) -> None:
        """Advance computed counts, append sampled tokens, finish stopped requests."""
        for chunk in out.chunks:
            req = chunk.request
            if req.is_finished:
                continue
            req.num_computed_tokens += chunk.num_tokens
            self._cache_computed(req)
            token = sampled.get(req.request_id)
            if token is None:
                continue
            req.append_token(token)
            status = self._stop_status(req, token)
            if status is not None:
                self.finish(req, status)

    def _stop_status(self, req: Request, token: int) -> RequestStatus | None:
        sp = req.sampling_params
        num_out = len(req.output_token_ids)
        if num_out >= sp.min_tokens:
            if not sp.ignore_eos and token in req.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
            if token in sp.stop_token_ids:
                return RequestStatus.FINISHED_STOPPED
        if num_out >= sp.max_tokens or req.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _hold(self, req: Request, key: str) -> None:
        """Move a request's blocks under a connector hold (the request keeps none)."""
        if req.block_ids:
            self.pool.transfer_ownership(req.block_ids, Owner(OwnerKind.REQUEST, req.request_id),
                                         Owner(OwnerKind.TRANSFER, key))
            self.holds.setdefault(key, []).extend(req.block_ids)
        req.block_ids = []

    def apply_connector_output(self, out: ConnectorOutput) -> None:
        """Act on what the connector reported this step (see disagg/engine/kv_connector.py)."""
        for request_id, key in out.park:
            req = self.requests.get(request_id)
            if req is not None and not req.is_finished:
                self._hold(req, key)
                req.num_computed_tokens = req.num_external_tokens = 0
        for request_id, token in out.first_tokens:
            self.take_first_token(request_id, token)
        for request_id in out.loaded:
            self.on_remote_kv(request_id, None, recompute=False)
        for f in out.load_failed:
            self._load_failed(f.request_id, f.error, f.recompute)
        for request_id, error in out.producer_failed:
            req = self.requests.get(request_id)
            if req is not None and not req.is_finished:
                self.finish(req, RequestStatus.FINISHED_ERROR, error)
        for key in out.free_holds:
            self.free_held(key)

    def take_first_token(self, request_id: str, token: int) -> Request | None:
        """Append the first output token a remote prefill sampled (the request then computes
        this token alone when the last prompt token's KV was loaded, else both together);
        returns the request it went to."""
        req = self.requests.get(request_id)
        if req is None or req.is_finished or req.output_token_ids:
            return None
        req.append_token(token)
        if (req.status is RequestStatus.WAITING and req.num_external_tokens >= req.num_prompt_tokens
                and req.num_computed_tokens == req.num_prompt_tokens - 1):
            req.num_computed_tokens = req.num_prompt_tokens  # its KV was loaded: compute the token
        self.given_first_token.append(req)
        status = self._stop_status(req, token)
        if status is not None:
            self.finish(req, status)
        return req

    def _load_failed(self, request_id: str, error: str, recompute: bool) -> None:
        req = self.requests.get(request_id)
        if req is None or req.is_finished:
            return
        if request_id in self.remote_wait:
            self.on_remote_kv(request_id, error, recompute)
        elif not recompute:  # still queued: it never got its blocks
            self.finish(req, RequestStatus.FINISHED_ERROR, error)

    def on_remote_kv(self, request_id: str, error: str | None, recompute: bool) -> None:
        """The connector finished receiving a request's KV (or failed to)."""
        req = self.remote_wait.pop(request_id, None)
        if req is None or req.is_finished:
            return
        if error is None:
            # at least one token to compute: with every prompt token's KV loaded but the first
            # output token not given yet, the last prompt token is computed again (for logits)
            req.num_computed_tokens = min(req.num_external_tokens, req.num_tokens - 1)
        elif not recompute:
            self.remote_wait[request_id] = req  # so finish() finds and releases it
            self.finish(req, RequestStatus.FINISHED_ERROR, error)
            return
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)

    def take_finished(self) -> list[Request]:
        """Requests that reached a terminal state since the last call."""
        done, self.finished_this_step = self.finished_this_step, []
        return done

    def free_held(self, transfer_key: str) -> None:
        """A hold ended: its blocks go back to the pool."""
        blocks = self.holds.pop(transfer_key, [])
        if blocks:
            self.pool.free(blocks, Owner(OwnerKind.TRANSFER, transfer_key))
