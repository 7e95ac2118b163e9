"""GPU engine benchmark: decode step vs the HBM roofline, 4k prefill vs the matmul ceiling, and
offline throughput (optionally against transformers' continuous batching in the same command).

    python -m bench.engine_bench --shape llama3-8b [--throughput] [--hf-baseline]
    python -m bench.engine_bench --shape qwen3-30b-a3b --throughput      # MoE

For an MoE shape the roofline counts the bytes a step actually reads: every non-expert weight,
the experts the batch routes to (exactly top-k at batch 1; at batch b the expected number of
distinct experts under uniform routing, E (1 - (1 - k/E)^b), per MoE layer) and the KV; the
prefill's FLOPs count the active experts only (top-k per token).

Ceilings are measured in the same run: device copy bandwidth (bytes read + written per second,
as bench/kernel_bench.py does) and a bf16 8192^3 matmul. Rows go to bench/results/engine.jsonl.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SHAPES: dict[str, dict[str, Any]] = {
    "llama3-8b": {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
                  "intermediate_size": 14336, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                  "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
                  "rope_theta": 500000.0, "tie_word_embeddings": False,
                  "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16"},
    "qwen3-30b-a3b": {"model_type": "qwen3_moe", "vocab_size": 151936, "hidden_size": 2048,
                      "intermediate_size": 6144, "moe_intermediate_size": 768,
                      "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True,
                      "decoder_sparse_step": 1, "mlp_only_layers": [],
                      "num_hidden_layers": 48, "num_attention_heads": 32,
                      "num_key_value_heads": 4, "head_dim": 128,
                      "max_position_embeddings": 40960, "rms_norm_eps": 1e-6,
                      "rope_theta": 1000000.0, "tie_word_embeddings": False,
                      "bos_token_id": 151643, "eos_token_id": 151645, "torch_dtype": "bfloat16"},
    "deepseek-v2-lite": {"model_type": "deepseek_v2", "vocab_size": 102400, "hidden_size": 2048,
                         "intermediate_size": 10944, "moe_intermediate_size": 1408,
                         "n_routed_experts": 64, "n_shared_experts": 2, "num_experts_per_tok": 6,
                         "first_k_dense_replace": 1, "topk_method": "greedy",
                         "norm_topk_prob": False, "routed_scaling_factor": 1.0,
                         "num_hidden_layers": 27, "num_attention_heads": 16,
                         "num_key_value_heads": 16, "q_lora_rank": None, "kv_lora_rank": 512,
                         "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
                         "max_position_embeddings": 163840, "rms_norm_eps": 1e-6,
                         "rope_theta": 10000.0,
                         "rope_scaling": {"type": "yarn", "factor": 40, "beta_fast": 32,
                                          "beta_slow": 1, "mscale": 0.707,
                                          "mscale_all_dim": 0.707,
                                          "original_max_position_embeddings": 4096},
                         "tie_word_embeddings": False, "bos_token_id": 100000,
                         "eos_token_id": 100001, "torch_dtype": "bfloat16"},
}


class _Cost:
    """Bytes a decode step reads and FLOPs a prefill does, from the model's shape: the weights
    as loaded (``weight_bytes``; routed experts at ``expert_elt`` bytes per parameter: 1 when
    fp8) and the KV cache at ``kv_elt`` bytes per element. FLOPs count parameters, whatever
    their storage."""

    def __init__(self, shape: str, weight_bytes: int, kv_elt: int = 2,
                 expert_elt: int = 2) -> None:
        from disagg.models.arch import arch_from_hf_dict
        from disagg.models.loader import hf_param_shapes

        a = self.arch = arch_from_hf_dict(SHAPES[shape])
        self.kv_per_token = a.kv_bytes_per_token_per_elt * kv_elt
        moe = a.moe
        self.expert_params = 3 * a.hidden_size * moe.intermediate_size if moe else 0
        self.expert_bytes = self.expert_params * expert_elt
        self.moe_layers = len(moe.layers) if moe else 0
        num_experts = moe.num_experts if moe else 0
        self.dense_bytes = weight_bytes - self.moe_layers * num_experts * self.expert_bytes
        total = sum(math.prod(s) for s in hf_param_shapes(a).values())
        self.dense_params = total - self.moe_layers * num_experts * self.expert_params

    def experts_read(self, batch: int) -> float:
        """Expected distinct experts per MoE layer for ``batch`` tokens."""
        moe = self.arch.moe
        if moe is None:
            return 0.0
        if batch == 1:
            return float(moe.top_k)
        return moe.num_experts * (1 - (1 - moe.top_k / moe.num_experts) ** batch)

    def decode_bytes(self, batch: int, context: int) -> float:
        """Weights read once per step (active experts only) plus every sequence's KV."""
        return (self.dense_bytes + self.moe_layers * self.experts_read(batch) * self.expert_bytes
                + batch * context * self.kv_per_token)

    def prefill_flops(self, tokens: int) -> float:
        """Matmul FLOPs: every active weight except the embedding and LM head (the last token
        only), plus causal attention."""
        a, moe = self.arch, self.arch.moe
        embed = (1 if a.tie_word_embeddings else 2) * a.vocab_size * a.hidden_size
        active = self.dense_params - embed + (self.moe_layers * moe.top_k * self.expert_params
                                              if moe else 0)
        qk, pv = (a.mla.qk_nope_head_dim + a.mla.qk_rope_head_dim, a.mla.v_head_dim) \
            if a.mla else (a.head_dim, a.head_dim)
        attn = 2 * a.num_layers * a.num_heads * (qk + pv) * tokens * tokens / 2
        return 2 * active * tokens + attn


def _ceilings() -> dict[str, float]:
    import torch

    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    for _ in range(3):
        y.copy_(x)
        a @ a
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        y.copy_(x)
    torch.cuda.synchronize()
    copy_gbps = 2 * x.numel() * 20 / (time.perf_counter() - t0) / 1e9
    t0 = time.perf_counter()
    for _ in range(10):
        a @ a
    torch.cuda.synchronize()
    tflops = 2 * 8192**3 * 10 / (time.perf_counter() - t0) / 1e12
    del x, y, a
    torch.cuda.empty_cache()
    return {"copy_gbps": copy_gbps, "matmul_tflops": tflops}


def _model_dir(shape: str) -> str:
    path = tempfile.mkdtemp(prefix=f"disagg-{shape}-")
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(SHAPES[shape], f)
    return path


def _param_bytes(llm: Any) -> int:
    return sum(p.numel() * p.element_size() for p in llm.engine.runner.model.parameters())


def _decode(llm: Any, batch: int, context: int, steps: int) -> float:
    """Mean step time (ms) of ``steps`` decode-only steps run back to back for ``batch``
    sequences at ``context``."""
    import torch

    from disagg.common.protocol import EngineCoreRequest
    from disagg.common.sampling_params import SamplingParams

    eng = llm.engine
    sp = SamplingParams(max_tokens=steps + 8, temperature=0, ignore_eos=True)
    for i in range(batch):
        eng.add_request(EngineCoreRequest(request_id=f"dec-{batch}-{i}", sampling_params=sp,
                                          prompt_token_ids=[(i * 7 + j) % 30000 + 10
                                                            for j in range(context)]))
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in eng.scheduler.requests.values()):
        eng.step()
    for _ in range(3):  # into the steady state (async scheduling: a step launched ahead)
        eng.step()
    # back to back, as serving runs them: with async scheduling a step's host work overlaps
    # the step before it on the device, which a sync before each step would hide
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        eng.step()
    torch.cuda.synchronize()
    per_step_ms = (time.perf_counter() - t0) * 1000 / steps
    while eng.has_work():
        eng.step()
    return per_step_ms


def _prefill(llm: Any, tokens: int) -> float:
    """Seconds for one prefill step of ``tokens`` tokens (one sequence, max_tokens=1); each
    repetition's prompt is new, so the prefix cache holds none of it."""
    import torch

    from disagg.common.protocol import EngineCoreRequest
    from disagg.common.sampling_params import SamplingParams

    eng = llm.engine
    best = float("inf")
    for rep in range(3):
        eng.add_request(EngineCoreRequest(
            request_id=f"pf-{rep}",
            prompt_token_ids=[(j * 13 + 7919 * (rep + 1)) % 30000 + 5 for j in range(tokens)],
            sampling_params=SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        while eng.has_work():
            eng.step()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def _workload(n: int, seed: int = 0, fixed_out: int | None = None
              ) -> tuple[list[list[int]], list[int]]:
    """n random-id prompts of 100-1024 tokens; outputs 100-1024 tokens, or all ``fixed_out``."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(10, 30000) for _ in range(rng.randint(100, 1024))] for _ in range(n)]
    outs = [fixed_out or rng.randint(100, 1024) for _ in range(n)]
    return prompts, outs


def _throughput(llm: Any, n: int, fixed_out: int | None = None) -> dict[str, float]:
    from disagg.common.sampling_params import SamplingParams

    prompts, outs = _workload(n, fixed_out=fixed_out)
    sps = [SamplingParams(max_tokens=o, temperature=0, ignore_eos=True) for o in outs]
    t0 = time.perf_counter()
    results = llm.generate(prompts, sps)
    dt = time.perf_counter() - t0
    out_tokens = sum(len(r.output_token_ids) for r in results)
    return {"seconds": dt, "output_tokens": out_tokens, "output_tok_s": out_tokens / dt,
            "total_tok_s": (out_tokens + sum(map(len, prompts))) / dt}


def _hf_baseline(model_dir: str, n: int) -> dict[str, float]:
    """transformers' own continuous batching on the same workload (max_new_tokens = 512)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    cfg = AutoConfig.from_pretrained(model_dir)
    with torch.device("cuda"):  # initialise the random weights on the GPU, not the CPU
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16,
                                                 attn_implementation="sdpa").eval()
    prompts, _ = _workload(n, fixed_out=512)
    gen = GenerationConfig(max_new_tokens=512, do_sample=False, eos_token_id=-1,
                           pad_token_id=0)
    t0 = time.perf_counter()
    out = model.generate_batch(inputs=prompts, generation_config=gen)
    dt = time.perf_counter() - t0
    tokens = sum(len(v.generated_tokens) for v in out.values())
    del model
    torch.cuda.empty_cache()
    return {"seconds": dt, "output_tokens": tokens, "output_tok_s": tokens / dt}


def _readme_cells(row: dict[str, Any]) -> dict[str, Any]:
    figures = {f"decode b{b}": f"{row[f'decode_b{b}']['tok_s']:.0f} tok/s "
                               f"({row[f'decode_b{b}']['ratio_to_roofline']:.2f}x roofline)"
               for b in (1, 64)}
    if "prefill_4k" in row:
        figures["prefill 4k"] = f"{100 * row['prefill_4k']['ratio_to_matmul']:.0f}% of matmul"
    if "throughput" in row:
        figures["offline"] = f"{row['throughput']['output_tok_s']:.0f} out tok/s"
    if "hf_generate_batch" in row and "throughput" in row:
        speedup = row["throughput"]["output_tok_s"] / row["hf_generate_batch"]["output_tok_s"]
        figures["vs transformers"] = f"{speedup:.1f}x"

    figures["weights + KV per step"] = (f"{row['weight_bytes'] / 2**30:.2f} GiB weights, "
                                        f"{row['kv_bytes_per_token']} B KV per token")
    precision = row.get("precision", "bf16")
    flags = "".join(f" --{k.replace('_', '-')} {v}" for k, v in row.get("flags", {}).items())
    return {"model": f"{row['shape']} shape, dummy {precision}", "figures": figures,
            "workload": "decode ctx 1024; prefill 4096; offline 256 x U[100,1024] in/out",
            "command": f"python -m bench.engine_bench --throughput{flags}"}


def _make_llm(model_dir: str, quantization: str | None = None,
              kv_cache_dtype: str = "auto", async_scheduling: bool = True) -> Any:
    from disagg.llm import LLM

    return LLM(model_dir, load_format="dummy", device="cuda", dtype="bfloat16",
               max_num_seqs=256, max_num_batched_tokens=8192, max_model_len=8192,
               quantization=quantization, kv_cache_dtype=kv_cache_dtype,
               async_scheduling=async_scheduling)


def _precision(args: argparse.Namespace) -> str:
    """``bf16``, or what is fp8: ``fp8 weights``, ``fp8 KV`` or both."""
    fp8 = [what for what, on in (("weights", args.quantization == "fp8"),
                                 ("KV", args.kv_cache_dtype != "auto")) if on]
    return "bf16" if not fp8 else "fp8 " + " + ".join(fp8)


def _ours_then_free(model_dir: str, n: int) -> dict[str, float]:
    """Our throughput; the engine (and its KV cache) is gone when this returns."""
    import gc

    import torch

    llm = _make_llm(model_dir)
    result = _throughput(llm, n, fixed_out=512)
    llm.engine.close()
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return result


def _compare(args: argparse.Namespace, model_dir: str, ceil: dict[str, float]) -> int:
    """Ours and transformers on the same 256 x (U[100,1024] in, 512 out) workload."""
    ours = _ours_then_free(model_dir, args.hf_num_prompts)
    print("ours:", ours, flush=True)
    hf = _hf_baseline(model_dir, args.hf_num_prompts)
    print("transformers generate_batch:", hf, flush=True)
    from bench.metadata import run_metadata

    row = {"kind": "engine_vs_transformers", "shape": args.shape, "ceilings": ceil,
           "ours": ours, "transformers_generate_batch": hf,
           "speedup": ours["output_tok_s"] / hf["output_tok_s"],
           **run_metadata(deployment="in-process engine vs transformers, 1 GPU"),
           "model": f"{args.shape} shape, dummy bf16",
           "workload": f"{args.hf_num_prompts} prompts, U[100,1024] random ids in, 512 out, "
                       "EOS ignored",
           "command": "python -m bench.engine_bench --compare-only",
           "figures": {"ours": f"{ours['output_tok_s']:.0f} out tok/s",
                       "transformers": f"{hf['output_tok_s']:.0f} out tok/s",
                       "speedup": f"{ours['output_tok_s'] / hf['output_tok_s']:.1f}x"}}
    if args.commit:
        row["commit"] = args.commit
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with args.output.open("a") as f:
        f.write(json.dumps(row) + "\n")
    return 0


def _append(args: argparse.Namespace, row: dict[str, Any]) -> None:
    from bench.metadata import run_metadata

    out = {**row, **run_metadata(deployment="in-process engine, 1 GPU")}
    if args.commit:
        out["commit"] = args.commit
    out.update(_readme_cells(out))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with args.output.open("a") as f:
        f.write(json.dumps(out) + "\n")


def main(argv: list[str] | None = None) -> int:
    """Run the selected measurements and append one JSON row."""
    ap = argparse.ArgumentParser(prog="python -m bench.engine_bench")
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--throughput", action="store_true")
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--hf-baseline", action="store_true")
    ap.add_argument("--hf-num-prompts", type=int, default=256)
    ap.add_argument("--compare-only", action="store_true",
                    help="only the issue's comparison: 256 prompts x 512 output tokens, ours "
                         "then transformers generate_batch, same prompts, same command")
    ap.add_argument("--quantization", choices=["fp8"], default=None,
                    help="quantize the weights at load (the serve flag)")
    ap.add_argument("--kv-cache-dtype", default="auto", help="the serve flag (auto, fp8)")
    ap.add_argument("--no-async-scheduling", action="store_true", help="the serve flag")
    ap.add_argument("--output", type=Path, default=Path("bench/results/engine.jsonl"))
    ap.add_argument("--commit", default=None)
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("engine_bench: needs a GPU (CUDA or ROCm); none is visible", file=sys.stderr)
        return 2
    ceil = _ceilings()
    model_dir = _model_dir(args.shape)
    if args.compare_only:
        return _compare(args, model_dir, ceil)
    llm = _make_llm(model_dir, args.quantization, args.kv_cache_dtype,
                    not args.no_async_scheduling)
    kv_elt = llm.engine.runner.kv_cache.element_size()
    cost = _Cost(args.shape, _param_bytes(llm), kv_elt,
                 expert_elt=1 if args.quantization == "fp8" else 2)
    flags: dict[str, Any] = {
        k: v for k, v in (("quantization", args.quantization),
                          ("kv_cache_dtype", args.kv_cache_dtype)) if v not in (None, "auto")}
    if args.no_async_scheduling:
        flags["no_async_scheduling"] = ""
    row: dict[str, Any] = {"kind": "engine", "shape": args.shape, "ceilings": ceil,
                           "kernels": llm.engine.runner.ops.backend,
                           "num_gpu_blocks": llm.engine.plan.num_blocks,
                           "precision": _precision(args), "flags": flags,
                           "weight_bytes": _param_bytes(llm),
                           "kv_bytes_per_token": cost.kv_per_token}
    for batch in (1, 64):
        ms = _decode(llm, batch, args.context, args.steps)
        # copy_gbps counts bytes read + written: the rate HBM sustains in total
        roof_ms = cost.decode_bytes(batch, args.context) / (ceil["copy_gbps"] * 1e9) * 1000
        row[f"decode_b{batch}"] = {"step_ms": ms, "tok_s": batch / ms * 1000,
                                   "roofline_ms": roof_ms, "ratio_to_roofline": ms / roof_ms}
        print(f"decode batch {batch}: {ms:.2f} ms/step, roofline {roof_ms:.2f} ms", flush=True)
    secs = _prefill(llm, 4096)
    flops = cost.prefill_flops(4096)
    row["prefill_4k"] = {"seconds": secs, "tflops": flops / secs / 1e12,
                         "ratio_to_matmul": flops / secs / 1e12 / ceil["matmul_tflops"]}
    print(f"prefill 4k: {secs * 1000:.1f} ms, {flops / secs / 1e12:.0f} TFLOP/s", flush=True)
    if args.throughput:
        row["throughput"] = _throughput(llm, args.num_prompts)
        print("throughput:", row["throughput"], flush=True)
    llm.engine.close()
    del llm
    import gc

    gc.collect()
    torch.cuda.empty_cache()
    _append(args, row)  # our figures are safe on disk before the long baseline runs
    if args.hf_baseline:
        row["hf_generate_batch"] = _hf_baseline(model_dir, args.hf_num_prompts)
        print("transformers generate_batch:", row["hf_generate_batch"], flush=True)
        _append(args, row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
