#!/usr/bin/env bash
# The one GPU check: builds the CUDA extension, runs the GPU tests, then every GPU benchmark suite.
# Fits in under 8 minutes on an H100/H200. Writes logs and JSON results to the folder given as $1,
# else $OUT (the device tool's output folder), else benchmarks/results; prints the summary tables last.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-benchmarks/results}}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'" || exit 1

# Offline install (the GPU machine has torch, triton, pybind11, cmake and ninja but no network).
DCIGN_FAST_CUDA=1 python3 -m pip install -q --no-build-isolation --no-deps --no-index -e . >"$out/build.log" 2>&1 \
  || { echo "extension build failed; see build.log"; tail -20 "$out/build.log"; }

status=0
timeout 150 python3 -m pytest -q -m cuda -p no:cacheprovider 2>&1 | tee "$out/gpu-tests.log" | tail -15
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

timeout 300 python3 -m benchmarks.run --suite all --device cuda --out "$out" 2>&1 | tee "$out/benchmarks.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
exit $status
