"""backend="cuda": the CUDA C++ kernels of dcign_fast._C against the reference and torch backends.

GPU tests carry @pytest.mark.cuda (skipped without a GPU); the rest check the no-GPU behaviour.
"""

from __future__ import annotations

import pytest
import torch

import dcign_fast as dc
from dcign_fast.kernels import cuda
from tests.helpers import poisoned_allocations

needs_extension = pytest.mark.skipif(not cuda.available(), reason="dcign_fast._C was not built (no nvcc)")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Sampler outputs vs the torch backend: float32 differs by libm ulps and fused multiply-adds; 16-bit storage
# by one rounding of the output.
SAMPLER_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


@needs_extension
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error path")
@pytest.mark.parametrize(
    "launch, kernel",
    [
        (lambda c: c.sampler_forward(0, 0, 0, 0, 0, 0, 4, 8, 8, 1, 8, 1, 0, 1, 0, 0, 0), "sampler_forward_kernel"),
        (lambda c: c.sampler_column_means(0, 0, 4, 8, 8, 1, 8, 1, 0, 0, 0), "column_means_kernel"),
    ],
)
def test_kernel_launch_without_a_gpu_names_the_kernel(launch, kernel):
    with pytest.raises(RuntimeError, match=kernel):
        launch(cuda.load())


def _sampler_inputs(B: int, D: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mu = torch.randn(B, D, device="cuda").to(dtype)
    logvar = (0.5 * torch.randn(B, D, device="cuda")).to(dtype)
    active = torch.rand(D, device="cuda") < 0.5
    return mu, logvar, active


def _sample_both(mu, logvar, active, clamp, invariance, seed):
    """((z, kl, grad_mu, grad_logvar) from cuda, the same from torch), for random output gradients."""
    results = []
    grads = torch.randn(mu.shape, device="cuda").to(mu.dtype), torch.randn(mu.shape[0], device="cuda").to(mu.dtype)
    for backend in ("cuda", "torch"):
        m, lv = mu.detach().clone().requires_grad_(), logvar.detach().clone().requires_grad_()
        with poisoned_allocations():
            z, kl = dc.sample_latents(m, lv, active, clamp=clamp, invariance=invariance, seed=seed, backend=backend)
            torch.autograd.backward((z, kl), grads)
        results.append((z, kl, m.grad, lv.grad))
    return results


@pytest.mark.cuda
@needs_extension
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masked, clamp, invariance", [(False, "mean", 0.0), (True, "mean", 0.3), (True, "first", 0.0)])
@pytest.mark.parametrize("B, D", [(128, 200), (3, 37), (1000, 1)])
def test_sampler_matches_the_torch_backend(dtype, masked, clamp, invariance, B, D):
    mu, logvar, active = _sampler_inputs(B, D, dtype)
    seed = int(torch.randint(0, 2**62, ()).item())
    got, expected = _sample_both(mu, logvar, active if masked else None, clamp, invariance, seed)
    for name, g, e in zip(("z", "kl", "grad_mu", "grad_logvar"), got, expected):
        assert g.dtype == dtype and g.shape == e.shape, name
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g.float(), e.float(), rtol=SAMPLER_TOL[dtype], atol=SAMPLER_TOL[dtype], msg=name)


@pytest.mark.cuda
@needs_extension
def test_sampler_eps_is_the_shared_philox_stream():
    B, D = 64, 50
    mu, logvar, _ = _sampler_inputs(B, D, torch.float32)
    seed = int(torch.randint(0, 2**62, ()).item())
    z, _ = dc.sample_latents(mu, logvar, seed=seed, backend="cuda")
    eps = (z.double() - mu.double()) / torch.exp(0.5 * logvar.double())
    expected = dc.ops.philox.normal(seed, 0, (B, D), "cuda").double()
    torch.testing.assert_close(eps, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@needs_extension
def test_sampler_reads_strided_inputs():
    mu_t, logvar_t, active = _sampler_inputs(40, 96, torch.float32)
    mu, logvar = mu_t.T, logvar_t.T  # [96, 40], column-major
    seed = 1234
    got, expected = _sample_both(mu, logvar, active[:40], "mean", 0.5, seed)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@needs_extension
def test_sampler_captures_in_a_cuda_graph():
    mu, logvar, active = _sampler_inputs(32, 24, torch.float32)
    dc.sample_latents(mu, logvar, active, seed=99, backend="cuda")  # loads the extension outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        z, kl = dc.sample_latents(mu, logvar, active, seed=99, backend="cuda")
    z.fill_(float("nan"))
    kl.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    z_ref, kl_ref = dc.sample_latents(mu, logvar, active, seed=99, backend="torch")
    torch.testing.assert_close(z, z_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kl, kl_ref, rtol=1e-5, atol=1e-5)
