#!/usr/bin/env bash
# Issue 20's GPU figures on one GPU: the fp8 / MLA kernels' GPU tests, their kernel rows, and
# engine rows (decode vs roofline, prefill vs matmul, bytes per token) for bf16 against fp8.
# Usage: bash bench/fp8_mla_gpu.sh OUT_DIR COMMIT PART
#   PART kernels: GPU tests of fp8_gemm, kv_fp8, mla_prefill_attention, paged_mla_decode;
#                 kernel_bench groups fp8_gemm and mla_prefill_attention; DeepSeek-V2-Lite
#                 shape with bf16 and fp8 KV
#   PART llama:   Llama-3-8B shape: bf16, fp8 weights, fp8 KV, both
# Rows go to OUT_DIR/{kernels,engine}.jsonl (copy them into bench/results/).
set -euo pipefail
out="${1:?usage: fp8_mla_gpu.sh OUT_DIR COMMIT PART}"
commit="${2:?commit}"
part="${3:?part: kernels | llama}"
mkdir -p "$out"
engine() {  # SHAPE [FLAGS...]
  python3 -m bench.engine_bench --shape "$@" --output "$out/engine.jsonl" --commit "$commit" \
    2>&1 | grep -v "^\s*$" | tail -6
}
case "$part" in
  kernels)
    python3 -m pytest -q -p no:cacheprovider -m gpu tests/hip_kernels/test_fp8_gemm.py \
      tests/hip_kernels/test_kv_fp8.py tests/hip_kernels/test_mla_prefill_attention.py \
      tests/hip_kernels/test_paged_mla_decode.py 2>&1 | tail -15
    python3 -m bench.kernel_bench --kernels fp8_gemm,mla_prefill_attention \
      --output "$out/kernels.jsonl" --commit "$commit" 2>&1 | tail -20
    engine deepseek-v2-lite
    engine deepseek-v2-lite --kv-cache-dtype fp8
    ;;
  llama)
    engine llama3-8b
    engine llama3-8b --quantization fp8
    engine llama3-8b --kv-cache-dtype fp8
    engine llama3-8b --quantization fp8 --kv-cache-dtype fp8
    ;;
  *) echo "unknown PART $part"; exit 2 ;;
esac
