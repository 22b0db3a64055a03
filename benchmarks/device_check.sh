#!/usr/bin/env bash
# The one GPU check: builds the CUDA extension, runs the GPU tests, a short paper150 training run and its
# evaluation, then every GPU benchmark suite, and prints the summary table last. Sized for under 8 minutes
# on an H100/H200: each step has its own time limit (and each suite its own torch.compile budget), so one
# slow step cannot starve the others, and the steps that matter most run first. Time a step leaves unused
# goes to the steps after it (and time it overruns is taken from them), so the whole check takes about the
# sum of the limits (460 s) at most, plus what runs without a limit: the probes, packing and the report
# (about 10-25 s). A suite cut short by its limit keeps the rows it wrote, marked as not finished.
# Writes to the folder given as $1, else $OUT (the device tool's output folder), else benchmarks/results:
# one JSON file per suite, and device-check-logs.tgz (every step's log, the training run's metrics and its
# evaluation, the report; no weights), replaced after each step. That is 7 files (8 while a tarball is
# written), as the device tool returns at most 8, and a check stopped from outside leaves what it had done.
set -uo pipefail
out="${1:-${OUT:-}}"
[[ -n $out ]] && out=$(realpath -m "$out")  # before the cd: a relative folder is the caller's
cd "$(dirname "$0")/.."
out="${out:-benchmarks/results}"
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT  # also when the check is stopped from outside
export PYTHONUNBUFFERED=1
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'" || exit 1
status=0
spare=0  # seconds the steps so far left unused (negative: overran)
pack() {  # the logs so far into $out, replaced whole: a check stopped mid-write leaves the previous tarball
  rm -f "$out"/*.json.partial  # (a suite killed mid-write of its results: the .json before it stands)
  tar czf "$out/device-check-logs.tgz.partial" --exclude='*.safetensors' --exclude='*.pt' -C "$work" . &&
    mv -f "$out/device-check-logs.tgz.partial" "$out/device-check-logs.tgz"
}
step() {  # step [--foreground] [--ok CODE] NAME SECONDS COMMAND...: run with a time limit, log to $work/NAME.log
  local foreground="" ok=0
  [[ $1 == --foreground ]] && { foreground=--foreground; shift; }
  [[ $1 == --ok ]] && { ok=$2; shift 2; }  # an exit code that also means success (besides 0)
  local name=$1 budget=$(($2 + spare)) start=$SECONDS
  shift 2
  local limit=$((budget < 5 ? 5 : budget))  # the floor of 5 s is lent: spare below keeps what it cost
  echo "== $name (limit ${limit}s)"
  # -k: a process that outlives SIGTERM by 10 s is killed. --foreground signals the command alone, not its
  # children: the trainer finishes its step and saves, where a killed ptxas would fail the step unsaved.
  local rc=0
  timeout $foreground -k 10 "$limit" "$@" >"$work/$name.log" 2>&1 || rc=$?
  if ((rc != 0 && rc != ok)); then
    status=1
    echo "   $name failed or timed out (exit $rc): see $name.log in device-check-logs.tgz"
  fi
  spare=$((budget - (SECONDS - start)))
  tail -3 "$work/$name.log"
  pack
}

# Offline install (the GPU machine has torch, triton, pybind11, cmake and ninja but no network). Without
# the extension every cuda-backend test would skip: the import makes a failed build fail this step. Built for
# this card's architecture only (sm_90a on an H100/H200): half the nvcc work of the default "80;90a", where
# one sm_90a source alone takes about a minute.
arch=$(python3 -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}{n}' + 'a' * (m == 9))")
step build 100 env DCIGN_FAST_CUDA_ARCHS="$arch" bash -c 'DCIGN_FAST_CUDA=1 python3 -m pip install -q --no-build-isolation --no-deps --no-index -e . &&
  python3 -c "import dcign_fast._C; print(\"built dcign_fast._C\")"'
# Four pytest workers share the GPU and compile Triton kernels in parallel; their autotuning, timed while
# sharing, is not cached (TRITON_CACHE_AUTOTUNING=0), while the benchmarks below keep theirs.
workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n 4")
step gpu-tests 90 env TRITON_CACHE_AUTOTUNING=0 python3 -m pytest -v -m cuda -p no:cacheprovider --durations=15 $workers
grep -E "^(FAILED|ERROR)" "$work/gpu-tests.log" | head -40
# Triton's autotuning picks each kernel's config once per machine, not once per process: the training run
# and every suite launch the same shapes.
export TRITON_CACHE_AUTOTUNING=1
# It stops at its time limit, which the trainer reports with exit status 75.
step --foreground --ok 75 train-paper150 55 python3 -m dcign_fast.train --preset paper150 --out "$work/paper150" \
  --steps 100000 --set time_limit_s=32 --set batch_size=128 --set log_every=1 --set image_every=100000
newest=$(ls -d "$work"/paper150/checkpoints/step-* 2>/dev/null | tail -1)
step eval-paper150 15 python3 -m dcign_fast.cli eval --checkpoint "${newest:-missing}" --device cuda \
  --sweeps 10 --identities 40 --out "$work/paper150/eval"
tail -1 "$work/paper150/metrics.jsonl" 2>/dev/null
# suite:time limit:compile budget (seconds)
for suite in ops:75:30 kernels:15:0 train:75:45 latent:15:8 render:10:0 patch:10:0; do
  IFS=: read -r name limit compile <<<"$suite"
  step "bench-$name" "$limit" env DCIGN_BENCH_COMPILE_S="$compile" \
    python3 -m benchmarks.run --suite "$name" --device cuda --out "$out"
done
python3 -m benchmarks.report --results "$out" --out "$work/report" --summary >"$work/report.log" 2>&1
pack
sed -n '/^## summary/,$p' "$work/report.log"  # all of the summary, however long (or the error, if none)
grep -q '^## summary' "$work/report.log" || tail -20 "$work/report.log"
exit $status
