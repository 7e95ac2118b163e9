#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Build the disagg ROCm image, or run a command in it with what MI300X serving needs: the GPU
# device files, host networking and IPC, and (unless --no-rdma) the RDMA devices with unlimited
# locked memory, since MoRI-IO and UCX register the whole KV cache with the NIC.
#
#   container.sh build                                      # docker build -f deploy/mi300x/Dockerfile
#   container.sh run                                        # disagg doctor in the image
#   container.sh run --models /models -- bash deploy/mi300x/single_node.sh --model /models/M
set -euo pipefail
SCRIPT_NAME=container.sh
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$HERE/../.." && pwd)
# shellcheck source=lib.sh
source "$HERE/lib.sh"

usage() {
  cat <<'USAGE'
usage: container.sh build [--image NAME] [--base-image IMAGE] [--dry-run]
       container.sh run [--image NAME] [--name NAME] [--models DIR] [--shm-size SIZE]
                        [--no-rdma] [--dry-run] [-- COMMAND...]

  --image NAME         image to build or run (default disagg:mi300x)
  --base-image IMAGE   ROCm PyTorch base image (default rocm/pytorch:latest; pin a digest)
  --name NAME          container name (default disagg)
  --models DIR         host directory mounted at the same path, read-only
  --shm-size SIZE      /dev/shm size (default 16g)
  --no-rdma            do not pass /dev/infiniband through (single-node ipc deployments)
  --dry-run            print the docker command, run nothing
USAGE
}

ACTION="" IMAGE=disagg:mi300x BASE_IMAGE="" NAME=disagg MODELS="" SHM_SIZE=16g RDMA=1
COMMAND=(disagg doctor)

parse_args() {
  (( $# )) || die "give an action: build or run (see --help)"
  case $1 in
    build|run) ACTION=$1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown action '$1'; use build or run" ;;
  esac
  while (( $# )); do
    [[ $1 != --*=* ]] || set -- "${1%%=*}" "${1#*=}" "${@:2}"  # --flag=value
    case $1 in
      --dry-run) DRY_RUN=1; shift; continue ;;
      --no-rdma) RDMA=0; shift; continue ;;
      --) shift; (( $# )) || die "nothing after --"; COMMAND=("$@"); break ;;
      -h|--help) usage; exit 0 ;;
    esac
    need_arg "$1" $# "${2:-}"
    case $1 in
      --image) IMAGE=$2 ;;
      --base-image) BASE_IMAGE=$2 ;;
      --name) NAME=$2 ;;
      --models) MODELS=$2 ;;
      --shm-size) SHM_SIZE=$2 ;;
      *) die "unknown option '$1' (see --help)" ;;
    esac
    shift 2
  done
  check_word --image "$IMAGE"
  check_word --name "$NAME"
  [[ -z $BASE_IMAGE ]] || check_word --base-image "$BASE_IMAGE"
  [[ -z $MODELS ]] || check_word --models "$MODELS"
  [[ $SHM_SIZE =~ ^[0-9]+[kmgKMG]?$ ]] || die "--shm-size must look like 16g, got '$SHM_SIZE'"
}

build() {
  local -a cmd=(docker build -f "$HERE/Dockerfile" -t "$IMAGE")
  [[ -z $BASE_IMAGE ]] || cmd+=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
  cmd+=("$REPO_ROOT")
  run_now "${cmd[@]}"
}

run_container() {
  # AMD's ROCm container flags: the KFD and DRI device files, the video group, and ptrace /
  # seccomp relaxed for the ROCm debugger and profilers
  local -a cmd=(docker run --rm --name "$NAME" --device=/dev/kfd --device=/dev/dri
                --group-add video --cap-add=SYS_PTRACE --security-opt seccomp=unconfined
                --network=host --ipc=host --shm-size "$SHM_SIZE")
  if (( RDMA )); then
    cmd+=(--device=/dev/infiniband --cap-add=IPC_LOCK --ulimit memlock=-1:-1)
  fi
  [[ -z $MODELS ]] || cmd+=(-v "$MODELS:$MODELS:ro")
  cmd+=("$IMAGE" "${COMMAND[@]}")
  run_now "${cmd[@]}"
}

run_now() {  # print in --dry-run, else run in the foreground
  if [[ $DRY_RUN == 1 ]]; then print_command "$@"; else "$@"; fi
}

main() {
  parse_args "$@"
  if [[ $ACTION == build ]]; then build; else run_container; fi
}

main "$@"
