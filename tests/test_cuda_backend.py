"""backend="cuda": the CUDA C++ kernels of dcign_fast._C against the reference and torch backends.

GPU tests carry @pytest.mark.cuda (skipped without a GPU); the rest check the no-GPU behaviour.
"""

from __future__ import annotations

import pytest
import torch

import dcign_fast as dc
from dcign_fast.kernels import cuda
from dcign_fast.kernels.unpool_conv_common import kernel_unsupported_reason
from tests.cuda_checks import (
    DTYPES,
    PRECISIONS,
    check_every_padding,
    check_grad_weight_deterministic,
    check_rectangular_kernels,
    check_sampler,
    check_sampler_eps,
    check_sampler_strided,
    check_strided_parameters_and_grad,
    check_tf32_follows_the_cudnn_flag,
    check_unaligned_and_one_pixel_views,
    check_unpool_conv,
    cudnn_tf32,
    oracle,
    sampler_inputs,
)
from tests.helpers import REL_TOL, check_empty_batch, paper150_decoder_layers, rel_error, relu_nan_mismatches

needs_extension = pytest.mark.skipif(not cuda.available(), reason="dcign_fast._C was not built")


@needs_extension
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error path")
@pytest.mark.parametrize(
    "launch, kernel",
    [
        (
            lambda c: c.sampler_forward(0, 0, 0, 0, 0, 0, 4, 8, 8, 1, 8, 1, 0, 1, 0, 0, 0, 0, 0),
            "sampler_forward_kernel",
        ),
        (lambda c: c.sampler_column_means(0, 0, 4, 8, 8, 1, 8, 1, 0, 0, 0), "column_means_kernel"),
        (lambda c: c.unpool_conv_pack_weight(0, 0, 4, 4, 3, 3, 1, 1, 0, 0), "pack_weight_kernel"),
        (
            lambda c: c.unpool_conv_forward(
                (0, 64, 1, 16, 4), 0, 0, (0, 64, 1, 16, 4), 1, 1, 4, 4, 1, 3, 3, 1, 1, 0, 0, 0, 0
            ),
            "unpool_conv_forward_kernel",
        ),
    ],
)
def test_kernel_launch_without_a_gpu_names_the_kernel(launch, kernel):
    with pytest.raises(RuntimeError, match=kernel):
        launch(cuda.load())


@pytest.mark.cuda
@needs_extension
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masked, clamp, invariance", [(False, "mean", 0.0), (True, "mean", 0.3), (True, "first", 0.0)])
@pytest.mark.parametrize("B, D", [(128, 200), (3, 37), (1000, 1)])
def test_sampler_matches_the_torch_backend(dtype, masked, clamp, invariance, B, D):
    check_sampler(B, D, dtype, masked, clamp, invariance, "cuda")


@pytest.mark.cuda
@needs_extension
def test_sampler_eps_is_the_shared_philox_stream():
    check_sampler_eps(64, 50, "cuda")


@pytest.mark.cuda
@needs_extension
def test_sampler_reads_strided_inputs():
    check_sampler_strided(40, 96, "cuda")


@pytest.mark.cuda
@needs_extension
def test_sampler_captures_in_a_cuda_graph():
    mu, logvar, active = sampler_inputs(32, 24, torch.float32, "cuda")
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
    assert message in kernel_unsupported_reason("cuda", x, w, scale)
    assert kernel_unsupported_reason("cuda", x.float(), w[:, :, :3, :3].float(), 2) == ""


# The paper150 decoder layers (K=7, valid) at batch 8, and K=3 / K=5 "same" layers.
PAPER150 = [*paper150_decoder_layers(), (64, 32, 20, 3, 1), (32, 40, 17, 5, 2)]


@pytest.mark.cuda
@needs_extension
@pytest.mark.parametrize("dtype, tf32", PRECISIONS)
@pytest.mark.parametrize("c_in, c_out, size, kernel, padding", PAPER150)
def test_unpool_conv_matches_reference_on_paper150_layers(dtype, tf32, c_in, c_out, size, kernel, padding):
    shape = (size, size), (kernel, kernel), (padding, padding)
    check_unpool_conv(8, c_in, c_out, *shape, dtype, "cuda", channels_last=True, tf32=tf32)


@pytest.mark.cuda
@needs_extension
@pytest.mark.parametrize("kernel", range(1, 10))
def test_unpool_conv_every_kernel_and_padding(kernel):
    check_every_padding(kernel, 3, 12, "cuda")


@pytest.mark.cuda
@needs_extension
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_unpool_conv_rectangular_kernels_layouts_and_relu(channels_last, activation):
    check_rectangular_kernels((9, 13), (6, 4), "cuda", channels_last, activation)


@pytest.mark.cuda
@needs_extension
def test_unpool_conv_float32_follows_cudnn_allow_tf32():
    check_tf32_follows_the_cudnn_flag("cuda")


@pytest.mark.cuda
@needs_extension
def test_unpool_conv_unaligned_and_one_pixel_views():
    check_unaligned_and_one_pixel_views("cuda")


@pytest.mark.cuda
@needs_extension
def test_unpool_conv_strided_parameters_and_grad():
    check_strided_parameters_and_grad("cuda")


@pytest.mark.cuda
@needs_extension
def test_unpool_conv_empty_batch():
    check_empty_batch("cuda", "cuda")


@pytest.mark.cuda
@needs_extension
def test_unpool_conv_relu_keeps_a_nan_as_f_relu_does():
    assert relu_nan_mismatches("cuda", "cuda") == []


@pytest.mark.cuda
@needs_extension
def test_unpool_conv_grad_weight_is_deterministic():
    check_grad_weight_deterministic(16, 48, 96, 24, 7, "cuda")


@pytest.mark.cuda
@needs_extension
def test_unpool_conv_captures_in_a_cuda_graph():
    x = torch.randn(4, 24, 15, 15, device="cuda")
    w, b = torch.randn(48, 24, 7, 7, device="cuda"), torch.randn(48, device="cuda")
    with cudnn_tf32(False):
        dc.unpool_conv2d(x, w, b, backend="cuda")  # loads the extension outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = dc.unpool_conv2d(x, w, b, backend="cuda")
    y.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert rel_error(y, oracle(x, w, b, (0, 0))) < REL_TOL[torch.float32]


@pytest.mark.cuda
@needs_extension
def test_unpool_conv_other_scale_factors_are_a_value_error():
    x, w = torch.randn(1, 2, 5, 5, device="cuda"), torch.randn(3, 2, 3, 3, device="cuda")
    with pytest.raises(ValueError, match="scale_factor=2 only"):
        dc.unpool_conv2d(x, w, scale_factor=3, backend="cuda")
