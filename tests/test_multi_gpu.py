"""Kernel backends on a machine with two or more GPUs: each op runs on its tensors' device, whichever
device is current (Triton and the extension launch on the current one unless told otherwise).
Skipped with fewer than two GPUs."""

from __future__ import annotations

import pytest
import torch

import dcign_fast as dc
from dcign_fast.kernels import cuda
from dcign_fast.ops.backends import triton_available, triton_unavailable_reason
from tests.helpers import REL_TOL, rel_error

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs"),
]

BACKENDS = [
    pytest.param("triton", marks=pytest.mark.skipif(not triton_available(), reason=triton_unavailable_reason())),
    pytest.param("cuda", marks=pytest.mark.skipif(not cuda.available(), reason="dcign_fast._C was not built")),
]


@pytest.mark.parametrize("backend", BACKENDS)
def test_unpool_conv_runs_on_the_tensors_device(backend):
    torch.cuda.set_device(0)
    device = torch.device("cuda", 1)
    x = torch.randn(2, 16, 9, 11, device=device, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(24, 16, 5, 5, device=device, dtype=torch.bfloat16, requires_grad=True)
    bias = torch.randn(24, device=device, dtype=torch.bfloat16, requires_grad=True)
    results = {}
    for name in ("reference", backend):
        out = dc.unpool_conv2d(x, weight, bias, padding=2, backend=name)
        results[name] = (out, *torch.autograd.grad(out, (x, weight, bias), torch.ones_like(out)))
    assert torch.cuda.current_device() == 0
    for actual, expected in zip(results[backend], results["reference"]):
        assert actual.device == device
        assert rel_error(actual, expected) < REL_TOL[torch.bfloat16]


@pytest.mark.parametrize("backend", BACKENDS)
def test_sample_latents_runs_on_the_tensors_device(backend):
    torch.cuda.set_device(0)
    device = torch.device("cuda", 1)
    mu = torch.randn(64, 40, device=device, requires_grad=True)
    logvar = (0.5 * torch.randn(64, 40, device=device)).requires_grad_()
    active = torch.rand(40, device=device) < 0.5
    grad_z = torch.randn(64, 40, device=device)
    results = {}
    for name in ("torch", backend):
        z, kl = dc.sample_latents(mu, logvar, active, invariance=0.3, seed=7, backend=name)
        results[name] = (z, kl, *torch.autograd.grad(z, (mu, logvar), grad_z))
    assert torch.cuda.current_device() == 0
    for actual, expected in zip(results[backend], results["torch"]):
        assert actual.device == device
        assert rel_error(actual, expected) < 1e-5
