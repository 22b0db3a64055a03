"""The host+device headers of csrc/ (Philox, sampler math, phase index arithmetic, fast division), compiled for the CPU
with the host C++ compiler and compared with the Python definitions the other backends use."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from dcign_fast.ops import philox
from dcign_fast.ops.latent_sampler import sample_latents_torch_backward, sample_latents_torch_forward
from dcign_fast.ops.phases import axis_phases, output_size
from tests.helpers import EXTREME_WORDS

# One pytest-xdist worker runs this module (with --dist loadgroup, as the README's command does): one build.
pytestmark = pytest.mark.xdist_group("csrc_host")

CSRC = Path(__file__).resolve().parents[1] / "csrc"
CXX = next((c for c in (shutil.which("g++"), shutil.which("c++"), shutil.which("clang++")) if c), None)
U64, I64, INT, PTR = ctypes.c_uint64, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p


@pytest.fixture(scope="module")
def lib(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    if CXX is None:
        pytest.skip("no C++ compiler (g++, c++ or clang++) found")
    path = tmp_path_factory.mktemp("csrc") / "libdcign_host.so"
    # -ffp-contract=off: no fused multiply-adds, so the float math rounds like torch's separate ops.
    source = Path(__file__).with_name("csrc_host_api.cpp")
    cmd = [CXX, "-O2", "-std=c++17", "-ffp-contract=off", "-shared", "-fPIC", f"-I{CSRC}", str(source)]
    subprocess.run([*cmd, "-o", str(path)], check=True)
    lib = ctypes.CDLL(str(path))
    lib.dcign_philox.argtypes = [U64, U64, I64, PTR, PTR, PTR]
    lib.dcign_box_muller.argtypes = [I64, PTR, PTR, PTR]
    lib.dcign_axis_phase.argtypes = [INT, INT, INT, INT, INT, PTR]
    lib.dcign_axis_union.argtypes = [INT, INT, PTR]
    lib.dcign_sampler_elements.argtypes = [I64, *[PTR] * 9]
    lib.dcign_fast_divmod.argtypes = [I64, PTR, PTR, PTR, PTR]
    return lib


def _host_philox(lib: ctypes.CDLL, seed: int, offset: int, count: int) -> tuple[torch.Tensor, ...]:
    x0 = torch.full((count,), -1, dtype=torch.int32)
    x1 = torch.full((count,), -1, dtype=torch.int32)
    eps = torch.full((count,), float("nan"))
    lib.dcign_philox(seed, offset, count, x0.data_ptr(), x1.data_ptr(), eps.data_ptr())
    # The uint32 words came back in int32 storage: reinterpret as unsigned values in int64.
    return x0.long() & philox.MASK32, x1.long() & philox.MASK32, eps


@pytest.mark.parametrize(
    "seed, offset",
    [(0, 0), (12345, 7), (2**64 - 1, 2**32 - 3), (int(torch.randint(0, 2**62, ()).item()) * 3 + 1, 2**40 + 5)],
    ids=["zero", "small", "uint64-max-seed", "random-seed"],  # named: pytest-xdist's workers must collect alike
)
def test_philox_words_bit_identical_and_normals_close(lib, seed, offset):
    count = 4099
    x0, x1, eps = _host_philox(lib, seed, offset, count)
    words = philox.philox_words(seed, offset, count)
    assert torch.equal(x0, words[0])
    assert torch.equal(x1, words[1])
    expected = philox.normal(seed, offset, (count,))
    assert torch.isfinite(eps).all()
    torch.testing.assert_close(eps, expected, rtol=1e-6, atol=1e-6)


def test_box_muller_clamps_extreme_words_like_the_python_spec(lib):
    """Words whose uniform would be 0 (log(0) = -inf) are clamped to the smallest uniform, as in Python."""
    extremes = torch.tensor(EXTREME_WORDS, dtype=torch.int64)
    words0 = torch.cat([extremes, torch.randint(0, 2**32, (250,))])
    words1 = torch.randint(0, 2**32, words0.shape)
    eps = torch.full(words0.shape, float("nan"))
    as_uint32 = [w.to(torch.int32).contiguous() for w in (words0, words1)]  # the same 32 bits
    lib.dcign_box_muller(len(eps), as_uint32[0].data_ptr(), as_uint32[1].data_ptr(), eps.data_ptr())
    assert torch.isfinite(eps).all()
    torch.testing.assert_close(eps, philox.box_muller(words0, words1), rtol=1e-6, atol=1e-6)


def test_philox_known_answer_zero_key(lib):
    # Random123's known answer for counter 0 and key 0: words (0x6627E8D5, 0xE169C58D, ...).
    x0, x1, _ = _host_philox(lib, 0, 0, 1)
    assert (int(x0[0]), int(x1[0])) == (0x6627E8D5, 0xE169C58D)


@pytest.mark.parametrize("kernel", range(1, 10))
@pytest.mark.parametrize("scale", [2, 3])
def test_axis_phases_match_the_python_plan(lib, kernel, scale):
    out = (ctypes.c_int * (3 + kernel))()
    for padding in range(kernel):
        for in_size in (1, 2, 3, 5, 8, 15, 24):
            if output_size(in_size, kernel, padding, scale) < 1:
                continue
            for ph in axis_phases(in_size, kernel, padding, scale):
                lib.dcign_axis_phase(in_size, kernel, padding, scale, ph.phase, out)
                got = (out[0], out[1], out[2], tuple(out[3:]))
                assert got == (ph.first_offset, ph.taps, ph.count, ph.tap_offsets), (in_size, kernel, padding, ph)


@pytest.mark.parametrize("kernel", range(1, 10))
def test_axis_union_covers_both_phases(lib, kernel):
    out = (ctypes.c_int * (6 + 2 * kernel))()
    for padding in range(kernel):
        lib.dcign_axis_union(kernel, padding, out)
        start, taps = out[0], out[1]
        # Any input size with two phases gives the same offsets; kernel itself is one.
        phases = axis_phases(kernel, kernel, padding, 2)
        assert start == min(p.first_offset for p in phases)
        assert taps == max(p.first_offset + p.taps for p in phases) - start
        for a, p in enumerate(phases):
            assert (out[2 + a], out[4 + a]) == (p.first_offset - start, p.taps)
            union = tuple(out[6 + a * kernel : 6 + (a + 1) * kernel])
            assert union == tuple(p.first_offset - start + t for t in p.tap_offsets)


def test_sampler_math_matches_the_torch_backend(lib):
    B, D = 64, 37
    mu, logvar = torch.randn(B, D), torch.randn(B, D)
    grad_z, grad_kl = torch.randn(B, D), torch.randn(B)
    seed = int(torch.randint(0, 2**62, ()).item())
    eps = philox.normal(seed, 0, (B, D))
    outs = [torch.full((B, D), float("nan")) for _ in range(4)]
    args = [mu, logvar, eps, grad_z, grad_kl[:, None].expand(B, D).contiguous(), *outs]
    lib.dcign_sampler_elements(B * D, *[t.data_ptr() for t in args])
    z, kl_term, grad_mu, grad_logvar = outs
    z_ref, kl_ref = sample_latents_torch_forward(mu, logvar, None, False, seed, 0)
    torch.testing.assert_close(z, z_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(-0.5 * kl_term.double().sum(1), kl_ref.double(), rtol=1e-5, atol=1e-4)
    gmu_ref, glv_ref = sample_latents_torch_backward(mu, logvar, None, 0.0, seed, 0, grad_z, grad_kl)
    torch.testing.assert_close(grad_mu, gmu_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_logvar, glv_ref, rtol=1e-5, atol=1e-5)


def _divisors() -> list[int]:
    """Every divisor up to 1024, the powers of two and their neighbours, and large ones up to 2^31 - 1."""
    powers = [2**k + e for k in range(1, 31) for e in (-1, 0, 1)]
    large = torch.randint(1025, 2**31 - 1, (64,), generator=torch.Generator().manual_seed(0)).tolist()
    return sorted({*range(1, 1025), *powers, *large, 2**31 - 1})


def test_fast_divmod_matches_integer_division(lib):
    """FastDivmod (csrc/fast_divmod.h), which the unpool-conv kernels divide positions and steps with, over its
    whole stated range: divisors 1 <= d < 2^31, numerators 0 <= n < 2^31 (small ones, random ones, and the
    multiples of d and their neighbours near the top, where a rounding error of the multiplier would show)."""
    gen = torch.Generator().manual_seed(1)
    top = 2**31 - 1
    pairs = []
    for d in _divisors():
        near_top = [top - top % d + e for e in (-d - 1, -d, -d + 1, -1, 0)]
        numerators = [*range(0, 512), *torch.randint(0, top, (256,), generator=gen).tolist(), top, *near_top]
        pairs += [(d, n) for n in numerators if n >= 0]
    d, n = torch.tensor(pairs, dtype=torch.int32).T.contiguous()
    q, r = torch.full_like(n, -1), torch.full_like(n, -1)
    lib.dcign_fast_divmod(n.numel(), d.data_ptr(), n.data_ptr(), q.data_ptr(), r.data_ptr())
    wrong = ((q != torch.div(n, d, rounding_mode="floor")) | (r != n % d)).nonzero().flatten()
    assert wrong.numel() == 0, [(int(d[i]), int(n[i]), int(q[i]), int(r[i])) for i in wrong[:10]]
