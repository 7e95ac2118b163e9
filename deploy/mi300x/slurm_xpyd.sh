#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
#SBATCH --job-name=disagg-xpyd
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=08:00:00
#SBATCH --output=disagg-xpyd-%j.out
#
# xPyD on whole MI300X nodes under Slurm: the first X nodes of the allocation prefill, the next
# Y decode (one srun step each, running multi_node.sh), and the proxy runs as one more step on
# the first prefill node.
#
#   sbatch --nodes=4 deploy/mi300x/slurm_xpyd.sh --num-prefill-nodes 2 --num-decode-nodes 2 \
#       --model /models/Llama-3.1-70B-Instruct --nics mlx5_0,mlx5_1,mlx5_2,mlx5_3,mlx5_4,mlx5_5,mlx5_6,mlx5_7
#   deploy/mi300x/slurm_xpyd.sh --nodes n1,n2 --num-prefill-nodes 1 --num-decode-nodes 1 \
#       --model M --nics auto --tp-prefill 4 --tp-decode 2 --dry-run    # outside Slurm: print
#
# Options it does not know go to multi_node.sh on every prefill/decode node unchanged.
# sbatch runs a copy of this file from a spool directory, so it finds multi_node.sh through
# SLURM_SUBMIT_DIR (submit from the repository root), the image (--container-image) or
# --deploy-dir.
set -euo pipefail
SCRIPT_NAME=slurm_xpyd.sh
if [[ -n ${SLURM_JOB_ID:-} ]]; then
  HERE=${SLURM_SUBMIT_DIR:-$PWD}/deploy/mi300x
else
  HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
fi
# shellcheck source=lib.sh
source "$HERE/lib.sh"

usage() {
  cat <<'EOF'
usage: slurm_xpyd.sh --num-prefill-nodes X --num-decode-nodes Y --model MODEL [options]
                     [multi_node.sh options...]

  --num-prefill-nodes X       nodes that run prefill instances (the first X of the job)
  --num-decode-nodes Y        nodes that run decode instances (the next Y)
  --nodes HOSTS               node names (default: the job's, from scontrol)
  --container-image IMAGE     run each node's step in this image (pyxis --container-image)
  --container-mounts MOUNTS   pyxis --container-mounts for the model directory, e.g. /models:/models
  --deploy-dir DIR            where multi_node.sh is on the nodes
  --proxy-port PORT           proxy HTTP port, on the first prefill node (default 8000)
  --policy NAME               proxy routing policy (default least_loaded)
  --dry-run                   print the srun and proxy commands, start nothing
  (--model, --nics, --transport, --mode, --gpus, --tp-prefill, --tp-decode,
   --gpus-per-instance, --gid-index, --socket-ifname, --http-base-port, timeouts,
   --instance-arg: see multi_node.sh --help)
EOF
}

NUM_PREFILL_NODES="" NUM_DECODE_NODES="" NODES="" CONTAINER_IMAGE="" CONTAINER_MOUNTS=""
DEPLOY_DIR="" PROXY_PORT=8000 POLICY=least_loaded MODE=read GPUS=0,1,2,3,4,5,6,7
GPUS_PER_INSTANCE="" TP_PREFILL=1 TP_DECODE=1 HTTP_BASE_PORT=8100 KV_BASE_PORT=20000 TRANSPORT_BASE_PORT=21000
NODE_ARGS=()

parse_args() {
  while (( $# )); do
    [[ $1 != --*=* ]] || set -- "${1%%=*}" "${1#*=}" "${@:2}"  # --flag=value
    case $1 in
      --dry-run) DRY_RUN=1; shift; continue ;;
      -h|--help) usage; exit 0 ;;
    esac
    need_arg "$1" $# "${2:-}"
    case $1 in
      --num-prefill-nodes) NUM_PREFILL_NODES=$2 ;;
      --num-decode-nodes) NUM_DECODE_NODES=$2 ;;
      --nodes) NODES=$2 ;;
      --container-image) CONTAINER_IMAGE=$2 ;;
      --container-mounts) CONTAINER_MOUNTS=$2 ;;
      --deploy-dir) DEPLOY_DIR=$2 ;;
      --proxy-port) PROXY_PORT=$2 ;;
      --policy) POLICY=$2 ;;
      --log-dir) LOG_DIR=$2; NODE_ARGS+=("$1" "$2") ;;
      --ready-timeout) READY_TIMEOUT_S=$2; NODE_ARGS+=("$1" "$2") ;;
      # the proxy must know how the nodes lay out their instances: read these, and pass them on
      --mode) MODE=$2; NODE_ARGS+=("$1" "$2") ;;
      --gpus) GPUS=$2; NODE_ARGS+=("$1" "$2") ;;
      --gpus-per-instance) GPUS_PER_INSTANCE=$2; NODE_ARGS+=("$1" "$2") ;;
      --tp-prefill) TP_PREFILL=$2; NODE_ARGS+=("$1" "$2") ;;
      --tp-decode) TP_DECODE=$2; NODE_ARGS+=("$1" "$2") ;;
      --http-base-port) HTTP_BASE_PORT=$2; NODE_ARGS+=("$1" "$2") ;;
      --kv-base-port) KV_BASE_PORT=$2; NODE_ARGS+=("$1" "$2") ;;
      --transport-base-port) TRANSPORT_BASE_PORT=$2; NODE_ARGS+=("$1" "$2") ;;
      --role|--node-ip|--prefill-nodes|--decode-nodes) die "$1 is set per node by this script" ;;
      *) NODE_ARGS+=("$1" "$2") ;;
    esac
    shift 2
  done
}

job_nodes() {  # fills ALL_NODES from --nodes or the Slurm allocation
  if [[ -n $NODES ]]; then
    split_csv --nodes "$NODES" ALL_NODES
  elif [[ -n ${SLURM_JOB_NODELIST:-} ]]; then
    mapfile -t ALL_NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
  else
    die "--nodes is required outside a Slurm job"
  fi
  local node
  for node in "${ALL_NODES[@]}"; do check_word "a node name" "$node"; done
}

validate() {
  [[ -n $NUM_PREFILL_NODES ]] || die "--num-prefill-nodes is required"
  [[ -n $NUM_DECODE_NODES ]] || die "--num-decode-nodes is required"
  check_positive_int --num-prefill-nodes "$NUM_PREFILL_NODES"
  check_positive_int --num-decode-nodes "$NUM_DECODE_NODES"
  check_port --proxy-port "$PROXY_PORT"
  check_positive_int --ready-timeout "$READY_TIMEOUT_S"
  [[ -z $CONTAINER_IMAGE ]] || check_word --container-image "$CONTAINER_IMAGE"
  [[ -z $CONTAINER_MOUNTS ]] || check_word --container-mounts "$CONTAINER_MOUNTS"
  job_nodes
  local wanted=$(( NUM_PREFILL_NODES + NUM_DECODE_NODES ))
  (( wanted <= ${#ALL_NODES[@]} )) \
    || die "$NUM_PREFILL_NODES prefill + $NUM_DECODE_NODES decode nodes need $wanted nodes; the job has ${#ALL_NODES[@]}"
  claim_batch_node_ports
  P_NODES=("${ALL_NODES[@]:0:NUM_PREFILL_NODES}")
  D_NODES=("${ALL_NODES[@]:NUM_PREFILL_NODES:NUM_DECODE_NODES}")
  if [[ -z $DEPLOY_DIR ]]; then
    DEPLOY_DIR=$HERE
    [[ -z $CONTAINER_IMAGE ]] || DEPLOY_DIR=/opt/disagg/deploy/mi300x  # where the image has it
  fi
}

check_node_args() {  # multi_node.sh validates what it will be given, before any step starts
  local role out
  for role in prefill decode; do
    out=$(bash "$HERE/multi_node.sh" --role "$role" --node-ip 192.0.2.1 "${NODE_ARGS[@]}" --dry-run 2>&1 >/dev/null) \
      || die "for the $role nodes: ${out#multi_node.sh: error: }"
  done
  out=$(bash "$HERE/multi_node.sh" --role proxy "${PROXY_ARGS[@]}" --dry-run 2>&1 >/dev/null) \
    || die "for the proxy: ${out#multi_node.sh: error: }"
}

claim_batch_node_ports() {  # the proxy shares the first prefill node with its instances
  local gpus
  gpus=$(gpu_total)
  check_port --http-base-port "$HTTP_BASE_PORT"
  check_port --kv-base-port "$KV_BASE_PORT"
  check_port --transport-base-port "$TRANSPORT_BASE_PORT"
  claim_ports proxy "$PROXY_PORT" 1
  claim_ports "the instances' HTTP" "$HTTP_BASE_PORT" "$gpus"
  claim_ports "the instances' connectors" "$KV_BASE_PORT" $(( gpus * KV_PORTS_PER_RANK ))
  claim_ports "the instances' transports" "$TRANSPORT_BASE_PORT" "$gpus"
}

srun_prefix() {  # srun_prefix NODE ARRAY_NAME KIND: one step, one task, on NODE
  local -n _srun=$2
  local -a ids
  IFS=, read -r -a ids <<<"$GPUS"
  local max=0 id
  for id in "${ids[@]}"; do (( id < max )) || max=$(( id + 1 )); done
  _srun=(srun --nodes=1 --ntasks=1 "--nodelist=$1")
  if [[ $3 == proxy ]]; then
    _srun+=(--overlap)  # beside the first prefill node's step, without GPUs of its own
  else
    _srun+=("--gpus-per-node=$max")
  fi
  [[ -z $CONTAINER_IMAGE ]] || _srun+=("--container-image=$CONTAINER_IMAGE")
  [[ -z $CONTAINER_MOUNTS ]] || _srun+=("--container-mounts=$CONTAINER_MOUNTS")
  return 0
}

start_nodes() {  # one srun step per prefill/decode node; remembers each instance's URL
  URLS=() URL_CHILD=()
  local role node index=0 k per_node tp
  for role in prefill decode; do
    local -a nodes=("${P_NODES[@]}")
    tp=$TP_PREFILL
    [[ $role == prefill ]] || { nodes=("${D_NODES[@]}"); tp=$TP_DECODE; }
    per_node=$(( $(gpu_total) / ${GPUS_PER_INSTANCE:-$tp} ))
    for node in "${nodes[@]}"; do
      local -a step
      srun_prefix "$node" step node
      comment "$role node $node: $per_node instance(s) at tp $tp"
      launch "$role-$node" -- "${step[@]}" bash "$DEPLOY_DIR/multi_node.sh" --role "$role" \
        --node-ip auto "${NODE_ARGS[@]}"
      for (( k = 0; k < per_node; k++ )); do
        URLS+=("http://$node:$(( HTTP_BASE_PORT + k ))") URL_CHILD+=("$index")
      done
      index=$(( index + 1 ))
    done
  done
}

gpu_total() {
  local -a ids
  IFS=, read -r -a ids <<<"$GPUS"
  printf '%s' "${#ids[@]}"
}

main() {
  parse_args "$@"
  validate
  PROXY_ARGS=(--prefill-nodes "$(join_by , "${P_NODES[@]}")"
              --decode-nodes "$(join_by , "${D_NODES[@]}")" --gpus "$GPUS"
              --tp-prefill "$TP_PREFILL" --tp-decode "$TP_DECODE"
              --http-base-port "$HTTP_BASE_PORT" --mode "$MODE" --proxy-port "$PROXY_PORT"
              --policy "$POLICY")
  [[ -z $GPUS_PER_INSTANCE ]] || PROXY_ARGS+=(--gpus-per-instance "$GPUS_PER_INSTANCE")
  check_node_args
  comment "disagg ${#P_NODES[@]}P${#D_NODES[@]}D over Slurm job ${SLURM_JOB_ID:-(none)}: prefill ${P_NODES[*]}, decode ${D_NODES[*]}, proxy on ${P_NODES[0]}:$PROXY_PORT"
  start_nodes
  local i
  for i in "${!URLS[@]}"; do wait_healthy "${URLS[$i]}" "${URLS[$i]}" "${URL_CHILD[$i]}"; done
  comment "proxy on ${P_NODES[0]}: http://${P_NODES[0]}:$PROXY_PORT"
  local -a step
  srun_prefix "${P_NODES[0]}" step proxy
  launch proxy -- "${step[@]}" bash "$DEPLOY_DIR/multi_node.sh" --role proxy "${PROXY_ARGS[@]}" \
    --log-dir "$LOG_DIR" --ready-timeout "$READY_TIMEOUT_S"
  supervise
}

main "$@"
