#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# P/D against colocated on the same N GPUs (default 2), one `disagg bench serve
# --compare-colocated` command per workload: random 2000 in / 1000 out and the prefill-heavy
# 4096 in / 256 out mix, each at a sweep of request rates, with goodput under TTFT/TPOT SLOs.
#
#   compare_colocated_gpu.sh                              # 2 GPUs, Llama-3-8B-shaped dummy bf16
#   compare_colocated_gpu.sh --model /models/Llama-3.1-8B-Instruct --num-gpus 4
#   compare_colocated_gpu.sh --dry-run                    # print the plan, start nothing
#
# What runs (one GPU per instance, N even):
#   P/D        disagg-proxy --launch: N/2 prefill + N/2 decode instances (1P1D on 2 GPUs), the
#              launcher placing them on GPUs 0..N-1 and fronting them (port BASE).
#   colocated  N plain `disagg serve` instances (no --kv-transfer-config: kv_both, they prefill
#              and decode themselves), instance i on GPU i, behind a static disagg-proxy (port
#              BASE+1) with a decode pool only and --local-prefill-threshold above every prompt.
#              Why both: the proxy's READ/WRITE flows always pick a prefill instance first, so
#              an empty prefill pool alone would fail every request with 503; a prompt shorter
#              than the threshold goes to a decode instance alone (proxy/flows.py), so with the
#              threshold at 10^9 tokens every request is served locally, least-loaded over the
#              N instances like the P/D decode pool. That proxy's /health stays 503 (it wants both
#              pools): readiness is its /v1/models instead.
# Both deployments are started (P/D first, then colocated) before the benchmark and stay up
# together, so each instance gets the same fixed KV budget (--kv-bytes) and the idle deployment
# only holds memory while the other is measured. The same command, seed and requests run
# against both; the result JSON, plots and one row per run and point plus one serve-compare
# row per point go under OUT (default bench/results/compare-colocated).
#
# Transport: tcp (staged through pinned host memory, works anywhere) by default; ipc (GPU peer
# copies: --launch shows each instance the other instances' GPUs after its own) or nixl when it
# is installed.
set -euo pipefail
SCRIPT_NAME=compare_colocated_gpu.sh
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
# shellcheck source=../deploy/mi300x/lib.sh
source "$REPO/deploy/mi300x/lib.sh"

usage() {
  cat <<'EOF'
usage: compare_colocated_gpu.sh [options]

  --model MODEL             model directory or cached HF id (default: a Llama-3-8B-shaped
                            config written to $TMPDIR/disagg-llama3-8b-dummy, served with
                            --load-format dummy)
  --served-model-name NAME  name both deployments serve (default llama3-8b-dummy, or the
                            model directory's name)
  --tokenizer TOK           benchmark tokenizer (default builtin:tiny-llama for the dummy
                            model, else MODEL)
  --num-gpus N              GPUs 0..N-1, an even number (default 2)
  --devices-env VAR         variable that selects GPUs (default CUDA_VISIBLE_DEVICES;
                            HIP_VISIBLE_DEVICES on ROCm)
  --transport NAME          tcp | nixl, the P/D KV transport (default tcp)
  --mode MODE               read | write (default read)
  --kv-bytes SIZE           --kv-cache-memory-bytes of every instance (default 32GiB)
  --max-model-len N         --max-model-len of every instance (default 8192)
  --rates LIST              request rates of the 2000/1000 sweep (default 1,2,4,8)
  --mix-rates LIST          request rates of the 4096/256 sweep (default 2,4,8,16)
  --num-prompts N           requests per point (default 256)
  --goodput SLOS            SLOs in ms, quoted (default "ttft:2000 tpot:50")
  --base-port PORT          P/D proxy port; colocated proxy +1, P/D instances +100..,
                            colocated instances +200.. (default 8000)
  --kv-base-port PORT       first connector port of the P/D instances (default 20000)
  --out DIR                 results, plots and logs (default bench/results/compare-colocated)
  --results-jsonl PATH      rows file (default OUT/serve.jsonl)
  --instance-arg ARG        one more argument for every instance (repeatable)
  --ready-timeout S         seconds to wait for each deployment (default 900)
  --dry-run                 print the commands and environment, start nothing
EOF
}

MODEL="" SERVED_NAME="" TOKENIZER="" NUM_GPUS=2 DEVICES_ENV=CUDA_VISIBLE_DEVICES TRANSPORT=tcp
MODE=read KV_BYTES=32GiB MAX_MODEL_LEN=8192 RATES=1,2,4,8 MIX_RATES=2,4,8,16 NUM_PROMPTS=256
GOODPUT="ttft:2000 tpot:50" BASE_PORT=8000 KV_BASE_PORT=20000
OUT=$REPO/bench/results/compare-colocated RESULTS_JSONL=""
PYTHON=${PYTHON:-python3}
LOCAL_PREFILL_THRESHOLD=1000000000  # tokens: above every prompt, so the proxy never prefills

parse_args() {
  while (( $# )); do
    [[ $1 != --*=* ]] || set -- "${1%%=*}" "${1#*=}" "${@:2}"  # --flag=value
    case $1 in
      --dry-run) DRY_RUN=1; shift; continue ;;
      -h|--help) usage; exit 0 ;;
    esac
    need_arg "$1" $# "${2:-}"
    case $1 in
      --model) MODEL=$2 ;;
      --served-model-name) SERVED_NAME=$2 ;;
      --tokenizer) TOKENIZER=$2 ;;
      --num-gpus) NUM_GPUS=$2 ;;
      --devices-env) DEVICES_ENV=$2 ;;
      --transport) TRANSPORT=$2 ;;
      --mode) MODE=$2 ;;
      --kv-bytes) KV_BYTES=$2 ;;
      --max-model-len) MAX_MODEL_LEN=$2 ;;
      --rates) RATES=$2 ;;
      --mix-rates) MIX_RATES=$2 ;;
      --num-prompts) NUM_PROMPTS=$2 ;;
      --goodput) GOODPUT=$2 ;;
      --base-port) BASE_PORT=$2 ;;
      --kv-base-port) KV_BASE_PORT=$2 ;;
      --out) OUT=$2 ;;
      --results-jsonl) RESULTS_JSONL=$2 ;;
      --instance-arg) INSTANCE_ARGS+=("$2") ;;
      --ready-timeout) READY_TIMEOUT_S=$2 ;;
      *) die "unknown option '$1' (see --help)" ;;
    esac
    shift 2
  done
}

check_rates() {  # check_rates FLAG LIST: a comma list of positive numbers
  [[ $2 =~ ^[0-9]+([.][0-9]+)?(,[0-9]+([.][0-9]+)?)*$ && ! $2 =~ (^|,)0+([.]0+)?(,|$) ]] \
    || die "$1 takes a comma list of positive numbers like 1,2,4; got '$2'"
}

validate() {
  [[ -z $MODEL ]] || check_word --model "$MODEL"
  [[ -z $SERVED_NAME ]] || check_word --served-model-name "$SERVED_NAME"
  [[ -z $TOKENIZER ]] || check_word --tokenizer "$TOKENIZER"
  check_positive_int --num-gpus "$NUM_GPUS"
  (( NUM_GPUS % 2 == 0 )) || die "--num-gpus must be even (N/2 prefill + N/2 decode), got $NUM_GPUS"
  [[ $DEVICES_ENV =~ ^[A-Z_]+$ ]] || die "--devices-env must be a variable name, got '$DEVICES_ENV'"
  check_choice --transport "$TRANSPORT" tcp ipc nixl
  check_choice --mode "$MODE" read write
  [[ $KV_BYTES =~ ^[0-9]+([KMGT]i?B)?$ ]] || die "--kv-bytes must be bytes like 32GiB, got '$KV_BYTES'"
  check_positive_int --max-model-len "$MAX_MODEL_LEN"
  (( MAX_MODEL_LEN >= 4096 + 256 )) || die "--max-model-len must hold 4096 + 256 tokens, got $MAX_MODEL_LEN"
  check_rates --rates "$RATES"
  check_rates --mix-rates "$MIX_RATES"
  check_positive_int --num-prompts "$NUM_PROMPTS"
  read -r -a SLOS <<<"$GOODPUT"
  (( ${#SLOS[@]} )) || die "--goodput must not be empty"
  local slo
  for slo in "${SLOS[@]}"; do
    [[ $slo =~ ^(ttft|tpot|e2el):[0-9]+([.][0-9]+)?$ ]] \
      || die "--goodput takes NAME:MS items (ttft, tpot, e2el), got '$slo'"
  done
  check_port --base-port "$BASE_PORT"
  check_port --kv-base-port "$KV_BASE_PORT"
  check_positive_int --ready-timeout "$READY_TIMEOUT_S"
  claim_ports "P/D proxy" "$BASE_PORT" 1
  claim_ports "colocated proxy" $(( BASE_PORT + 1 )) 1
  claim_ports "P/D instances" $(( BASE_PORT + 100 )) "$NUM_GPUS"
  claim_ports "colocated instances" $(( BASE_PORT + 200 )) "$NUM_GPUS"
  claim_ports "P/D connectors" "$KV_BASE_PORT" $(( NUM_GPUS * KV_PORTS_PER_RANK ))
}

settle_defaults() {  # the dummy model and the names that follow from --model
  DUMMY=0
  if [[ -z $MODEL ]]; then
    DUMMY=1 MODEL=${TMPDIR:-/tmp}/disagg-llama3-8b-dummy
  fi
  if [[ -z $SERVED_NAME ]]; then
    if (( DUMMY )); then SERVED_NAME=llama3-8b-dummy; else SERVED_NAME=$(basename "$MODEL"); fi
  fi
  if [[ -z $TOKENIZER ]]; then
    if (( DUMMY )); then TOKENIZER=builtin:tiny-llama; else TOKENIZER=$MODEL; fi
  fi
  [[ -n $RESULTS_JSONL ]] || RESULTS_JSONL=$OUT/serve.jsonl
  LOG_DIR=$OUT/logs
  GPU_LIST=$(seq -s , 0 $(( NUM_GPUS - 1 )))
  INSTANCE_FLAGS=(--max-model-len "$MAX_MODEL_LEN" --kv-cache-memory-bytes "$KV_BYTES"
                  --served-model-name "$SERVED_NAME")
  (( DUMMY )) && INSTANCE_FLAGS+=(--load-format dummy)
  INSTANCE_FLAGS+=(${INSTANCE_ARGS[@]+"${INSTANCE_ARGS[@]}"})
  return 0
}

step() {  # step NAME COMMAND...: run in the foreground (output also in LOG_DIR/NAME.log)
  local name=$1
  shift
  if [[ $DRY_RUN == 1 ]]; then
    print_command "$@"
    return 0
  fi
  mkdir -p "$LOG_DIR"
  "$@" 2>&1 | tee "$LOG_DIR/$name.log"
}

wait_models() {  # wait_models NAME URL INDEX: until GET URL/v1/models answers 200
  local name=$1 url=$2 index=$3
  if [[ $DRY_RUN == 1 ]]; then
    comment "wait until $url/v1/models answers (up to ${READY_TIMEOUT_S}s)"
    return 0
  fi
  local deadline=$(( SECONDS + READY_TIMEOUT_S ))
  until curl -fsS -o /dev/null --max-time 2 "$url/v1/models" 2>/dev/null; do
    kill -0 "${CHILD_PIDS[$index]}" 2>/dev/null \
      || fail "$name exited during start-up; see $LOG_DIR/${CHILD_NAMES[$index]}.log"
    (( SECONDS < deadline )) || fail "$name not ready after ${READY_TIMEOUT_S}s"
    sleep 1
  done
}

write_dummy_model() {
  comment "a Llama-3-8B-shaped config (bench/engine_bench.py SHAPES), weights drawn at load"
  step model-config "$PYTHON" -c 'import json, os, sys; from bench.engine_bench import SHAPES; os.makedirs(sys.argv[1], exist_ok=True); json.dump(SHAPES["llama3-8b"], open(os.path.join(sys.argv[1], "config.json"), "w"))' "$MODEL"
}

start_pd() {
  local half=$(( NUM_GPUS / 2 ))
  comment "P/D: ${half}P${half}D on GPUs $GPU_LIST, one GPU each, $TRANSPORT $MODE, proxy on $BASE_PORT"
  launch pd "$DEVICES_ENV=$GPU_LIST" -- "$PYTHON" -m proxy.launcher --launch --model "$MODEL" \
    --num-prefill "$half" --num-decode "$half" --transport "$TRANSPORT" --mode "$MODE" \
    --device cuda --host 127.0.0.1 --port "$BASE_PORT" \
    --instance-base-port $(( BASE_PORT + 100 )) --kv-base-port "$KV_BASE_PORT" \
    --ready-timeout-s "$READY_TIMEOUT_S" -- "${INSTANCE_FLAGS[@]}"
  wait_healthy "P/D deployment" "http://127.0.0.1:$BASE_PORT"
}

start_colocated() {
  local gpu urls=() indexes=()
  for (( gpu = 0; gpu < NUM_GPUS; gpu++ )); do
    comment "colocated instance $gpu: GPU $gpu, HTTP $(( BASE_PORT + 200 + gpu )), prefill and decode in one engine"
    launch "colocated-$gpu" "$DEVICES_ENV=$gpu" -- "$PYTHON" -m disagg.cli serve "$MODEL" \
      --host 127.0.0.1 --port $(( BASE_PORT + 200 + gpu )) --device cuda "${INSTANCE_FLAGS[@]}"
    urls+=("http://127.0.0.1:$(( BASE_PORT + 200 + gpu ))")
    indexes+=($(( ${#CHILD_PIDS[@]} - 1 )))
  done
  for (( gpu = 0; gpu < NUM_GPUS; gpu++ )); do
    wait_healthy "colocated-$gpu" "${urls[$gpu]}" "${indexes[$gpu]:-0}"
  done
  comment "colocated proxy on $(( BASE_PORT + 1 )): decode pool only, every prompt below --local-prefill-threshold"
  launch colocated-proxy -- "$PYTHON" -m proxy.launcher --host 127.0.0.1 \
    --port $(( BASE_PORT + 1 )) --model "$MODEL" --decode "${urls[@]}" \
    --local-prefill-threshold "$LOCAL_PREFILL_THRESHOLD"
  wait_models "colocated proxy" "http://127.0.0.1:$(( BASE_PORT + 1 ))" \
    $(( ${#CHILD_PIDS[@]} - 1 ))
}

bench() {  # bench NAME RATES INPUT_LEN OUTPUT_LEN
  local half=$(( NUM_GPUS / 2 )) i metrics=()
  for (( i = 0; i < NUM_GPUS; i++ )); do  # the P/D instances: KV bytes moved per request
    metrics+=(--metrics-url "http://127.0.0.1:$(( BASE_PORT + 100 + i ))")
  done
  comment "workload $1: random $3 in / $4 out at request rates $2, P/D then colocated"
  step "bench-$1" "$PYTHON" -m bench.cli serve --base-url "http://127.0.0.1:$BASE_PORT" \
    --compare-colocated "http://127.0.0.1:$(( BASE_PORT + 1 ))" \
    --model "$SERVED_NAME" --tokenizer "$TOKENIZER" --dataset-name random \
    --random-input-len "$3" --random-output-len "$4" --num-prompts "$NUM_PROMPTS" \
    --num-warmups 2 --sweep-rate "$2" --goodput "${SLOS[@]}" --num-gpus "$NUM_GPUS" \
    --deployment "${half}P${half}D disagg-proxy --launch, $TRANSPORT $MODE, 1 GPU per instance" \
    --colocated-deployment "$NUM_GPUS x disagg serve, 1 GPU each, behind disagg-proxy (decode pool only)" \
    "${metrics[@]}" --disable-tqdm --result-dir "$OUT" --result-filename "$1.json" \
    --results-jsonl "$RESULTS_JSONL"
}

main() {
  parse_args "$@"
  validate
  settle_defaults
  comment "P/D vs colocated on $NUM_GPUS GPU(s): model $MODEL served as $SERVED_NAME, results in $OUT"
  [[ $DRY_RUN == 1 ]] || mkdir -p "$OUT"
  (( DUMMY )) && write_dummy_model
  start_pd
  start_colocated
  bench random-2000-1000 "$RATES" 2000 1000
  bench random-4096-256 "$MIX_RATES" 4096 256
  [[ $DRY_RUN == 1 ]] || printf '%s: done; rows in %s\n' "$SCRIPT_NAME" "$RESULTS_JSONL"
}

main "$@"
