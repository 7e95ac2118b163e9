#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Multi-node xPyD over RDMA: run once per node with its role. Prefill and decode nodes run one
# instance per GPU (or per --tp-prefill / --tp-decode GPUs as one tensor-parallel engine, or per
# --gpus-per-instance GPUs as DP ranks of that TP size), each pinned to its GPUs and to their
# NICs; the proxy node runs disagg-proxy in front of every instance.
#
#   multi_node.sh --role prefill --model M --node-ip auto --nics mlx5_0,...,mlx5_7   # node A
#   multi_node.sh --role decode  --model M --node-ip auto --nics mlx5_0,...,mlx5_7   # node B
#   multi_node.sh --role proxy --prefill-nodes nodeA --decode-nodes nodeB            # any node
#   (add --tp-prefill A --tp-decode B on every node, the proxy's included: it counts instances)
#
# NIC selection: MoRI-IO (mori) uses exactly the devices in MORI_RDMA_DEVICES, in order; UCX
# (nixl) the ones in UCX_NET_DEVICES. Each instance gets the NICs of its own GPUs only, so
# every GPU's KV leaves through the NIC beside it (one NIC per GPU on MI300X platforms).
set -euo pipefail
SCRIPT_NAME=multi_node.sh
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
source "$HERE/lib.sh"

usage() {
  cat <<'EOF'
usage: multi_node.sh --role prefill|decode --model MODEL --node-ip IP|auto [options]
       multi_node.sh --role proxy --prefill-nodes HOSTS --decode-nodes HOSTS [options]

  --role ROLE                 prefill | decode | proxy
  --model MODEL               Hugging Face model directory (prefill and decode)
  --node-ip IP|auto           this node's address on the KV network; auto: the address of
                              --socket-ifname, else the first of `hostname -I`
  --gpus LIST                 GPUs to use on each node (default 0,1,2,3,4,5,6,7)
  --tp-prefill N              --tensor-parallel-size of each prefill instance (default 1)
  --tp-decode N               --tensor-parallel-size of each decode instance (default 1)
  --gpus-per-instance N       GPUs per instance, DP ranks of --tp-prefill/--tp-decode GPUs
                              each (default: the role's TP size, so one engine core each)
  --nics LIST|auto            one RDMA device per GPU of --gpus, in the same order; auto: the
                              devices under /sys/class/infiniband in natural order, GPU i
                              taking the i-th (required for mori and nixl)
  --transport NAME            mori | nixl | tcp (default mori)
  --mode MODE                 read | write (default read)
  --gid-index N               RoCE GID index (MORI_IB_GID_INDEX / UCX_IB_GID_INDEX)
  --socket-ifname IF          interface of the KV network (MORI_SOCKET_IFNAME)
  --http-host ADDR            address instances bind for HTTP (default 0.0.0.0)
  --http-base-port PORT       first instance HTTP port, then +1 each (default 8100)
  --kv-base-port PORT         first connector port; 16 per DP rank after it (default 20000)
  --transport-base-port PORT  first mori/tcp transport port, +1 per instance (default 21000)
  --prefill-nodes HOSTS       proxy: comma list of prefill node names or addresses
  --decode-nodes HOSTS        proxy: comma list of decode node names or addresses
  --proxy-host ADDR           proxy: address to bind (default 0.0.0.0)
  --proxy-port PORT           proxy: HTTP port (default 8000)
  --policy NAME               proxy: round_robin | least_loaded | power_of_two
EOF
  printf '%s\n' "$COMMON_USAGE"
}

ROLE="" MODEL="" NODE_IP="" GPUS=0,1,2,3,4,5,6,7 GPUS_PER_INSTANCE="" NICS="" TRANSPORT=mori
TP_PREFILL=1 TP_DECODE=1
MODE=read GID_INDEX="" SOCKET_IFNAME="" HTTP_HOST=0.0.0.0 HTTP_BASE_PORT=8100
KV_BASE_PORT=20000 TRANSPORT_BASE_PORT=21000 PREFILL_NODES="" DECODE_NODES=""
PROXY_HOST=0.0.0.0 PROXY_PORT=8000 POLICY=least_loaded
IB_SYSFS=${DISAGG_IB_SYSFS:-/sys/class/infiniband}

parse_args() {
  while (( $# )); do
    [[ $1 != --*=* ]] || set -- "${1%%=*}" "${1#*=}" "${@:2}"  # --flag=value
    case $1 in
      --dry-run) DRY_RUN=1; shift; continue ;;
      -h|--help) usage; exit 0 ;;
    esac
    need_arg "$1" $# "${2:-}"
    case $1 in
      --role) ROLE=$2 ;;
      --model) MODEL=$2 ;;
      --node-ip) NODE_IP=$2 ;;
      --gpus) GPUS=$2 ;;
      --gpus-per-instance) GPUS_PER_INSTANCE=$2 ;;
      --tp-prefill) TP_PREFILL=$2 ;;
      --tp-decode) TP_DECODE=$2 ;;
      --nics) NICS=$2 ;;
      --transport) TRANSPORT=$2 ;;
      --mode) MODE=$2 ;;
      --gid-index) GID_INDEX=$2 ;;
      --socket-ifname) SOCKET_IFNAME=$2 ;;
      --http-host) HTTP_HOST=$2 ;;
      --http-base-port) HTTP_BASE_PORT=$2 ;;
      --kv-base-port) KV_BASE_PORT=$2 ;;
      --transport-base-port) TRANSPORT_BASE_PORT=$2 ;;
      --prefill-nodes) PREFILL_NODES=$2 ;;
      --decode-nodes) DECODE_NODES=$2 ;;
      --proxy-host) PROXY_HOST=$2 ;;
      --proxy-port) PROXY_PORT=$2 ;;
      --policy) POLICY=$2 ;;
      *) common_option "$1" "$2" || die "unknown option '$1' (see --help)" ;;
    esac
    shift 2
  done
}

validate_layout() {  # what every role needs: the GPUs and how they group into instances
  check_choice --role "$ROLE" prefill decode proxy
  check_choice --mode "$MODE" read write
  [[ -z $GPUS_PER_INSTANCE ]] || check_positive_int --gpus-per-instance "$GPUS_PER_INSTANCE"
  check_tp --tp-prefill "$TP_PREFILL"
  check_tp --tp-decode "$TP_DECODE"
  check_port --http-base-port "$HTTP_BASE_PORT"
  split_csv --gpus "$GPUS" GPU_IDS
  check_gpu_ids --gpus "${GPU_IDS[@]}"
  if [[ $ROLE == proxy ]]; then
    role_layout prefill; P_INSTANCES=$NUM_INSTANCES
    role_layout decode; D_INSTANCES=$NUM_INSTANCES
  else
    role_layout "$ROLE"
  fi
  validate_common
}

role_layout() {  # role_layout ROLE: sets TP, WIDTH (GPUs per instance), DP and NUM_INSTANCES
  TP=$TP_PREFILL
  [[ $1 == prefill ]] || TP=$TP_DECODE
  WIDTH=${GPUS_PER_INSTANCE:-$TP}
  (( WIDTH % TP == 0 )) || die "--gpus-per-instance $WIDTH is not a multiple of --tp-$1 $TP"
  DP=$(( WIDTH / TP ))
  (( WIDTH <= ${#GPU_IDS[@]} )) \
    || die "a $1 instance needs $WIDTH GPUs (dp $DP x tp $TP); --gpus lists ${#GPU_IDS[@]}"
  (( ${#GPU_IDS[@]} % WIDTH == 0 )) \
    || die "${#GPU_IDS[@]} GPUs do not split evenly into instances of $WIDTH"
  NUM_INSTANCES=$(( ${#GPU_IDS[@]} / WIDTH ))
}

validate_node() {
  [[ -n $MODEL ]] || die "--model is required for --role $ROLE"
  check_word --model "$MODEL"
  [[ -n $NODE_IP ]] || die "--node-ip is required for --role $ROLE (an address or auto)"
  check_word --node-ip "$NODE_IP"
  check_word --http-host "$HTTP_HOST"
  check_choice --transport "$TRANSPORT" mori nixl tcp
  check_port --kv-base-port "$KV_BASE_PORT"
  check_port --transport-base-port "$TRANSPORT_BASE_PORT"
  [[ -z $GID_INDEX ]] || check_uint --gid-index "$GID_INDEX"
  [[ -z $SOCKET_IFNAME ]] || check_word --socket-ifname "$SOCKET_IFNAME"
  if [[ $MODE == write ]] && (( DP > 1 )); then
    die "--mode write needs --gpus-per-instance $TP on $ROLE nodes (one engine core per instance: WRITE with a data-parallel instance is not supported yet)"
  fi
  [[ $TRANSPORT == tcp || -n $NICS ]] || die "--nics is required for --transport $TRANSPORT (one RDMA device per GPU, or auto)"
}

validate_proxy() {
  [[ -n $PREFILL_NODES ]] || die "--prefill-nodes is required for --role proxy"
  [[ -n $DECODE_NODES ]] || die "--decode-nodes is required for --role proxy"
  split_csv --prefill-nodes "$PREFILL_NODES" P_NODES
  split_csv --decode-nodes "$DECODE_NODES" D_NODES
  local node
  for node in "${P_NODES[@]}" "${D_NODES[@]}"; do check_word "a node name" "$node"; done
  check_word --proxy-host "$PROXY_HOST"
  check_port --proxy-port "$PROXY_PORT"
  check_choice --policy "$POLICY" round_robin least_loaded power_of_two
}

resolve_nics() {  # fills GPU_NIC (one per entry of GPU_IDS), or nothing for tcp
  GPU_NIC=()
  [[ $TRANSPORT != tcp ]] || return 0
  if [[ $NICS != auto ]]; then
    split_csv --nics "$NICS" GPU_NIC
    (( ${#GPU_NIC[@]} == ${#GPU_IDS[@]} )) \
      || die "--nics names ${#GPU_NIC[@]} devices for ${#GPU_IDS[@]} GPUs; give one per GPU"
    local nic
    for nic in "${GPU_NIC[@]}"; do check_word --nics "$nic"; done
    return 0
  fi
  local -a found=()
  local dev
  for dev in "$IB_SYSFS"/*; do [[ -e $dev ]] && found+=("${dev##*/}"); done
  (( ${#found[@]} )) || die "--nics auto found no RDMA devices under $IB_SYSFS; pass --nics"
  mapfile -t found < <(printf '%s\n' "${found[@]}" | sort -V)
  local gpu
  for gpu in "${GPU_IDS[@]}"; do
    (( gpu < ${#found[@]} )) || die "--nics auto: GPU $gpu has no NIC (only ${#found[@]} RDMA devices: ${found[*]})"
    GPU_NIC+=("${found[$gpu]}")
  done
}

resolve_node_ip() {
  [[ $NODE_IP == auto ]] || return 0
  if [[ -n $SOCKET_IFNAME ]]; then
    NODE_IP=$(ip -4 -o addr show dev "$SOCKET_IFNAME" 2>/dev/null | awk '{split($4, a, "/"); print a[1]; exit}')
  else
    NODE_IP=$(hostname -I 2>/dev/null | awk '{print $1}')
  fi
  [[ -n $NODE_IP ]] || die "--node-ip auto found no IPv4 address; pass --node-ip ADDR"
}

instance_gpus() {  # instance_gpus K: comma list of instance K's GPUs
  join_by , "${GPU_IDS[@]:$1*WIDTH:WIDTH}"
}

instance_nics() {  # instance_nics K: comma list of the NICs beside instance K's GPUs
  join_by , "${GPU_NIC[@]:$1*WIDTH:WIDTH}"
}

nic_env() {  # nic_env K ARRAY_NAME: the transport's NIC selection for instance K
  local -n _nic_env=$2
  local nics
  nics=$(instance_nics "$1")
  case $TRANSPORT in
    mori)
      _nic_env+=("MORI_RDMA_DEVICES=$nics")
      [[ -z $GID_INDEX ]] || _nic_env+=("MORI_IB_GID_INDEX=$GID_INDEX")
      [[ -z $SOCKET_IFNAME ]] || _nic_env+=("MORI_SOCKET_IFNAME=$SOCKET_IFNAME") ;;
    nixl)
      _nic_env+=("UCX_NET_DEVICES=${nics//,/:1,}:1")
      [[ -z $GID_INDEX ]] || _nic_env+=("UCX_IB_GID_INDEX=$GID_INDEX") ;;
  esac
  return 0
}

transport_port() {  # transport_port K: instance K's first fixed transport port
  # TP rank t of the instance listens on that port + t (connectors/protocol.py transport_port)
  printf '%s' $(( TRANSPORT_BASE_PORT + $1 * TP ))
}

transport_options() {  # transport_options K: the transport_options JSON of instance K, or ""
  # A fixed port lets a firewall name it; with several DP ranks in one instance they would
  # all ask for it, so those take a free port instead (see deploy/README.md, ports).
  local port=""
  (( DP > 1 )) || port=$(transport_port "$1")
  case $TRANSPORT in
    mori) printf '{"backend":"rdma"%s}' "${port:+,\"port\":$port}" ;;
    tcp) [[ -z $port ]] || printf '{"port":%s}' "$port" ;;
  esac
  return 0
}

start_instance() {  # start_instance K
  local k=$1 name="$ROLE-$1" gpus role=kv_producer dp=$DP
  [[ $ROLE == prefill ]] || role=kv_consumer
  gpus=$(instance_gpus "$k")
  local http=$(( HTTP_BASE_PORT + k )) kv=$(( KV_BASE_PORT + k * dp * KV_PORTS_PER_RANK ))
  local opts
  opts=$(transport_options "$k")
  local line
  line="$name: $(rank_text "$gpus" "$TP")"
  [[ $TRANSPORT == tcp ]] || line+=", NIC $(instance_nics "$k")"
  comment "$line, HTTP $http, connector ports $kv-$(( kv + dp * KV_PORTS_PER_RANK - 1 ))${opts:+, transport $opts}"
  local -a envs=("HIP_VISIBLE_DEVICES=$gpus")
  rocm_env envs
  nic_env "$k" envs
  launch "$name" "${envs[@]}" -- disagg serve "$MODEL" --host "$HTTP_HOST" --port "$http" \
    --device cuda --data-parallel-size "$dp" --tensor-parallel-size "$TP" --kv-transfer-config \
    "$(kv_transfer_config "$role" "$(kv_extra_fields "$TRANSPORT" "$MODE" "$kv" "$NODE_IP" "$opts")")" \
    ${INSTANCE_ARGS[@]+"${INSTANCE_ARGS[@]}"}
}

claim_node_ports() {
  local k dp=$DP
  for (( k = 0; k < NUM_INSTANCES; k++ )); do
    claim_ports "$ROLE-$k HTTP" $(( HTTP_BASE_PORT + k )) 1
    claim_ports "$ROLE-$k connector" $(( KV_BASE_PORT + k * dp * KV_PORTS_PER_RANK )) $(( dp * KV_PORTS_PER_RANK ))
    if [[ $TRANSPORT != nixl ]] && (( dp == 1 )); then
      claim_ports "$ROLE-$k transport" "$(transport_port "$k")" "$TP"
    fi
  done
}

run_node() {
  validate_node
  resolve_nics
  claim_node_ports
  resolve_node_ip
  comment "disagg $ROLE node $NODE_IP: $NUM_INSTANCES instance(s) x $WIDTH GPU(s) (dp $DP x tp $TP), transport $TRANSPORT, mode $MODE"
  preflight "HIP_VISIBLE_DEVICES=$GPUS" -- "$TRANSPORT"
  local k
  for (( k = 0; k < NUM_INSTANCES; k++ )); do start_instance "$k"; done
  local probe=$HTTP_HOST
  [[ $probe != 0.0.0.0 ]] || probe=127.0.0.1
  for (( k = 0; k < NUM_INSTANCES; k++ )); do
    wait_healthy "$ROLE-$k" "http://$probe:$(( HTTP_BASE_PORT + k ))"
  done
  supervise
}

run_proxy() {
  validate_proxy
  local -a cmd=(disagg-proxy --host "$PROXY_HOST" --port "$PROXY_PORT" --mode "$MODE"
                --policy "$POLICY")
  local node k
  for node in "${P_NODES[@]}"; do
    for (( k = 0; k < P_INSTANCES; k++ )); do cmd+=(--prefill "http://$node:$(( HTTP_BASE_PORT + k ))"); done
  done
  for node in "${D_NODES[@]}"; do
    for (( k = 0; k < D_INSTANCES; k++ )); do cmd+=(--decode "http://$node:$(( HTTP_BASE_PORT + k ))"); done
  done
  comment "disagg proxy: ${#P_NODES[@]} prefill node(s) of $P_INSTANCES instance(s) (tp $TP_PREFILL), ${#D_NODES[@]} decode node(s) of $D_INSTANCES (tp $TP_DECODE), mode $MODE"
  launch proxy -- "${cmd[@]}"
  local probe=$PROXY_HOST
  [[ $probe != 0.0.0.0 ]] || probe=127.0.0.1
  wait_healthy proxy "http://$probe:$PROXY_PORT"
  supervise
}

main() {
  parse_args "$@"
  [[ -n $ROLE ]] || die "--role is required (prefill, decode or proxy)"
  validate_layout
  if [[ $ROLE == proxy ]]; then run_proxy; else run_node; fi
}

main "$@"
