#!/usr/bin/env bash
# Cross-check `disagg bench serve` against aiperf on a host with cores to spare (the GPU
# machines have 16): a 1P1D `disagg-proxy --launch` of the built-in model on CPU, then
# bench/crosscheck.py at a few concurrencies. aiperf comes from wheels carried in
# .aiperf_whl/ (see the header of bench/crosscheck.py); rows go to OUT_DIR/crosscheck.jsonl.
# Usage: bash bench/crosscheck_device.sh OUT_DIR
set -euo pipefail
out="${1:?usage: crosscheck_device.sh OUT_DIR}"
mkdir -p "$out" /tmp/aiperf-notorch /tmp/aiperf-bin
python3 -m pip install -q --no-index --no-deps --target /tmp/aiperf-site .aiperf_whl/*.whl
# aiperf's dataset manager would import torch through transformers (~14 CPU-s a run): hide it
# from aiperf's processes only.
echo 'import sys; sys.modules["torch"] = None' > /tmp/aiperf-notorch/sitecustomize.py
cat > /tmp/aiperf-bin/aiperf <<SH
#!/bin/sh
unset HF_HUB_OFFLINE TRANSFORMERS_OFFLINE
export PYTHONPATH=/tmp/aiperf-notorch:/tmp/aiperf-site:/tmp/site
exec $(command -v python3) -m aiperf "\$@"
SH
chmod +x /tmp/aiperf-bin/aiperf
port=18800
# 4 torch threads per instance: P and D on their own cores, the rest for the clients
OMP_NUM_THREADS=4 python3 -m proxy.launcher --launch --num-prefill 1 --num-decode 1 \
  --model builtin:tiny-llama --device cpu --port $port >"$out/launch.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true' EXIT
for _ in $(seq 1 240); do
  curl -sf "http://127.0.0.1:$port/v1/models" >/dev/null && break
  sleep 0.5
done
curl -sf "http://127.0.0.1:$port/v1/models" >/dev/null || { tail -20 "$out/launch.log"; exit 1; }
cores=$(nproc)
for spec in "16 320" "64 640"; do
  read -r conc num <<<"$spec"
  python3 -m bench.crosscheck --base-url "http://127.0.0.1:$port" --model builtin:tiny-llama \
    --num-prompts "$num" --random-input-len 256 --random-output-len 64 \
    --max-concurrency "$conc" --repeats 3 --aiperf /tmp/aiperf-bin/aiperf \
    --aiperf-args "--export-level summary --log-level warning" \
    --deployment "1P1D tcp read on CPU (disagg-proxy --launch), $cores-core host" \
    --results-jsonl "$out/crosscheck.jsonl" 2>&1 | tail -8
done
