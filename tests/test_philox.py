"""The torch Philox4x32-10 and normal transform: published known answers, statistics, fast paths (the
comparison with Triton's own generator: test_philox_triton.py)."""

import math

import pytest
import torch

from dcign_fast.ops import philox
from tests.helpers import EXTREME_WORDS

# Random123's kat_vectors, "philox4x32 10" lines: counter (4 words), key (2 words) -> output (4 words).
KAT = [
    ((0x00000000,) * 4, (0x00000000,) * 2, (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


def test_known_answers():
    counters = torch.tensor([c for c, _, _ in KAT], dtype=torch.int64)
    for i, (_, key, expected) in enumerate(KAT):
        # All counters go through one call, so the batched arithmetic is what is checked.
        out = philox.philox4x32(counters.T.contiguous(), key)[:, i]
        assert [int(v) for v in out] == list(expected)


def test_fast_box_muller_clamps_extreme_words_like_the_spec():
    """The fast path's transform, bit for bit the spec's at the words whose uniform would be 0 (log(0) = -inf:
    both clamp it to the smallest uniform) or closest to 1."""
    extremes = torch.tensor(EXTREME_WORDS, dtype=torch.int64)
    words1 = torch.randint(0, 2**32, extremes.shape)
    out = torch.full(extremes.shape, float("nan"))
    philox._box_muller_fast(extremes.clone(), words1.clone(), out)
    assert torch.isfinite(out).all()
    assert torch.equal(out, philox.box_muller(extremes, words1))


def test_normal_statistics():
    n = 10**6
    eps = philox.normal(torch.randint(0, 2**62, ()).item(), torch.randint(0, 2**40, ()).item(), (n,)).double()
    tolerance = 5 / n**0.5  # five standard errors
    assert abs(eps.mean().item()) < tolerance
    assert abs(eps.var().item() - 1) < 5 * (2 / n) ** 0.5
    assert abs(torch.corrcoef(torch.stack([eps[:-1], eps[1:]]))[0, 1].item()) < tolerance
    expected_tail = math.erfc(2 / math.sqrt(2))  # P(|eps| > 2) for a standard normal
    tail = (eps.abs() > 2).double().mean().item()
    assert abs(tail - expected_tail) < 5 * (expected_tail * (1 - expected_tail) / n) ** 0.5


@pytest.mark.parametrize(
    "seed, offset, count",
    [
        (1234, 0, 4000),
        (2**40 + 12345, 2**32 - 300, 1000),
        (2**64 - 977, 2**45 + 3, 5000),
        (7, 2**33 - 70000, 140000),
        (99, 2**63 - 3000, 3000),
    ],
    ids=["small", "offset-crosses-2^32", "uint64-seed", "chunks-cross-2^32", "last-counters"],
)
@pytest.mark.parametrize("chunk", [philox.CHUNK, 777])
def test_fast_paths_are_the_same_stream_bit_for_bit(seed, offset, count, chunk):
    """normal_fast and normal_at (the torch backend's) against normal, the spec the known answers check."""
    expected = philox.normal(seed, offset, (count,)).view(torch.int32)  # bits: -0.0 is not 0.0
    assert torch.equal(philox.normal_fast(seed, offset, (count,), chunk=chunk).view(torch.int32), expected)
    index = torch.randint(0, count, (7, count // 21 + 1))
    assert torch.equal(philox.normal_at(seed, offset, index, chunk=chunk).view(torch.int32), expected[index])
    shaped = philox.normal_fast(seed, offset, (8, count // 8), chunk=chunk)
    assert torch.equal(shaped.view(torch.int32), expected[: count // 8 * 8].view(8, -1))


@pytest.mark.parametrize("draw", [philox.normal, philox.normal_fast])
def test_seed_and_offset_may_be_tensors_holding_them(draw):
    """What a CUDA graph captured with seed=None passes (values read on the device): the same bits, with the
    seed's top bit set and counters crossing a multiple of 2**32."""
    seed, offset = 2**64 - 3, 2**32 - 10
    rng = torch.tensor([seed - 2**64, offset])
    assert torch.equal(draw(rng[0], rng[1], (4, 9)), draw(seed, offset, (4, 9)))


def test_fast_path_refuses_counters_past_int64():
    assert philox.normal_fast(5, 2**63 - 4, (2, 2)).shape == (2, 2)
    with pytest.raises(ValueError, match="offset \\+ numel must be in \\[0, 2\\*\\*63\\]"):
        philox.normal_fast(5, 2**63 - 3, (2, 2))


@pytest.mark.cuda
def test_fast_path_on_cuda_is_the_spec_on_cuda_bit_for_bit():
    """CUDA's int64 multiply must wrap as the CPU's does, and its one-chunk pass must match."""
    for seed, offset, count in ((1234, 0, 300_000), (2**64 - 977, 2**32 - 70_000, 140_000)):
        expected = philox.normal(seed, offset, (count,), "cuda").view(torch.int32)
        assert torch.equal(philox.normal_fast(seed, offset, (count,), "cuda").view(torch.int32), expected)
