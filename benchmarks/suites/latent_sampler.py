"""Latent sampler: forward+backward of ``sample_latents`` per backend against the reference.

A DC-IGN one-factor batch: one latent active, the others clamped to their batch mean, invariance
pull on. Every variant draws the same Philox noise, so all of them do the same work. ``speedup`` is
the reference's time over the row's, measured side by side in the same run. ``compiled reference``
is ``torch.compile`` of the reference (skipped in quick mode on the CPU, where compiling takes longer
than the suite), timed beside the reference in a second pass over the cases, after every eager row, so
that a compile cut short by a time limit costs no eager rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from benchmarks.harness import CompileBudget, Step, compare
from dcign_fast.kernels import cuda as cuda_extension
from dcign_fast.ops.latent_sampler import sample_latents
from dcign_fast.ops.reference import sample_latents_reference

INVARIANCE = 0.01  # the paper's strength
SEED = 1234


def cases(device: str, quick: bool) -> list[tuple[int, int]]:
    """(B, D) pairs: the paper's latent size 200 at growing batches, then a wide latent code."""
    if quick:
        return [(20, 200), (128, 200)]
    wide = [(128, 4096), (4096, 4096)] if device == "cpu" else [(128, 4096), (4096, 4096), (65536, 4096)]
    return [(20, 200), (128, 200), (4096, 200), (65536, 200), *wide]


def variants(device: str) -> dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]]:
    """The eager variants: name -> fn(mu, logvar, active) -> (z, kl), the reference first (also the
    pytest-benchmark front door's)."""

    def backend(name: str) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
        return lambda mu, logvar, active: sample_latents(
            mu, logvar, active, invariance=INVARIANCE, seed=SEED, backend=name
        )

    eager = {"reference": _reference(sample_latents_reference), "torch": backend("torch")}
    if device == "cuda":
        eager["triton"] = backend("triton")
        if cuda_extension.available():
            eager["cuda"] = backend("cuda")
    return eager


def _reference(fn: Callable) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """``fn`` (the reference sampler or a compiled one) with this suite's settings."""
    return lambda mu, logvar, active: fn(mu, logvar, active, "mean", INVARIANCE, SEED)


def runners(fns: dict[str, Callable], batch: int, dim: int, device: str) -> dict[str, Step]:
    """Each of ``fns``' forward+backward on one fresh one-factor batch, shared so that side by side they do
    the same work (the suite's cases and the pytest-benchmark front door's build them here alike)."""
    mu = (torch.randn(batch, dim, device=device) * 1.5).requires_grad_()
    logvar = (torch.randn(batch, dim, device=device) * 0.7 - 0.5).requires_grad_()
    active = torch.zeros(dim, dtype=torch.bool, device=device)
    active[0] = True
    grads = (torch.randn(batch, dim, device=device), torch.randn(batch, device=device))

    def clear() -> None:
        mu.grad = logvar.grad = None

    def step(fn: Callable) -> Step:
        def run() -> None:
            clear()
            torch.autograd.backward(fn(mu, logvar, active), grads)

        return Step(run, clear)

    return {name: step(fn) for name, fn in fns.items()}


def row(batch: int, dim: int) -> dict:
    """The fields that name a case's rows (and its pytest-benchmark group)."""
    return {"case": f"B={batch} D={dim}", "pass": "forward+backward", "dtype": "float32"}


def _case(
    batch: int,
    dim: int,
    fns: dict[str, Callable],
    device: str,
    warmup: int,
    repeats: int,
    budget: CompileBudget | None = None,
) -> list[dict]:
    """One case's rows: ``fns`` timed side by side on a fresh one-factor batch."""
    timed = runners(fns, batch, dim, device)
    return compare(timed, device, row(batch, dim), "reference", warmup=warmup, repeats=repeats, budget=budget)


def run(device: str, quick: bool) -> Iterator[dict]:
    repeats, warmup = (2, 1) if quick else (5, 1)
    for batch, dim in cases(device, quick):
        yield from _case(batch, dim, variants(device), device, warmup, repeats)
    if quick and device == "cpu":
        return
    budget = CompileBudget()  # torch.compile of the reference compiles again for every shape
    for batch, dim in cases(device, quick):
        if budget.spent:  # said without timing the reference again for nothing
            yield budget.spent_row(row(batch, dim), "compiled reference")
            continue
        # A fresh compile per case: after one shape, dynamo would trace the next as dynamic (a slower graph).
        torch._dynamo.reset()
        compiled = torch.compile(sample_latents_reference)
        pair = {"reference": _reference(sample_latents_reference), "compiled reference": _reference(compiled)}
        yield from _case(batch, dim, pair, device, warmup, repeats, budget)
