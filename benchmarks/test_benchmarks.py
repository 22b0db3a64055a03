"""The pytest-benchmark front door over the suites' own cases:

    pytest benchmarks/ --benchmark-only --benchmark-group-by=group

Each test times one variant of one case of a suite, taken from the suite's own case list and built by the
suite's own helpers, so both front doors time the same cases; tests are named test_<suite>*, so that
``-k <suite>`` picks a suite (ops, latent, train, render, patch). A test's group is its case as the suite's
rows name it (case, pass, dtype), so ``--benchmark-group-by=group`` puts a case's variants side by side.
DCIGN_BENCH_QUICK=1 takes each suite's quick cases (CI runs it with --benchmark-disable, so the cases cannot
rot; tests/test_cli_and_benchmarks.py checks that they are the suites' cases, no more, no fewer).

Eager variants only. What needs more than timing a call comes only from ``python -m benchmarks.run``:
torch.compile variants (they need the compile budget), CUDA-graph replays, floors, peak memory, the train
suite's renderer check and the kernels suite's profiler breakdown.

Tensors and models are built inside each test, never at collection: the GPU cases are large. (The ops
suite's case list holds small modules on the CPU; it is built once, on first use, for the tests' names.)
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import pytest
import torch

from benchmarks.suites import latent_sampler, ops, patch, render, train
from benchmarks.suites.unpool_cases import Case, backends_for, case_inputs, row_fields, runner, with_backend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
QUICK = os.environ.get("DCIGN_BENCH_QUICK", "0") == "1"


def case_name(row: dict) -> str:
    """A case as the suites' rows name it: the row's case, pass, dtype and layout fields, those it has."""
    return ", ".join(str(row[field]) for field in ("case", "pass", "dtype", "layout") if field in row)


def param_id(row: dict, variant: str) -> str:
    """The id of the test timing ``variant`` of ``row``'s case (tests/test_cli_and_benchmarks.py builds the
    ids the suites' rows call for with it, to compare them with the tests that ran)."""
    return f"{case_name(row)}, {variant}"


def _params(suite: str, cases: Iterable[tuple[dict, tuple]], variants: Sequence[str]) -> list[Any]:
    """One pytest.param per (case, variant): (the group, the case's arguments..., the variant), with a
    readable id; ``cases`` pairs each case's row fields with the arguments that rebuild it in the test."""
    return [
        pytest.param(f"{suite}: {case_name(row)}", *args, variant, id=param_id(row, variant))
        for row, args in cases
        for variant in variants
    ]


def _sync(fn: Callable[[], object]) -> Callable[[], None]:
    """``fn`` waiting for the device: CUDA queues kernels and returns, the time must include them."""

    def run() -> None:
        fn()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    return run


@functools.cache
def _ops_cases() -> list[tuple[int, torch.dtype, Case]]:
    """The ops suite's cases, built once: their names give the tests' ids, and a test moves its case's module
    to the device (as the suite does) and builds its inputs there."""
    return ops.cases(DEVICE, QUICK)


OPS = _params(
    "ops",
    (
        (row_fields(case, batch, dtype, pass_name), (index, backward))
        for index, (batch, dtype, case) in enumerate(_ops_cases())
        for pass_name, backward in ops.PASSES
    ),
    backends_for(DEVICE),
)


@pytest.mark.parametrize("group, index, backward, backend", OPS)
def test_ops(benchmark, group: str, index: int, backward: bool, backend: str) -> None:
    _, dtype, case = _ops_cases()[index]
    module, x, grad = case_inputs(case, DEVICE, dtype)
    benchmark.group = group
    benchmark(_sync(runner(with_backend(module, backend), x, grad if backward else None)))


LATENT = _params(
    "latent",
    ((latent_sampler.row(batch, dim), (batch, dim)) for batch, dim in latent_sampler.cases(DEVICE, QUICK)),
    list(latent_sampler.variants(DEVICE)),
)


@pytest.mark.parametrize("group, batch, dim, variant", LATENT)
def test_latent(benchmark, group: str, batch: int, dim: int, variant: str) -> None:
    fn = latent_sampler.variants(DEVICE)[variant]
    benchmark.group = group
    benchmark(_sync(latent_sampler.runners({variant: fn}, batch, dim, DEVICE)[variant]))


TRAIN = _params(
    "train",
    ((train.row(*case, train.EAGER_PASS), case) for case in train.cases(DEVICE, QUICK)),
    train.eager_variants(DEVICE),
)


@pytest.mark.parametrize("group, preset, batch, bf16, variant", TRAIN)
def test_train(benchmark, group: str, preset: str, batch: int, bf16: bool, variant: str) -> None:
    benchmark.group = group
    benchmark(_sync(train.steps((variant,), preset, batch, bf16, DEVICE)[variant]))


RENDER = _params("render", ((render.render_row(*case), case) for case in render.render_cases(QUICK)), [render.BACKEND])
# The sampler's rows are times per batch, so its tests draw one batch per call: pytest-benchmark's rounds then
# average over the kinds of batch, as the suite's several batches per timed call do.
SAMPLER = _params(
    "render", ((render.sampler_row(size), (size,)) for size, _ in render.sampler_cases(QUICK)), [render.BACKEND]
)


@pytest.mark.parametrize("group, size, batch, antialias, variant", RENDER)
def test_render(benchmark, group: str, size: int, batch: int, antialias: int, variant: str) -> None:
    draw, _ = render.render_runner(DEVICE, size, batch, antialias)
    benchmark.group = group
    benchmark(_sync(draw))


@pytest.mark.parametrize("group, size, variant", SAMPLER)
def test_render_sampler(benchmark, group: str, size: int, variant: str) -> None:
    benchmark.group = group
    benchmark(_sync(render.sampler_runner(DEVICE, size, batches=1)))


PATCH_SETUP = patch.setup(DEVICE, QUICK)
PATCH = _params("patch", ((PATCH_SETUP.row(case), (case,)) for case in patch.CASES), patch.EAGER)


@pytest.fixture(scope="module")
def patch_variants() -> dict[str, dict[str, Callable[[], object]]]:
    """The patch suite's eager variants, its VAE built (and patched) once for all its tests."""
    if not patch.available():
        pytest.skip(patch.MISSING)
    with torch.inference_mode():
        return patch.eager_variants(*PATCH_SETUP.build(DEVICE))


@pytest.mark.parametrize("group, case, variant", PATCH)
def test_patch(benchmark, patch_variants, group: str, case: str, variant: str) -> None:
    benchmark.group = group
    with torch.inference_mode():  # as the suite times it (the captured inputs are inference tensors)
        benchmark(_sync(patch_variants[case][variant]))
