"""The engine core: scheduler + model runner (+ KV connector), stepping in its own process.

Start-up order matters (seeds 000/002): load the model, size the KV cache (override and auto-fit
included), build the scheduler, and only then send EngineCoreReadyResponse carrying the values
the frontend must use.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

from disagg.common import envs
from disagg.common.config import ConfigError, EngineConfig
from disagg.common.generation_config import eos_ids, load_generation_config
from disagg.common.memory_split import describe_memory
from disagg.common.protocol import (
    EngineCoreOutput,
    EngineCoreReadyResponse,
    EngineCoreRequest,
    EngineStats,
    KVCacheEvents,
    TokenLogprob,
)
from disagg.common.version import __version__
from disagg.engine.kv_cache import BlockPool, model_seed
from disagg.engine.kv_connector import create_connector, supports_tensor_parallel
from disagg.engine.kv_quant import KVCacheSpec
from disagg.engine.kv_sizing import KVPlan, plan_kv_cache
from disagg.engine.model_runner import (
    DecodeLaunch,
    ModelRunner,
    resolve_device,
    resolve_dtype,
)
from disagg.engine.request import FINISH_REASONS, Request, RequestStatus
from disagg.engine.scheduler import Scheduler, SchedulerOutput
from disagg.engine.step_trace import StepProfiler, StepTrace
from disagg.engine.tp import TPGroup, TPWorkerError
from disagg.models.arch import ArchConfig, check_sliding_window
from disagg.models.expert_parallel import EPContext
from disagg.models.loader import resolve_arch
from disagg.models.parallel import check_tp

logger = logging.getLogger(__name__)


class EngineCore:
    """One engine: owns the KV cache, the block pool, the scheduler and the model."""

    def __init__(self, cfg: EngineConfig, engine_id: str | None = None,
                 ep: EPContext = EPContext()) -> None:
        cfg = align_block_size(cfg)
        self.ep = ep
        self.cfg = cfg
        self.engine_id = engine_id or f"engine-{uuid.uuid4().hex[:8]}"
        self.arch = arch = resolve_arch(cfg.model.model)
        self.eos_token_ids = model_eos_ids(arch, cfg.model.model, cfg.model.generation_config)
        self.device = resolve_device(cfg.model.device)
        self.dtype = resolve_dtype(cfg.model.dtype, self.device, arch)
        model_max = arch.max_position_embeddings
        requested = cfg.model.max_model_len
        if requested != -1:  # before any weight loads; an auto-fitted length is checked later
            check_sliding_window(arch, requested or model_max)
        tp_size = cfg.parallel.tensor_parallel_size
        self.tp: TPGroup | None = None
        if tp_size > 1:
            check_tp(arch, tp_size)  # before any worker starts: one clear line
            self.tp = TPGroup(cfg, self.device.type)
        try:
            self._build(cfg, model_max, requested)
        except BaseException:
            if self.tp is not None:
                self.tp.close()
            raise

    def _build(self, cfg: EngineConfig, model_max: int, requested: int | None) -> None:
        """Model, KV sizing (the min over TP ranks), cache, connector, scheduler."""
        tp = self.tp
        self.runner = ModelRunner(cfg, self.arch, self.device, self.dtype, model_max,
                                  tp=tp.context if tp else None,
                                  send_step=tp.send_step if tp else None, ep=self.ep)
        block_bytes = self.runner.block_bytes()
        if tp is not None:
            tp.post_all("kv_budget")  # each rank profiles its own memory (collectives in step)
        budgets = [(self.runner.available_kv_bytes(), block_bytes)]
        if tp is not None:
            budgets += tp.collect("kv_budget")
        fit = min(avail // bb for avail, bb in budgets)
        self.plan: KVPlan = plan_kv_cache(
            available_bytes=fit * block_bytes, block_bytes=block_bytes,
            block_size=cfg.cache.block_size,
            num_blocks_override=cfg.cache.num_gpu_blocks_override,
            requested_max_model_len=requested, model_max_len=model_max)
        check_sliding_window(self.arch, self.plan.max_model_len)
        if tp is not None:
            tp.post_all("allocate", self.plan.num_blocks, self.plan.max_model_len)
        kv_cache = self.runner.allocate_kv_cache(self.plan.num_blocks)
        self.runner.enable_decode_graphs(self.plan.max_model_len)
        if tp is not None:
            tp.collect("allocate")
        assert kv_cache[0].numel() * kv_cache.element_size() == block_bytes
        self.pool = BlockPool(self.plan.num_blocks, cfg.cache.enable_prefix_caching)
        self.connector = self._make_connector(kv_cache)
        self.scheduler = Scheduler(cfg.scheduler, self.pool, cfg.cache.block_size,
                                   self.plan.max_model_len,
                                   self.connector.scheduler if self.connector else None,
                                   hash_seed=model_seed(cfg.model.model))
        self._sent: dict[str, int] = {}
        self._emitted_early = False
        """The last step only sent handed-over first tokens (the next one runs the model)."""
        trace = envs.step_trace_file()
        self._trace = StepTrace(trace, self.engine_id) if trace else None
        profile = envs.torch_profile()
        self._profiler = StepProfiler(profile[0], self.engine_id, *profile[1:]) \
            if profile else None
        self._awaiting: dict[str, Request] = {}
        """Finished WRITE prefills whose answer waits for their transfer's end."""
        self._settled: dict[str, str | None] = {}
        """Transfer ends reported for requests (error or None), consumed by the next collect."""
        self._pending_logprobs: dict[str, list[TokenLogprob]] = {}
        self.held: deque[Request] = deque()
        """Requests that arrived while paused: known to the scheduler's table (so aborts and
        connector failures find them) but queued only by release_held() at resume."""
        self.num_requests_total = 0
        self._launched: DecodeLaunch | None = None
        """Async scheduling: the decode step on the device whose tokens nobody read yet."""
        self.async_scheduling = (cfg.scheduler.async_scheduling and tp is None
                                 and self.ep.size == 1
                                 and not cfg.parallel.data_parallel_lockstep)
        """Only without TP workers (they take host ids) or lockstep ranks. With a KV connector
        only steps it needs no hook for are launched (KVConnector.step_needs_hooks): a P/D
        decode instance's decode batches."""
        logger.info("KV cache: %d blocks x %d tokens (%s, %d bytes/block%s), "
                    "max_model_len=%d%s", self.plan.num_blocks, cfg.cache.block_size,
                    self.runner.kv_spec.describe(), block_bytes,
                    f" on each of {tp.size} TP ranks" if tp else "",
                    self.plan.max_model_len, " (auto-fitted)" if self.plan.auto_fitted else "")
        self.memory_bytes = self._memory_bytes()
        """Where the GPU memory budget went (None on CPU): logged, and in the ready message."""
        if self.memory_bytes is not None:
            logger.info("%s", describe_memory(self.memory_bytes))

    def _memory_bytes(self) -> dict[str, int] | None:
        mem = self.runner.memory
        if mem is None:
            return None
        held = self.runner.held_gpu_bytes()
        return mem.parts() | ({} if held is None else {"held": held})

    def _make_connector(self, kv_cache: Any) -> Any:
        kt = self.cfg.kv_transfer
        if kt is None or kt.kv_connector is None:
            return None
        if self.tp is not None and not supports_tensor_parallel(kt):
            raise ConfigError(f"kv_connector {kt.kv_connector!r} has no per-rank half "
                              "(make_rank_worker): it cannot move the KV of "
                              "--tensor-parallel-size > 1")
        return create_connector(kt, self, kv_cache)

    @property
    def kv_spec(self) -> KVCacheSpec:
        """The KV cache's dtype and fp8 scales (what the connector handshake advertises)."""
        return self.runner.kv_spec

    @property
    def max_model_len(self) -> int:
        """The synced, possibly auto-fitted context length."""
        return self.plan.max_model_len

    def ready_response(self) -> EngineCoreReadyResponse:
        """The handshake message the frontend applies before accepting traffic."""
        c = self.connector
        return EngineCoreReadyResponse(
            max_model_len=self.plan.max_model_len, num_gpu_blocks=self.plan.num_blocks,
            block_size=self.cfg.cache.block_size, dtype=str(self.dtype).removeprefix("torch."),
            version=__version__, dp_rank=self.cfg.parallel.data_parallel_rank,
            dp_size=self.cfg.parallel.data_parallel_size,
            max_num_seqs=self.cfg.scheduler.max_num_seqs,
            max_num_batched_tokens=self.cfg.scheduler.max_num_batched_tokens,
            kv_role=self.cfg.kv_transfer.kv_role if self.cfg.kv_transfer else "kv_both",
            engine_id=self.engine_id, device=str(self.device), model=self.cfg.model.model,
            kv_host=c.host if c else None, kv_handshake_port=c.handshake_port if c else None,
            kv_notify_port=c.notify_port if c else None, kv_mode=c.mode if c else None,
            tp_size=self.cfg.parallel.tensor_parallel_size,
            kv_cache_dtype=self.kv_spec.dtype_name, memory_bytes=self.memory_bytes)

    def add_request(self, msg: EngineCoreRequest, hold: bool = False) -> str | None:
        """Queue (or, while paused, hold) a request; returns an error string instead if it
        cannot ever run."""
        total = len(msg.prompt_token_ids) + msg.sampling_params.max_tokens
        if not msg.prompt_token_ids:
            return "the prompt is empty"
        if total > self.plan.max_model_len:
            return (f"prompt ({len(msg.prompt_token_ids)} tokens) plus max_tokens "
                    f"({msg.sampling_params.max_tokens}) exceeds max_model_len "
                    f"{self.plan.max_model_len}")
        top = max(msg.prompt_token_ids)
        if top >= self.arch.vocab_size:  # the embedding would index past its table: fatal
            return f"prompt token id {top} is out of range [0, {self.arch.vocab_size})"
        bad_bias = [t for t, _ in msg.sampling_params.logit_bias if t >= self.arch.vocab_size]
        if bad_bias:  # the sampler indexes the logits with them
            return (f"logit_bias token id {bad_bias[0]} is out of range "
                    f"[0, {self.arch.vocab_size})")
        req = Request(msg.request_id, list(msg.prompt_token_ids), msg.sampling_params,
                      () if msg.sampling_params.ignore_eos else self.eos_token_ids,
                      kv_transfer_params=msg.kv_transfer_params, cache_salt=msg.cache_salt)
        if hold:
            self.scheduler.requests[req.request_id] = req
            self.held.append(req)
        else:
            self.scheduler.add_request(req)
        self._sent[req.request_id] = 0
        self.num_requests_total += 1
        if self.connector is not None:  # held too: its transfer is leased, never stranded
            self.connector.on_request_arrival(req)
            if not hold:
                self.connector.on_request_queued(req)
        return None

    def release_held(self) -> int:
        """Resume: queue the held requests that are still alive, in arrival order; every
        queued request's wait counts again (pause_queue_clocks stopped it)."""
        n = 0
        while self.held:
            req = self.held.popleft()
            if not req.is_finished:
                self.scheduler.waiting.append(req)
                n += 1
        if self.connector is not None:
            for req in self.scheduler.waiting:
                self.connector.on_request_queued(req)
        return n

    def pause_queue_clocks(self) -> None:
        """A pause (keep or wait): requests already queued stop counting their wait toward
        their transfers' queue deadline until release_held at resume."""
        if self.connector is not None:
            for req in self.scheduler.waiting:
                self.connector.on_request_paused(req)

    @property
    def num_held(self) -> int:
        """Held requests still waiting for resume."""
        return sum(1 for r in self.held if not r.is_finished)

    def abort_all(self, error: str) -> int:
        """End every in-flight (not held) request with ``error``; their blocks are freed and
        their transfers failed toward the peer."""
        held = {id(r) for r in self.held}
        victims = [r for r in self.scheduler.requests.values() if id(r) not in held]
        for req in victims:
            self.scheduler.finish(req, RequestStatus.FINISHED_ERROR, error)
        return len(victims)

    def abort(self, request_ids: list[str]) -> None:
        """Abort requests wherever they are."""
        for rid in request_ids:
            self.scheduler.abort_request(rid)

    def set_wakeup(self, wake: Callable[[], None]) -> None:
        """The loop's doorbell, for the KV connector to ring (KVConnector.set_wakeup)."""
        if self.connector is not None:
            self.connector.set_wakeup(wake)

    def has_work(self) -> bool:
        """Something to step for (requests, a launched step or connector transfers)."""
        return (self.scheduler.has_work() or self._launched is not None
                or bool(self.connector and self.connector.busy()))

    def has_inflight(self) -> bool:
        """Requests queued, running or waiting for remote KV (held ones excluded), or a
        launched step not settled yet (a pause completes only after it)."""
        return self.scheduler.has_work() or self._launched is not None

    def has_runnable_work(self) -> bool:
        """Requests the model could step now (not ones only waiting for remote KV), or a
        launched step to settle."""
        return bool(self.scheduler.waiting or self.scheduler.running
                    or self._launched is not None)

    def connector_busy(self) -> bool:
        """KV transfers or holds outstanding."""
        return bool(self.connector and self.connector.busy())

    def connector_needs_polling(self) -> bool:
        """One-sided ops in flight that only polling sees settle (KVConnector.needs_polling)."""
        return bool(self.connector and self.connector.needs_polling())

    def connector_step(self, join_experts: bool = False) -> list[EngineCoreOutput]:
        """A step without the model: connector bookkeeping only. Runs while paused (peers'
        transfers finish or fail explicitly) and as a lockstep dummy step, where an
        expert-parallel rank (``join_experts``) still joins every MoE layer's exchange. A
        launched decode step is settled first (a pause waits for it)."""
        settled = self._drain()
        self._connector_output()
        if join_experts:
            self._join_experts()
        given, self.scheduler.given_first_token = self.scheduler.given_first_token, []
        return settled + self._collect_outputs(given)

    def _join_experts(self) -> None:
        """A step that runs no tokens here: with expert parallelism the peers' tokens may
        still need this rank's experts, so it joins each MoE layer's all-to-all."""
        if self.ep.size > 1:
            self.runner.idle_forward()

    def _connector_output(self) -> None:
        """The connector reports (finished and failed loads, holds to free), the scheduler
        acts on it."""
        if self.connector is None:
            return
        out = self.connector.update_connector_output()
        out.first_tokens = self._usable_first_tokens(out.first_tokens)
        self._settled.update(out.producer_settled)
        for rid, posted_s, done_s in out.transfer_times:  # a finished WRITE prefill: _awaiting
            req = self.scheduler.requests.get(rid) or self._awaiting.get(rid)
            if req is not None:
                req.times.kv_posted_s, req.times.kv_done_s = posted_s, done_s
        self.scheduler.apply_connector_output(out)

    def _usable_first_tokens(self, given: list[tuple[str, int]]) -> list[tuple[str, int]]:
        """A prefill's first tokens that are in this vocabulary (else the decode computes the
        token itself); a seeded request's generator skips the draw the prefill made."""
        usable = []
        for rid, token in given:
            if token >= self.arch.vocab_size:
                logger.warning("request %s: the prefill's first token %d is outside the "
                               "vocabulary (%d); computing it here", rid, token,
                               self.arch.vocab_size)
                continue
            req = self.scheduler.requests.get(rid)
            if req is None or req.is_finished or req.output_token_ids:
                continue  # it computed its first token itself: nothing to take, no draw to skip
            if req.sampling_params.seed is not None and not req.sampling_params.greedy:
                self.runner.sampler.skip_draw(rid, req.sampling_params.seed,
                                              self.arch.vocab_size)
            usable.append((rid, token))
        return usable

    def step(self) -> list[EngineCoreOutput]:
        """One scheduler iteration: connector bookkeeping, schedule, execute, emit outputs.
        First tokens a prefill handed over go out before the model runs (not after the step
        that computes the second token); at most every other step returns early for them.
        With async scheduling a greedy decode batch is launched and its tokens are read one
        call later, after the next step was launched behind it (``_step_ahead``)."""
        if self._launched is not None:
            return self._step_ahead()
        self._connector_output()
        given, self.scheduler.given_first_token = self.scheduler.given_first_token, []
        if given and not self._emitted_early:
            self._emitted_early = True
            self._join_experts()  # an expert-parallel rank joins one exchange per step
            return self._collect_outputs(given)
        self._emitted_early = False
        touched: list[Request] = list(given)
        out = self.scheduler.schedule()
        if not out.is_empty and self._launchable(out):
            self._launched = self.runner.launch_decode(out.chunks)
            return self._collect_outputs(touched)
        if not out.is_empty:
            layer_hook = None
            if self.connector is not None:
                self.connector.before_execute(out)
                layer_hook = self.connector.layer_hook(out)
            if self._profiler is not None:
                self._profiler.before_step()
            started_s = time.time()
            sampled, logprobs = self._execute(out, layer_hook)
            if self._trace is not None:
                self._trace.step(started_s, out)
            if self._profiler is not None:
                self._profiler.after_step()
            for rid, lp in logprobs.items():
                self._pending_logprobs.setdefault(rid, []).append(lp)
            touched += [c.request for c in out.chunks if c.request.request_id in sampled]
            self.scheduler.update_from_output(out, sampled)
            if self.connector is not None:
                self.connector.after_execute(out)
        else:
            self._join_experts()
        return self._collect_outputs(touched)

    def _launchable(self, out: SchedulerOutput) -> bool:
        """A batch async scheduling may launch: one sampled token per request, each sampled
        by argmax alone (greedy; no logprobs, bias, penalties or min_tokens ban), no step
        tracing or profiling, and no connector hook to run for it."""
        if not self.async_scheduling or self._trace is not None or self._profiler is not None:
            return False
        if self.connector is not None and self.connector.step_needs_hooks(out):
            return False
        for chunk in out.chunks:
            req, sp = chunk.request, chunk.request.sampling_params
            if chunk.num_tokens != 1 or not chunk.samples or not sp.greedy \
                    or sp.logprobs is not None or sp.logit_bias or sp.has_penalties \
                    or len(req.output_token_ids) < sp.min_tokens:
                return False
        return True

    def _step_ahead(self) -> list[EngineCoreOutput]:
        """Launch the next decode step behind the launched one (its input ids are the launched
        step's tokens, still on the device), then read the launched step's tokens and apply
        them: the host's scheduling and bookkeeping overlap the device's step. A request that
        stops on a launched token computed one more token in the step behind: that token is
        dropped (it is finished), and its slot's block was its own.

        The connector's report is applied first (loads that landed, first tokens handed over,
        failures), so a request whose KV just arrived ends the chain at once (schedule_ahead
        then declines) and first tokens go out with this step's. A block freed while a step is
        launched (a request that stopped or was aborted) can only be handed on by a normal
        schedule, which runs once every launched step is settled: no transfer lands in a block
        that a launched step still writes."""
        launched = self._launched
        assert launched is not None
        self._launched = None
        self._connector_output()
        given, self.scheduler.given_first_token = self.scheduler.given_first_token, []
        ahead = self.scheduler.schedule_ahead(launched.chunks)
        if ahead is not None:  # a subset of a launched batch: no hook needed for it either
            out, rows = ahead
            self._launched = self.runner.launch_decode(out.chunks, launched, rows)
        return self._settle(launched, given)

    def _settle(self, launched: DecodeLaunch,
                given: list[Request] | None = None) -> list[EngineCoreOutput]:
        """A launched step's tokens, applied as a normal step's (requests finished since it was
        launched are skipped); its outputs, with those of ``given`` (requests handed their
        first token since)."""
        sampled = self.runner.collect_decode(launched)
        touched = [c.request for c in launched.chunks if not c.request.is_finished]
        touched += given or []
        self.scheduler.update_from_output(
            SchedulerOutput(chunks=launched.chunks, num_batched_tokens=len(launched.chunks)),
            sampled)
        return self._collect_outputs(touched)

    def _drain(self) -> list[EngineCoreOutput]:
        """Settle the launched step, if any (nothing is launched behind it)."""
        launched, self._launched = self._launched, None
        return [] if launched is None else self._settle(launched)

    def _execute(self, out: Any, layer_hook: Any) -> tuple[dict[str, int],
                                                           dict[str, TokenLogprob]]:
        """Run the model; with TP, a collective that fails means a worker died or hung."""
        if self.tp is None:
            return self.runner.execute(out, layer_hook)
        self.tp.step_begin()
        try:
            return self.runner.execute(out, layer_hook)
        except TPWorkerError:
            raise
        except RuntimeError as exc:
            raise self.tp.collective_failed(exc) from exc
        finally:
            self.tp.step_end()

    @property
    def tp_failure(self) -> str | None:
        """Why the TP group is broken (a worker died), else None."""
        return None if self.tp is None else self.tp.failure

    def fail_all(self, error: str) -> list[EngineCoreOutput]:
        """The instance goes down (a TP worker died): end every request, held ones too, with
        ``error``; their transfers fail toward the peers (which free their blocks at once)
        and their blocks are freed. Returns the outputs to send before exiting."""
        if self.tp is not None:
            self.tp.acknowledge()
        settled = self._drain()  # requests that ended on its tokens get their answers
        for req in list(self.scheduler.requests.values()):
            self.scheduler.finish(req, RequestStatus.FINISHED_ERROR, error)
        if self.connector is not None:  # finished prefills' transfers: their peers free now
            self.connector.fail_all(error)
            self._connector_output()
        self.held.clear()
        for req in self._awaiting.values():
            req.status, req.error = RequestStatus.FINISHED_ERROR, error
            self._settled[req.request_id] = error
        return settled + self._collect_outputs([])

    def _collect_outputs(self, touched: list[Request]) -> list[EngineCoreOutput]:
        outputs = []
        finished = self._answerable(self.scheduler.take_finished())
        touched = [r for r in touched if not r.awaiting_transfer]
        seen: set[str] = set()
        now = time.monotonic()
        for req in [*touched, *finished]:
            if req.request_id in seen:
                continue
            seen.add(req.request_id)
            sent = self._sent.get(req.request_id, 0)
            new = req.output_token_ids[sent:]
            self._sent[req.request_id] = sent + len(new)
            reason = FINISH_REASONS.get(req.status) if req.is_finished else None
            if not new and reason is None:
                continue
            outputs.append(EngineCoreOutput(
                req.request_id, new, reason, self._pending_logprobs.pop(req.request_id, None),
                req.kv_transfer_params if reason else None, req.error, req.num_prompt_tokens,
                req.num_cached_tokens if reason else 0,
                None if req.times.reported else req.times.report(req.arrival_time, now)))
        for req in finished:
            self._sent.pop(req.request_id, None)
            self._pending_logprobs.pop(req.request_id, None)
            self.runner.sampler.forget(req.request_id)
        return outputs

    def _answerable(self, finished: list[Request]) -> list[Request]:
        """Finished requests whose answer may go now: all but WRITE prefills still waiting for
        their transfer, plus those whose transfer ended (with its error, if it failed)."""
        for req in finished:
            if req.awaiting_transfer:
                self._awaiting[req.request_id] = req
        out = [r for r in finished if not r.awaiting_transfer]
        for rid in [r for r in self._settled if r in self._awaiting]:
            req, error = self._awaiting.pop(rid), self._settled.pop(rid)
            req.awaiting_transfer = False
            if error is not None:
                req.status, req.error = RequestStatus.FINISHED_ERROR, error
            out.append(req)
        self._settled.clear()  # ends of requests already answered (aborted ones)
        return out

    def stats(self) -> EngineStats:
        """Gauges for /metrics."""
        snap = self.pool.snapshot()
        held = self.num_held
        return EngineStats(num_running=self.scheduler.num_running,
                           num_waiting=self.scheduler.num_waiting + held,
                           kv_blocks_total=snap.total, kv_blocks_free=snap.free,
                           kv_blocks_held=snap.held,
                           connector=self.connector.metrics() if self.connector else {},
                           num_requests_total=self.num_requests_total, num_held=held,
                           kv_blocks_cached=snap.cached,
                           prefix_cache_queries=self.scheduler.prefix_cache_queries,
                           prefix_cache_hits=self.scheduler.prefix_cache_hits)

    def take_kv_events(self) -> KVCacheEvents | None:
        """The prefix cache's stored/evicted hashes since the last call (None: none); after
        lost events, a snapshot of every hash held."""
        pool = self.pool
        events = pool.take_events()
        dropped, pool.events_dropped = pool.events_dropped, 0
        if not events and not dropped:
            return None
        if dropped:
            return KVCacheEvents(dropped=dropped, snapshot=pool.cached_hashes())
        return KVCacheEvents(changes=events)

    def kv_abort(self, transfer_id: str) -> bool:
        """Abort a request and drop any held blocks for a transfer id (proxy cleanup)."""
        found = False
        for req in list(self.scheduler.requests.values()):
            params = req.kv_transfer_params
            if params is not None and params.transfer_id == transfer_id:
                self.scheduler.abort_request(req.request_id)
                found = True
        if self.connector is not None:
            found = self.connector.abort_transfer(transfer_id) or found
        return found

    def kv_faults(self, faults: Any) -> int:
        """Replace the connector's fault-injection rules (tests and drills; refused unless
        DISAGG_FAULT_INJECTION=1). Returns the number of rules now active."""
        set_faults = getattr(self.connector, "set_faults", None)
        if set_faults is None:
            raise ValueError("this engine has no connector that injects faults")
        return int(set_faults(faults))

    def close(self) -> None:
        """Release connector resources, then stop the TP workers."""
        if self._trace is not None:
            self._trace.close()
            self._trace = None
        if self._profiler is not None:
            self._profiler.close()
        if self.connector is not None:
            self.connector.close()
        if self.tp is not None:
            self.tp.close()


def model_eos_ids(arch: ArchConfig, model: str, generation_config: str) -> tuple[int, ...]:
    """Every id that ends generation: config.json's ``eos_token_id`` (an int or a list), then
    those generation_config.json adds (vLLM's stop set with --generation-config auto)."""
    ids = eos_ids(arch.eos_token_id, "config.json")
    extra = load_generation_config(model, generation_config).eos_token_ids
    return tuple(dict.fromkeys(ids + extra))


def align_block_size(cfg: EngineConfig) -> EngineConfig:
    """Round block_size up to a power of two (the Triton kernels tile a block with
    tl.arange, which needs one). The frontend learns the result from the ready handshake."""
    bs = cfg.cache.block_size
    aligned = 1 << (bs - 1).bit_length()
    if aligned == bs:
        return cfg
    logger.warning("block_size %d is not a power of two; the engine uses %d", bs, aligned)
    return dataclasses.replace(cfg, cache=dataclasses.replace(cfg.cache, block_size=aligned))


def build_engine(cfg: EngineConfig, ep: EPContext = EPContext()) -> EngineCore:
    """Construct an engine, turning known failures into ConfigError with one line."""
    try:
        return EngineCore(cfg, engine_id=f"{os.uname().nodename}-{uuid.uuid4().hex[:8]}"
                                         f"-dp{cfg.parallel.data_parallel_rank}", ep=ep)
    except ConfigError:
        raise
    except (OSError, ValueError, TPWorkerError) as exc:
        raise ConfigError(str(exc)) from exc
