#!/usr/bin/env bash
# The README's "run the main job" command: `fastkd demo` on a fresh machine. Installs what is
# missing (CPU torch 2.13.0 when no torch is installed; never the CUDA packages), builds fastkd._C,
# then runs the data-free distillation demo on the registry-shipped teacher and data
# (see `python -m fastkd demo --help`; pass e.g. --quick for the ~5-minute budget).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -c "import torch" >/dev/null 2>&1 || $PY -m pip install --quiet torch==2.13.0
TORCH_VERSION=$($PY -c "import torch; print(torch.__version__)")
CONSTRAINTS=$(mktemp); echo "torch==${TORCH_VERSION}" > "$CONSTRAINTS"
$PY -m pip install --quiet -c "$CONSTRAINTS" -r requirements-dev.txt
rm -f "$CONSTRAINTS"
[ -n "$(ls fastkd/_C*.so 2>/dev/null)" ] || $PY setup.py --quiet build_ext --inplace >/dev/null 2>&1
PYTHONPATH=. exec $PY -m fastkd demo "$@"
