"""Promises of the kernel backends' host code that the other kernel tests leave open (found by mutation testing
dcign_fast/kernels/): cases of the phase geometry no other test reaches, the argument checks on each axis,
and the autotuner's config pruning and int32 margins, which the interpreter (one config per kernel) never
exercises."""

from __future__ import annotations

import pytest
import torch

import dcign_fast as dc
from tests.helpers import NEEDS_TRITON, REL_TOL, rel_error, unpool_conv_against_oracle

pytestmark = NEEDS_TRITON


@pytest.mark.parametrize("c_out", [3, 20])  # both sides of FEW_OUTPUTS: both grad-input and grad-weight paths
@pytest.mark.parametrize("kernel, padding", [((2, 4), (0, 2)), ((4, 2), (1, 0))])
def test_even_kernels_with_little_padding(kernel, padding, c_out):
    """An even kernel padded by at most K - 2 gives an odd output side whose phase 1 has one row (column) fewer
    than phase 0, while the row (column) past the output would still read the input: the kernels must stop at
    each phase's own rows and columns."""
    x = torch.randn(2, 5, 4, 5)
    weight = torch.randn(c_out, 5, *kernel) / (5 * kernel[0] * kernel[1]) ** 0.5
    leaves = [t.requires_grad_() for t in (x, weight, torch.randn(c_out))]
    got, want = unpool_conv_against_oracle("triton", leaves, padding, None, REL_TOL[torch.float32])
    assert got[0].shape[2] % 2 == 1 or got[0].shape[3] % 2 == 1
    for name, g, w in zip(("output", "grad x", "grad weight", "grad bias"), got, want):
        assert rel_error(g, w) < REL_TOL[torch.float32], name


@pytest.mark.parametrize("kernel", [(3, 10), (10, 3)])
def test_a_kernel_wider_than_9_on_either_axis_is_refused(kernel):
    x, w = torch.randn(1, 2, 6, 6), torch.randn(2, 2, *kernel)
    with pytest.raises(ValueError, match=r"kernel sizes up to 9, got \((3, 10|10, 3)\)"):
        dc.unpool_conv2d(x, w, padding=2, backend="triton")


@pytest.mark.parametrize("scale", [1, 3])
def test_scale_factors_other_than_2_are_refused_below_and_above(scale):
    x, w = torch.randn(1, 2, 3, 3), torch.randn(2, 2, 3, 3)
    with pytest.raises(ValueError, match=f"scale_factor=2 only, got {scale}"):
        dc.unpool_conv2d(x, w, padding=1, scale_factor=scale, backend="triton")


def _blocks(configs) -> list[tuple[int, int]]:
    return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in configs]


def test_config_pruning_keeps_the_tiles_that_fit_the_gemm():
    """fit_columns: a config stays while its BLOCK_N is at most the GEMM's N rounded up to a power of 2 (at least
    16) and its tile at most the largest allowed (bounds included); with none left, the narrowest (last) one."""
    from dcign_fast.kernels.triton.unpool_conv_grad_input import GRAD_INPUT_OPTIONS
    from dcign_fast.kernels.triton.unpool_conv_tiles import GEMM_BLOCKS, config, fit_columns

    configs = [config(GEMM_BLOCKS, option) for option in GRAD_INPUT_OPTIONS]
    assert _blocks(configs) == [(128, 128), (64, 128), (64, 64), (64, 32), (64, 16)]
    prune = fit_columns(lambda args: args["N"], lambda args: args["LARGEST"])["early_config_prune"]

    def kept(n: int, largest: int | None = None) -> list[tuple[int, int]]:
        return _blocks(prune(configs, {"N": n}, LARGEST=largest))

    assert kept(64) == [(64, 64), (64, 32), (64, 16)]  # BLOCK_N == N is kept
    assert kept(20) == [(64, 32), (64, 16)]  # N rounded up to 32
    assert kept(3) == [(64, 16)]  # at least tl.dot's 16
    assert kept(200, 64 * 128) == [(64, 128), (64, 64), (64, 32), (64, 16)]  # a tile of exactly the bound is kept
    assert kept(200, 100) == [(64, 16)]  # none fits: the narrowest


def test_the_few_outputs_grad_input_never_runs_128_x_128_tiles():
    """Its element-wise grad_out gathers spill at 128 x 128 (a GPU-only failure: the interpreter runs one config);
    with many output channels that tile stays."""
    from dcign_fast.kernels.triton import unpool_conv_grad_input as kernels
    from dcign_fast.kernels.triton.unpool_conv_tiles import GEMM_BLOCKS, config

    configs = [config(GEMM_BLOCKS, option) for option in kernels.GRAD_INPUT_OPTIONS]
    prune = kernels._grad_input_kernel.early_config_prune
    assert (128, 128) not in _blocks(prune(configs, {"C_IN": 96, "TAPS_IN_K": True}))
    assert (128, 128) in _blocks(prune(configs, {"C_IN": 96, "TAPS_IN_K": False}))


def test_the_int32_index_limit_leaves_room_for_a_whole_block_of_every_config():
    """TRITON_INDEX_LIMIT positions rounded up to whole blocks of any GEMM config still index in int32."""
    from dcign_fast.kernels.triton import unpool_conv_forward, unpool_conv_grad_input
    from dcign_fast.kernels.unpool_conv_common import TRITON_INDEX_LIMIT

    options = [*unpool_conv_forward.FORWARD_OPTIONS, *unpool_conv_grad_input.GRAD_INPUT_OPTIONS]
    for block in {size for option in options for size in option[:3]}:
        assert -(-TRITON_INDEX_LIMIT // block) * block + block <= 2**31 - 1, block


# (Not "cuda" as a test id: conftest.py skips tests with that keyword where there is no GPU.)
KERNEL_BACKENDS = ["triton", pytest.param("cuda", id="emulated-cuda")]


@pytest.fixture
def kernel_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The parametrised kernel backend, runnable on CPU tensors: triton in the interpreter (conftest.py), cuda
    on its CPU emulation (a C++ compiler builds it once, cached)."""
    if request.param == "cuda":
        import shutil

        from dcign_fast.ops.backends import CUDA_EMULATION_ENV

        if shutil.which("g++") is None and shutil.which("c++") is None:
            pytest.skip("no C++ compiler to build the CUDA emulation")
        monkeypatch.setenv(CUDA_EMULATION_ENV, "1")
    return request.param


@pytest.mark.parametrize("kernel_backend", KERNEL_BACKENDS, indirect=True)
def test_strided_inputs_and_mask_are_read_through_their_strides(kernel_backend):
    """``active`` may be a view (a column of a [D, 2] mask): the kernels must read its elements, not the D bytes
    after its first one; mu (column-major) and logvar (row-major) have strides of their own, also for the batch
    means of the clamped columns."""
    mu, logvar = torch.randn(9, 6).t(), 0.5 * torch.randn(6, 9)
    masks = torch.rand(9, 2) < 0.5
    active = masks[:, 0]
    assert not torch.equal(active, masks.flatten()[:9])  # read as contiguous, it would be another mask
    grad_z, grad_kl = torch.randn(6, 9), torch.randn(6)
    results = []
    for backend, mask in ((kernel_backend, active), ("reference", active.contiguous())):
        leaves = [t.clone().requires_grad_() for t in (mu, logvar)]
        z, kl = dc.sample_latents(*leaves, mask, invariance=0.3, seed=11, backend=backend)
        results.append((z, kl, *torch.autograd.grad((z, kl), leaves, (grad_z, grad_kl))))
    for name, got, want in zip(("z", "kl", "grad mu", "grad logvar"), *results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("kernel_backend", KERNEL_BACKENDS, indirect=True)
def test_a_direct_op_call_names_an_unknown_activation(kernel_backend):
    x, weight = torch.randn(1, 2, 3, 3), torch.randn(2, 2, 3, 3)
    with pytest.raises(ValueError, match="activation must be one of"):
        torch.ops.dcign_fast.unpool_conv2d(x, weight, None, 1, 1, 2, "gelu", kernel_backend)


@pytest.mark.parametrize("kernel_backend", KERNEL_BACKENDS, indirect=True)
def test_the_backward_op_gives_a_zero_bias_gradient_without_a_bias(kernel_backend):
    """unpool_conv2d_backward's grad bias is zeros when has_bias is False (its docstring), not grad_out's sum."""
    x, weight = torch.randn(2, 3, 4, 4), torch.randn(5, 3, 3, 3)
    grad_out = torch.randn(2, 5, 8, 8)
    grads = torch.ops.dcign_fast.unpool_conv2d_backward(grad_out, x, weight, None, False, 1, 1, 2, None, kernel_backend)
    assert grads[2].shape == (5,) and bool((grads[2] == 0).all())


@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")  # the interpreter's inf * 0
def test_an_infinite_grad_out_element_reaches_only_the_inputs_it_depends_on():
    """Grad x of a grad_out holding one inf: non-finite exactly where the float64 reference's is. The few-outputs
    grad-input GEMM pads its (tap, channel) pairs to whole blocks; a padding pair that loaded grad_out would
    multiply the inf by a zero weight and spread NaN."""
    from dcign_fast.ops.reference import unpool_conv2d_reference

    x, weight = torch.randn(1, 4, 5, 5, requires_grad=True), torch.randn(3, 4, 3, 3)  # 3 x 4 taps: 12 of 32 pairs
    y = dc.unpool_conv2d(x, weight, padding=1, backend="triton")
    grad_out = torch.randn_like(y)
    grad_out[0, 1, 4, 7] = float("inf")
    (got,) = torch.autograd.grad(y, x, grad_out)
    exact = x.detach().double().requires_grad_()
    reference = unpool_conv2d_reference(exact, weight.double(), None, (1, 1))
    (want,) = torch.autograd.grad(reference, exact, grad_out.double())
    assert 0 < int((~want.isfinite()).sum()) < want.numel()
    assert torch.equal(got.isfinite(), want.isfinite())


def test_grad_weight_channel_tiles_fit_shared_memory():
    """At least tl.dot's 16 channels, at most 128 for 16-bit storage and 64 for float32 (whose 128 x 128 tiles
    over 64 pixels in 3 stages would need 256 KiB of shared memory, past sm_90's 227): a GPU-only limit."""
    from dcign_fast.kernels.triton.unpool_conv_grad_weight import _channel_tile

    assert [_channel_tile(c, torch.float32) for c in (1, 17, 96, 512)] == [16, 32, 64, 64]
    assert [_channel_tile(c, torch.bfloat16) for c in (1, 17, 96, 512)] == [16, 32, 128, 128]


@pytest.mark.parametrize("reduce_over, reduced", [("in", 1), ("out", 0)])
def test_packed_weights_pad_the_reduced_channels_to_16_with_zeros(reduce_over, reduced):
    """pack_weight's rows (the channels a GEMM reduces over) are whole multiples of 16 elements, zero past the
    real channels: 16-byte copies on the GPU read those rows whole."""
    from dcign_fast.kernels.triton.unpool_conv_layout import unions
    from dcign_fast.kernels.triton.unpool_conv_weights import pack_weight

    weight = torch.randn(24, 24, 3, 3).narrow(reduced, 0, 20)  # 20 channels reduced over, 24 the other way
    packed = pack_weight(weight, *unions(3, 3, 1, 1), reduce_over)
    assert packed.shape[-2:] == (24, 32)
    assert bool((packed[..., 20:] == 0).all()) and bool((packed[..., :20] != 0).any())


@pytest.mark.parametrize("kernel_backend", [pytest.param("cuda", id="emulated-cuda")], indirect=True)
def test_the_cuda_sampler_skips_the_pull_at_invariance_zero(kernel_backend):
    """At invariance 0 inactive columns get exactly zero gradients, also where mu or logvar is not finite (a pull
    of 0 * (x - mean) would be NaN there): the cuda backend, which the other backends' test leaves out."""
    mu, logvar = torch.randn(5, 4), 0.5 * torch.randn(5, 4)
    mu[1, 2], logvar[3, 0] = float("inf"), float("nan")
    active = torch.tensor([False, True, False, True])
    leaves = [t.requires_grad_() for t in (mu, logvar)]
    z, _ = dc.sample_latents(*leaves, active, clamp="first", invariance=0.0, seed=2, backend=kernel_backend)
    grads = torch.autograd.grad(z, leaves, torch.randn_like(z))
    assert all(bool((g[:, ~active] == 0).all()) and bool(g.isfinite().all()) for g in grads)


@pytest.mark.parametrize("kernel_backend", KERNEL_BACKENDS, indirect=True)
def test_the_sampler_backward_reads_output_gradients_through_their_strides(kernel_backend):
    """grad_z and grad_kl as views (column-major rows, every other element), as a caller's autograd.grad may pass
    them: the kernels read them through their strides."""
    mu, logvar = torch.randn(6, 5), 0.5 * torch.randn(6, 5)
    grad_z, grad_kl = torch.randn(5, 12).t()[:6], torch.randn(12)[::2]
    assert grad_z.stride() == (1, 12) and grad_kl.stride() == (2,)
    results = []
    for backend in (kernel_backend, "reference"):
        leaves = [t.clone().requires_grad_() for t in (mu, logvar)]
        z, kl = dc.sample_latents(*leaves, seed=4, backend=backend)
        results.append(torch.autograd.grad((z, kl), leaves, (grad_z, grad_kl)))
    for name, got, want in zip(("grad mu", "grad logvar"), *results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)
