#!/usr/bin/env bash
# The one GPU check: builds the CUDA extension, runs the GPU tests, a short paper150 training run and its
# evaluation, then every GPU benchmark suite, and prints the summary table last. Sized for under 8 minutes
# on an H100/H200: each step has its own time limit (and each suite its own torch.compile budget), so one
# slow step cannot starve the others, and the steps that matter most run first. Time a step leaves unused
# goes to the steps after it (and time it overruns is taken from them), so the whole check takes about the
# sum of the limits at most. A suite cut short by its limit keeps the rows it wrote.
# Writes logs and JSON results to the folder given as $1, else $OUT (the device tool's output folder),
# else benchmarks/results.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-benchmarks/results}}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
# Triton's autotuning picks each kernel's config once per machine, not once per process: the tests, the
# training run and every suite launch the same shapes.
export TRITON_CACHE_AUTOTUNING=1
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'" || exit 1
status=0
spare=0  # seconds the steps so far left unused (negative: overran)
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $out/NAME.log, remember failures
  local name=$1 limit=$(($2 + spare)) start=$SECONDS
  shift 2
  ((limit < 5)) && limit=5
  echo "== $name (limit ${limit}s)"
  # -k: a process that outlives SIGTERM by 10 s (the trainer finishes its step and saves first) is killed.
  timeout -k 10 "$limit" "$@" >"$out/$name.log" 2>&1 || { status=1; echo "   $name failed or timed out: see $name.log"; }
  spare=$((limit - (SECONDS - start)))
  tail -3 "$out/$name.log"
}

# Offline install (the GPU machine has torch, triton, pybind11, cmake and ninja but no network).
step build 60 env DCIGN_FAST_CUDA=1 python3 -m pip install -q --no-build-isolation --no-deps --no-index -e .
step gpu-tests 150 python3 -m pytest -v -m cuda -p no:cacheprovider --durations=15
step train-paper150 40 python3 -m dcign_fast.train --preset paper150 --out "$out/paper150" --steps 100000 \
  --set time_limit_s=25 --set batch_size=128 --set log_every=10 --set image_every=100000
newest=$(ls -d "$out"/paper150/checkpoints/step-* 2>/dev/null | tail -1)
step eval-paper150 25 python3 -m dcign_fast.cli eval --checkpoint "${newest:-missing}" --device cuda \
  --sweeps 10 --identities 40 --out "$out/paper150/eval"
tail -1 "$out/paper150/metrics.jsonl" 2>/dev/null
# suite:time limit:compile budget (seconds)
for suite in ops:80:30 kernels:20:0 train:55:25 latent:25:8 render:10:0 patch:10:0; do
  IFS=: read -r name limit compile <<<"$suite"
  step "bench-$name" "$limit" env DCIGN_BENCH_COMPILE_S="$compile" \
    python3 -m benchmarks.run --suite "$name" --device cuda --out "$out"
done
python3 -m benchmarks.report --results "$out" --out "$out" --summary | tail -40
exit $status
