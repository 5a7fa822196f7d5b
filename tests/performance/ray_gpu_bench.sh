#!/usr/bin/env bash
# Ray against the pool on the lent 2-GPU machine (issue 13; docs/benchmarks.md says how it was run).
# Carried: FunASR wheels in $WHEELS (default .whl; jieba and modelscope are not needed here), Ray in .raypkg/
# (ray-stripped.tar.xz: the cp312 wheel less Java, dashboard UI and the ML libraries, plus its dependencies'
# wheels), the podcast and the real fsmn-vad in .bench-data/shared/. Results go to $1; the rest of the
# arguments go to ray_bench.py.
set -uo pipefail
out=${1:-/tmp/ray-gpu-out}; shift || true
mkdir -p "$out" /tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
  "${WHEELS:-.whl}"/*.whl .raypkg/*.whl > "$out/pip.log" 2>&1 || { echo "pip install failed"; tail "$out/pip.log"; exit 1; }
tar -xJf .raypkg/ray-stripped.tar.xz -C /tmp/site
export PYTHONPATH=/tmp/site:$PWD/src:$PWD TRANSCRIBE_SHARED=$PWD/.bench-data/shared PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
python3 tests/performance/ray_bench.py --device cuda --shared "$TRANSCRIBE_SHARED" --out "$out" \
  --work /tmp/ray-work --models /tmp/bench-models "$@" > "$out/ray_bench.log" 2>&1
echo "exit $?" >> "$out/ray_bench.log"
