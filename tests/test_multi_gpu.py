"""Kernel backends on a machine with two or more GPUs: each op runs on its tensors' device, whichever
device is current (Triton and the extension launch on the current one unless told otherwise). The GPU
tests skip with fewer than two GPUs; a CPU test checks that every entry point enters the device guard."""

from __future__ import annotations

import contextlib
import shutil

import pytest
import torch

import dcign_fast as dc
from dcign_fast.kernels import cuda
from dcign_fast.ops.backends import CUDA_EMULATION_ENV
from tests.helpers import NEEDS_TRITON, REL_TOL, rel_error

BACKENDS = [
    pytest.param("triton", marks=NEEDS_TRITON),
    pytest.param("cuda", marks=pytest.mark.skipif(not cuda.available(), reason="dcign_fast._C was not built")),
]


def _both_ops(backend: str, device: torch.device) -> list[tuple[torch.Tensor, ...]]:
    """[(out, grads...)] of unpool_conv2d (bf16) and sample_latents (float32) with ``backend`` on fresh inputs
    and fresh output gradients (of z and kl both): the same ones for every backend after the same seed."""
    x = torch.randn(2, 16, 9, 11, device=device, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(24, 16, 5, 5, device=device, dtype=torch.bfloat16, requires_grad=True)
    bias = torch.randn(24, device=device, dtype=torch.bfloat16, requires_grad=True)
    out = dc.unpool_conv2d(x, weight, bias, padding=2, backend=backend)
    conv = (out, *torch.autograd.grad(out, (x, weight, bias), torch.randn_like(out)))
    mu = torch.randn(64, 40, device=device, requires_grad=True)
    logvar = (0.5 * torch.randn(64, 40, device=device)).requires_grad_()
    active = torch.arange(40, device=device) % 3 == 0
    z, kl = dc.sample_latents(mu, logvar, active, invariance=0.3, seed=7, backend=backend)
    sampler = (z, kl, *torch.autograd.grad((z, kl), (mu, logvar), (torch.randn_like(z), torch.randn_like(kl))))
    return [conv, sampler]


@pytest.mark.parametrize(  # ids without "cuda": conftest skips tests whose keywords hold it
    "backend", [pytest.param("triton", marks=NEEDS_TRITON, id="triton_backend"), pytest.param("cuda", id="extension")]
)
def test_every_kernel_entry_point_enters_its_tensors_device(backend, monkeypatch):
    """What the two-GPU tests check, on the CPU (Triton's interpreter, the CUDA emulation): forward and
    backward of both ops make their tensors' device current around their launches."""
    if backend == "cuda":
        if shutil.which("g++") is None and shutil.which("c++") is None:
            pytest.skip("no C++ compiler to build the CUDA emulation")
        monkeypatch.setenv(CUDA_EMULATION_ENV, "1")
    from dcign_fast.kernels import cuda_latent_sampler, cuda_unpool_conv

    modules = [cuda_latent_sampler, cuda_unpool_conv]
    if backend == "triton":  # (importing its launchers imports triton, which the extension's case may lack)
        from dcign_fast.kernels.triton import latent_sampler, unpool_conv

        modules += [latent_sampler, unpool_conv]
    entered = []

    @contextlib.contextmanager
    def recording_guard(device: torch.device):
        entered.append(device)
        yield

    for module in modules:
        monkeypatch.setattr(module, "device_guard", recording_guard)
    _both_ops(backend, torch.device("cpu"))
    assert entered == [torch.device("cpu")] * 4  # unpool-conv forward, backward; sampler forward, backward


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
@pytest.mark.parametrize("backend", BACKENDS)
def test_both_ops_run_on_the_tensors_device(backend):
    torch.cuda.set_device(0)
    device = torch.device("cuda", 1)
    torch.manual_seed(0)
    got = _both_ops(backend, device)
    torch.manual_seed(0)
    want = _both_ops("torch", device)  # the torch backend runs torch ops, which follow their tensors
    assert torch.cuda.current_device() == 0
    for op, tolerance in zip(range(2), (REL_TOL[torch.bfloat16], 1e-5)):
        for actual, expected in zip(got[op], want[op]):
            assert actual.device == device
            assert rel_error(actual, expected) < tolerance
