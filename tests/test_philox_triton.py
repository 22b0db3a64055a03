"""The torch Philox4x32-10 and normal transform against Triton's own generator (tl.randint, tl.randn), which
the Triton sampler draws from: the same words and normals, extreme words included."""

import pytest
import torch

from dcign_fast.ops import philox
from dcign_fast.ops.backends import triton_available, triton_unavailable_reason
from tests.helpers import EXTREME_WORDS

if not triton_available():
    pytest.skip(triton_unavailable_reason(), allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.language.random import pair_uniform_to_normal, uint_to_uniform_float  # noqa: E402


@triton.jit
def _triton_stream(ints_ptr, normals_ptr, seed, offset, N, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    n = offset + i.to(tl.int64)
    tl.store(ints_ptr + i, tl.randint(seed, n), mask=i < N)
    tl.store(normals_ptr + i, tl.randn(seed, n), mask=i < N)


@pytest.mark.parametrize(
    "seed, offset",
    [(torch.randint(0, 2**31, ()).item(), 0), (2**40 + 12345, 2**32 - 300), (2**64 - 977, 2**45 + 3)],
    ids=["int32-seed", "offset-crosses-2^32", "uint64-seed"],
)
def test_matches_triton_randint_and_randn(seed, offset):
    n = 1000
    ints, normals = torch.full((n,), -1, dtype=torch.int32), torch.full((n,), float("nan"))
    _triton_stream[(1,)](ints, normals, seed, offset, n, BLOCK=1024)
    words = philox.philox_words(seed, offset, n)
    assert torch.equal(ints.to(torch.int64) & philox.MASK32, words[0])
    torch.testing.assert_close(philox.normal(seed, offset, (n,)), normals, rtol=1e-6, atol=1e-6)


@triton.jit
def _triton_transform(words0_ptr, words1_ptr, uniforms_ptr, normals_ptr, N, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    x0 = tl.load(words0_ptr + i, mask=i < N).to(tl.uint32)
    x1 = tl.load(words1_ptr + i, mask=i < N).to(tl.uint32)
    n0, _ = pair_uniform_to_normal(uint_to_uniform_float(x0), uint_to_uniform_float(x1))
    tl.store(uniforms_ptr + i, uint_to_uniform_float(x0), mask=i < N)
    tl.store(normals_ptr + i, n0, mask=i < N)


def test_transform_matches_triton_including_extreme_words():
    extremes = torch.tensor(EXTREME_WORDS, dtype=torch.int64)
    words0 = torch.cat([extremes, torch.randint(0, 2**32, (500,))])
    words1 = torch.randint(0, 2**32, words0.shape)
    uniforms, normals = torch.full(words0.shape, float("nan")), torch.full(words0.shape, float("nan"))
    _triton_transform[(1,)](words0, words1, uniforms, normals, words0.numel(), BLOCK=512)
    ours = philox.uniform(words0)
    assert torch.equal(ours, uniforms)
    assert bool(((ours >= 0) & (ours < 1)).all())
    torch.testing.assert_close(philox.box_muller(words0, words1), normals, rtol=1e-6, atol=1e-6)
