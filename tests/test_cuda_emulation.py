"""backend="cuda" on the CPU emulation (DCIGN_FAST_CUDA_EMULATION=1): the real csrc/ kernels, compiled
against csrc/emulation/ by the host C++ compiler, run on CPU tensors against the same oracles as the GPU
tests (tests/cuda_checks.py), at sizes that still cover every tile path (O <= 16 and wide tiles, several
channel chunks, every kernel size and padding, partial tiles, 16-bit storage, both layouts)."""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import pytest
import torch

import dcign_fast
from dcign_fast.kernels import cuda, cuda_emulation
from dcign_fast.ops.backends import CUDA_EMULATION_ENV
from dcign_fast.ops.reference import sample_latents_reference
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
)
from tests.helpers import (
    check_empty_batch,
    gradient_penalty_error,
    layout_mismatches,
    relu_nan_mismatches,
    seed_none_backward_error,
    seed_offset_mismatches,
)

# One pytest-xdist worker runs this module (with --dist loadgroup, as the README's command does): one build.
pytestmark = pytest.mark.xdist_group("cuda_emulation")


@pytest.fixture(scope="module", autouse=True)
def emulation() -> None:
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("no C++ compiler to build the CUDA emulation")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CUDA_EMULATION_ENV, "1")
        cuda_emulation.load()  # builds once (cached by a hash of the sources)
        yield


def test_the_emulation_stands_in_for_the_extension():
    lib = cuda.load()
    assert lib is cuda_emulation.load()
    assert lib.runtime_version() == 0  # the emulation's mark; a real build reports its CUDA version
    x, y = torch.randn(1000), torch.full((1000,), float("nan"))
    lib.axpb(x.data_ptr(), y.data_ptr(), x.numel(), 3.0, -1.0, 0)
    torch.testing.assert_close(y, 3.0 * x - 1.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masked, clamp, invariance", [(False, "mean", 0.0), (True, "mean", 0.3), (True, "first", 0.0)])
# The emulation's grids stop at 3 blocks (24 rows, 96 columns, 768 elements), so (37, 130) runs every
# kernel's grid-stride loop.
@pytest.mark.parametrize("B, D", [(37, 130), (3, 1)])
def test_sampler_matches_the_torch_backend(dtype, masked, clamp, invariance, B, D):
    check_sampler(B, D, dtype, masked, clamp, invariance, "cpu")


def test_sampler_eps_is_the_shared_philox_stream():
    check_sampler_eps(19, 45, "cpu")


def test_sampler_reads_strided_inputs():
    check_sampler_strided(12, 40, "cpu")


def test_sampler_at_a_nonzero_offset_matches_the_reference_by_value_and_from_memory():
    assert seed_offset_mismatches("cuda", "cpu") == []


def test_sampler_seed_none_backward_regenerates_the_forwards_noise():
    assert seed_none_backward_error("cuda", "cpu") < 1e-5


@pytest.mark.parametrize("kernel", range(1, 10))
def test_unpool_conv_every_kernel_and_padding(kernel):
    check_every_padding(kernel, 2, 7, "cpu")


# Decoder-like layers: K=7 valid (wide tiles, two channel chunks), image layers of one and three channels (the
# phases side by side in the forward's columns; few-outputs backward), K=3 and K=5 "same".
LAYERS = [(24, 48, 6, 7, 0), (20, 1, 7, 7, 0), (8, 3, 6, 5, 2), (33, 12, 5, 3, 1), (16, 40, 5, 5, 2)]


@pytest.mark.parametrize("dtype, tf32", PRECISIONS)
@pytest.mark.parametrize("c_in, c_out, size, kernel, padding", LAYERS)
def test_unpool_conv_matches_reference_on_decoder_layers(dtype, tf32, c_in, c_out, size, kernel, padding):
    shape = (size, size), (kernel, kernel), (padding, padding)
    check_unpool_conv(3, c_in, c_out, *shape, dtype, "cpu", channels_last=True, tf32=tf32)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_unpool_conv_rectangular_kernels_layouts_and_relu(channels_last, activation):
    check_rectangular_kernels((5, 6), (4, 4), "cpu", channels_last, activation)


def test_unpool_conv_float32_follows_cudnn_allow_tf32():
    check_tf32_follows_the_cudnn_flag("cpu")


def test_unpool_conv_unaligned_and_one_pixel_views():
    check_unaligned_and_one_pixel_views("cpu")


def test_unpool_conv_strided_parameters_and_grad():
    check_strided_parameters_and_grad("cpu")


def test_unpool_conv_empty_batch():
    check_empty_batch("cuda", "cpu")


def test_unpool_conv_relu_keeps_a_nan_as_f_relu_does():
    assert relu_nan_mismatches("cuda", "cpu") == []


def test_double_backward_matches_reference():
    with cudnn_tf32(False):
        assert gradient_penalty_error("cuda", "cpu") < 1e-5


def test_unpool_conv_few_outputs_over_several_splits(monkeypatch):
    """An image layer's grad weight (few output channels: the kernel that pairs input pixels with every tap)
    summed over several splits of the input positions."""
    from dcign_fast.kernels import cuda_unpool_conv

    calls, splits_of = [], cuda_unpool_conv._grad_weight_splits
    monkeypatch.setattr(cuda_unpool_conv, "_grad_weight_splits", lambda *a: calls.append(splits_of(*a)) or calls[-1])
    check_unpool_conv(2, 6, 3, (16, 16), (5, 5), (2, 2), torch.float32, "cpu", channels_last=True, activation="relu")
    assert calls and min(splits for splits, _ in calls) > 1


@pytest.mark.parametrize(
    ("c_in", "c_out", "kernel", "padding", "blocks"),
    [
        # Per-tap kernel, 64 (K=7 valid) or 36 (K=5 same) phase taps: 128 x 64 tiles past 64 input channels,
        # 64 x 64 up to them, 64 x 16 for up to 16 output channels.
        (96, 96, 7, 0, 1 * 2 * 64),
        (48, 96, 7, 0, 1 * 2 * 64),
        (200, 100, 5, 2, 2 * 2 * 36),
        # Few outputs, four phases: 64 x 16 tiles of (union tap, output) pairs up to 16 of them, else 64 x 64.
        (96, 1, 7, 0, 2 * 1 * 4),
        (96, 3, 7, 0, 2 * 1 * 4),
        (96, 5, 7, 0, 2 * 2 * 4),
    ],
)
def test_grad_weight_blocks_per_split(c_in, c_out, kernel, padding, blocks):
    """The blocks per split that the Python side sizes its splits by are the grid the launcher would use."""
    from dcign_fast.kernels import cuda
    from dcign_fast.kernels.unpool_conv_common import FEW_OUTPUTS

    lib = cuda.load()
    few = c_out <= FEW_OUTPUTS
    query = lib.unpool_conv_grad_weight_few_outputs_blocks if few else lib.unpool_conv_grad_weight_blocks
    assert query(2, c_in, 20, 20, c_out, kernel, kernel, padding, padding) == blocks


def test_grad_weight_splits_keep_within_what_the_kernels_walk():
    """The grad-weight kernels walk a split's positions in 32-bit arithmetic: chunks of at most 2^30 positions,
    and a clear error (not a wrong sum) past 65535 such splits, from the Python side and from both grad-weight
    kernels' own argument check."""
    from dcign_fast.kernels import cuda, cuda_unpool_conv

    positions = 3 * 2**30 + 5
    splits, chunk = cuda_unpool_conv._grad_weight_splits(positions, 4 * 8 * 100, torch.device("cpu"))
    assert chunk <= 2**30 and splits * chunk >= positions
    with pytest.raises(ValueError, match="positions per phase"):
        cuda_unpool_conv._grad_weight_splits(65536 * 2**30, 4, torch.device("cpu"))
    x = torch.randn(1, 4, 3, 3).to(memory_format=torch.channels_last)
    view = (x.data_ptr(), *x.stride())
    for launcher in (cuda.load().unpool_conv_grad_weight, cuda.load().unpool_conv_grad_weight_few_outputs):
        with pytest.raises(ValueError, match="chunk in \\[1, 2\\^30\\]"):
            launcher(view, view, 0, 1, 4, 3, 3, 4, 3, 3, 1, 1, 1, 2**30 + 1, 0, 0, 0)


def test_unpool_conv_grad_weight_is_deterministic():
    check_grad_weight_deterministic(3, 20, 24, 6, 7, "cpu")


@pytest.fixture
def gpu_like_splits(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The grad-weight kernels over three splits of their positions (chunks not a whole number of K steps), as
    on a GPU, whose many multiprocessors make every decoder layer split (the emulation's 2 cores seldom do).
    Returns the split counts used."""
    from dcign_fast.kernels import cuda_unpool_conv

    used: list[int] = []

    def splits(positions: int, *_) -> tuple[int, int]:
        used.append(min(3, positions))
        return used[-1], -(-positions // used[-1])

    monkeypatch.setattr(cuda_unpool_conv, "_grad_weight_splits", splits)
    return used


# What a GPU run selects (csrc dispatch) for the paper150 decoder at batch 128, channels_last, in bfloat16 and
# float32 (TF32, or exact), and for the K=3 "same" benchmark layers: the real channel counts (the same tiles,
# 16-byte vector loads, several channel tiles, phases side by side and few-outputs 16-column tiles for the image
# layer), the fused ReLU and split grad weights, at tiny images.
# Layer 2 (48 -> 96) selects nothing that layers 1 and 3 do not (96 -> 96 has several tiles of both C and O).
GPU_LAYERS = [
    pytest.param(24, 48, 8, 7, 0, "relu", id="paper150-L1-24-48"),
    pytest.param(96, 96, 4, 7, 0, "relu", id="paper150-L3-96-96"),
    pytest.param(96, 1, 5, 7, 0, None, id="paper150-L4-96-1"),
    pytest.param(128, 128, 3, 3, 1, "relu", id="k3-same-128"),
]
GPU_PRECISIONS = [p for p in PRECISIONS if p.id != "float16"]


@pytest.mark.parametrize("dtype, tf32", GPU_PRECISIONS)
@pytest.mark.parametrize("c_in, c_out, size, kernel, padding, activation", GPU_LAYERS)
def test_unpool_conv_layers_as_a_gpu_runs_them(
    gpu_like_splits, dtype, tf32, c_in, c_out, size, kernel, padding, activation
):
    shape = (size, size), (kernel, kernel), (padding, padding)
    check_unpool_conv(2, c_in, c_out, *shape, dtype, "cpu", channels_last=True, activation=activation, tf32=tf32)
    assert gpu_like_splits and min(gpu_like_splits) > 1


# Instantiations that neither the layers above nor the other tests select (channel counts that real layers do
# not have), one layer each covering several: (16, 10) the forward's tall tile with vector loads in 16-bit
# storage and the grad input's C <= 16 tile with element loads; (12, 18) element loads in the forward's and the
# general grad weight's 64 x 64 tiles (16-bit) and in the grad input's C <= 16 tile (TF32); (6, 1) element loads
# with the phases side by side (TF32) and in the few-outputs 16-column tile (TF32); (8, 1) vector loads in that
# tile (float16).
GAP_LAYERS = [(16, 10, 4, 3, 1), (12, 18, 4, 3, 1), (6, 1, 5, 7, 0), (8, 1, 4, 7, 0)]


@pytest.mark.parametrize("dtype, tf32", [p for p in PRECISIONS if p.id != "float32"])  # exact float32: all run
@pytest.mark.parametrize("c_in, c_out, size, kernel, padding", GAP_LAYERS)
def test_unpool_conv_remaining_tile_and_load_paths(dtype, tf32, c_in, c_out, size, kernel, padding):
    shape = (size, size), (kernel, kernel), (padding, padding)
    check_unpool_conv(2, c_in, c_out, *shape, dtype, "cpu", channels_last=True, activation="relu", tf32=tf32)


@pytest.mark.parametrize("dtype, tf32", PRECISIONS)
@pytest.mark.parametrize("c_in, c_out", [(8, 8), (6, 3)])
def test_unpool_conv_general_grad_weight_with_few_outputs(monkeypatch, dtype, tf32, c_in, c_out):
    """The per-tap grad-weight kernel's 16-column tile (O <= 16), with vector and with element loads: the
    backward sends so few output channels to the few-outputs kernel, but the extension keeps the tile."""
    from dcign_fast.kernels import cuda_unpool_conv

    monkeypatch.setattr(cuda_unpool_conv, "FEW_OUTPUTS", 0)
    check_unpool_conv(2, c_in, c_out, (4, 4), (3, 3), (1, 1), dtype, "cpu", channels_last=True, tf32=tf32)


@pytest.fixture(scope="module")
def selftest(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    """csrc/emulation/selftest.cu built against the emulation: kernels that are wrong on purpose."""
    source = cuda_emulation.CSRC / "emulation" / "selftest.cu"
    library = tmp_path_factory.mktemp("selftest") / "libselftest.so"
    compiler = shutil.which("g++") or shutil.which("c++")
    flags = [
        *cuda_emulation.FLAGS,
        *cuda_emulation.include_flags(),
        "-shared",
        "-x",
        "c++",
        "-include",
        "cuda_runtime.h",
    ]
    subprocess.run([compiler, *flags, str(source), "-o", str(library)], check=True)
    return ctypes.CDLL(str(library))


def _error_buffer() -> ctypes.Array:
    return ctypes.create_string_buffer(256)


@pytest.mark.parametrize("blocks", [1, 3])
def test_the_emulation_catches_a_missing_barrier(selftest, blocks):
    x = torch.randn(blocks, 128)
    for sync in (1, 0):
        y = torch.full_like(x, float("nan"))
        assert (
            selftest.reverse(
                ctypes.c_void_p(x.data_ptr()), ctypes.c_void_p(y.data_ptr()), blocks, sync, _error_buffer(), 256
            )
            == 0
        )
        if sync:
            assert torch.equal(y, x.flip(1))
        else:  # a thread reads its partner's slot before the partner has written it, as a GPU might
            assert not torch.equal(y, x.flip(1))


def test_the_emulation_fails_a_divergent_barrier_and_a_bad_launch(selftest):
    out, error = torch.zeros(64), _error_buffer()
    assert selftest.divergent(ctypes.c_void_p(out.data_ptr()), error, 256) == 1
    assert b"divergent_kernel" in error.value and b"deadlocked" in error.value
    assert selftest.reverse(ctypes.c_void_p(out.data_ptr()), ctypes.c_void_p(out.data_ptr()), 0, 1, error, 256) == 1
    assert b"reverse_kernel: invalid configuration" in error.value


def test_the_emulation_shuffles_within_each_warp(selftest):
    x, y = torch.randn(96), torch.full((96,), float("nan"))
    assert (
        selftest.warp_sum(ctypes.c_void_p(x.data_ptr()), ctypes.c_void_p(y.data_ptr()), 96, _error_buffer(), 256) == 0
    )
    torch.testing.assert_close(y, x.view(3, 32).sum(1, keepdim=True).expand(3, 32).reshape(96))


def test_kernel_entry_refuses_a_weight_of_another_dtype():
    from dcign_fast.kernels.cuda_unpool_conv import unpool_conv2d_cuda

    x, w = torch.randn(1, 3, 4, 4), torch.randn(2, 3, 3, 3, dtype=torch.float16)
    with pytest.raises(TypeError, match="weight must have x's dtype"):
        unpool_conv2d_cuda(x, w, None, (1, 1), 2)


def test_outputs_are_laid_out_as_the_fake_kernels_promise():
    assert layout_mismatches("cuda", "cpu") == []


@pytest.mark.parametrize("seed", [-5, 2**63, 2**64 - 5])
def test_sampler_takes_negative_and_top_bit_seeds(seed):
    """Such seeds reach the kernels as their uint64 (the extension's seed argument is unsigned)."""
    mu, logvar = torch.randn(3, 5), torch.randn(3, 5)
    z, kl = dcign_fast.sample_latents(mu, logvar, seed=seed, backend="cuda")
    want_z, want_kl = sample_latents_reference(mu, logvar, seed=seed % 2**64)
    torch.testing.assert_close((z, kl), (want_z, want_kl), rtol=1e-5, atol=1e-5)


def test_a_build_says_so_before_it_starts(tmp_path, monkeypatch, capsys):
    """The first build takes minutes of g++: it is announced, not silent (a failing compiler ends it early)."""
    monkeypatch.setenv("CXX", shutil.which("false") or pytest.skip("no `false` command"))
    with pytest.raises(RuntimeError, match="building the CUDA emulation failed"):
        cuda_emulation.build(tmp_path)
    assert f"building the CPU emulation of dcign_fast._C into {tmp_path}" in capsys.readouterr().err
