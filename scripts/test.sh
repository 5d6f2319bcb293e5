#!/usr/bin/env bash
# fastkd's test command (README "Run the tests"; .ci/run calls exactly this).
# On a fresh machine it installs what the tests need (the CPU torch 2.13.0 wheel when no torch is
# installed; never the multi-GB CUDA packages), builds fastkd._C in place, compiles the CUDA sources
# to object files where nvcc exists, checks the installed package in a fresh virtual environment,
# runs ruff and the test suite (Triton kernels under TRITON_INTERPRET=1 when there is no GPU).
#   --slow   also run the tests marked slow
#   --quick  skip the install check in a virtual environment and the nvcc compile check
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SLOW=0; QUICK=0
for a in "$@"; do
  case "$a" in
    --slow) SLOW=1 ;;
    --quick) QUICK=1 ;;
    *) echo "usage: scripts/test.sh [--slow] [--quick]" >&2; exit 2 ;;
  esac
done
step() { printf '\n==> %s\n' "$*"; }

step "dependencies"
if ! $PY -c "import torch" >/dev/null 2>&1; then
  # The CPU wheel; on a GPU machine install the CUDA build of torch first (README).
  $PY -m pip install --quiet torch==2.13.0
fi
TORCH_VERSION=$($PY -c "import torch; print(torch.__version__)")
CONSTRAINTS=$(mktemp); echo "torch==${TORCH_VERSION}" > "$CONSTRAINTS"
$PY -m pip install --quiet -c "$CONSTRAINTS" -r requirements-dev.txt
rm -f "$CONSTRAINTS"

step "build fastkd._C (torch ${TORCH_VERSION})"
$PY setup.py --quiet build_ext --inplace 2>&1 | grep -vE "warning: |^\s*$|In file included|note: " | tail -n 20 || true
$PY -c "import fastkd._C" || { echo "fastkd._C failed to build or load" >&2; exit 1; }

if [ "$QUICK" = 0 ] && command -v nvcc >/dev/null 2>&1; then
  step "nvcc: compile the CUDA sources to object files"
  bash scripts/nvcc_check.sh
fi

if [ "$QUICK" = 0 ]; then
  step "install check: pip install . into a fresh virtual environment, import from elsewhere"
  bash scripts/install_check.sh
fi

step "ruff"
$PY -m ruff check .

step "pytest"
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export TRITON_INTERPRET=1
fi
MARK=(-m "not slow")
[ "$SLOW" = 1 ] && MARK=()
$PY -m pytest -q "${MARK[@]}" tests
