#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# One MI300X node: prefill and decode instances whose GPUs are data-parallel (and
# tensor-parallel) ranks, the KV moving between GPUs over xGMI (ipc transport by default), and
# the proxy in front. --platform cuda runs the same plan on one NVIDIA node (H100/H200: KV over
# NVLink; CUDA_VISIBLE_DEVICES, an nvidia-smi check, no mori); deploy/cuda/single_node.sh is
# this script with --platform cuda.
#
#   single_node.sh --model /models/Llama-3.1-8B-Instruct          # 1P on GPUs 0-3, 1D on 4-7
#   single_node.sh --model M --num-prefill 2 --num-decode 2       # 2P2D, 2 GPUs each
#   single_node.sh --model M --tp-prefill 4 --tp-decode 2         # 1P at TP 4, 1D at DP 2 x TP 2
#   single_node.sh --model M --platform cuda                      # the same on an NVIDIA node
#   single_node.sh --model M --dry-run                            # print the plan, start nothing
#
# An instance's GPUs are dp x tp ranks: DP rank d, TP rank t runs on its device d*tp+t.
# Every instance sees its own GPUs first, so that numbering holds. With ipc (and
# mori's xGMI backend) it also sees the other instances' GPUs after its own: opening a peer's
# IPC handle needs the peer's GPU to be visible (connectors/transports/ipc.py).
set -euo pipefail
SCRIPT_NAME=single_node.sh
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
source "$HERE/lib.sh"

usage() {
  cat <<'EOF'
usage: single_node.sh --model MODEL [options]

  --model MODEL               Hugging Face model directory (or builtin:tiny-llama)
  --platform NAME             rocm (AMD, HIP_VISIBLE_DEVICES; default) | cuda (NVIDIA,
                              CUDA_VISIBLE_DEVICES, nvidia-smi must list every GPU used)
  --prefill-gpus LIST         GPUs of the prefill instances (default 0,1,2,3)
  --decode-gpus LIST          GPUs of the decode instances (default 4,5,6,7)
  --num-prefill N             prefill instances; their GPUs split evenly (default 1)
  --num-decode N              decode instances; their GPUs split evenly (default 1)
  --tp-prefill N              --tensor-parallel-size of each prefill instance; its GPUs
                              are DP ranks of N GPUs each (default 1)
  --tp-decode N               the same for each decode instance (default 1)
  --transport NAME            ipc | mori | tcp | nixl (default ipc; mori needs rocm)
  --mode MODE                 read | write (default read)
  --host ADDR                 address instances bind (default 127.0.0.1)
  --http-base-port PORT       first instance HTTP port, then +1 each (default 8100)
  --kv-base-port PORT         first connector port; 16 per DP rank after it (default 20000)
  --proxy-host ADDR           address the proxy binds (default 0.0.0.0)
  --proxy-port PORT           proxy HTTP port (default 8000)
  --policy NAME               round_robin | least_loaded | power_of_two (default least_loaded)
EOF
  printf '%s\n' "$COMMON_USAGE"
}

MODEL="" PLATFORM=rocm PREFILL_GPUS=0,1,2,3 DECODE_GPUS=4,5,6,7 NUM_PREFILL=1 NUM_DECODE=1
TP_PREFILL=1 TP_DECODE=1
TRANSPORT=ipc MODE=read HOST=127.0.0.1 HTTP_BASE_PORT=8100 KV_BASE_PORT=20000
PROXY_HOST=0.0.0.0 PROXY_PORT=8000 POLICY=least_loaded

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
      --platform) PLATFORM=$2 ;;
      --prefill-gpus) PREFILL_GPUS=$2 ;;
      --decode-gpus) DECODE_GPUS=$2 ;;
      --num-prefill) NUM_PREFILL=$2 ;;
      --num-decode) NUM_DECODE=$2 ;;
      --tp-prefill) TP_PREFILL=$2 ;;
      --tp-decode) TP_DECODE=$2 ;;
      --transport) TRANSPORT=$2 ;;
      --mode) MODE=$2 ;;
      --host) HOST=$2 ;;
      --http-base-port) HTTP_BASE_PORT=$2 ;;
      --kv-base-port) KV_BASE_PORT=$2 ;;
      --proxy-host) PROXY_HOST=$2 ;;
      --proxy-port) PROXY_PORT=$2 ;;
      --policy) POLICY=$2 ;;
      *) common_option "$1" "$2" || die "unknown option '$1' (see --help)" ;;
    esac
    shift 2
  done
}

validate() {
  [[ -n $MODEL ]] || die "--model is required"
  check_word --model "$MODEL"
  check_word --host "$HOST"
  check_word --proxy-host "$PROXY_HOST"
  check_choice --platform "$PLATFORM" rocm cuda
  check_choice --transport "$TRANSPORT" ipc mori tcp nixl
  [[ $PLATFORM == rocm || $TRANSPORT != mori ]] \
    || die "--transport mori needs --platform rocm (MoRI is AMD's); on cuda use ipc, nixl or tcp"
  check_choice --mode "$MODE" read write
  check_choice --policy "$POLICY" round_robin least_loaded power_of_two
  check_positive_int --num-prefill "$NUM_PREFILL"
  check_positive_int --num-decode "$NUM_DECODE"
  check_tp --tp-prefill "$TP_PREFILL"
  check_tp --tp-decode "$TP_DECODE"
  check_port --http-base-port "$HTTP_BASE_PORT"
  check_port --kv-base-port "$KV_BASE_PORT"
  check_port --proxy-port "$PROXY_PORT"
  validate_common
  split_csv --prefill-gpus "$PREFILL_GPUS" P_GPUS
  split_csv --decode-gpus "$DECODE_GPUS" D_GPUS
  check_gpu_ids --prefill-gpus "${P_GPUS[@]}"
  check_gpu_ids --decode-gpus "${D_GPUS[@]}"
  local gpu
  for gpu in "${P_GPUS[@]}"; do
    [[ ",$DECODE_GPUS," != *",$gpu,"* ]] || die "GPU $gpu is in both --prefill-gpus and --decode-gpus"
  done
  check_role_gpus prefill "${#P_GPUS[@]}" "$NUM_PREFILL" "$TP_PREFILL"
  check_role_gpus decode "${#D_GPUS[@]}" "$NUM_DECODE" "$TP_DECODE"
  if [[ $MODE == write ]] && (( ${#P_GPUS[@]} / NUM_PREFILL > TP_PREFILL )); then
    die "--mode write needs one engine core per prefill instance (a data-parallel prefill cannot push yet); use --num-prefill $(( ${#P_GPUS[@]} / TP_PREFILL )) or --mode read"
  fi
  if [[ $MODE == write ]] && (( ${#D_GPUS[@]} / NUM_DECODE > TP_DECODE )); then
    die "--mode write needs one engine core per decode instance (a data-parallel decode cannot be pushed to yet); use --num-decode $(( ${#D_GPUS[@]} / TP_DECODE )) or --mode read"
  fi
}

use_platform() {  # the variable, knobs and words of --platform
  if [[ $PLATFORM == cuda ]]; then
    VISIBLE_VAR=CUDA_VISIBLE_DEVICES GPU_API=CUDA NODE_KIND=NVIDIA
  else
    VISIBLE_VAR=HIP_VISIBLE_DEVICES GPU_API=HIP NODE_KIND=MI300X
  fi
}

platform_env() {  # platform_env ARRAY_NAME: the platform's knobs for every instance
  if [[ $PLATFORM == cuda ]]; then cuda_env "$1"; else rocm_env "$1"; fi
}

check_nvidia_gpus() {  # --platform cuda: nvidia-smi must list every GPU the plan uses
  local highest=0 gpu count
  for gpu in "${P_GPUS[@]}" "${D_GPUS[@]}"; do
    (( 10#$gpu <= highest )) || highest=$(( 10#$gpu ))
  done
  local -a cmd=(nvidia-smi "--query-gpu=index,pci.bus_id,name" "--format=csv,noheader")
  comment "nvidia-smi must list GPUs 0-$highest (indices in PCI bus order, as CUDA_DEVICE_ORDER=PCI_BUS_ID)"
  if [[ $DRY_RUN == 1 ]]; then
    print_command "${cmd[@]}"
    return 0
  fi
  command -v nvidia-smi >/dev/null || fail "nvidia-smi not found: no NVIDIA driver on this node?"
  mkdir -p "$LOG_DIR"
  "${cmd[@]}" >"$LOG_DIR/nvidia-smi.txt" 2>&1 \
    || fail "nvidia-smi failed; see $LOG_DIR/nvidia-smi.txt"
  count=$(grep -c . "$LOG_DIR/nvidia-smi.txt" || true)
  (( highest < count )) \
    || fail "the plan uses GPU $highest but nvidia-smi lists $count GPU(s); see $LOG_DIR/nvidia-smi.txt"
}

check_role_gpus() {  # check_role_gpus ROLE NUM_GPUS NUM_INSTANCES TP: enough, evenly split
  local role=$1 gpus=$2 count=$3 tp=$4
  (( count * tp <= gpus )) \
    || die "$count $role instance(s) x tp $tp need $(( count * tp )) GPUs; --$role-gpus lists $gpus"
  (( gpus % count == 0 )) || die "$gpus $role GPUs do not split evenly into $count instances"
  (( gpus / count % tp == 0 )) \
    || die "$(( gpus / count )) GPUs per $role instance do not split into TP groups of --tp-$role $tp"
}

# Fills NAMES, ROLES, GPU_GROUPS (comma GPU lists), TPS, HTTP_PORTS and KV_PORTS, prefill
# first.
plan_instances() {
  NAMES=() ROLES=() GPU_GROUPS=() TPS=() HTTP_PORTS=() KV_PORTS=()
  local p_size=$(( ${#P_GPUS[@]} / NUM_PREFILL )) d_size=$(( ${#D_GPUS[@]} / NUM_DECODE ))
  local i
  for (( i = 0; i < NUM_PREFILL; i++ )); do
    NAMES+=("prefill-$i") ROLES+=(kv_producer) TPS+=("$TP_PREFILL")
    GPU_GROUPS+=("$(join_by , "${P_GPUS[@]:i*p_size:p_size}")")
  done
  for (( i = 0; i < NUM_DECODE; i++ )); do
    NAMES+=("decode-$i") ROLES+=(kv_consumer) TPS+=("$TP_DECODE")
    GPU_GROUPS+=("$(join_by , "${D_GPUS[@]:i*d_size:d_size}")")
  done
  claim_ports proxy "$PROXY_PORT" 1
  local kv_next=$KV_BASE_PORT dp
  for i in "${!NAMES[@]}"; do
    dp=$(dp_size "$i")
    HTTP_PORTS+=($(( HTTP_BASE_PORT + i )))
    KV_PORTS+=("$kv_next")
    claim_ports "${NAMES[$i]} HTTP" "${HTTP_PORTS[$i]}" 1
    claim_ports "${NAMES[$i]} connector" "$kv_next" $(( dp * KV_PORTS_PER_RANK ))
    kv_next=$(( kv_next + dp * KV_PORTS_PER_RANK ))
  done
}

gpu_count() {
  local -a ids
  IFS=, read -r -a ids <<<"$1"
  printf '%s' "${#ids[@]}"
}

dp_size() {  # dp_size INDEX: engine cores (DP ranks) of instance INDEX, each of TPS[INDEX] GPUs
  printf '%s' $(( $(gpu_count "${GPU_GROUPS[$1]}") / TPS[$1] ))
}

visible_devices() {  # own GPUs first; the peers' after them when the transport maps peer memory
  local own=$1 gpu visible=$1
  if [[ $TRANSPORT == ipc || $TRANSPORT == mori ]]; then
    for gpu in "${P_GPUS[@]}" "${D_GPUS[@]}"; do
      [[ ",$own," == *",$gpu,"* ]] || visible+=",$gpu"
    done
  fi
  printf "%s" "$visible"
}

transport_options() {
  # mori inside one node: its XGMI backend (GPU peer copies), not RDMA through the NICs
  [[ $TRANSPORT == mori ]] && printf '{"backend":"xgmi"}'
  return 0
}

start_instance() {  # start_instance INDEX
  local i=$1 dp extra
  dp=$(dp_size "$i")
  comment "${NAMES[$i]}: $(rank_text "${GPU_GROUPS[$i]}" "${TPS[$i]}"), HTTP ${HTTP_PORTS[$i]}, connector ports ${KV_PORTS[$i]}-$(( KV_PORTS[i] + dp * KV_PORTS_PER_RANK - 1 ))"
  extra=$(kv_extra_fields "$TRANSPORT" "$MODE" "${KV_PORTS[$i]}" "$HOST" "$(transport_options)")
  local -a envs=("$VISIBLE_VAR=$(visible_devices "${GPU_GROUPS[$i]}")")
  platform_env envs
  launch "${NAMES[$i]}" "${envs[@]}" -- disagg serve "$MODEL" --host "$HOST" \
    --port "${HTTP_PORTS[$i]}" --device cuda --data-parallel-size "$dp" \
    --tensor-parallel-size "${TPS[$i]}" \
    --kv-transfer-config "$(kv_transfer_config "${ROLES[$i]}" "$extra")" \
    ${INSTANCE_ARGS[@]+"${INSTANCE_ARGS[@]}"}
}

start_proxy() {
  local -a cmd=(disagg-proxy --host "$PROXY_HOST" --port "$PROXY_PORT" --mode "$MODE"
                --policy "$POLICY")
  local i
  for i in "${!NAMES[@]}"; do
    if [[ ${ROLES[$i]} == kv_producer ]]; then cmd+=(--prefill); else cmd+=(--decode); fi
    cmd+=("http://$HOST:${HTTP_PORTS[$i]}")
  done
  comment "proxy: http://$PROXY_HOST:$PROXY_PORT"
  launch proxy -- "${cmd[@]}"
}

main() {
  parse_args "$@"
  validate
  use_platform
  plan_instances
  comment "disagg on one $NODE_KIND node: $NUM_PREFILL prefill x $(( ${#P_GPUS[@]} / NUM_PREFILL )) GPU(s) at tp $TP_PREFILL, $NUM_DECODE decode x $(( ${#D_GPUS[@]} / NUM_DECODE )) GPU(s) at tp $TP_DECODE, transport $TRANSPORT, mode $MODE"
  local all_gpus
  all_gpus=$(join_by , "${P_GPUS[@]}" "${D_GPUS[@]}")
  [[ $PLATFORM != cuda ]] || check_nvidia_gpus
  comment "preflight: the transport must be usable with every GPU of this deployment visible"
  local -a doctor_env=("$VISIBLE_VAR=$all_gpus")
  [[ $PLATFORM != cuda ]] || cuda_env doctor_env
  preflight "${doctor_env[@]}" -- "$TRANSPORT"
  local i
  for i in "${!NAMES[@]}"; do start_instance "$i"; done
  for i in "${!NAMES[@]}"; do wait_healthy "${NAMES[$i]}" "http://$HOST:${HTTP_PORTS[$i]}"; done
  start_proxy
  local probe_host=$PROXY_HOST
  [[ $probe_host != 0.0.0.0 ]] || probe_host=127.0.0.1
  wait_healthy proxy "http://$probe_host:$PROXY_PORT"
  [[ $DRY_RUN == 1 ]] || printf '%s: ready on http://%s:%s\n' "$SCRIPT_NAME" "$probe_host" "$PROXY_PORT"
  supervise
}

main "$@"
