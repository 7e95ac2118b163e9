"""Time every Triton kernel at real shapes against the ceilings measured in the same run.

    python -m bench.kernel_bench [--kernels paged_decode_attention,rms_norm] [--output F]

Ceilings: a 1 GiB device-to-device copy (bytes read + written per second) for memory-bound
kernels, a bf16 8192^3 matmul for compute-bound ones. Each kernel's achieved rate counts the
fewest bytes (or flops) it must move, over its median time (L2 flushed before every run); a
case that counts both is held to the copy ceiling. A case with a dense baseline (fused_moe: a
torch.matmul pair of the same flops) also reports ratio_to_dense = dense time / kernel time.
One JSON row per kernel config goes to bench/results/kernels.jsonl (or --output). Needs a
GPU; on a CPU-only machine it refuses with exit code 2.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "kernels.jsonl"
FLUSH_BYTES = 512 * 2**20  # more than any L2 / MI300X Infinity Cache
COPY_BYTES = 2**30
MATMUL_SIZE = 8192
# Llama-3-8B: 32 q heads, 8 kv heads, head_dim 128, hidden 4096, MLP 14336, block size 16.
Q_HEADS, KV_HEADS, HEAD_DIM, HIDDEN, INTER, BLOCK_SIZE = 32, 8, 128, 4096, 14336, 16
# Qwen3-30B-A3B's MoE layer: 128 experts, 8 per token, hidden 2048, expert MLP 768.
MOE_EXPERTS, MOE_TOP_K, MOE_HIDDEN, MOE_INTER = 128, 8, 2048, 768
# DeepSeek-V2/V3 latent attention: latent 576 = kv_lora_rank 512 + rope 64, q/k head dim 192.
MLA_LATENT_DIM, MLA_LORA_RANK, MLA_QK_HEAD_DIM = 576, 512, 192


@dataclass
class KernelCase:
    """One kernel at one shape: what to run and the minimum work it must do."""

    kernel: str
    config: dict[str, Any]
    run: Callable[[], Any]
    bytes_moved: int = 0
    flops: int = 0
    ref: Callable[[], Any] | None = None
    launch: dict[str, Any] = field(default_factory=dict)
    dense: Callable[[], Any] | None = None
    """A dense torch computation of the same flops, timed as a baseline (ratio_to_dense)."""


def time_ms(fn: Callable[[], Any], iters: int, warmup: int, flush: Any) -> list[float]:
    """Per-run device times in ms (events), L2 flushed before each run."""
    import torch

    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for start, end in zip(starts, ends, strict=True):
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in zip(starts, ends, strict=True)]


def _bf16(*shape: int) -> Any:
    """Random bf16 values on the GPU (never zeros: they can time faster than real data)."""
    import torch

    return torch.randn(*shape, dtype=torch.bfloat16, device="cuda")


def measure_ceilings(iters: int, flush: Any) -> dict[str, float]:
    """Copy bandwidth (GB/s, read + write) and bf16 matmul rate (TFLOP/s) of this device."""
    import torch

    src, dst = _bf16(COPY_BYTES // 2), _bf16(COPY_BYTES // 2)
    copy_ms = statistics.median(time_ms(functools.partial(dst.copy_, src), iters, 3, flush))
    a, b = _bf16(MATMUL_SIZE, MATMUL_SIZE), _bf16(MATMUL_SIZE, MATMUL_SIZE)
    mm_ms = statistics.median(time_ms(functools.partial(torch.matmul, a, b), iters, 3, flush))
    return {"copy_gbps": 2 * COPY_BYTES / copy_ms / 1e6,
            "matmul_tflops": 2 * MATMUL_SIZE**3 / mm_ms / 1e9}



def _decode_cases() -> Iterator[KernelCase]:
    """Paged decode at the acceptance shape (batch 64, context 4k) and around it."""
    import torch

    from hip_kernels.paged_attention import (
        decode_plan,
        paged_decode_attention,
        paged_decode_attention_ref,
    )
    from hip_kernels.paged_kv import make_paged_kv

    for batch, context in ((64, 4096), (8, 32768), (256, 1024), (1, 4096)):
        kv = make_paged_kv([context] * batch, KV_HEADS, HEAD_DIM, BLOCK_SIZE, torch.bfloat16,
                           "cuda")
        q = torch.randn(batch, Q_HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
        args = (q, kv.kv_layer, kv.block_tables, kv.seq_lens, HEAD_DIM**-0.5)
        plan = decode_plan(batch, KV_HEADS, kv.block_tables.shape[1] * BLOCK_SIZE)
        kv_bytes = batch * context * KV_HEADS * HEAD_DIM * 2 * 2
        yield KernelCase("paged_decode_attention",
                         {"batch": batch, "context": context, "q_heads": Q_HEADS,
                          "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "block_size": BLOCK_SIZE,
                          "dtype": "bf16"},
                         functools.partial(paged_decode_attention, *args),
                         bytes_moved=kv_bytes + 2 * q.numel() * 2 + kv.block_tables.numel() * 4,
                         ref=functools.partial(paged_decode_attention_ref, *args),
                         launch={"num_splits": plan.num_splits, "split_tokens": plan.split_tokens,
                                 "block_n": plan.block_n, "num_warps": plan.num_warps,
                                 "num_stages": plan.num_stages})


def mla_decode_work(batch: int, context: int, heads: int, latent_dim: int, kv_lora_rank: int,
                    elt: int) -> tuple[int, int]:
    """(bytes, flops) of one absorbed-MLA decode step: every latent read once, q in, out back;
    per head and token a latent_dim dot for the score and a kv_lora_rank-wide weighted sum."""
    bytes_moved = batch * context * latent_dim * elt + batch * heads * (latent_dim
                                                                         + kv_lora_rank) * elt
    return bytes_moved, 2 * batch * heads * context * (latent_dim + kv_lora_rank)


def _mla_decode_cases() -> Iterator[KernelCase]:
    """DeepSeek MLA decode: 16 heads (V2-Lite, V3 at TP 8) and 128 (V3), batch 1 long context
    (split along the sequence) up to batches that fill the device."""
    import torch

    from hip_kernels.paged_kv import make_paged_kv
    from hip_kernels.paged_mla_decode import (
        mla_decode_plan,
        paged_mla_decode,
        paged_mla_decode_ref,
    )

    half = -(-MLA_LATENT_DIM // 2)
    for batch, heads, context in ((1, 16, 8192), (64, 16, 4096), (8, 16, 32768),
                                  (1, 128, 8192), (32, 128, 4096)):
        kv = make_paged_kv([context] * batch, 1, half, BLOCK_SIZE, torch.bfloat16, "cuda")
        q = _bf16(batch, heads, MLA_LATENT_DIM)
        args = (q, kv.kv_layer, kv.block_tables, kv.seq_lens, MLA_QK_HEAD_DIM**-0.5,
                MLA_LORA_RANK)
        plan = mla_decode_plan(batch, heads, kv.block_tables.shape[1] * BLOCK_SIZE)
        bytes_moved, flops = mla_decode_work(batch, context, heads, MLA_LATENT_DIM,
                                             MLA_LORA_RANK, 2)
        yield KernelCase("paged_mla_decode",
                         {"model": "DeepSeek-V3", "batch": batch, "context": context,
                          "heads": heads, "latent_dim": MLA_LATENT_DIM,
                          "kv_lora_rank": MLA_LORA_RANK, "block_size": BLOCK_SIZE,
                          "dtype": "bf16"},
                         functools.partial(paged_mla_decode, *args), bytes_moved=bytes_moved,
                         flops=flops, ref=functools.partial(paged_mla_decode_ref, *args),
                         launch=asdict(plan))


def _mla_prefill_cases() -> Iterator[KernelCase]:
    """DeepSeek MLA prefill over up-projected K/V (nope 128 + rope 64, v 128): fresh prompts
    with 16 heads (V2-Lite) and 128 (V3), and a chunk over a long cached prefix."""
    import torch

    from hip_kernels.mla_prefill_attention import (
        mla_prefill_attention,
        mla_prefill_attention_ref,
    )

    nope, rope, v_dim = 128, 64, 128
    for prefix, chunk, num_seqs, heads in ((0, 4096, 2, 16), (8192, 512, 4, 16),
                                           (0, 2048, 2, 128)):
        keys, queries = num_seqs * (prefix + chunk), num_seqs * chunk
        q = _bf16(queries, heads, nope + rope)
        kv = _bf16(keys, heads, nope + v_dim)
        k_pe = _bf16(keys, rope)
        q_loc = torch.arange(num_seqs + 1, dtype=torch.int32, device="cuda") * chunk
        kv_loc = torch.arange(num_seqs + 1, dtype=torch.int32, device="cuda") * (prefix + chunk)
        args = (q[..., :nope], q[..., nope:], kv[..., :nope], k_pe, kv[..., nope:], q_loc,
                kv_loc, (nope + rope)**-0.5)
        keys_seen = num_seqs * (chunk * prefix + chunk * (chunk + 1) // 2)
        yield KernelCase("mla_prefill_attention",
                         {"model": "DeepSeek-V2-Lite" if heads == 16 else "DeepSeek-V3",
                          "num_seqs": num_seqs, "prefix": prefix, "chunk": chunk,
                          "heads": heads, "nope": nope, "rope": rope, "v": v_dim,
                          "dtype": "bf16"},
                         functools.partial(mla_prefill_attention, *args),
                         flops=2 * keys_seen * heads * (nope + rope + v_dim),
                         ref=functools.partial(mla_prefill_attention_ref, *args))


def _prefill_cases() -> Iterator[KernelCase]:
    """Causal prefill (fresh prompts) and a chunk over a long cached prefix."""
    import torch

    from hip_kernels.paged_attention import paged_prefill_attention, paged_prefill_attention_ref
    from hip_kernels.paged_kv import make_paged_kv

    for prefix, chunk, num_seqs in ((0, 2048, 8), (8192, 512, 4)):
        kv = make_paged_kv([prefix + chunk] * num_seqs, KV_HEADS, HEAD_DIM, BLOCK_SIZE,
                           torch.bfloat16, "cuda")
        starts = torch.arange(num_seqs + 1, dtype=torch.int32, device="cuda") * chunk
        q = torch.randn(num_seqs * chunk, Q_HEADS, HEAD_DIM, dtype=torch.bfloat16,
                        device="cuda")
        args = (q, kv.kv_layer, kv.block_tables, starts, kv.seq_lens, HEAD_DIM**-0.5)
        keys_seen = num_seqs * (chunk * prefix + chunk * (chunk + 1) // 2)
        yield KernelCase("paged_prefill_attention",
                         {"num_seqs": num_seqs, "prefix": prefix, "chunk": chunk,
                          "q_heads": Q_HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM,
                          "block_size": BLOCK_SIZE, "dtype": "bf16"},
                         functools.partial(paged_prefill_attention, *args),
                         flops=4 * keys_seen * Q_HEADS * HEAD_DIM,
                         ref=functools.partial(paged_prefill_attention_ref, *args))


def _elementwise_cases() -> Iterator[KernelCase]:
    """rms_norm, fused_add_rms_norm, rotary, silu_and_mul, reshape_and_cache at 8192 tokens."""
    import torch

    from hip_kernels import reshape_and_cache as rc
    from hip_kernels import rms_norm as rn
    from hip_kernels import rotary_embedding as rope
    from hip_kernels import silu_and_mul as sm

    tokens, elt = 8192, 2
    x, res, w = _bf16(tokens, HIDDEN), _bf16(tokens, HIDDEN), _bf16(HIDDEN)
    config = {"tokens": tokens, "hidden": HIDDEN, "dtype": "bf16"}
    yield KernelCase("rms_norm", config, lambda: rn.rms_norm(x, w, 1e-5),
                     bytes_moved=2 * x.numel() * elt, ref=lambda: rn.rms_norm_ref(x, w, 1e-5))
    yield KernelCase("fused_add_rms_norm", config,
                     lambda: rn.fused_add_rms_norm(x, res, w, 1e-5),
                     bytes_moved=4 * x.numel() * elt,
                     ref=lambda: rn.fused_add_rms_norm_ref(x, res, w, 1e-5))
    gate_up = _bf16(tokens, 2 * INTER)
    yield KernelCase("silu_and_mul", {"tokens": tokens, "inter": INTER, "dtype": "bf16"},
                     lambda: sm.silu_and_mul(gate_up), bytes_moved=3 * tokens * INTER * elt,
                     ref=lambda: sm.silu_and_mul_ref(gate_up))
    qkv = _bf16(tokens, (Q_HEADS + 2 * KV_HEADS) * HEAD_DIM)
    q = qkv[:, :Q_HEADS * HEAD_DIM].view(tokens, Q_HEADS, HEAD_DIM)
    k = qkv[:, Q_HEADS * HEAD_DIM:(Q_HEADS + KV_HEADS) * HEAD_DIM].view(tokens, KV_HEADS,
                                                                        HEAD_DIM)
    v = qkv[:, (Q_HEADS + KV_HEADS) * HEAD_DIM:].view(tokens, KV_HEADS, HEAD_DIM)
    cache = rope.make_cos_sin_cache(8192, HEAD_DIM, 500000.0, device="cuda")
    positions = torch.randperm(8192, device="cuda")[:tokens]
    heads_config = {"tokens": tokens, "q_heads": Q_HEADS, "kv_heads": KV_HEADS,
                    "head_dim": HEAD_DIM, "dtype": "bf16"}
    yield KernelCase("rotary_embedding", heads_config,
                     lambda: rope.rotary_embedding(positions, q, k, cache),
                     bytes_moved=2 * tokens * (Q_HEADS + KV_HEADS) * HEAD_DIM * elt
                     + tokens * HEAD_DIM * 4,
                     ref=lambda: rope.rotary_embedding_ref(positions, q, k, cache))
    kv_layer = _bf16(tokens // BLOCK_SIZE + 1, 2, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    slots = torch.randperm(tokens, device="cuda")
    yield KernelCase("reshape_and_cache", {**heads_config, "block_size": BLOCK_SIZE},
                     lambda: rc.reshape_and_cache(k, v, kv_layer, slots),
                     bytes_moved=4 * tokens * KV_HEADS * HEAD_DIM * elt,
                     ref=lambda: rc.reshape_and_cache_ref(k, v, kv_layer, slots))


def _kv_block_cases() -> Iterator[KernelCase]:
    """256 Llama-3-8B blocks (32 layers, 2 MiB each) between cache and staging."""
    import torch

    from hip_kernels import kv_blocks

    num_ids, num_blocks = 256, 1024
    cache = torch.randn(num_blocks, 32, 2, BLOCK_SIZE, KV_HEADS, HEAD_DIM,
                        dtype=torch.bfloat16, device="cuda")
    staging = torch.empty(num_ids, *cache.shape[1:], dtype=cache.dtype, device="cuda")
    ids = torch.randperm(num_blocks, device="cuda")[:num_ids].to(torch.int32)
    config = {"num_blocks": num_ids, "block_bytes": cache[0].numel() * 2, "dtype": "bf16"}
    moved = 2 * staging.numel() * 2
    yield KernelCase("gather_kv_blocks", config,
                     lambda: kv_blocks.gather_kv_blocks(cache, ids, staging), bytes_moved=moved,
                     ref=lambda: kv_blocks.gather_kv_blocks_ref(cache, ids, staging))
    yield KernelCase("scatter_kv_blocks", config,
                     lambda: kv_blocks.scatter_kv_blocks(staging, ids, cache), bytes_moved=moved,
                     ref=lambda: kv_blocks.scatter_kv_blocks_ref(staging, ids, cache))


def moe_work(num_tokens: int, num_active_experts: int, top_k: int, hidden: int, inter: int,
             elt: int) -> tuple[int, int]:
    """(bytes, flops) of one MoE MLP: each active expert's w13 + w2 read once, x in, out back."""
    weight_bytes = num_active_experts * 3 * hidden * inter * elt
    return weight_bytes + 2 * num_tokens * hidden * elt, 6 * num_tokens * top_k * hidden * inter


def _dense_mlp_pair(a_up: Any, w_up: Any, a_down: Any, w_down: Any) -> None:
    """[T*K, H] x [H, 2I] and [T*K, I] x [I, H]: the flops of a MoE layer as two dense GEMMs."""
    import torch

    torch.matmul(a_up, w_up)
    torch.matmul(a_down, w_down)


def _fused_moe_cases() -> Iterator[KernelCase]:
    """Qwen3-30B-A3B's MoE MLP, softmax-top-8 routing: decode (1, 64 tokens), prefill (4096)."""
    import torch

    from hip_kernels.fused_moe import fused_moe, fused_moe_ref, moe_plan

    experts, top_k, hidden, inter = MOE_EXPERTS, MOE_TOP_K, MOE_HIDDEN, MOE_INTER
    w13 = _bf16(experts, 2 * inter, hidden).mul_(hidden**-0.5)
    w2 = _bf16(experts, hidden, inter).mul_(inter**-0.5)
    w_up, w_down = _bf16(hidden, 2 * inter), _bf16(inter, hidden)
    for tokens in (1, 64, 4096):
        x = _bf16(tokens, hidden)
        probs = torch.softmax(torch.randn(tokens, experts, device="cuda"), dim=-1)
        weights, ids = torch.topk(probs, top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        num_active = int(torch.unique(ids).numel())
        bytes_moved, flops = moe_work(tokens, num_active, top_k, hidden, inter, 2)
        args = (x, w13, w2, weights, ids)
        yield KernelCase("fused_moe",
                         {"model": "Qwen3-30B-A3B", "tokens": tokens, "experts": experts,
                          "top_k": top_k, "hidden": hidden, "inter": inter,
                          "active_experts": num_active, "dtype": "bf16"},
                         functools.partial(fused_moe, *args), bytes_moved=bytes_moved,
                         flops=flops, ref=functools.partial(fused_moe_ref, *args),
                         launch=asdict(moe_plan(tokens * top_k, experts)),
                         dense=functools.partial(_dense_mlp_pair,
                                                 _bf16(tokens * top_k, hidden), w_up,
                                                 _bf16(tokens * top_k, inter), w_down))


def _fp8_gemm_cases() -> Iterator[KernelCase]:
    """Llama-3-8B's qkv and down projections with 128x128-block fp8 weights: decode (1, 64
    tokens: bound by the weight bytes, half of bf16's) and prefill (4096: compute), each beside
    the bf16 torch.matmul of the same shape (ratio_to_dense)."""
    import torch

    from disagg.models.quant import quantize_fp8
    from hip_kernels.fp8_gemm import fp8_gemm, fp8_gemm_ref, gemm_plan

    for name, n, k in (("qkv", (Q_HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN),
                       ("down", HIDDEN, INTER)):
        dense_w = _bf16(k, n).mul_(k**-0.5)
        w, scale = quantize_fp8(dense_w.t().contiguous(), 128, 128)
        for tokens in (1, 64, 4096):
            x = _bf16(tokens, k)
            weight_bytes = n * k + 4 * scale.numel()
            yield KernelCase("fp8_gemm",
                             {"model": "Llama-3-8B", "proj": name, "tokens": tokens, "n": n,
                              "k": k, "scales": "128x128 blocks", "x_dtype": "bf16",
                              "w_dtype": str(w.dtype).removeprefix("torch.")},
                             functools.partial(fp8_gemm, x, w, scale),
                             # decode is held to the copy ceiling, prefill to the matmul one
                             bytes_moved=(weight_bytes + (tokens * k + tokens * n) * 2
                                          if tokens <= 64 else 0),
                             flops=2 * tokens * n * k,
                             ref=functools.partial(fp8_gemm_ref, x, w, scale),
                             launch=asdict(gemm_plan(tokens)),
                             dense=functools.partial(torch.matmul, x, dense_w))


def _skinny_gemm_cases() -> Iterator[KernelCase]:
    """Llama-3-8B's four projections at decode's 1-8 tokens, bound by the weight bytes, each
    beside F.linear (the vendor BLAS) of the same shape (ratio_to_dense > 1: faster)."""
    import torch.nn.functional as F

    from hip_kernels.skinny_gemm import skinny_gemm, skinny_gemm_ref, skinny_plan

    for name, n, k in (("qkv", (Q_HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN),
                       ("o_proj", HIDDEN, Q_HEADS * HEAD_DIM), ("gate_up", 2 * INTER, HIDDEN),
                       ("down", HIDDEN, INTER)):
        w = _bf16(n, k).mul_(k**-0.5)
        for tokens in (1, 2, 4, 8):
            x = _bf16(tokens, k)
            yield KernelCase("skinny_gemm",
                             {"model": "Llama-3-8B", "proj": name, "tokens": tokens, "n": n,
                              "k": k},
                             functools.partial(skinny_gemm, x, w),
                             bytes_moved=(n * k + tokens * k + tokens * n) * 2,
                             ref=functools.partial(skinny_gemm_ref, x, w),
                             launch=asdict(skinny_plan(tokens)),
                             dense=functools.partial(F.linear, x, w))


CASE_GROUPS: dict[str, Callable[[], Iterator[KernelCase]]] = {
    "paged_decode_attention": _decode_cases,
    "paged_mla_decode": _mla_decode_cases,
    "mla_prefill_attention": _mla_prefill_cases,
    "fp8_gemm": _fp8_gemm_cases,
    "skinny_gemm": _skinny_gemm_cases,
    "paged_prefill_attention": _prefill_cases,
    "elementwise": _elementwise_cases,
    "kv_blocks": _kv_block_cases,
    "fused_moe": _fused_moe_cases,
}


def measure(case: KernelCase, ceilings: dict[str, float], iters: int, flush: Any
            ) -> dict[str, Any]:
    """Time one case (and its reference); the result part of its JSON row."""
    times = time_ms(case.run, iters, 5, flush)
    ms = statistics.median(times)
    row: dict[str, Any] = {"kernel": case.kernel, "config": case.config, "launch": case.launch,
                           "median_ms": ms, "min_ms": min(times), "iters": iters}
    if case.bytes_moved:
        row["achieved_gbps"] = case.bytes_moved / ms / 1e6
        row["ceiling_gbps"] = ceilings["copy_gbps"]
        row["ratio_to_ceiling"] = row["achieved_gbps"] / ceilings["copy_gbps"]
    if case.flops:
        row["achieved_tflops"] = case.flops / ms / 1e9
        row["ceiling_tflops"] = ceilings["matmul_tflops"]
        row.setdefault("ratio_to_ceiling", row["achieved_tflops"] / ceilings["matmul_tflops"])
    if case.dense is not None:
        row["dense_median_ms"] = statistics.median(time_ms(case.dense, iters, 5, flush))
        row["ratio_to_dense"] = row["dense_median_ms"] / ms
    if case.ref is not None:
        row["ref_median_ms"] = statistics.median(time_ms(case.ref, max(3, iters // 5), 1, flush))
        row["speedup_vs_ref"] = row["ref_median_ms"] / ms
    return row


def _metadata(commit: str | None) -> dict[str, Any]:
    """Commit, hardware and versions (triton and the config arch included)."""
    import torch
    import triton

    from bench.metadata import run_metadata
    from disagg.common.platform import current_platform

    meta = run_metadata()
    meta["versions"] = {**meta["versions"], "triton": triton.__version__,
                        "torch_hip": torch.version.hip, "torch_cuda": torch.version.cuda}
    meta["arch"] = current_platform().arch
    if commit:
        meta["commit"] = commit
    return meta


def _summary(row: dict[str, Any]) -> str:
    """One line for the console."""
    config = " ".join(f"{k}={v}" for k, v in row["config"].items() if k != "dtype")
    if "achieved_gbps" in row:
        rate = f"{row['achieved_gbps']:8.1f} GB/s   "
    else:
        rate = f"{row['achieved_tflops']:8.1f} TFLOP/s"
    extra = f"  x{row['speedup_vs_ref']:.1f} vs torch" if "speedup_vs_ref" in row else ""
    if "achieved_gbps" in row and "achieved_tflops" in row:
        extra += f"  {row['achieved_tflops']:.1f} TFLOP/s"
    if "ratio_to_dense" in row:
        extra += f"  {row['ratio_to_dense']:.2f}x dense GEMM speed"
    return (f"{row['kernel']:<24} {row['median_ms']:8.3f} ms {rate} "
            f"{100 * row['ratio_to_ceiling']:5.1f}% of ceiling{extra}  [{config}]")


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(prog="python -m bench.kernel_bench",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", default=",".join(CASE_GROUPS),
                        help="comma list of: " + ", ".join(CASE_GROUPS))
    parser.add_argument("--iters", type=int, default=50, help="timed runs per case")
    parser.add_argument("--output", type=Path, default=RESULTS_PATH,
                        help="JSON-lines file the rows are appended to")
    parser.add_argument("--commit", default=None,
                        help="commit to record when this copy is not a git checkout")
    return parser


def readme_cells(row: dict[str, Any]) -> dict[str, Any]:
    """kind/model/workload/command/figures keys for the README table."""
    cfg = row.get("config", {})
    if "achieved_gbps" in row:
        rate = f"{row['achieved_gbps']:.0f} GB/s"
    else:
        rate = f"{row.get('achieved_tflops', 0):.0f} TFLOP/s"
    figures = {"achieved": rate,
               "of measured ceiling": f"{100 * row['ratio_to_ceiling']:.1f}%",
               "median": f"{row['median_ms'] * 1000:.0f} us"}
    if "ratio_to_dense" in row:
        figures["vs dense GEMM of the same flops"] = f"{row['ratio_to_dense']:.2f}x"
    return {"kind": "kernels", "model": f"{cfg.get('model', 'Llama-3-8B')} shapes, bf16",
            "workload": f"{row['kernel']} " + ", ".join(f"{k}={v}" for k, v in cfg.items()
                                                         if k not in ("dtype", "model")),
            "command": "python -m bench.kernel_bench",
            "figures": figures}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 2 on a machine without a GPU or for an unknown kernel group."""
    args = build_parser().parse_args(argv)
    groups = [name.strip() for name in args.kernels.split(",") if name.strip()]
    unknown = [name for name in groups if name not in CASE_GROUPS]
    if unknown:
        print(f"kernel_bench: unknown --kernels {unknown}; choose from {list(CASE_GROUPS)}",
              file=sys.stderr)
        return 2
    from disagg.common.platform import is_gpu

    if not is_gpu():
        print("kernel_bench: needs a GPU (ROCm or CUDA); none is visible on this machine",
              file=sys.stderr)
        return 2
    import torch

    flush = torch.empty(FLUSH_BYTES, dtype=torch.int8, device="cuda")
    ceilings = measure_ceilings(max(5, args.iters // 5), flush)
    meta = _metadata(args.commit)
    print(f"ceilings: copy {ceilings['copy_gbps']:.0f} GB/s (read+write), "
          f"bf16 matmul {ceilings['matmul_tflops']:.0f} TFLOP/s on {meta['hardware']['summary']}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    for group in groups:
        for case in CASE_GROUPS[group]():
            row = {"bench": "kernels", **meta, "ceilings": ceilings,
                   **measure(case, ceilings, args.iters, flush)}
            row.update(readme_cells(row))
            with args.output.open("a", encoding="utf-8") as f:
                f.write(json.dumps(row, allow_nan=False) + "\n")
            print(_summary(row), flush=True)
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
