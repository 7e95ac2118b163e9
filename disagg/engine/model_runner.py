"""Turns a SchedulerOutput into tensors, runs the model over the paged cache, samples.

The KV cache is ONE tensor (blocks outermost, see hip_kernels/__init__.py); the model reads
per-layer views of it. Transports register this tensor whole.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from disagg.common import envs, platform
from disagg.common.config import ConfigError, EngineConfig
from disagg.common.protocol import TokenLogprob
from disagg.common.sampling_params import SamplingParams
from disagg.engine.cuda_graphs import DecodeGraphs
from disagg.engine.gpu_memory import MemorySplit, outside_torch_bytes, process_gpu_bytes
from disagg.engine.kv_quant import KVCacheSpec, apply_kv_scales, kv_cache_spec
from disagg.engine.sampler import Sampler
from disagg.engine.scheduler import ScheduledChunk, SchedulerOutput
from disagg.models.arch import ArchConfig
from disagg.models.expert_parallel import EPContext
from disagg.models.layers import AttentionMetadata, LayerHook
from disagg.models.loader import load_model
from disagg.models.ops import select_ops
from disagg.models.parallel import TPContext

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
           "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
           "half": torch.float16, "float": torch.float32}


def resolve_device(device: str) -> torch.device:
    """auto -> cuda when a GPU is visible, else cpu."""

    return torch.device(platform.default_device() if device == "auto" else device)


def resolve_dtype(dtype: str, device: torch.device, arch: ArchConfig) -> torch.dtype:
    """auto -> fp32 on CPU; the checkpoint's dtype (or bf16) on GPU."""
    if dtype != "auto":
        if dtype not in _DTYPES:
            raise ConfigError(f"--dtype {dtype!r} is not one of auto, float32, bfloat16, float16")
        return _DTYPES[dtype]
    if device.type == "cpu":
        return torch.float32
    return _DTYPES.get(str(arch.torch_dtype), torch.bfloat16) \
        if arch.torch_dtype in ("bfloat16", "float16") else torch.bfloat16


@dataclass(frozen=True, slots=True)
class HostStep:
    """One step's inputs on the host: what rank 0 hands every tensor-parallel worker, which
    then runs the same forward (disagg/engine/tp.py)."""

    graph: bool
    """Replay a decode graph (ids, positions, slots, seq_lens [n], table [n, width])."""
    ids: np.ndarray
    positions: np.ndarray
    slots: np.ndarray
    seq_lens: np.ndarray
    table: np.ndarray
    query_start_loc: np.ndarray | None = None
    sample_rows: list[int] = field(default_factory=list)
    decode_only: bool = False


@dataclass(slots=True)
class DecodeLaunch:
    """A decode step launched without reading its tokens back (async scheduling): one token
    for each of ``chunks``, in order, greedy (EngineCore._step_ahead)."""

    chunks: list[ScheduledChunk]
    tokens: torch.Tensor
    """[n] sampled ids on the device: the next step's input ids, before anyone read them."""
    host: torch.Tensor
    """[n] their copy on the host (pinned on a GPU), valid once ``done`` completed."""
    done: torch.cuda.Event | None
    """Recorded after the copy (None on CPU, where the copy is already done)."""


StepSender = Callable[[HostStep], None]
"""Rank 0 hands a step's inputs to the other TP ranks before running it itself."""


class ModelRunner:
    """Owns the model (this rank's shard), the KV cache tensor and the sampler."""

    def __init__(self, cfg: EngineConfig, arch: ArchConfig, device: torch.device,
                 dtype: torch.dtype, max_positions: int, tp: TPContext | None = None,
                 send_step: StepSender | None = None, ep: EPContext = EPContext()) -> None:
        self.cfg = cfg
        self.arch = arch
        self.device = device
        self.dtype = dtype
        self.tp = tp or TPContext()
        self.send_step = send_step
        self.ops = select_ops(device.type)
        self.ep = ep
        self.model = load_model(cfg.model, arch, self.ops, device, dtype, max_positions,
                                self.tp, ep)
        self.sampler = Sampler(device, cfg.model.seed, self.ops.greedy_argmax)
        self.kv_spec: KVCacheSpec = kv_cache_spec(cfg.cache.kv_cache_dtype, dtype, arch,
                                                  cfg.model.model)
        """The cache's element dtype (the model's, or fp8) and per-layer scales."""
        apply_kv_scales(self.model, self.kv_spec)
        self.kv_cache: torch.Tensor | None = None
        self.block_size = cfg.cache.block_size
        self.graphs: DecodeGraphs | None = None
        self.max_positions = max_positions
        self.memory: MemorySplit | None = None
        """Where this GPU process's memory budget goes (None on CPU or with explicit bytes)."""
        logger.info("model loaded on %s (%s), kernels: %s%s", device, dtype, self.ops.backend,
                    f", tp rank {self.tp.rank} of {self.tp.size}" if self.tp.size > 1 else "")

    @property
    def num_kv_heads(self) -> int:
        """KV heads in this rank's cache (all of them without tensor parallelism)."""
        return int(getattr(self.model, "num_local_kv_heads", self.arch.num_kv_heads))

    def block_bytes(self) -> int:
        """Bytes of one block of this rank's cache (all layers, K and V, its KV heads) in the
        cache's dtype: an fp8 cache's blocks are half a bf16 one's."""
        a = self.arch
        return a.num_layers * 2 * self.block_size * self.num_kv_heads * a.head_dim \
            * self.kv_spec.dtype.itemsize

    def allocate_kv_cache(self, num_blocks: int) -> torch.Tensor:
        """[num_blocks, layers, 2, block_size, kv_heads of this rank, head_dim], zero-filled,
        in the cache dtype (kv_spec)."""
        a = self.arch
        self.kv_cache = torch.zeros(num_blocks, a.num_layers, 2, self.block_size,
                                    self.num_kv_heads, a.head_dim, dtype=self.kv_spec.dtype,
                                    device=self.device)
        return self.kv_cache

    def _graphs_wanted(self) -> bool:
        """Decode steps replay CUDA/HIP graphs (GPU with Triton kernels, not --enforce-eager;
        not with expert parallelism, whose all-to-all sizes are known only at run time)."""
        return (self.device.type == "cuda" and self.ops.backend == "triton"
                and not envs.disable_cuda_graphs() and not self.cfg.model.enforce_eager
                and self.ep.size == 1)

    def enable_decode_graphs(self, max_model_len: int) -> None:
        """Capture every decode graph now (the cache is allocated), and record what they and
        the cache hold in ``self.memory``."""
        if not self._graphs_wanted() or self.kv_cache is None:
            self._account_kv()
            return
        self.graphs = DecodeGraphs(self.model, self.kv_cache, self.cfg.scheduler.max_num_seqs,
                                   -(-max_model_len // self.block_size))
        grown = self.graphs.capture(self.graphs.all_buckets())
        if self.memory is not None and grown > self.memory.graphs * 1.05 + 2**26:
            logger.warning("the decode graphs hold %.2f GiB, %.2f GiB more than estimated "
                           "before the KV cache was sized: the instance holds that much more "
                           "than its budget", grown / 2**30,
                           (grown - self.memory.graphs) / 2**30)
        if self.memory is not None:  # the budgeted figure unless the capture measured more
            # (the real capture's growth reads low when it reuses blocks torch's cache kept)
            self.memory = replace(self.memory, graphs=max(grown, self.memory.graphs))
        self._account_kv()

    def _account_kv(self) -> None:
        if self.memory is not None and self.kv_cache is not None:
            kv = self.kv_cache.numel() * self.kv_cache.element_size()
            other, _ = outside_torch_bytes(self.device.index or 0)
            self.memory = replace(self.memory, kv=kv, other=max(other, self.memory.other))

    def held_gpu_bytes(self) -> int | None:
        """What this process holds on its GPU as the driver counts it (None: not known)."""
        if self.device.type != "cuda":
            return None
        return process_gpu_bytes(self.device.index or 0)

    def available_kv_bytes(self) -> int:
        """KV budget: explicit bytes, or (GPU) what ``--gpu-memory-utilization x total`` leaves
        after the weights, the profiled activation peak, the decode graphs' estimate and the
        memory outside torch's allocator (disagg/engine/gpu_memory.py); the split is kept in
        ``self.memory`` for the ready line."""
        explicit = self.cfg.cache.kv_cache_memory_bytes
        if explicit is not None:
            return explicit
        if self.device.type != "cuda":
            return 256 * 2**20
        dev = self.device
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        weights = torch.cuda.memory_reserved(dev)
        self._profile_run()
        activations = torch.cuda.max_memory_reserved(dev) - weights
        torch.cuda.empty_cache()
        graphs = self._estimate_graph_bytes() if self._graphs_wanted() else 0
        other, how = outside_torch_bytes(dev.index or 0)
        self.memory = MemorySplit(
            total=torch.cuda.get_device_properties(dev).total_memory,
            utilization=self.cfg.cache.gpu_memory_utilization, weights=weights,
            activations=activations, graphs=graphs, other=other)
        logger.debug("memory before the KV cache (outside torch measured %s): %s", how,
                     self.memory.describe())
        return self.memory.kv_room

    def _estimate_graph_bytes(self) -> int:
        """Capture every decode graph over a one-block cache and release them: what their pool
        holds, before the real cache exists (the capture after it repeats the same sequence;
        only the cache's address differs). Capturing only the largest graph measured a third
        of it on an H200: smaller graphs reuse the pool only in part."""
        requested = self.cfg.model.max_model_len
        max_len = requested if requested and requested > 0 else self.max_positions
        cache = self.allocate_kv_cache(1)
        graphs = DecodeGraphs(self.model, cache, self.cfg.scheduler.max_num_seqs,
                              -(-max_len // self.block_size))
        try:
            return graphs.capture(graphs.all_buckets())
        finally:
            graphs.release()
            del graphs, cache
            self.kv_cache = None
            gc.collect()  # a cycle holding the pool would free it only during the real capture
            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    @torch.inference_mode()
    def _profile_run(self) -> None:
        """One forward of max_num_batched_tokens tokens, then the sampler over max_num_seqs
        rows with top-p, top-k and the most logprobs: the activation peak."""
        n = self.cfg.scheduler.max_num_batched_tokens
        nb = -(-n // self.block_size)
        cache = self.allocate_kv_cache(nb)
        ids = torch.zeros(n, dtype=torch.long, device=self.device)
        pos = torch.arange(n, device=self.device)
        attn = AttentionMetadata(
            slot_mapping=pos.clone(), block_tables=torch.arange(nb, dtype=torch.int32,
                                                                device=self.device)[None],
            seq_lens=torch.tensor([n], dtype=torch.int32, device=self.device),
            query_start_loc=torch.tensor([0, n], dtype=torch.int32, device=self.device),
            decode_only=False)
        hidden = self.model(ids, pos, attn, cache)
        rows = min(n, self.cfg.scheduler.max_num_seqs)
        logits = self.model.compute_logits(hidden[-rows:])
        del hidden
        sp = SamplingParams(temperature=1.0, top_p=0.9, top_k=50,
                            logprobs=self.cfg.model.max_logprobs or None)
        names = [f"profile-{i}" for i in range(rows)]
        self.sampler.sample(logits, names, [sp] * rows)
        for name in names:
            self.sampler.forget(name)
        torch.cuda.synchronize()
        self.kv_cache = None
        del cache, logits

    def _host_inputs(self, out: SchedulerOutput) -> HostStep:
        """Flatten the scheduled chunks into host arrays (ids, positions, slots, tables)."""
        bs = self.block_size
        ids: list[int] = []
        positions: list[np.ndarray] = []
        slots: list[np.ndarray] = []
        qsl = [0]
        seq_lens: list[int] = []
        sample_rows: list[int] = []
        max_blocks = max(len(c.request.block_ids) for c in out.chunks)
        table = np.zeros((len(out.chunks), max_blocks), dtype=np.int32)
        for i, chunk in enumerate(out.chunks):
            req, start = chunk.request, chunk.request.num_computed_tokens
            end = start + chunk.num_tokens
            ids.extend(req.all_token_ids[start:end])
            pos = np.arange(start, end, dtype=np.int64)
            blocks = np.asarray(req.block_ids, dtype=np.int64)
            positions.append(pos)
            slots.append(blocks[pos // bs] * bs + pos % bs)
            table[i, :len(req.block_ids)] = req.block_ids
            qsl.append(qsl[-1] + chunk.num_tokens)
            seq_lens.append(end)
            if chunk.samples:
                sample_rows.append(qsl[-1] - 1)
        return HostStep(graph=False, ids=np.asarray(ids, dtype=np.int64),
                        positions=np.concatenate(positions), slots=np.concatenate(slots),
                        seq_lens=np.asarray(seq_lens, dtype=np.int32), table=table,
                        query_start_loc=np.asarray(qsl, dtype=np.int32),
                        sample_rows=sample_rows, decode_only=len(ids) == len(out.chunks))

    def _device_inputs(self, h: HostStep, layer_hook: LayerHook | None
                       ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        dev = self.device
        assert h.query_start_loc is not None
        attn = AttentionMetadata(
            slot_mapping=torch.from_numpy(h.slots).to(dev, non_blocking=True),
            block_tables=torch.from_numpy(h.table).to(dev, non_blocking=True),
            seq_lens=torch.from_numpy(h.seq_lens).to(dev),
            query_start_loc=torch.from_numpy(h.query_start_loc).to(dev),
            decode_only=h.decode_only, layer_hook=layer_hook,
            host_query_start_loc=tuple(h.query_start_loc.tolist()),
            host_seq_lens=tuple(h.seq_lens.tolist()))
        return (torch.from_numpy(h.ids).to(dev),
                torch.from_numpy(h.positions).to(dev, non_blocking=True), attn)

    def _graph_inputs(self, out: SchedulerOutput) -> HostStep | None:
        """A pure decode batch a graph can replay, as host arrays; None when not applicable."""
        chunks = out.chunks
        if self.graphs is None or any(c.num_tokens != 1 or not c.samples for c in chunks):
            return None
        return self._decode_inputs(chunks, 0, graph=True)

    def _decode_inputs(self, chunks: list[ScheduledChunk], ahead: int,
                       graph: bool) -> HostStep | None:
        """One token per chunk at position num_computed_tokens + ``ahead`` (1: the token a
        launched step is sampling, whose id only the device has yet: ids are then 0, the
        caller passes them on the device). None when no graph fits (``graph``)."""
        width = max(len(c.request.block_ids) for c in chunks)
        if graph and (self.graphs is None or not self.graphs.fits(len(chunks), width)):
            return None
        bs, n = self.block_size, len(chunks)
        pos = np.fromiter((c.request.num_computed_tokens + ahead for c in chunks), np.int64, n)
        ids = np.zeros(n, np.int64) if ahead else np.fromiter(
            (c.request.all_token_ids[p] for c, p in zip(chunks, pos.tolist())), np.int64, n)
        table = np.zeros((n, width), dtype=np.int32)
        for i, c in enumerate(chunks):
            table[i, :len(c.request.block_ids)] = c.request.block_ids
        rows = np.arange(n)
        slots = table[rows, pos // bs].astype(np.int64) * bs + pos % bs
        if graph:
            return HostStep(graph=True, ids=ids, positions=pos, slots=slots, seq_lens=pos + 1,
                            table=table)
        return HostStep(graph=False, ids=ids, positions=pos, slots=slots,
                        seq_lens=(pos + 1).astype(np.int32), table=table,
                        query_start_loc=np.arange(n + 1, dtype=np.int32),
                        sample_rows=list(range(n)), decode_only=True)

    @torch.inference_mode()
    def launch_decode(self, chunks: list[ScheduledChunk], prev: DecodeLaunch | None = None,
                      rows: list[int] | None = None) -> DecodeLaunch:
        """Run a greedy decode step and start copying its tokens to the host, without waiting
        for either. ``prev``: the step whose tokens (its ``rows``, one per chunk) are this
        step's inputs, still on the device; ``chunks`` then stand one token behind (their
        requests have not taken prev's tokens yet)."""
        assert self.kv_cache is not None and self.send_step is None
        ahead = 0 if prev is None else 1
        ids_dev = None
        if prev is not None:
            assert rows is not None
            ids_dev = prev.tokens if rows == list(range(len(prev.chunks))) else \
                prev.tokens[torch.tensor(rows, dtype=torch.long).to(self.device,
                                                                     non_blocking=True)]
        host = (self._decode_inputs(chunks, ahead, graph=True)
                or self._decode_inputs(chunks, ahead, graph=False))
        assert host is not None
        logits = self.execute_step(host, device_ids=ids_dev)
        assert logits is not None
        tokens = self.ops.greedy_argmax(logits)
        if self.device.type == "cpu":
            return DecodeLaunch(chunks, tokens, tokens, None)
        out = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        out.copy_(tokens, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return DecodeLaunch(chunks, tokens, out, done)

    @staticmethod
    def collect_decode(launch: DecodeLaunch) -> dict[str, int]:
        """Wait for a launched step's tokens (only for it, not for steps launched after) and
        return them per request id."""
        if launch.done is not None:
            launch.done.synchronize()
        return dict(zip((c.request.request_id for c in launch.chunks), launch.host.tolist(),
                        strict=True))

    @torch.inference_mode()
    def idle_forward(self) -> None:
        """An expert-parallel rank's step without tokens: join every MoE layer's exchange."""
        self.model.idle_moe_pass()

    @torch.inference_mode()
    def execute_step(self, h: HostStep, layer_hook: LayerHook | None = None,
                     device_ids: torch.Tensor | None = None) -> torch.Tensor | None:
        """Run one step's forward from host inputs; the logits of its sampling rows (None when
        no row samples). Every TP rank runs this with the same inputs. Inference mode: with
        autograd recording, the CPU cache write (index_copy_ into the pool) chained every step's
        activations to the pool for good (512 MiB per 2k-token prompt of the tiny model).
        ``device_ids``: input ids already on the device, in place of ``h.ids`` (async
        scheduling: the tokens a launched step sampled)."""
        assert self.kv_cache is not None, "allocate_kv_cache first"
        if h.graph:
            assert self.graphs is not None
            return self.graphs.run_host(h.ids, h.positions, h.slots, h.seq_lens, h.table,
                                        device_ids)
        input_ids, positions, attn = self._device_inputs(h, layer_hook)
        if device_ids is not None:
            input_ids = device_ids
        hidden = self.model(input_ids, positions, attn, self.kv_cache)
        if not h.sample_rows:
            return None
        return self.model.compute_logits(hidden[h.sample_rows])

    def execute(self, out: SchedulerOutput, layer_hook: LayerHook | None = None
                ) -> tuple[dict[str, int], dict[str, TokenLogprob]]:
        """Run one step; returns sampled token and logprobs per request that samples.

        ``layer_hook`` is called after each layer's K/V are in the cache; a step that has one
        runs eagerly (a replayed decode graph calls no Python per layer). With tensor
        parallelism the other ranks get the same host inputs first; only this rank samples.
        """
        assert self.kv_cache is not None, "allocate_kv_cache first"
        host = self._graph_inputs(out) if layer_hook is None else None
        if host is None:
            host = self._host_inputs(out)
        if self.send_step is not None:
            self.send_step(host)
        logits = self.execute_step(host, layer_hook)
        if logits is None:
            return {}, {}
        sampling = out.chunks if host.graph else [c for c in out.chunks if c.samples]
        return self._sample(sampling, logits)

    def _sample(self, sampling: list[ScheduledChunk], logits: torch.Tensor
                ) -> tuple[dict[str, int], dict[str, TokenLogprob]]:
        req_ids = [c.request.request_id for c in sampling]
        tokens, logprobs = self.sampler.sample(
            logits, req_ids, [c.request.sampling_params for c in sampling],
            [c.request for c in sampling])
        sampled = dict(zip(req_ids, tokens, strict=True))
        lps = {rid: lp for rid, lp in zip(req_ids, logprobs, strict=True) if lp is not None}
        return sampled, lps
