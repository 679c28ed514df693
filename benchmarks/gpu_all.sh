#!/usr/bin/env bash
# Everything that needs the GPU, in one call (the device tool's lease is short):
# the GPU tests, then every benchmark shape; results under $OUT (default benchmarks/results).
#   device run:  bash benchmarks/gpu_all.sh      (carry wheels/ with liger-kernel, cut-cross-entropy)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
if ls wheels/*.whl >/dev/null 2>&1; then
    python -m pip install -q --no-deps wheels/*.whl || echo "warning: some peer wheels failed to install"
fi
python -m pip install -q --no-build-isolation --no-deps -e . >/dev/null 2>&1 || export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu-info.txt"
python -m pytest -q -rP -m gpu tests 2>&1 | tee "$OUT/gpu-tests.txt" | tail -30
python -m benchmarks --preset G2 --device cuda --out-dir "$OUT" --name G2-cuda 2>&1 | tail -20
python -m benchmarks --preset G1 --device cuda --out-dir "$OUT" --name G1-cuda 2>&1 | tail -20
