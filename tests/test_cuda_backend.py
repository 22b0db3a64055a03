"""backend="cuda": the CUDA C++ kernels of dcign_fast._C against the reference and torch backends.

GPU tests carry @pytest.mark.cuda (skipped without a GPU); the rest check the no-GPU behaviour.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import dcign_fast as dc
from dcign_fast.kernels import cuda
from dcign_fast.kernels.cuda_ops import cuda_unsupported_reason
from tests.helpers import REL_TOL, poisoned_allocations, rel_error

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
        (lambda c: c.unpool_conv_pack_weight(0, 0, 4, 4, 3, 3, 1, 1, 0, 0), "pack_weight_kernel"),
        (
            lambda c: c.unpool_conv_forward(
                (0, 64, 1, 16, 4), 0, 0, (0, 64, 1, 16, 4), 1, 1, 4, 4, 1, 3, 3, 1, 1, 0, 0, 0
            ),
            "unpool_conv_forward_kernel",
        ),
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


@pytest.mark.parametrize(
    "dtype, kernel, scale, message",
    [
        (torch.float32, 3, 3, "scale_factor=2 only"),
        (torch.float64, 3, 2, "float32, float16 and bfloat16"),
        (torch.float32, 11, 2, "kernel sizes up to 9"),
    ],
)
def test_unpool_conv_unsupported_arguments_are_named(dtype, kernel, scale, message):
    x, w = torch.randn(1, 2, 5, 5, dtype=dtype), torch.randn(3, 2, kernel, kernel, dtype=dtype)
    assert message in cuda_unsupported_reason(x, w, scale)
    assert cuda_unsupported_reason(x.float(), w[:, :, :3, :3].float(), 2) == ""


def _oracle(x, w, b, padding):
    """Float64 upsample + convolution, differentiable: the reference the kernels are held to."""
    return F.conv2d(F.interpolate(x.double(), scale_factor=2, mode="nearest"), w.double(), b.double(), padding=padding)


def _check_unpool_conv(n, c_in, c_out, size, kernel, padding, dtype, channels_last=False, activation=None):
    """Forward and all three gradients of backend="cuda" against the float64 oracle."""
    h, w = size
    x = torch.randn(n, c_in, h, w, device="cuda").to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(c_out, c_in, *kernel, device="cuda") / (c_in * kernel[0] * kernel[1]) ** 0.5).to(dtype)
    bias = torch.randn(c_out, device="cuda").to(dtype)
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias)]
    with poisoned_allocations():
        y = dc.unpool_conv2d(*leaves, padding=padding, backend="cuda", activation=activation)
    expected = _oracle(x, weight, bias, padding)
    if activation == "relu":
        expected = F.relu(expected)
    assert y.dtype == dtype and y.shape == expected.shape
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert rel_error(y, expected) < REL_TOL[dtype], "forward"
    grad = torch.randn(expected.shape, device="cuda").to(dtype)
    with poisoned_allocations():
        got = torch.autograd.grad(y, leaves, grad)
    ref_leaves = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    ref = _oracle(*ref_leaves, padding)
    if activation == "relu":
        ref = F.relu(ref)
    expected_grads = torch.autograd.grad(ref, ref_leaves, grad.double())
    for name, g, e in zip(("grad x", "grad weight", "grad bias"), got, expected_grads):
        assert g.dtype == dtype, name
        assert rel_error(g, e) < 2 * REL_TOL[dtype], name


# The paper150 decoder layers (K=7, valid) at batch 8, and K=3 / K=5 "same" layers.
PAPER150 = [
    (24, 48, 15, 7, 0),
    (48, 96, 24, 7, 0),
    (96, 96, 42, 7, 0),
    (96, 1, 78, 7, 0),
    (64, 32, 20, 3, 1),
    (32, 40, 17, 5, 2),
]


@pytest.mark.cuda
@needs_extension
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c_in, c_out, size, kernel, padding", PAPER150)
def test_unpool_conv_matches_reference_on_paper150_layers(dtype, c_in, c_out, size, kernel, padding):
    _check_unpool_conv(8, c_in, c_out, (size, size), (kernel, kernel), (padding, padding), dtype, channels_last=True)


@pytest.mark.cuda
@needs_extension
@pytest.mark.parametrize("kernel", range(1, 10))
def test_unpool_conv_every_kernel_and_padding(kernel):
    for padding in range(kernel):
        c_in, c_out = (int(v) for v in torch.randint(1, 40, (2,)))
        h, w = (int(v) for v in torch.randint((kernel + 1) // 2, 12, (2,)))
        _check_unpool_conv(3, c_in, c_out, (h, w), (kernel, kernel), (padding, padding), torch.float32)


@pytest.mark.cuda
@needs_extension
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_unpool_conv_rectangular_kernels_layouts_and_relu(channels_last, activation):
    _check_unpool_conv(2, 17, 70, (9, 13), (5, 2), (3, 1), torch.float32, channels_last, activation)
    _check_unpool_conv(2, 70, 5, (6, 4), (1, 6), (0, 4), torch.bfloat16, channels_last, activation)


@pytest.mark.cuda
@needs_extension
def test_unpool_conv_grad_weight_is_deterministic():
    x = torch.randn(16, 48, 24, 24, device="cuda", requires_grad=True)
    w = torch.randn(96, 48, 7, 7, device="cuda", requires_grad=True)
    b = torch.randn(96, device="cuda", requires_grad=True)
    grad = torch.randn(16, 96, 42, 42, device="cuda")
    first = torch.autograd.grad(dc.unpool_conv2d(x, w, b, backend="cuda"), (w, b), grad)
    second = torch.autograd.grad(dc.unpool_conv2d(x, w, b, backend="cuda"), (w, b), grad)
    assert all(torch.equal(f, s) for f, s in zip(first, second))


@pytest.mark.cuda
@needs_extension
def test_unpool_conv_captures_in_a_cuda_graph():
    x = torch.randn(4, 24, 15, 15, device="cuda")
    w, b = torch.randn(48, 24, 7, 7, device="cuda"), torch.randn(48, device="cuda")
    dc.unpool_conv2d(x, w, b, backend="cuda")  # loads the extension outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = dc.unpool_conv2d(x, w, b, backend="cuda")
    y.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert rel_error(y, _oracle(x, w, b, (0, 0))) < REL_TOL[torch.float32]


@pytest.mark.cuda
@needs_extension
def test_unpool_conv_other_scale_factors_are_a_value_error():
    x, w = torch.randn(1, 2, 5, 5, device="cuda"), torch.randn(3, 2, 3, 3, device="cuda")
    with pytest.raises(ValueError, match="scale_factor=2 only"):
        dc.unpool_conv2d(x, w, scale_factor=3, backend="cuda")
