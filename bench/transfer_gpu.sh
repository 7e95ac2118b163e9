#!/usr/bin/env bash
# Transfer GB/s on a 2-GPU host: 512 MiB as 256 scattered 2 MiB KV blocks, ipc and nixl,
# read and write, defaults twice and one alternative each, against the peer-copy ceiling measured
# in the same run. One row per configuration in OUT_DIR/transfer.jsonl.
# Usage: bash bench/transfer_gpu.sh OUT_DIR
set -uo pipefail
out="${1:?usage: transfer_gpu.sh OUT_DIR}"
mkdir -p "$out"
run() {  # transport mode [option ... | ENV=value ...] (NAME=value in capitals sets the env)
  local transport=$1 mode=$2
  shift 2
  local opts=() envs=()
  for o in "$@"; do
    if [[ $o =~ ^[A-Z_]+= ]]; then envs+=("$o"); else opts+=(--option "$o"); fi
  done
  env "${envs[@]}" python3 -m bench.transfer --transport "$transport" --mode "$mode" --device cuda \
    --num-blocks 256 --block-bytes 2097152 --iters 10 --warmup 2 "${opts[@]}" \
    --output "$out/transfer.jsonl" 2>&1 | grep -E "GB/s|Error|error" | tail -2
}
for mode in read write; do
  for _ in 1 2; do
    run ipc "$mode"                       # auto: batched copy engines (CUDA 12.8+), 8 streams
    run nixl "$mode"                      # VRAM defaults: SGL, 4 UCX threads, split past 64
  done
  run ipc "$mode" streams=4
  run ipc "$mode" copy=kernel
  run nixl "$mode" sgl=false num_workers=1  # NIXL's own defaults, for comparison
done
