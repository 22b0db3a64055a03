"""Unpool-conv, per kernel: where each backend's forward+backward time goes, from torch.profiler.

The ops suite says how fast each backend is; this one says which of its kernels to work on next (forward,
grad input, grad weight, weight packing, layout copies), so that one short GPU run is enough to direct the
next optimisation. Rows: one per (case, backend, kernel) with the kernel's device time per iteration
(``kernel_ms``, the mean over the profiled iterations), its ``share`` of the backend's total and its
``calls`` per iteration; kernels beyond the largest few are summed as "(other)". On CUDA the cases are
the largest paper150 decoder layer and the whole decoder at batch 128 in bf16 and float32; on the CPU
(no kernels to see) the "kernels" are the aten operators' self CPU times. Inputs are channels_last, as
in the trainer (see the ops suite).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from benchmarks.harness import synchronize
from benchmarks.suites.unpool_cases import (
    Case,
    backends_for,
    case_inputs,
    paper150_cases,
    row_fields,
    runner,
    with_backend,
)

TOP = 6  # kernels listed by name per backend; the rest are summed


def short_kernel_name(name: str) -> str:
    """A demangled kernel name without its return type, namespaces and argument list."""
    name = re.sub(r"^void\s+", "", name)
    name = re.sub(r"\([^()]*\)$", "", name)  # the argument list
    name = re.sub(r"\b(?:\w+::|\(anonymous namespace\)::)+", "", name)
    return name[:90]


def kernel_times(run: Callable[[], object], device: str, iterations: int) -> list[tuple[str, float, float]]:
    """(kernel, milliseconds per iteration, calls per iteration) of ``iterations`` calls of ``run``, after two
    warm-up calls, largest first: device kernels on CUDA, operators' self CPU time on the CPU."""
    for _ in range(2):
        run()
    synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(iterations):
            run()
        synchronize(device)
    times: dict[str, list[float]] = {}
    for event in prof.key_averages():
        if device == "cuda":
            if event.device_type != DeviceType.CUDA:
                continue
            us = event.self_device_time_total
        else:
            us = event.self_cpu_time_total
        if us > 0:
            entry = times.setdefault(short_kernel_name(event.key), [0.0, 0.0])
            entry[0] += us / 1e3 / iterations
            entry[1] += event.count / iterations
    return sorted(((name, ms, calls) for name, (ms, calls) in times.items()), key=lambda t: -t[1])


def _cases(device: str, quick: bool) -> list[tuple[int, torch.dtype, Case]]:
    if quick:
        return [(4, torch.float32, paper150_cases(4)[-1])]
    if device == "cpu":
        return [(20, torch.float32, paper150_cases(20)[-1])]
    cases = paper150_cases(128)
    largest = max(cases[:-1], key=lambda c: c.shape[1] * c.layers[0][0].out_channels * c.shape[2] ** 2)
    return [(128, dtype, case) for dtype in (torch.bfloat16, torch.float32) for case in (largest, cases[-1])]


def run(device: str, quick: bool) -> Iterator[dict]:
    iterations = 2 if quick else 5
    # Triton first in every case: its kernels are the ones to work on, and a time limit that ends the suite
    # should cut the rest. (Its autotuning is charged to the ops suite where TRITON_CACHE_AUTOTUNING=1
    # keeps the choices, as device_check.sh does.)
    backends = sorted(backends_for(device), key=lambda backend: backend != "triton")
    for batch, dtype, case in _cases(device, quick):
        yield from _profile_case(device, batch, dtype, case, backends, iterations)


def _profile_case(
    device: str, batch: int, dtype: torch.dtype, case: Case, backends: list[str], iterations: int
) -> Iterator[dict]:
    """Rows of one case: each backend's largest kernels, the rest summed."""
    module, x, grad = case_inputs(case, device, dtype)
    row = row_fields(case, batch, dtype, "forward+backward")
    for backend in backends:
        try:
            times = kernel_times(runner(with_backend(module, backend), x, grad), device, iterations)
        except Exception as err:  # a backend that cannot run is reported, never fatal to the suite
            yield {**row, "backend": backend, "note": f"skipped: {type(err).__name__}: {str(err)[:80]}"}
            continue
        if not times:
            yield {**row, "backend": backend, "note": "the profiler recorded no kernels"}
            continue
        total = sum(ms for _, ms, _ in times)
        rest = times[TOP:]
        listed = times[:TOP] + ([("(other)", sum(t[1] for t in rest), sum(t[2] for t in rest))] if rest else [])
        for name, ms, calls in listed:
            yield {**row, "backend": backend, "kernel": name, "kernel_ms": ms, "share": ms / total, "calls": calls}
