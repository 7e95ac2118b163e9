#!/usr/bin/env bash
# 1P1D on ONE GPU, prefix caching on vs off: a Llama-3-8B-shaped dummy-weight bf16 model, the
# prefill and the decode instance sharing GPU 0 (each with its own KV budget), KV moved over
# the ipc transport (a copy inside the GPU), a static proxy in front. Runs the multi-turn and
# the shared-prefix workloads and appends one row per run to OUT_DIR/serve.jsonl (full result
# JSON beside it). Hit rate and KV bytes per request come from both instances' /metrics.
# Usage: bash bench/prefix_cache_gpu.sh OUT_DIR [COMMIT]
# A CPU dry run of the script itself: MODEL=builtin:tiny-llama DEVICE=cpu TRANSPORT=tcp
#   MAX_LEN=4096 KV_BYTES=64MiB SYSTEM_LEN=256 CONVERSATIONS=4 PROMPTS=16 bash bench/prefix_cache_gpu.sh /tmp/x
set -euo pipefail
out="${1:?usage: prefix_cache_gpu.sh OUT_DIR [COMMIT]}"
commit="${2:-}"
device="${DEVICE:-cuda}" transport="${TRANSPORT:-ipc}" kv_bytes="${KV_BYTES:-24GiB}"
system_len="${SYSTEM_LEN:-2048}" conversations="${CONVERSATIONS:-64}" prompts="${PROMPTS:-256}"
mkdir -p "$out"
model_dir="${MODEL:-}"
if [ -z "$model_dir" ]; then
  model_dir=$(mktemp -d)
  python3 - "$model_dir" <<'PY'
import json, sys
from bench.engine_bench import SHAPES
json.dump(SHAPES["llama3-8b"], open(sys.argv[1] + "/config.json", "w"))
PY
fi
pids=()
stop_all() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  pids=()
}
trap stop_all EXIT
wait_ready() {  # LOG NAME
  for _ in $(seq 1 480); do grep -q "ready on" "$1" && return 0; sleep 0.5; done
  echo "$2 not ready:"; tail -20 "$1"; return 1
}
instance() {  # ROLE PORT KV_PORT CACHING LOG
  local cfg
  cfg="{\"kv_connector\":\"PDConnector\",\"kv_role\":\"$1\",\"kv_connector_extra_config\":"
  cfg+="{\"transport\":\"$transport\",\"mode\":\"read\",\"base_port\":$3}}"
  CUDA_VISIBLE_DEVICES=0 python3 -m disagg.cli serve "$model_dir" --load-format dummy \
    --device "$device" --host 127.0.0.1 --port "$2" --max-model-len "${MAX_LEN:-8192}" \
    --kv-cache-memory-bytes "$kv_bytes" --served-model-name llama3-8b-dummy \
    "--$4" --kv-transfer-config "$cfg" >"$5" 2>&1 &
  pids+=($!)
}
for caching in enable-prefix-caching no-enable-prefix-caching; do
  tag=$([ "$caching" = enable-prefix-caching ] && echo on || echo off)
  instance kv_producer 28100 29100 "$caching" "$out/prefill-$tag.log"
  wait_ready "$out/prefill-$tag.log" prefill
  instance kv_consumer 28101 29200 "$caching" "$out/decode-$tag.log"
  wait_ready "$out/decode-$tag.log" decode
  python3 -m proxy.launcher --port 28000 --prefill http://127.0.0.1:28100 \
    --decode http://127.0.0.1:28101 --model "$model_dir" >"$out/proxy-$tag.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 1 60); do curl -sf http://127.0.0.1:28000/health >/dev/null && break; sleep 0.5; done
  common=(--base-url http://127.0.0.1:28000 --model llama3-8b-dummy --tokenizer builtin:tiny-llama
          --max-concurrency 16 --num-warmups 2 --metrics-url http://127.0.0.1:28100
          --metrics-url http://127.0.0.1:28101 --disable-tqdm --save-result --result-dir "$out"
          --results-jsonl "$out/serve.jsonl"
          --deployment "1P1D on one GPU (P and D share it, $kv_bytes KV each), $transport READ, prefix caching $tag")
  [ -n "$commit" ] && common+=(--label "commit $commit")
  python3 -m bench.cli serve "${common[@]}" --dataset-name multi-turn \
    --multi-turn-conversations "$conversations" --multi-turn-turns 4 \
    --multi-turn-system-len "$system_len" \
    --multi-turn-user-len 128 --multi-turn-output-len 64 \
    --result-filename "$tag-multi-turn.json" 2>&1 | tail -30
  python3 -m bench.cli serve "${common[@]}" --dataset-name shared-prefix --num-prompts "$prompts" \
    --shared-prefix-groups 4 --shared-prefix-len "$system_len" --random-input-len 128 \
    --random-output-len 64 --result-filename "$tag-shared-prefix.json" 2>&1 | tail -30
  stop_all
done
