"""Checks of backend="cuda" against the reference, shared by the GPU tests (test_cuda_backend.py) and the
CPU-emulation tests (test_cuda_emulation.py): the same checks, on "cuda" or on "cpu" tensors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import dcign_fast as dc
from tests.helpers import REL_TOL, cudnn_tf32, poisoned_allocations, rel_error, unpool_conv_against_oracle

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# The unpool-conv multiplies: (storage dtype, float32 in TF32 on tensor cores).
PRECISIONS = [
    pytest.param(torch.float32, False, id="float32"),
    pytest.param(torch.float32, True, id="tf32"),
    pytest.param(torch.bfloat16, False, id="bfloat16"),
    pytest.param(torch.float16, False, id="float16"),
]
# Sampler outputs vs the torch backend: float32 differs by libm ulps and fused multiply-adds; 16-bit storage
# by one rounding of the output.
SAMPLER_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def sampler_inputs(B: int, D: int, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, ...]:
    """(mu, logvar, active) on fresh random values; about half the columns active."""
    mu = torch.randn(B, D, device=device).to(dtype)
    logvar = (0.5 * torch.randn(B, D, device=device)).to(dtype)
    active = torch.rand(D, device=device) < 0.5
    return mu, logvar, active


def sample_both(mu, logvar, active, clamp, invariance, seed):
    """((z, kl, grad_mu, grad_logvar) from cuda, the same from torch), for random output gradients."""
    results = []
    grad_z = torch.randn(mu.shape, device=mu.device).to(mu.dtype)
    grads = grad_z, torch.randn(mu.shape[0], device=mu.device).to(mu.dtype)
    for backend in ("cuda", "torch"):
        m, lv = mu.detach().clone().requires_grad_(), logvar.detach().clone().requires_grad_()
        with poisoned_allocations():
            z, kl = dc.sample_latents(m, lv, active, clamp=clamp, invariance=invariance, seed=seed, backend=backend)
            torch.autograd.backward((z, kl), grads)
        results.append((z, kl, m.grad, lv.grad))
    return results


def check_sampler(B: int, D: int, dtype: torch.dtype, masked: bool, clamp: str, invariance: float, device: str):
    """Values and both gradients of the cuda sampler against the torch backend (same Philox stream)."""
    mu, logvar, active = sampler_inputs(B, D, dtype, device)
    seed = int(torch.randint(0, 2**62, ()).item())
    got, expected = sample_both(mu, logvar, active if masked else None, clamp, invariance, seed)
    for name, g, e in zip(("z", "kl", "grad_mu", "grad_logvar"), got, expected):
        assert g.dtype == dtype and g.shape == e.shape, name
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g.float(), e.float(), rtol=SAMPLER_TOL[dtype], atol=SAMPLER_TOL[dtype], msg=name)


def check_sampler_eps(B: int, D: int, device: str) -> None:
    """The noise behind z is the documented Philox stream (seed, offset 0)."""
    mu, logvar, _ = sampler_inputs(B, D, torch.float32, device)
    seed = int(torch.randint(0, 2**62, ()).item())
    z, _ = dc.sample_latents(mu, logvar, seed=seed, backend="cuda")
    eps = (z.double() - mu.double()) / torch.exp(0.5 * logvar.double())
    expected = dc.ops.philox.normal(seed, 0, (B, D), device).double()
    torch.testing.assert_close(eps, expected, rtol=1e-5, atol=1e-5)


def check_sampler_strided(B: int, D: int, device: str) -> None:
    """Transposed (column-major) mu and logvar give what contiguous ones give."""
    mu_t, logvar_t, active = sampler_inputs(B, D, torch.float32, device)
    got, expected = sample_both(mu_t.T, logvar_t.T, active[:B], "mean", 0.5, 1234)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def unpool_conv_tolerance(dtype: torch.dtype, tf32: bool) -> float:
    """Relative error allowed against the float64 oracle: TF32 keeps float16's 10 mantissa bits."""
    return REL_TOL[torch.float16 if dtype == torch.float32 and tf32 else dtype]


def oracle(x, w, b, padding):
    """Float64 upsample + convolution, differentiable: the reference the kernels are held to."""
    return F.conv2d(F.interpolate(x.double(), scale_factor=2, mode="nearest"), w.double(), b.double(), padding=padding)


def check_unpool_conv(
    n, c_in, c_out, size, kernel, padding, dtype, device, channels_last=False, activation=None, tf32=False,
    backend="cuda",
) -> None:  # fmt: skip
    """Forward and all three gradients of ``backend`` against the float64 oracle; float32 multiplies in TF32
    when ``tf32``, else exactly."""
    with cudnn_tf32(tf32):
        tol = unpool_conv_tolerance(dtype, tf32)
        h, w = size
        x = torch.randn(n, c_in, h, w, device=device).to(dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        weight = (torch.randn(c_out, c_in, *kernel, device=device) / (c_in * kernel[0] * kernel[1]) ** 0.5).to(dtype)
        bias = torch.randn(c_out, device=device).to(dtype)
        leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias)]
        (y, *grads), (expected, *expected_grads) = unpool_conv_against_oracle(
            backend, leaves, padding, activation, tol, contiguous_grad=True
        )
        assert y.dtype == dtype and y.shape == expected.shape
        assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        assert rel_error(y, expected) < tol, "forward"
        for name, g, e in zip(("grad x", "grad weight", "grad bias"), grads, expected_grads):
            assert g.dtype == dtype, name
            assert rel_error(g, e) < 2 * tol, name


def check_rectangular_kernels(wide, narrow, device, channels_last, activation) -> None:
    """Rectangular kernels and paddings: 17 -> 70 channels on ``wide`` images in both float32 paths (exact and
    TF32), and 70 -> 5 channels on ``narrow`` images in bfloat16."""
    for tf32 in (False, True):
        check_unpool_conv(2, 17, 70, wide, (5, 2), (3, 1), torch.float32, device, channels_last, activation, tf32)
    check_unpool_conv(2, 70, 5, narrow, (1, 6), (0, 4), torch.bfloat16, device, channels_last, activation)


def check_tf32_follows_the_cudnn_flag(device: str) -> None:
    """float32 multiplies in TF32 exactly when torch.backends.cudnn.allow_tf32 is set: the TF32 result carries
    TF32's rounding error (more than exact float32 allows, within float16's tolerance), the exact one none."""
    x = torch.randn(2, 40, 6, 6, device=device)
    w, b = torch.randn(24, 40, 5, 5, device=device) / 1000**0.5, torch.randn(24, device=device)
    expected = oracle(x, w, b, (2, 2))
    errors = {}
    for tf32 in (False, True):
        with cudnn_tf32(tf32):
            errors[tf32] = rel_error(dc.unpool_conv2d(x, w, b, padding=2, backend="cuda"), expected)
    assert errors[False] < REL_TOL[torch.float32] < errors[True] < unpool_conv_tolerance(torch.float32, True)


def check_unaligned_and_one_pixel_views(device: str) -> None:
    """Views the 16-byte vector loads must handle, in exact float32: a channels_last input whose base is one
    element past a vector boundary (loaded element by element), and 1 x 1 images (the strides of extent-1
    dimensions do not matter). Into poisoned allocations: the tails of vector loads and stores are where an
    unwritten element would hide."""
    weight = (torch.randn(8, 16, 3, 3, device=device) / 12).requires_grad_()
    padded = torch.randn(2, 5, 6, 20, device=device, requires_grad=True)
    unaligned = padded[..., 1:17].permute(0, 3, 1, 2)  # [2, 16, 5, 6]: strides whole vectors, base not
    assert unaligned.data_ptr() % 16 != 0
    one_pixel = torch.randn(3, 16, 1, 1, device=device, requires_grad=True)
    for x in (unaligned, one_pixel):
        with cudnn_tf32(False), poisoned_allocations():
            y = dc.unpool_conv2d(x, weight, padding=2, backend="cuda", activation="relu")
            grad = torch.randn(y.shape, device=device)
            got = torch.autograd.grad(y, (x, weight), grad)
        ref_leaves = [t.detach().double().requires_grad_() for t in (x, weight)]
        expected = F.relu(oracle(*ref_leaves, torch.zeros(8, dtype=torch.float64, device=device), (2, 2)))
        assert rel_error(y, expected) < REL_TOL[torch.float32]
        for g, e in zip(got, torch.autograd.grad(expected, ref_leaves, grad.double())):
            assert rel_error(g, e) < 2 * REL_TOL[torch.float32]


def check_strided_parameters_and_grad(device: str) -> None:
    """Exact float32 with a channels_last weight (model.to(memory_format=torch.channels_last)), a strided bias
    (passed as is: a clone would be contiguous) and, with the ReLU, a grad_out laid out unlike the output
    (H and W strides swapped, channels innermost in both), which the fused mask must not misread."""
    x = torch.randn(2, 6, 4, 5, device=device).contiguous(memory_format=torch.channels_last).requires_grad_()
    weight = torch.randn(5, 6, 3, 3, device=device) / 7
    weight = weight.contiguous(memory_format=torch.channels_last).requires_grad_()
    bias = torch.randn(10, device=device)[::2].requires_grad_()
    assert not weight.is_contiguous() and not bias.is_contiguous()
    grad = torch.randn(2, 10, 8, 5, device=device).permute(0, 3, 2, 1)  # [2, 5, 8, 10]
    ref_leaves = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    for activation in (None, "relu"):
        with cudnn_tf32(False), poisoned_allocations():
            y = dc.unpool_conv2d(x, weight, bias, padding=1, backend="cuda", activation=activation)
            got = [y, *torch.autograd.grad(y, (x, weight, bias), grad)]
        expected = oracle(*ref_leaves, (1, 1))
        expected = F.relu(expected) if activation == "relu" else expected
        for name, g, e in zip(
            ("output", "grad x", "grad weight", "grad bias"),
            got,
            [expected, *torch.autograd.grad(expected, ref_leaves, grad.double())],
        ):
            assert rel_error(g, e) < 2 * REL_TOL[torch.float32], (name, activation)


def check_every_padding(kernel: int, n: int, max_size: int, device: str) -> None:
    """check_unpool_conv for a square ``kernel`` at every padding 0..kernel-1, exact float32, random channel
    counts in 1..39 and random rectangular images up to ``max_size - 1``."""
    for padding in range(kernel):
        c_in, c_out = (int(v) for v in torch.randint(1, 40, (2,)))
        h, w = (int(v) for v in torch.randint((kernel + 1) // 2, max_size, (2,)))
        check_unpool_conv(n, c_in, c_out, (h, w), (kernel, kernel), (padding, padding), torch.float32, device)


def check_grad_weight_deterministic(n, c_in, c_out, size, kernel, device) -> None:
    """Two backward passes give bit-identical grad weight and grad bias (fixed-order split reduction), into
    poisoned allocations: a workspace element read before it is written is NaN, which torch.equal never matches."""
    x = torch.randn(n, c_in, size, size, device=device, requires_grad=True)
    w = torch.randn(c_out, c_in, kernel, kernel, device=device, requires_grad=True)
    b = torch.randn(c_out, device=device, requires_grad=True)
    out = 2 * size - kernel + 1
    grad = torch.randn(n, c_out, out, out, device=device)
    with poisoned_allocations():
        first = torch.autograd.grad(dc.unpool_conv2d(x, w, b, backend="cuda"), (w, b), grad)
        second = torch.autograd.grad(dc.unpool_conv2d(x, w, b, backend="cuda"), (w, b), grad)
    assert all(torch.equal(f, s) for f, s in zip(first, second))
