"""Turns a SchedulerOutput into tensors, runs the model over the paged cache, samples.

The KV cache is ONE tensor (blocks outermost, see hip_kernels/__init__.py); the model reads
per-layer views of it. Transports register this tensor whole.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from disagg.common import envs, platform
from disagg.common.config import ConfigError, EngineConfig
from disagg.common.protocol import TokenLogprob
from disagg.engine.cuda_graphs import DecodeGraphs
from disagg.engine.sampler import Sampler
from disagg.engine.scheduler import ScheduledChunk, SchedulerOutput
from disagg.models.arch import ArchConfig
from disagg.models.llama import AttentionMetadata, LayerHook
from disagg.models.loader import load_model
from disagg.models.ops import select_ops

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


class ModelRunner:
    """Owns the model, the KV cache tensor and the sampler of one engine core."""

    def __init__(self, cfg: EngineConfig, arch: ArchConfig, device: torch.device,
                 dtype: torch.dtype, max_positions: int) -> None:
        self.cfg = cfg
        self.arch = arch
        self.device = device
        self.dtype = dtype
        self.ops = select_ops(device.type)
        self.model = load_model(cfg.model, arch, self.ops, device, dtype, max_positions)
        self.sampler = Sampler(device, cfg.model.seed)
        self.kv_cache: torch.Tensor | None = None
        self.block_size = cfg.cache.block_size
        self.graphs: DecodeGraphs | None = None
        logger.info("model loaded on %s (%s), kernels: %s", device, dtype, self.ops.backend)

    def allocate_kv_cache(self, num_blocks: int) -> torch.Tensor:
        """[num_blocks, layers, 2, block_size, kv_heads, head_dim], zero-filled."""
        a = self.arch
        self.kv_cache = torch.zeros(num_blocks, a.num_layers, 2, self.block_size,
                                    a.num_kv_heads, a.head_dim, dtype=self.dtype,
                                    device=self.device)
        return self.kv_cache

    def enable_decode_graphs(self, max_model_len: int) -> None:
        """Replay decode steps from CUDA/HIP graphs (GPU with Triton kernels only)."""
        if (self.device.type != "cuda" or self.ops.backend != "triton" or self.kv_cache is None
                or envs.disable_cuda_graphs()):
            return
        self.graphs = DecodeGraphs(self.model, self.kv_cache, self.cfg.scheduler.max_num_seqs,
                                   -(-max_model_len // self.block_size))

    def available_kv_bytes(self) -> int:
        """KV budget: explicit bytes, or (GPU) utilization * total - weights - activation peak."""
        explicit = self.cfg.cache.kv_cache_memory_bytes
        if explicit is not None:
            return explicit
        if self.device.type != "cuda":
            return 256 * 2**20
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self._profile_run()
        peak = torch.cuda.max_memory_allocated()
        total = torch.cuda.get_device_properties(self.device).total_memory
        return int(total * self.cfg.cache.gpu_memory_utilization) - peak

    @torch.inference_mode()
    def _profile_run(self) -> None:
        """One forward of max_num_batched_tokens tokens to measure activation memory."""
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
        self.model.compute_logits(hidden[-min(n, self.cfg.scheduler.max_num_seqs):])
        torch.cuda.synchronize()
        self.kv_cache = None
        del cache

    def _prepare(self, out: SchedulerOutput, layer_hook: LayerHook | None
                 ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        """Flatten the scheduled chunks into input ids, positions and attention metadata."""
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
        dev = self.device
        attn = AttentionMetadata(
            slot_mapping=torch.from_numpy(np.concatenate(slots)).to(dev, non_blocking=True),
            block_tables=torch.from_numpy(table).to(dev, non_blocking=True),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
            decode_only=len(ids) == len(out.chunks), layer_hook=layer_hook)
        return (torch.tensor(ids, dtype=torch.long, device=dev),
                torch.from_numpy(np.concatenate(positions)).to(dev, non_blocking=True),
                attn, sample_rows)

    def _graph_decode_logits(self, out: SchedulerOutput) -> torch.Tensor | None:
        """Logits of a pure decode batch replayed from a graph; None when not applicable."""
        g = self.graphs
        chunks = out.chunks
        if g is None or any(c.num_tokens != 1 or not c.samples for c in chunks):
            return None
        width = max(len(c.request.block_ids) for c in chunks)
        if not g.fits(len(chunks), width):
            return None
        bs = self.block_size
        pos = np.fromiter((c.request.num_computed_tokens for c in chunks), np.int64, len(chunks))
        ids = np.fromiter((c.request.all_token_ids[p] for c, p in zip(chunks, pos.tolist())),
                          np.int64, len(chunks))
        table = np.zeros((len(chunks), width), dtype=np.int32)
        for i, c in enumerate(chunks):
            table[i, :len(c.request.block_ids)] = c.request.block_ids
        rows = np.arange(len(chunks))
        slots = table[rows, pos // bs].astype(np.int64) * bs + pos % bs
        return g.run_host(ids, pos, slots, pos + 1, table)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, layer_hook: LayerHook | None = None
                ) -> tuple[dict[str, int], dict[str, TokenLogprob]]:
        """Run one step; returns sampled token and logprobs per request that samples.

        ``layer_hook`` is called after each layer's K/V are in the cache; a step that has one
        runs eagerly (a replayed decode graph calls no Python per layer).
        """
        assert self.kv_cache is not None, "allocate_kv_cache first"
        logits = self._graph_decode_logits(out) if layer_hook is None else None
        if logits is not None:
            return self._sample(out.chunks, logits)
        input_ids, positions, attn, sample_rows = self._prepare(out, layer_hook)
        sampling = [c for c in out.chunks if c.samples]
        hidden = self.model(input_ids, positions, attn, self.kv_cache)
        if not sampling:
            return {}, {}
        return self._sample(sampling, self.model.compute_logits(hidden[sample_rows]))

    def _sample(self, sampling: list[ScheduledChunk], logits: torch.Tensor
                ) -> tuple[dict[str, int], dict[str, TokenLogprob]]:
        req_ids = [c.request.request_id for c in sampling]
        tokens, logprobs = self.sampler.sample(
            logits, req_ids, [c.request.sampling_params for c in sampling])
        sampled = dict(zip(req_ids, tokens, strict=True))
        lps = {rid: lp for rid, lp in zip(req_ids, logprobs, strict=True) if lp is not None}
        return sampled, lps
