#!/usr/bin/env bash
# The README's "run the main job" command until `fastkd demo` lands: builds fastkd._C if needed
# and runs examples/distill_step.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -c "import torch" 2>/dev/null || $PY -m pip install --quiet torch==2.13.0
$PY -c "import transformers" 2>/dev/null || $PY -m pip install --quiet transformers safetensors
[ -n "$(ls fastkd/_C*.so 2>/dev/null)" ] || $PY setup.py --quiet build_ext --inplace >/dev/null
PYTHONPATH=. TRITON_INTERPRET=${TRITON_INTERPRET:-1} $PY examples/distill_step.py "$@"
