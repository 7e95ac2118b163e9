# shellcheck shell=bash disable=SC2034  # globals here are read by the scripts that source it
# Helpers shared by the deploy/mi300x scripts (sourced, never run): argument checks, the
# --kv-transfer-config JSON, shell quoting for --dry-run, and starting/supervising processes.
#
# The caller sets SCRIPT_NAME; the options every script shares (DRY_RUN, LOG_DIR, timeouts...)
# have their defaults below and are stored by common_option. Usage errors exit 2 and runtime
# failures exit 1, each with one line on stderr.

CHILD_PIDS=()
CHILD_NAMES=()
KV_PORTS_PER_RANK=16
# Every control port of one engine comes from connectors/protocol.py kv_ports():
# base + 2 * (dp_rank * 8 + tp_rank) (+1 for notify), so a DP rank owns 16 ports above its
# base, room for its TP ranks (only TP rank 0 runs the control plane).

die() {
  printf '%s: error: %s\n' "$SCRIPT_NAME" "$*" >&2
  exit 2
}

fail() {
  printf '%s: %s\n' "$SCRIPT_NAME" "$*" >&2
  exit 1
}

need_arg() {  # need_arg FLAG ARGC VALUE: the flag must be followed by a value
  [[ $2 -ge 2 ]] || die "$1 needs a value"
  # `--model --dry-run` must not swallow --dry-run and start things for real
  [[ $3 != --* || $1 == --instance-arg ]] || die "$1 needs a value, got the option '$3'"
}

check_uint() {  # no leading zeros: bash arithmetic would read them as octal, JSON refuses them
  [[ $2 =~ ^(0|[1-9][0-9]*)$ ]] || die "$1 must be a whole number, got '$2'"
}

check_positive_int() {
  check_uint "$1" "$2"
  (( 10#$2 >= 1 )) || die "$1 must be at least 1, got '$2'"
}

check_port() {
  check_uint "$1" "$2"
  (( 10#$2 >= 1 && 10#$2 <= 65535 )) || die "$1 must be a TCP port (1-65535), got '$2'"
}

check_seconds() {
  [[ $2 =~ ^(0|[1-9][0-9]*)([.][0-9]+)?$ && ! $2 =~ ^0([.]0+)?$ ]] \
    || die "$1 must be a positive number of seconds, got '$2'"
}

check_choice() {  # check_choice FLAG VALUE CHOICE...
  local flag=$1 value=$2 choice
  shift 2
  for choice in "$@"; do
    [[ $value == "$choice" ]] && return 0
  done
  die "$flag must be one of: $*; got '$value'"
}

check_word() {  # a host, path or name that needs no quoting inside JSON or a command line
  [[ $2 =~ ^[A-Za-z0-9_./:@+-]+$ ]] || die "$1 must be a plain word (letters, digits, ._/:@+-), got '$2'"
}

split_csv() {  # split_csv FLAG VALUE ARRAY_NAME: comma list, no empty or repeated items
  local flag=$1 value=$2 item
  local -n _csv_out=$3
  _csv_out=()
  [[ -n $value ]] || die "$flag must not be empty"
  IFS=, read -r -a _csv_out <<<"$value"
  local -A seen=()
  for item in "${_csv_out[@]}"; do
    [[ -n $item ]] || die "$flag has an empty item: '$value'"
    [[ -z ${seen[$item]:-} ]] || die "$flag lists '$item' twice"
    seen[$item]=1
  done
}

check_gpu_ids() {  # check_gpu_ids FLAG ID...
  local flag=$1 id
  shift
  for id in "$@"; do
    [[ $id =~ ^[0-9]+$ ]] || die "$flag must list GPU indices like 0,1,2,3; got '$id'"
  done
}

declare -A PORT_OWNER=()

claim_ports() {  # claim_ports OWNER FIRST COUNT: no two uses of one port, none past 65535
  local owner=$1 first=$2 count=$3 port
  (( first + count - 1 <= 65535 )) || die "$owner needs ports $first-$(( first + count - 1 )), past 65535"
  for (( port = first; port < first + count; port++ )); do
    [[ -z ${PORT_OWNER[$port]:-} ]] || die "port $port is wanted by both ${PORT_OWNER[$port]} and $owner"
    PORT_OWNER[$port]=$owner
  done
}

join_by() {  # join_by SEP ITEM...
  local sep=$1 joined=${2:-}
  shift 2 || return 0
  local item
  for item in "$@"; do joined+="$sep$item"; done
  printf '%s' "$joined"
}

check_tp() {  # check_tp FLAG VALUE: a --tensor-parallel-size disagg serve accepts
  check_positive_int "$1" "$2"
  (( 10#$2 <= 64 )) || die "$1 must be between 1 and 64, got '$2'"
}

GPU_API=HIP  # what the plan's comments call a device index: HIP, or CUDA (--platform cuda)

rank_text() {  # rank_text GPU_CSV [TP]: how an instance's GPUs become its DP and TP ranks
  local -a ids
  IFS=, read -r -a ids <<<"$1"
  local n=${#ids[@]} tp=${2:-1}
  local dp=$(( n / tp )) api=$GPU_API
  if (( n == 1 )); then
    printf 'GPU %s (DP rank 0 on %s device 0)' "$1" "$api"
  elif (( tp == 1 )); then
    printf 'GPUs %s as DP ranks 0-%s on %s devices 0-%s' "$1" $(( n - 1 )) "$api" $(( n - 1 ))
  elif (( dp == 1 )); then
    printf 'GPUs %s as TP ranks 0-%s of one engine core on %s devices 0-%s' "$1" $(( tp - 1 )) \
      "$api" $(( n - 1 ))
  else
    printf 'GPUs %s as DP ranks 0-%s x TP ranks 0-%s on %s devices 0-%s (DP rank d, TP rank t on device d*%s+t)' \
      "$1" $(( dp - 1 )) $(( tp - 1 )) "$api" $(( n - 1 )) "$tp"
  fi
}

shell_quote() {  # one argument, quoted only when it needs to be (deterministic dry-run text)
  if [[ $1 =~ ^[A-Za-z0-9_./:,=@%+-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

print_command() {  # the whole command line, each word quoted as a shell would need it
  local word line=""
  for word in "$@"; do line+="${line:+ }$(shell_quote "$word")"; done
  printf '%s\n' "$line"
}

kv_transfer_config() {  # kv_transfer_config ROLE EXTRA_JSON_FIELDS -> the serve flag's JSON
  printf '{"kv_connector":"PDConnector","kv_role":"%s","kv_connector_extra_config":{%s}}' \
    "$1" "$2"
}

kv_extra_fields() {  # kv_extra_fields TRANSPORT MODE BASE_PORT HOST TRANSPORT_OPTIONS_JSON
  local fields
  fields=$(printf '"transport":"%s","mode":"%s","base_port":%s,"host":"%s"' "$1" "$2" "$3" "$4")
  [[ -n $5 ]] && fields+=",\"transport_options\":$5"
  [[ -n ${TRANSFER_TIMEOUT:-} ]] && fields+=",\"transfer_timeout\":$TRANSFER_TIMEOUT"
  [[ -n ${DEFER_TIMEOUT:-} ]] && fields+=",\"defer_timeout\":$DEFER_TIMEOUT"
  [[ -n ${LEASE_TIMEOUT:-} ]] && fields+=",\"lease_timeout\":$LEASE_TIMEOUT"
  [[ -n ${LOAD_FAILURE_POLICY:-} ]] && fields+=",\"kv_load_failure_policy\":\"$LOAD_FAILURE_POLICY\""
  printf '%s' "$fields"
}

# Options every launching script shares (its usage text lists them too).
LOG_DIR=./disagg-logs READY_TIMEOUT_S=900 DRY_RUN=0 TRANSFER_TIMEOUT="" DEFER_TIMEOUT=""
LEASE_TIMEOUT="" LOAD_FAILURE_POLICY=""
INSTANCE_ARGS=()

common_option() {  # common_option FLAG VALUE: 0 if FLAG is a shared option (and stored)
  case $1 in
    --transfer-timeout) TRANSFER_TIMEOUT=$2 ;;
    --defer-timeout) DEFER_TIMEOUT=$2 ;;
    --lease-timeout) LEASE_TIMEOUT=$2 ;;
    --kv-load-failure-policy) LOAD_FAILURE_POLICY=$2 ;;
    --instance-arg) INSTANCE_ARGS+=("$2") ;;
    --log-dir) LOG_DIR=$2 ;;
    --ready-timeout) READY_TIMEOUT_S=$2 ;;
    *) return 1 ;;
  esac
}

validate_common() {
  check_positive_int --ready-timeout "$READY_TIMEOUT_S"
  [[ -z $TRANSFER_TIMEOUT ]] || check_seconds --transfer-timeout "$TRANSFER_TIMEOUT"
  [[ -z $DEFER_TIMEOUT ]] || check_seconds --defer-timeout "$DEFER_TIMEOUT"
  [[ -z $LEASE_TIMEOUT ]] || check_seconds --lease-timeout "$LEASE_TIMEOUT"
  [[ -z $LOAD_FAILURE_POLICY ]] \
    || check_choice --kv-load-failure-policy "$LOAD_FAILURE_POLICY" fail recompute
}

COMMON_USAGE='  --transfer-timeout S        seconds a posted KV transfer may take (connector default 30)
  --defer-timeout S           seconds a transfer may wait for its peer (connector default 60)
  --lease-timeout S           seconds without a peer heartbeat before giving up (default 5)
  --kv-load-failure-policy P  fail | recompute (connector default fail)
  --instance-arg ARG          one more argument for every disagg serve (repeatable)
  --log-dir DIR               where process logs go (default ./disagg-logs)
  --ready-timeout S           seconds to wait for each process to be healthy (default 900)
  --dry-run                   print the commands and environment, start nothing'

rocm_env() {  # rocm_env ARRAY_NAME: the ROCm knobs every instance gets (caller may override)
  local -n _env_out=$1
  # AMD's vLLM-on-MI300X guide: device-side kernel arguments cut launch latency, and hipBLASLt
  # is the faster GEMM library for the linear layers.
  _env_out+=("HIP_FORCE_DEV_KERNARG=${HIP_FORCE_DEV_KERNARG:-1}"
            "TORCH_BLAS_PREFER_HIPBLASLT=${TORCH_BLAS_PREFER_HIPBLASLT:-1}")
}

cuda_env() {  # cuda_env ARRAY_NAME: the CUDA knobs every instance gets (caller may override)
  local -n _cuda_env_out=$1
  # CUDA numbers GPUs fastest first by default; PCI bus order is nvidia-smi's, so the GPU
  # indices of the plan mean the same GPUs to the operator, the driver and torch.
  _cuda_env_out+=("CUDA_DEVICE_ORDER=${CUDA_DEVICE_ORDER:-PCI_BUS_ID}")
}

comment() {  # a line of the plan: printed in --dry-run, logged otherwise
  printf '# %s\n' "$*"
}

launch() {  # launch NAME [VAR=VALUE ...] -- COMMAND...
  local name=$1
  shift
  local -a envs=()
  while [[ $# -gt 0 && $1 != -- ]]; do envs+=("$1"); shift; done
  shift
  if [[ $DRY_RUN == 1 ]]; then
    if (( ${#envs[@]} )); then print_command env "${envs[@]}" "$@"; else print_command "$@"; fi
    return 0
  fi
  mkdir -p "$LOG_DIR"
  # from the first child on, any exit of this script (error, signal) stops what it started
  (( ${#CHILD_PIDS[@]} )) || { trap 'stop_children; exit 0' INT TERM; trap stop_children EXIT; }
  env "${envs[@]}" "$@" >"$LOG_DIR/$name.log" 2>&1 &
  CHILD_PIDS+=("$!")
  CHILD_NAMES+=("$name")
  printf '%s: started %s (pid %s, log %s)\n' "$SCRIPT_NAME" "$name" "$!" "$LOG_DIR/$name.log"
}

preflight() {  # preflight [VAR=VALUE ...] -- TRANSPORT: disagg doctor must call it usable
  local -a envs=()
  while [[ $1 != -- ]]; do envs+=("$1"); shift; done
  local transport=$2
  local -a cmd=(disagg doctor --no-compile --require "$transport")
  if [[ $DRY_RUN == 1 ]]; then
    print_command env "${envs[@]}" "${cmd[@]}"
    return 0
  fi
  mkdir -p "$LOG_DIR"
  env "${envs[@]}" "${cmd[@]}" >"$LOG_DIR/doctor.txt" \
    || fail "this node cannot use the $transport transport (see $LOG_DIR/doctor.txt)"
}

wait_healthy() {  # wait_healthy NAME URL [CHILD_INDEX]: until GET URL/health answers 200
  local name=$1 url=$2 index=${3:-$(( ${#CHILD_PIDS[@]} - 1 ))}
  if [[ $DRY_RUN == 1 ]]; then
    comment "wait until $url/health answers (up to ${READY_TIMEOUT_S}s)"
    return 0
  fi
  local deadline=$(( SECONDS + READY_TIMEOUT_S )) polls=0
  local -a backoff=(0.2 0.5 1)  # quick for what is up at once, then every 2 s
  until curl -fsS -o /dev/null --max-time 2 "$url/health" 2>/dev/null; do
    kill -0 "${CHILD_PIDS[$index]}" 2>/dev/null \
      || fail "$name exited during start-up; see $LOG_DIR/${CHILD_NAMES[$index]}.log"
    (( SECONDS < deadline )) \
      || fail "$name not healthy after ${READY_TIMEOUT_S}s; see $LOG_DIR/${CHILD_NAMES[$index]}.log"
    sleep "${backoff[polls]:-2}"
    polls=$(( polls + 1 ))
  done
}

stop_children() {  # TERM every child we started, KILL what is left after 15 s
  local pid waited=0
  for pid in "${CHILD_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${CHILD_PIDS[@]}"; do
    while kill -0 "$pid" 2>/dev/null && (( waited < 15 )); do sleep 1; waited=$(( waited + 1 )); done
    kill -KILL "$pid" 2>/dev/null || true
  done
}

supervise() {  # block until a child exits (then stop the rest, exit 1) or a signal (exit 0)
  [[ $DRY_RUN == 1 ]] && return 0
  local rc=0 i
  wait -n || rc=$?
  for i in "${!CHILD_PIDS[@]}"; do
    kill -0 "${CHILD_PIDS[$i]}" 2>/dev/null \
      || fail "${CHILD_NAMES[$i]} exited (code $rc); stopping everything; see $LOG_DIR/${CHILD_NAMES[$i]}.log"
  done
  fail "a child exited (code $rc); stopping everything"
}
