#!/usr/bin/env bash
# One NVIDIA node (H100 / H200, GPUs joined by NVLink): deploy/mi300x/single_node.sh with
# --platform cuda. Same options and plan: prefill and decode instances whose GPUs are DP (and
# TP) ranks, KV over the ipc transport (CUDA IPC peer copies) by default, nixl or tcp on
# request, the proxy in front. What differs from ROCm: CUDA_VISIBLE_DEVICES (with
# CUDA_DEVICE_ORDER=PCI_BUS_ID, so GPU indices are nvidia-smi's), nvidia-smi must list every
# GPU the plan uses, no ROCm knobs, no mori.
#
#   deploy/cuda/single_node.sh --model /models/Llama-3.1-8B-Instruct   # 1P on 0-3, 1D on 4-7
#   deploy/cuda/single_node.sh --model M --prefill-gpus 0 --decode-gpus 1 --dry-run
set -euo pipefail
exec bash "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/../mi300x/single_node.sh" \
  --platform cuda "$@"
