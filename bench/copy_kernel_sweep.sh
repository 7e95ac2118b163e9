#!/usr/bin/env bash
# Sweep the ipc copy kernel's launch config (hip_kernels/configs/*/kv_blocks.json copy_*) on a
# 2-GPU host: 512 MiB as 256 scattered 2 MiB blocks, read and write, one row per point in
# OUT_DIR/transfer.jsonl (the config is in the row's options).
# Usage: bash bench/copy_kernel_sweep.sh OUT_DIR
set -uo pipefail
out="${1:?usage: copy_kernel_sweep.sh OUT_DIR}"
mkdir -p "$out"
for cfg in "4096 32768 8" "8192 32768 8" "4096 131072 8" "8192 65536 16" "2048 16384 4" \
           "16384 65536 16" "8192 262144 8"; do
  read -r block chunk warps <<<"$cfg"
  export DISAGG_KERNEL_CONFIG="{\"kv_blocks\": {\"copy_block\": $block, \"copy_chunk\": $chunk, \"copy_num_warps\": $warps}}"
  for mode in read write; do
    python3 -m bench.transfer --transport ipc --mode "$mode" --device cuda --num-blocks 256 \
      --block-bytes 2097152 --iters 10 --warmup 2 --option copy=kernel \
      --output "$out/transfer.jsonl" 2>&1 \
      | grep -E "GB/s|Error|error" | sed "s|^|$block/$chunk/$warps |" | tail -2
  done
done
