#!/usr/bin/env bash
# Compile every csrc/*.cu to an object file with nvcc against the installed torch's headers, so a
# CUDA compile error cannot land unseen on a machine without a GPU (or with a CPU-only torch).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
shopt -s nullglob
cus=(csrc/*.cu)
[ ${#cus[@]} -eq 0 ] && { echo "no CUDA sources"; exit 0; }
INC=$($PY -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-I'+p for p in include_paths()))")
PYINC=$($PY -c "import sysconfig; print(sysconfig.get_paths()['include'])")
ARCH=${FASTKD_CUDA_ARCH:-9.0}
GENCODE="-gencode arch=compute_${ARCH/./},code=sm_${ARCH/./}"
OUT=$(mktemp -d)
for f in "${cus[@]}"; do
  echo "nvcc -c $f ($GENCODE)"
  nvcc -c "$f" -o "$OUT/$(basename "$f").o" $INC -I"$PYINC" -Icsrc -std=c++20 -O3 --use_fast_math \
    --expt-relaxed-constexpr -DFASTKD_WITH_CUDA $GENCODE -Xcompiler -fPIC \
    -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
    -D__CUDA_NO_HALF2_OPERATORS__ 2>&1 | grep -vE "^$" || true
  [ -s "$OUT/$(basename "$f").o" ] || { echo "nvcc failed on $f" >&2; exit 1; }
done
rm -rf "$OUT"
echo "all CUDA sources compiled"
