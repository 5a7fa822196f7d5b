#!/usr/bin/env bash
# Run the benchmark on the lent GPU machine (see docs/benchmarks.md): carried FunASR wheels in .whl/,
# the podcast and the real fsmn-vad in .bench-data/shared/. Results go to $1 (default /tmp/gpu-out).
# BENCH_SCRIPT picks another script taking the same options (e.g. tests/performance/punc_bench.py).
set -uo pipefail
out=${1:-/tmp/gpu-out}; shift || true
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  > "$out/pip.log" 2>&1 || { echo "pip install failed"; tail "$out/pip.log"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD/src:$PWD TRANSCRIBE_SHARED=$PWD/.bench-data/shared PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
python3 "${BENCH_SCRIPT:-tests/performance/bench.py}" --shared "$TRANSCRIBE_SHARED" --out "$out" --work /tmp/bench-work \
  --models /tmp/bench-models "$@" > "$out/bench.log" 2>&1
echo "exit $?" >> "$out/bench.log"
