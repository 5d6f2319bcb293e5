#!/usr/bin/env bash
# pip install . (non-editable) into a fresh virtual environment and import fastkd and
# fastkd.kernels from outside the repository. The venv sees the machine's torch/triton
# (--system-site-packages) so nothing large is downloaded; fastkd itself must come from the venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=$(mktemp -d)/venv
$PY -m venv --system-site-packages "$VENV"
# the venv's own bundled setuptools may predate bdist_wheel support: bring a current one
"$VENV/bin/python" -m pip install --quiet --upgrade "setuptools>=70" wheel
# The packaging is what is checked here; the instruction-set levels are built and tested by the
# in-place build of scripts/test.sh, so this second build compiles the baseline level only.
FASTKD_CPU_LEVELS=${FASTKD_CPU_LEVELS:-default} \
  "$VENV/bin/python" -m pip install --quiet --no-build-isolation --no-deps . 2>&1 | grep -vE "warning|^\s*$" | tail -n 5 || true
cd "$(mktemp -d)"
"$VENV/bin/python" - <<'PY'
import os
import fastkd, fastkd.kernels, fastkd.kernels.distill_loss
from fastkd import _ext
assert "/venv/" in fastkd.__file__, f"fastkd was imported from {fastkd.__file__}, not the venv"
# fastkd.kernels is a namespace subpackage (kernels/README.md says why): it has a __path__, no __file__
assert all("/venv/" in p for p in fastkd.kernels.__path__), list(fastkd.kernels.__path__)
assert "/venv/" in fastkd.kernels.distill_loss.__file__, fastkd.kernels.distill_loss.__file__
assert _ext.available(), _ext.unavailable_reason()
print("installed fastkd imports from", os.path.dirname(fastkd.__file__), "with fastkd._C and fastkd.kernels")
PY
rm -rf "$(dirname "$VENV")"
