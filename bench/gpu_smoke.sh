#!/usr/bin/env bash
# Serve a Llama-3-8B-shaped dummy-weight bf16 model on one GPU and measure it through HTTP:
# start `disagg serve`, send requests, run `disagg bench serve` at concurrency 1 and 64.
# Usage: bash bench/gpu_smoke.sh OUT_DIR
set -euo pipefail
out="${1:?usage: gpu_smoke.sh OUT_DIR}"
mkdir -p "$out"
model_dir=$(mktemp -d)
python3 - "$model_dir" <<'PY'
import json, sys
from bench.engine_bench import SHAPES
json.dump(SHAPES["llama3-8b"], open(sys.argv[1] + "/config.json", "w"))
PY
port=18000
python3 -m disagg.cli serve "$model_dir" --load-format dummy --device cuda --port $port \
  --max-model-len 4096 --served-model-name llama3-8b-dummy >"$out/serve.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true' EXIT
for _ in $(seq 1 240); do grep -q "ready on" "$out/serve.log" && break; sleep 0.5; done
grep "ready on" "$out/serve.log"
curl -s "http://127.0.0.1:$port/v1/completions" -H 'Content-Type: application/json' \
  -d '{"prompt": "Hello from a GPU", "max_tokens": 16, "temperature": 0}' | tee "$out/completion.json"
echo
for c in 1 64; do
  python3 -m bench.cli serve --base-url "http://127.0.0.1:$port" --model llama3-8b-dummy \
    --tokenizer builtin:tiny-llama --random-input-len 1024 --random-output-len 128 \
    --num-prompts $((c * 2)) --max-concurrency $c --deployment "1 instance, 1 GPU" \
    --save-result --result-dir "$out" --result-filename "serve-c$c.json" \
    --results-jsonl "$out/serve.jsonl" 2>&1 | tail -25
done
