"""Unpool-conv: every paper150 decoder layer, the whole decoder and K=3 "same" layers, each backend against
the reference.

Rows: forward and forward+backward median times of each backend, measured side by side in the same run;
``speedup`` is the reference's time over the row's. On CUDA the layers the goals name (paper150 at batch
128 in bf16) come first, then the other cases, then the goals' layers again with ``compile``
(torch.compile with mode="max-autotune" of the reference module, forward+backward, within the compile
budget) timed beside every backend; so a compile that overruns the suite's time limit costs no eager row.
On CUDA also: peak memory of forward+backward (not of ``compile``, whose CUDA graphs replay without
allocating); for the goals' layers, each backend's time replayed from a CUDA graph (``graph_ms``, and
``graph_speedup`` over the reference's replay), the GPU's time with no host work between the kernels; and
each case's floor: the phase form's multiply-adds at a matmul rate and its bytes at a copy bandwidth, both
measured in this run (``floor_ms``, and ``over_floor`` = time / floor).

Inputs, weights and gradients are channels_last, the layout the trainer runs DC-IGN in and the fused
kernels' own, for every backend (the reference's cuDNN included).

Layers that the decoder follows with a ReLU are timed with ``activation="relu"`` (the reference and torch
backends apply F.relu after the convolution, the triton backend fuses it).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import cast

import torch
from torch import nn

from benchmarks.harness import CompileBudget, compare, time_side_by_side
from benchmarks.suites.unpool_cases import (
    Case,
    backends_for,
    case_inputs,
    paper150_cases,
    row_fields,
    runner,
    same3_cases,
    with_backend,
)
from dcign_fast.ops.phases import multiply_adds

# --- floors -----------------------------------------------------------------------------------------------


def measured_rates(device: str, dtype: torch.dtype) -> tuple[float, float]:
    """(dense matmul multiply-adds per second in ``dtype`` (TF32 for float32), copy bytes per second)."""
    n = 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    src = torch.empty(2**28, device=device, dtype=torch.uint8)  # 256 MiB
    dst = torch.empty_like(src)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    copies = 8  # one 256 MiB copy takes ~0.1 ms on an H200: the timer's own overhead would be 10-25% of it

    def copy_all() -> None:
        for _ in range(copies):
            dst.copy_(src)

    try:
        times = time_side_by_side({"mm": lambda: a @ b, "copy": copy_all}, device, warmup=3, repeats=10)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return n**3 / (times["mm"] * 1e-3), 2 * copies * src.numel() / (times["copy"] * 1e-3)


def floor_ms(case: Case, batch: int, itemsize: int, backward: bool, rates: tuple[float, float]) -> float:
    """Lower bound: the phase form's multiply-adds at the matmul rate plus nothing, or its unavoidable bytes
    (input, output; backward: grad_out, input again, grad_input) at the copy bandwidth, whichever is larger,
    summed over the layers."""
    mac_rate, bandwidth = rates
    total = 0.0
    for layer, size in case.layers:
        kh, kw = layer.kernel_size
        macs = batch * layer.in_channels * layer.out_channels * multiply_adds((size, size), (kh, kw), layer.padding, 2)
        out_size = 2 * size + 2 * layer.padding[0] - kh + 1
        x_bytes = batch * layer.in_channels * size * size * itemsize
        y_bytes = batch * layer.out_channels * out_size * out_size * itemsize
        if backward:
            macs, moved = 3 * macs, 3 * x_bytes + 2 * y_bytes
        else:
            moved = x_bytes + y_bytes
        total += max(macs / mac_rate, moved / bandwidth)
    return total * 1e3


# --- the suite --------------------------------------------------------------------------------------------


# Each case's passes: (name, with backward); benchmarks/test_benchmarks.py times the same ones.
PASSES = (("forward", False), ("forward+backward", True))


def cases(device: str, quick: bool) -> list[tuple[int, torch.dtype, Case]]:
    """(batch, dtype, case) in order of importance: on CUDA the goals' layers first, batch 20 last. Public: the
    pytest-benchmark front door (benchmarks/test_benchmarks.py) times the same list."""
    if quick:
        return [(4, torch.float32, paper150_cases(4)[-1])]
    if device == "cpu":
        return [(20, torch.float32, c) for c in paper150_cases(20)]
    out = []
    for dtype in (torch.bfloat16, torch.float32):
        out += [(128, dtype, c) for c in paper150_cases(128)]
        out += [(16, dtype, c) for c in same3_cases(16)]
    return out + [(20, dtype, c) for dtype in (torch.bfloat16, torch.float32) for c in paper150_cases(20)]


def is_goal_case(device: str, batch: int, dtype: torch.dtype, case: Case) -> bool:
    """One of the layers the unpool-conv speed goals name: paper150's decoder, at batch 128 in bf16, on CUDA."""
    return device == "cuda" and batch == 128 and dtype == torch.bfloat16 and case.name.startswith("paper150")


def _measure(
    device: str, batch: int, dtype: torch.dtype, case: Case, backends: list[str], passes: tuple[tuple[str, bool], ...],
    quick: bool, budget: CompileBudget, rates: dict[torch.dtype, tuple[float, float]],
) -> Iterator[dict]:  # fmt: skip
    """Rows of one case: each pass (name, with backward) times ``backends`` side by side; "compile" is
    torch.compile(mode="max-autotune") of the reference module."""
    repeats, warmup = (2, 1) if quick else (7, 2)
    if device == "cuda" and dtype not in rates:
        rates[dtype] = measured_rates(device, dtype)
    module, x, grad = case_inputs(case, device, dtype)
    routed = {b: with_backend(module, b) for b in backends if b != "compile"}
    if "compile" in backends:
        # A fresh compile per case: the cases share UnpoolConv2d.forward's code, so after the first shape
        # dynamo would trace the next ones as dynamic, a slower graph than the baseline deserves.
        torch._dynamo.reset()
        compiled = torch.compile(with_backend(module, "reference"), mode="max-autotune")
        routed["compile"] = cast(nn.Module, compiled)  # an OptimizedModule
    for pass_name, backward in passes:
        g = grad if backward else None
        variants = {b: runner(m, x, g) for b, m in routed.items()}
        row = row_fields(case, batch, dtype, pass_name)
        # The goals' layers are also replayed from CUDA graphs: the first layers' wall times on the H200 (about
        # 1 ms for the reference's L1, 89x its floor) look like the host's, and say little of the kernels.
        replay = is_goal_case(device, batch, dtype, case) and "compile" not in backends
        measured = compare(
            variants, device, row, "reference", warmup, repeats, budget, graphed=("compile",), replay=replay
        )
        floor = floor_ms(case, batch, x.element_size(), backward, rates[dtype]) if dtype in rates else None
        for r in measured:
            if floor is not None and "median_ms" in r:
                r["floor_ms"], r["over_floor"] = floor, r["median_ms"] / floor
        yield from measured


def run(device: str, quick: bool) -> Iterator[dict]:
    rates: dict[torch.dtype, tuple[float, float]] = {}
    todo = cases(device, quick)
    goals = [c for c in todo if is_goal_case(device, *c)]
    rest = [c for c in todo if not is_goal_case(device, *c)]
    # Every eager row first: the budget is checked before each compile, but a max-autotune compile once begun
    # can outlast the suite's time limit, and the rows after it would be lost.
    for batch, dtype, case in goals + rest:
        yield from _measure(device, batch, dtype, case, backends_for(device), PASSES, quick, CompileBudget(0.0), rates)
    budget = CompileBudget()
    with_compile = (("forward+backward, beside max-autotune", True),)
    for batch, dtype, case in goals:
        if budget.spent:  # said without timing the backends again for nothing
            yield budget.spent_row(row_fields(case, batch, dtype, with_compile[0][0]), "compile")
            continue
        backends = [*backends_for(device), "compile"]
        yield from _measure(device, batch, dtype, case, backends, with_compile, quick, budget, rates)
