"""backend="cuda" on the CPU emulation (DCIGN_FAST_CUDA_EMULATION=1): the real csrc/ kernels, compiled
against csrc/emulation/ by the host C++ compiler, run on CPU tensors against the same oracles as the GPU
tests (tests/cuda_checks.py), at sizes that still cover every tile path (O <= 16 and wide tiles, several
channel chunks, every kernel size and padding, partial tiles, 16-bit storage, both layouts)."""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dcign_fast.kernels import cuda, cuda_emulation
from dcign_fast.ops.backends import CUDA_EMULATION_ENV
from tests.cuda_checks import (
    DTYPES,
    check_every_padding,
    check_grad_weight_deterministic,
    check_sampler,
    check_sampler_eps,
    check_sampler_strided,
    check_unpool_conv,
)


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
@pytest.mark.parametrize("B, D", [(37, 70), (3, 1)])
def test_sampler_matches_the_torch_backend(dtype, masked, clamp, invariance, B, D):
    check_sampler(B, D, dtype, masked, clamp, invariance, "cpu")


def test_sampler_eps_is_the_shared_philox_stream():
    check_sampler_eps(19, 45, "cpu")


def test_sampler_reads_strided_inputs():
    check_sampler_strided(12, 40, "cpu")


@pytest.mark.parametrize("kernel", range(1, 10))
def test_unpool_conv_every_kernel_and_padding(kernel):
    check_every_padding(kernel, 2, 7, "cpu")


# Decoder-like layers: K=7 valid (wide tiles, two channel chunks), one output channel (the tall tile),
# K=3 and K=5 "same".
LAYERS = [(24, 48, 6, 7, 0), (20, 1, 7, 7, 0), (33, 12, 5, 3, 1), (16, 40, 5, 5, 2)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c_in, c_out, size, kernel, padding", LAYERS)
def test_unpool_conv_matches_reference_on_decoder_layers(dtype, c_in, c_out, size, kernel, padding):
    shape = (size, size), (kernel, kernel), (padding, padding)
    check_unpool_conv(3, c_in, c_out, *shape, dtype, "cpu", channels_last=True)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_unpool_conv_rectangular_kernels_layouts_and_relu(channels_last, activation):
    check_unpool_conv(2, 17, 70, (5, 6), (5, 2), (3, 1), torch.float32, "cpu", channels_last, activation)
    check_unpool_conv(2, 70, 5, (4, 4), (1, 6), (0, 4), torch.bfloat16, "cpu", channels_last, activation)


def test_unpool_conv_grad_weight_is_deterministic():
    check_grad_weight_deterministic(3, 20, 24, 6, 7, "cpu")


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


# Memory safety: every kernel runs on tensors that end (or start) at an inaccessible page, inputs and every
# buffer the wrappers allocate alike; a kernel that strays outside a tensor kills the subprocess (SIGSEGV).
GUARDED_LAYERS = [
    (2, 17, 70, (5, 6), (5, 2), (3, 1)),
    (3, 20, 1, (7, 7), (7, 7), (0, 0)),
    (1, 33, 12, (4, 5), (3, 3), (1, 1)),
]


def run_guarded_kernels(guard_before: bool) -> None:
    """Forward and backward of both ops on guarded tensors (run by the test below in a subprocess)."""
    import dcign_fast as dc
    from tests.guard_pages import guarded_allocations, guarded_copy

    torch.manual_seed(0)
    for dtype in DTYPES:
        for n, c_in, c_out, size, kernel, padding in GUARDED_LAYERS:
            x = torch.randn(n, c_in, *size).to(dtype).contiguous(memory_format=torch.channels_last)
            weight = torch.randn(c_out, c_in, *kernel).to(dtype)
            leaves = [guarded_copy(t, guard_before).requires_grad_() for t in (x, weight, torch.randn(c_out).to(dtype))]
            with guarded_allocations(guard_before):
                y = dc.unpool_conv2d(*leaves, padding=padding, backend="cuda", activation="relu")
                grads = torch.autograd.grad(y, leaves, guarded_copy(torch.randn_like(y), guard_before))
            assert all(torch.isfinite(g).all() for g in (y, *grads))
        mu, logvar = (guarded_copy(torch.randn(6, 40).to(dtype), guard_before) for _ in range(2))
        active = guarded_copy(torch.rand(40) < 0.5, guard_before)
        for m, lv in ((mu, logvar), (mu[:, :5].T, logvar[:, :5].T)):  # contiguous and strided
            m, lv = m.detach().requires_grad_(), lv.detach().requires_grad_()
            with guarded_allocations(guard_before):
                z, kl = dc.sample_latents(m, lv, active[: m.shape[1]], invariance=0.2, seed=5, backend="cuda")
                grads = torch.autograd.grad((z.sum() + kl.sum()), (m, lv))
            assert all(torch.isfinite(g).all() for g in (z, kl, *grads))


def _run_in_subprocess(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, CUDA_EMULATION_ENV: "1"}
    root = Path(__file__).resolve().parents[1]
    return subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("guard_before", [False, True], ids=["past-the-end", "before-the-start"])
def test_kernels_stay_inside_their_tensors(guard_before):
    result = _run_in_subprocess(
        f"from tests.test_cuda_emulation import run_guarded_kernels; run_guarded_kernels({guard_before})"
    )
    assert result.returncode == 0, (
        f"exit {result.returncode} (-11: a kernel touched memory outside a tensor)\n{result.stderr[-3000:]}"
    )


def test_guard_pages_catch_an_overrun():
    # The emulated smoke kernel told to read one element more than the guarded tensor holds.
    code = (
        "import torch; from dcign_fast.kernels import cuda; from tests.guard_pages import guarded_copy\n"
        "x = guarded_copy(torch.randn(1024)); y = torch.empty(1025)\n"
        "cuda.load().axpb(x.data_ptr(), y.data_ptr(), 1024, 1.0, 0.0, 0); print('in bounds ok', flush=True)\n"
        "cuda.load().axpb(x.data_ptr(), y.data_ptr(), 1025, 1.0, 0.0, 0)\n"
    )
    result = _run_in_subprocess(code)
    assert "in bounds ok" in result.stdout
    assert result.returncode == -signal.SIGSEGV
