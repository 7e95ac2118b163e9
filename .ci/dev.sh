#!/usr/bin/env bash
# One entry point for a fresh machine: set-up (venv, torch only if missing, the project), then
#   bash .ci/dev.sh demo   - local 1 prefill + 1 decode + proxy on the built-in tiny model (CPU)
#   bash .ci/dev.sh test   - ruff, mypy and the default (CPU) test suite
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${DISAGG_VENV:-.venv}"
PY="$VENV/bin/python"

setup() {
  if [ ! -x "$PY" ]; then
    # --system-site-packages: a ROCm/CUDA machine's own torch stays visible and is never replaced.
    python3 -m venv --system-site-packages "$VENV"
  fi
  "$PY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    "$PY" -m pip install -q torch==2.13.0
  fi
  # triton: ROCm images ship it as pytorch-triton-rocm; install the PyPI wheel only if absent.
  if ! "$PY" -c "import triton" >/dev/null 2>&1; then
    "$PY" -m pip install -q "triton>=3.0" || echo "dev.sh: triton unavailable; kernel tests skip"
  fi
  "$PY" -m pip install -q -e ".[test,bench]"
  if ! "$PY" -c "import nixl" >/dev/null 2>&1; then
    "$PY" -m pip install -q nixl || echo "dev.sh: nixl unavailable; nixl tests skip"
  fi
  "$PY" -c "import torch; assert torch.__version__, 'torch missing'"
}

system_tools() {
  # shellcheck lints deploy/ scripts, curl is used by their real-mode tests (root on CI).
  if ! command -v shellcheck >/dev/null 2>&1 || ! command -v curl >/dev/null 2>&1; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
      (apt-get update -qq && apt-get install -y -qq shellcheck curl) >/dev/null 2>&1 \
        || echo "dev.sh: could not install shellcheck/curl; those tests skip"
    fi
  fi
}

run_tests() {
  system_tools
  "$VENV/bin/ruff" check disagg connectors hip_kernels proxy bench tests
  "$VENV/bin/mypy" disagg connectors hip_kernels proxy bench
  "$VENV/bin/mypy" --explicit-package-bases tests
  set +e
  "$PY" -m pytest -q -p no:cacheprovider "$@"
  code=$?
  set -e
  if [ "$code" -eq 5 ]; then
    echo "dev.sh: pytest collected no tests; that is a failure" >&2
    exit 1
  fi
  exit "$code"
}

cmd="${1:-test}"
shift || true
setup
case "$cmd" in
  test) run_tests "$@" ;;
  demo) exec "$PY" -m disagg.demo "$@" ;;
  *) echo "usage: bash .ci/dev.sh demo|test" >&2; exit 2 ;;
esac
