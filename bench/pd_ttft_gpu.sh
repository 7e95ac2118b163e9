#!/usr/bin/env bash
# Issue 22's GPU row: TTFT of a 4k-token prompt through 1P1D on ONE GPU (P and D co-located,
# ipc transport) against the monolithic instance on the same GPU, with the phase breakdown.
# Llama-3-8B-shaped dummy bf16, prefix caching off (every prompt is computed), one request at
# a time. Deployments, each behind `disagg-proxy` (static URLs):
#   read          READ, first token from the prefill (the default)
#   read-recomp   READ, --first-token recompute (the decode computes the first token again)
#   write-lw      WRITE layerwise, first token from the prefill
#   write-lw-COPY the same with the ipc transport's copy option COPY (kernel, batch, runtime)
#   write         WRITE of the whole prompt after the prefill (layerwise false: "auto" would
#                 stream layers on a GPU), first token from the prefill
# Usage: [DEPS="read write-lw"] [TRANSPORT=tcp] [LAYER_GROUP=N] [SERVE_FLAGS=...] [PROFILE_DIR=...] bash bench/pd_ttft_gpu.sh OUT_DIR COMMIT [NUM_PROMPTS]
# Rows: OUT_DIR/serve.jsonl (one `disagg bench serve` row per run, per-phase stats included)
# and OUT_DIR/pd_ttft.jsonl (one row per P/D run: p50 TTFT / monolithic p50 TTFT, the
# monolithic instance measured just before and just after that P/D run, the two p50s averaged).
set -euo pipefail
out="${1:?usage: pd_ttft_gpu.sh OUT_DIR COMMIT [NUM_PROMPTS]}"
commit="${2:?commit}"
num="${3:-24}"
mkdir -p "$out"
model_dir=$(mktemp -d)
python3 - "$model_dir" <<'PY'
import json, sys
from bench.engine_bench import SHAPES
json.dump(SHAPES["llama3-8b"], open(sys.argv[1] + "/config.json", "w"))
PY
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
common=("$model_dir" --load-format dummy --device cuda --max-model-len 8192
        --no-enable-prefix-caching --gpu-memory-utilization 0.25
        --served-model-name llama3-8b-dummy)
# SERVE_FLAGS: more flags for every instance (e.g. "--log-level debug" for transfer timings)
read -r -a extra_flags <<<"${SERVE_FLAGS:-}"
common+=("${extra_flags[@]}")
serve() {  # NAME PORT [FLAGS...]
  local name=$1 port=$2; shift 2
  # PROFILE_DIR: a torch.profiler trace per instance under PROFILE_DIR/NAME (disagg/common/envs.py)
  ${PROFILE_DIR:+env DISAGG_TORCH_PROFILE_DIR="$PROFILE_DIR/$name"} python3 -m disagg.cli serve "${common[@]}" --port "$port" "$@" >"$out/$name.log" 2>&1 &
  pids+=($!)
}
ready() {  # LOG...
  for log in "$@"; do
    for _ in $(seq 1 600); do grep -q "ready on" "$log" && break; sleep 0.5; done
    grep -q "ready on" "$log" || { echo "not ready: $log"; tail -20 "$log"; exit 1; }
  done
}
kv() {  # ROLE MODE [LAYERWISE(true) [IPC_COPY]]
  local opts=""
  [ -n "${4:-}" ] && opts=",\"transport_options\":{\"copy\":\"$4\"}"
  echo "{\"kv_connector\":\"PDConnector\",\"kv_role\":\"$1\",\"kv_connector_extra_config\":{\"transport\":\"${TRANSPORT:-ipc}\",\"mode\":\"$2\",\"layerwise\":${3:-false}${LAYER_GROUP:+,\"layer_group\":$LAYER_GROUP}$opts}}"
}
bench() {  # NAME URL
  python3 -m bench.cli serve --base-url "$2" --model llama3-8b-dummy --tokenizer builtin:tiny-llama \
    --random-input-len 4000 --random-output-len 4 --num-prompts "$num" --max-concurrency 1 \
    --num-warmups 2 --deployment "$1, 1 GPU (P and D co-located)" --label "$1" \
    --save-result --result-dir "$out" --result-filename "ttft-$1.json" \
    --results-jsonl "$out/serve.jsonl" 2>&1 | sed -n '/Serving Benchmark Result/,$p'
}
serve mono 18100
ready "$out/mono.log"
bench monolithic-0 http://127.0.0.1:18100
i=0
for dep in ${DEPS:-read read-recomp write-lw}; do
  mode="read"; lw=""; first="prefill"; copy=""
  [ "$dep" = read-recomp ] && first="recompute"
  case "$dep" in
    write) mode="write" ;;
    write-lw) mode="write"; lw=true ;;
    write-lw-*) mode="write"; lw=true; copy="${dep#write-lw-}" ;;  # ipc copy: kernel, batch, ...
  esac
  serve "p-$dep" 18101 --kv-transfer-config "$(kv kv_producer $mode "$lw" "$copy")"
  serve "d-$dep" 18102 --kv-transfer-config "$(kv kv_consumer $mode "$lw" "$copy")"
  ready "$out/p-$dep.log" "$out/d-$dep.log"
  python3 -m proxy.launcher --port 18103 --prefill http://127.0.0.1:18101 \
    --decode http://127.0.0.1:18102 --mode "$mode" --first-token "$first" \
    --model builtin:tiny-llama >"$out/proxy-$dep.log" 2>&1 &
  proxy=$!
  for _ in $(seq 1 60); do curl -sf http://127.0.0.1:18103/health >/dev/null && break; sleep 0.5; done
  bench "$dep${LAYER_GROUP:+-g$LAYER_GROUP}" http://127.0.0.1:18103
  kill "$proxy" "${pids[-1]}" "${pids[-2]}" 2>/dev/null || true
  wait "$proxy" "${pids[-1]}" "${pids[-2]}" 2>/dev/null || true
  unset 'pids[-1]' 'pids[-1]'
  # the baseline again right after each P/D run: a P/D run's ratio is against the mean of the
  # monolithic runs just before and just after it, so a GPU that drifts (clocks, temperature)
  # over the whole script counts neither for nor against the deployment measured later
  i=$((i + 1))
  bench "monolithic-$i" http://127.0.0.1:18100
done
python3 - "$out" "$commit" "${DEPS:+DEPS=\"$DEPS\" }${TRANSPORT:+TRANSPORT=$TRANSPORT }${LAYER_GROUP:+LAYER_GROUP=$LAYER_GROUP }bash bench/pd_ttft_gpu.sh OUT $commit $num" <<'PY'
import json, sys
out, commit, command = sys.argv[1], sys.argv[2], sys.argv[3]
rows = []
for line in open(out + "/serve.jsonl"):
    rows.append(json.loads(line))  # in run order: monolithic-0, dep, monolithic-1, dep, ...
with open(out + "/pd_ttft.jsonl", "a") as f:
    for k, r in enumerate(rows):
        label = r["label"]
        if label.startswith("monolithic"):
            continue
        monos = [rows[j]["p50_ttft_ms"] for j in (k - 1, k + 1)
                 if 0 <= j < len(rows) and rows[j]["label"].startswith("monolithic")]
        mono = sum(monos) / len(monos)
        row = {"kind": "pd_ttft", "commit": commit, "command": command,
               "deployment": r["deployment"],
               "workload": "random in=4000 out=4, concurrency 1, prefix caching off",
               "model": "Llama-3-8B-shaped dummy bf16", "hardware": r["hardware"],
               "monolithic_p50_ttft_ms": mono, "monolithic_runs_p50_ms": monos,
               "pd_p50_ttft_ms": r["p50_ttft_ms"],
               "ttft_ratio": r["p50_ttft_ms"] / mono,
               "phases_ms": {k: v for k, v in r.items() if "_phase_" in k},
               "figures": {"P/D TTFT p50 / monolithic": f"{r['p50_ttft_ms'] / mono:.3f}x",
                           "P/D ms": round(r["p50_ttft_ms"], 1),
                           "monolithic ms": round(mono, 1),
                           "monolithic just before / after ms": "/".join(f"{m:.1f}" for m in monos)}}
        f.write(json.dumps(row) + "\n")
        print(f"{label}: P/D p50 TTFT {r['p50_ttft_ms']:.1f} ms vs monolithic {mono:.1f} ms "
              f"= {row['ttft_ratio']:.3f}x")
PY
