"""The pytest-benchmark front door over the suites' cases:

    pytest benchmarks/ --benchmark-only [--benchmark-group-by=group]

Each group holds one case with every backend beside the reference, so pytest-benchmark's comparison
reads side by side. DCIGN_BENCH_QUICK=1 shrinks the shapes (CI runs it with --benchmark-disable so the
cases cannot rot). The same cases, with floors and peak memory, come from ``python -m benchmarks.run``.
"""

from __future__ import annotations

import os

import pytest
import torch

from benchmarks.suites import latent_sampler, render, train, unpool_cases

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
QUICK = os.environ.get("DCIGN_BENCH_QUICK", "0") == "1"


def _sync(fn):
    def run():
        fn()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    return run


@pytest.mark.parametrize("backend", unpool_cases.backends_for(DEVICE))
def test_decoder_forward_backward(benchmark, backend):
    batch = 4 if QUICK else 20
    case = unpool_cases.paper150_cases(batch)[-1]
    module, x, grad = unpool_cases.case_inputs(case, DEVICE, torch.float32)  # channels_last, as the ops suite times it
    module = unpool_cases.with_backend(module, backend)
    benchmark.group = f"unpool-conv: {case.name} b{batch} forward+backward, channels_last"
    benchmark(_sync(unpool_cases.runner(module, x, grad)))


@pytest.mark.parametrize("variant", ["reference", "torch"] + (["triton"] if DEVICE == "cuda" else []))
def test_latent_sampler(benchmark, variant):
    batch, dim = (20 if QUICK else 128), 200
    fn = latent_sampler._variants(DEVICE)[variant]
    mu = torch.randn(batch, dim, device=DEVICE, requires_grad=True)
    logvar = torch.randn(batch, dim, device=DEVICE, requires_grad=True)
    active = torch.zeros(dim, dtype=torch.bool, device=DEVICE)
    active[0] = True
    grads = (torch.randn(batch, dim, device=DEVICE), torch.randn(batch, device=DEVICE))
    benchmark.group = f"latent sampler: B={batch} D={dim} forward+backward"
    benchmark(_sync(latent_sampler._runner(fn, mu, logvar, active, grads)))


@pytest.mark.parametrize("variant", ["eager reference", "dcign_fast"])
def test_train_step(benchmark, variant):
    batch = 8 if QUICK else 64
    model = train._models("demo64", DEVICE)[variant]
    images = torch.rand(batch, 1, 64, 64, device=DEVICE)
    benchmark.group = f"train step: demo64 b{batch}"
    benchmark(_sync(train._step(model, images, bf16=False)))


def test_render(benchmark):
    draw, faces = render.render_runner(DEVICE, 64, 16 if QUICK else 64)
    benchmark.group = f"render: 64px, {faces} faces"
    benchmark(_sync(draw))
