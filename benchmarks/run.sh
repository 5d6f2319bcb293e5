#!/usr/bin/env bash
# Regenerate fastkd's benchmark results with one command: run the whole suite with the right flags,
# then the report. Writes benchmarks/results/<device>/ (CSV per op, README.md tables, PNG plots).
#
#   bash benchmarks/run.sh                      # default sizes (CPU: 26 min when first timed; see benchmarks/README.md)
#   bash benchmarks/run.sh --sizes full         # the full sweep (long on CPU)
#   bash benchmarks/run.sh --sizes quick        # smoke run: tiny shapes, marked as such in the report
#   bash benchmarks/run.sh --readme             # also refresh the tables in README.md
#   bash benchmarks/run.sh -k distill_loss      # other arguments go to pytest
#
# Environment: FASTKD_BENCH_THREADS (torch threads on CPU, default 2), FASTKD_BENCH_PROVIDERS
# (e.g. eager,fastkd-cpu), FASTKD_BENCH_TIME (seconds of timed rounds per case),
# FASTKD_BENCH_JSON (keep the raw pytest-benchmark JSON there), PYTHON (interpreter).
# Run it on a quiet machine: other processes on the same cores distort every number.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SIZES=${FASTKD_BENCH_SIZES:-default}
README=0
ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --sizes) SIZES=$2; shift 2 ;;
    --sizes=*) SIZES=${1#--sizes=}; shift ;;
    --readme) README=1; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
export FASTKD_BENCH_SIZES=$SIZES
# The Triton interpreter is for tests only; benchmarks time compiled kernels.
unset TRITON_INTERPRET

if ! $PY -c "import fastkd._C" >/dev/null 2>&1; then
  echo "==> building fastkd._C in place"
  $PY setup.py --quiet build_ext --inplace >/dev/null
fi
$PY -m fastkd.info
read -r LOAD _ < /proc/loadavg 2>/dev/null || LOAD=0
if awk -v l="$LOAD" -v n="$(nproc 2>/dev/null || echo 1)" 'BEGIN { exit !(l > 0.5 * n) }'; then
  echo "WARNING: load average $LOAD on $(nproc) cores: other processes distort CPU timings (the report marks the run as busy)" >&2
fi

JSON=${FASTKD_BENCH_JSON:-$(mktemp -t fastkd-bench-XXXXXX.json)}
echo "==> pytest benchmarks (sizes: $SIZES) -> $JSON"
$PY -m pytest benchmarks --benchmark-only -p no:cacheprovider -q \
  --benchmark-json "$JSON" --benchmark-columns=median,iqr,rounds ${ARGS[@]+"${ARGS[@]}"}

echo "==> report"
$PY -m benchmarks.report "$JSON"
if [ "$README" = 1 ]; then
  $PY -m benchmarks.report --update-readme README.md
fi
