"""Decode steps replayed from CUDA/HIP graphs (torch.cuda.CUDAGraph works on both).

A decode step launches hundreds of small kernels; at batch 1 the launch overhead alone exceeds
the time to read the weights. There is one graph per (batch bucket, block-table width bucket), so
the decode kernel's split plan, which it derives from the block-table width, stays close to the
real context length. All of them are captured at start-up (``capture(all_buckets())``, largest
first, into one private pool), so the memory they hold is measured and inside the instance's
budget before it reports ready (disagg/engine/gpu_memory.py); ``--enforce-eager`` captures none.
The buckets are bounded: at most len(BATCH_BUCKETS) + 1 batch sizes times one width per factor
of 4 from 16 blocks to max_model_len's.

Static buffers, padded to the bucket:
    input_ids, positions  [B]        pad rows: token 0, position 0
    slot_mapping          [B]        pad rows: -1 (the cache-write kernel skips negative slots)
    seq_lens              [B]        pad rows: 1
    block_tables          [B, W]     pad rows/cols: block 0
    logits                [B, vocab] output in the model's dtype, shared by every graph: each
                          graph's LM head writes the rows it covers, so the pool holds no
                          per-graph output (the caller reads them before the next replay)
"""

from __future__ import annotations

import bisect
import logging
import time
from typing import Any

import torch

from disagg.models.layers import AttentionMetadata

logger = logging.getLogger(__name__)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512)


class DecodeGraphs:
    """Captures and replays decode-only forward passes (model + LM head)."""

    def __init__(self, model: Any, kv_cache: torch.Tensor, max_num_seqs: int,
                 max_blocks_per_seq: int) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.batch_buckets = [b for b in BATCH_BUCKETS if b < max_num_seqs] + [max_num_seqs]
        widths, w = [], 16
        while w < max_blocks_per_seq:
            widths.append(w)
            w *= 4
        self.width_buckets = [*widths, max_blocks_per_seq]
        dev = kv_cache.device
        b, wmax = self.batch_buckets[-1], self.width_buckets[-1]
        self.input_ids = torch.zeros(b, dtype=torch.long, device=dev)
        self.positions = torch.zeros(b, dtype=torch.long, device=dev)
        self.slot_mapping = torch.full((b,), -1, dtype=torch.long, device=dev)
        self.seq_lens = torch.ones(b, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros(b, wmax, dtype=torch.int32, device=dev)
        self.logits: torch.Tensor | None = None
        """[B, vocab] output of every graph, model dtype (allocated by the first capture)."""
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.pool: Any = None
        # pinned host staging: one H2D copy per buffer and step, no intermediate tensors; two
        # sets used in turn, so a step prepared while the previous one may still be copying
        # its inputs (async scheduling) never writes the host memory that copy reads
        self._h_vecs = [torch.zeros(4, b, dtype=torch.long, pin_memory=True) for _ in range(2)]
        self._h_tables = [torch.zeros(b * wmax, dtype=torch.int32, pin_memory=True)
                          for _ in range(2)]
        self._turn = 0

    def fits(self, batch: int, width: int) -> bool:
        """Whether a decode batch can be served from a graph."""
        return batch <= self.batch_buckets[-1] and width <= self.width_buckets[-1]

    def _bucket(self, buckets: list[int], n: int) -> int:
        return buckets[bisect.bisect_left(buckets, n)]

    def _forward(self, b: int, w: int) -> None:
        attn = AttentionMetadata(
            slot_mapping=self.slot_mapping[:b], block_tables=self.block_tables[:b, :w],
            seq_lens=self.seq_lens[:b],
            query_start_loc=torch.arange(b + 1, dtype=torch.int32, device=self.kv_cache.device),
            decode_only=True)
        hidden = self.model(self.input_ids[:b], self.positions[:b], attn, self.kv_cache)
        if self.logits is None:  # outside any capture: the warm-up of the first graph
            vocab = self.model.compute_logits(hidden[:1]).shape[-1]
            self.logits = torch.empty(self.batch_buckets[-1], vocab, dtype=hidden.dtype,
                                      device=hidden.device)
        # the LM head's GEMM writes the shared output itself, in the model's dtype: no fp32
        # copy in the graph (a greedy step's argmax reads it as it is; Sampler widens the rest)
        self.model.compute_logits(hidden, out=self.logits[:b])

    def _capture(self, b: int, w: int) -> torch.cuda.CUDAGraph:
        self.slot_mapping.fill_(-1)
        self.seq_lens.fill_(1)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._forward(b, w)  # warm-up: Triton JIT compiles outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self._forward(b, w)
        self.pool = graph.pool()
        return graph

    def all_buckets(self) -> list[tuple[int, int]]:
        """Every (batch, width) bucket, largest first (smaller graphs reuse the pool)."""
        return [(b, w) for b in reversed(self.batch_buckets)
                for w in reversed(self.width_buckets)]

    @torch.inference_mode()
    def capture(self, buckets: list[tuple[int, int]]) -> int:
        """Capture ``buckets`` not captured yet; the bytes torch's allocator reserved more
        afterwards (the pool, the shared logits and the static buffers' growth)."""
        torch.cuda.synchronize()
        before = torch.cuda.memory_reserved(self.kv_cache.device)
        t0 = time.perf_counter()
        for b, w in buckets:
            if (b, w) not in self.graphs:
                self.graphs[(b, w)] = self._capture(b, w)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # the eager warm-ups' cached blocks: activations, not graphs
        grown = torch.cuda.memory_reserved(self.kv_cache.device) - before
        logger.info("captured %d decode graphs (batch up to %d, width up to %d blocks) in "
                    "%.1f s, %.2f GiB", len(buckets), max(b for b, _ in buckets),
                    max(w for _, w in buckets), time.perf_counter() - t0, grown / 2**30)
        return grown

    def release(self) -> None:
        """Drop every graph, the shared output and the pool handle (the pool's memory returns
        to torch's cache once nothing references it)."""
        self.graphs.clear()
        self.logits = None
        self.pool = None

    def graph_for(self, batch: int, width: int) -> torch.cuda.CUDAGraph:
        """The graph a decode batch of ``batch`` rows and ``width`` blocks replays."""
        return self.graphs[self.buckets_for(batch, width)]

    def buckets_for(self, batch: int, width: int) -> tuple[int, int]:
        """(batch bucket, width bucket) a decode batch is padded to."""
        return self._bucket(self.batch_buckets, batch), self._bucket(self.width_buckets, width)

    @torch.inference_mode()
    def run_host(self, ids: Any, positions: Any, slots: Any, seq_lens: Any,
                 table: Any, device_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Like ``run`` from numpy inputs: ids/positions/slots/seq_lens [n], table [n, width];
        ``device_ids`` [n] on the device, when given, replace ``ids`` (tokens a step before
        sampled and nobody read back yet)."""
        n, width = table.shape
        b, w = self.buckets_for(n, width)
        graph = self.graphs.get((b, w))
        if graph is None:  # all were captured at start-up: only a caller that skipped it
            self.capture([(b, w)])
            graph = self.graphs[(b, w)]
        assert self.logits is not None
        h_vec, h_table = self._h_vecs[self._turn], self._h_tables[self._turn]
        self._turn ^= 1
        vec = h_vec.numpy()
        vec[:, n:b] = ((0,), (0,), (-1,), (1,))
        vec[0, :n], vec[1, :n], vec[2, :n], vec[3, :n] = ids, positions, slots, seq_lens
        tab = h_table.numpy()[:b * w].reshape(b, w)
        tab[:] = 0
        tab[:n, :width] = table
        self.input_ids[:b].copy_(h_vec[0, :b], non_blocking=True)
        if device_ids is not None:
            self.input_ids[:n].copy_(device_ids)
        self.positions[:b].copy_(h_vec[1, :b], non_blocking=True)
        self.slot_mapping[:b].copy_(h_vec[2, :b], non_blocking=True)
        self.seq_lens[:b].copy_(h_vec[3, :b], non_blocking=True)
        self.block_tables[:b, :w].copy_(h_table[:b * w].view(b, w), non_blocking=True)
        graph.replay()
        return self.logits[:n]
