#!/usr/bin/env bash
# Transfer GB/s on a 2-GPU host: 512 MiB as 256 scattered 2 MiB KV blocks, ipc and nixl,
# read and write, for each transport's copy options, against the peer-copy ceiling measured
# in the same run. One row per configuration in OUT_DIR/transfer.jsonl.
# Usage: bash bench/transfer_gpu.sh OUT_DIR
set -uo pipefail
out="${1:?usage: transfer_gpu.sh OUT_DIR}"
mkdir -p "$out"
run() {  # transport mode [option ...]
  local transport=$1 mode=$2
  shift 2
  local opts=()
  for o in "$@"; do opts+=(--option "$o"); done
  python3 -m bench.transfer --transport "$transport" --mode "$mode" --device cuda \
    --num-blocks 256 --block-bytes 2097152 --iters 10 --warmup 2 "${opts[@]}" \
    --output "$out/transfer.jsonl" 2>&1 | grep -E "GB/s|Error|error" | tail -2
}
for mode in read write; do
  for copy in runtime kernel torch; do
    run ipc "$mode" copy=$copy
  done
  run nixl "$mode"
  run nixl "$mode" num_workers=4 split=8
done
