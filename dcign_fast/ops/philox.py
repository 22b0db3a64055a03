"""Philox4x32-10 and its normal transform in torch: the one definition of the latent sampler's noise.

Every backend (reference, torch, triton, cuda) draws the same ``eps`` for the same ``(seed, offset)``;
the Philox words are bit-identical everywhere, the normals equal within float32 rounding of
``log``/``sqrt``/``cos`` (a few ulp, < 1e-6 relative). The mapping is Triton's ``tl.randn(seed, offset)``,
so the Triton kernel calls ``tl.randn`` and tests check it against this module bit for bit.

The mapping, precisely (all words uint32; ``lo(x) = x & 0xffffffff``, ``hi(x) = x >> 32``):

1. Element ``(b, j)`` of a ``[B, D]`` draw has index ``i = b * D + j`` (row-major, whatever the strides
   of the tensors involved) and 64-bit counter value ``n = offset + i`` (``seed`` is a uint64 in
   ``[0, 2**64)``, ``offset`` an int64 in ``[0, 2**63)``, ``n`` must stay below ``2**64``).
2. Philox4x32-10 (Salmon et al., SC'11; Random123's ``philox4x32_R(10, ctr, key)``) with
   counter ``(c0, c1, c2, c3) = (lo(n), hi(n), 0, 0)`` and key ``(k0, k1) = (lo(seed), hi(seed))``.
   Ten times: ``(c0, c1, c2, c3) <- (mulhi(0xCD9E8D57, c2) ^ c1 ^ k0, mullo(0xCD9E8D57, c2),
   mulhi(0xD2511F53, c0) ^ c3 ^ k1, mullo(0xD2511F53, c0))``, then ``k0 += 0x9E3779B9``,
   ``k1 += 0xBB67AE85`` (mod 2**32). Only the outputs ``x0 = c0`` and ``x1 = c1`` are used.
3. Uniform in [0, 1) from a word x: ``v = min(x, 0xffffffff - x)`` (equivalently: reinterpret x as
   int32 and replace a negative value by its bitwise complement), an integer in ``[0, 2**31)``;
   ``u = float32(v) * 4.6566127342e-10f`` (int -> float32 rounds to nearest even, then one float32
   multiply).
4. Box-Muller, first output only, in float32: ``u0 = max(u(x0), 1e-7f)``,
   ``eps = sqrtf(-2.0f * logf(u0)) * cosf(6.283185307179586f * u(x1))``.

The uint32 arithmetic runs on int64 tensors holding values in ``[0, 2**32)``; the 32x32-bit products
are split into two 32x16-bit products (< 2**48) so no int64 operation overflows.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
PHILOX_M0 = 0xD2511F53  # multiplier of words 0 -> 3 (Random123's PHILOX_M4x32_0)
PHILOX_M1 = 0xCD9E8D57  # multiplier of words 2 -> 1
PHILOX_W0 = 0x9E3779B9  # key bumps (golden ratio, sqrt(3) - 1)
PHILOX_W1 = 0xBB67AE85
ROUNDS = 10
UNIFORM_SCALE = 4.6566127342e-10  # Triton's: the largest float32 s with (2**31 - 1) * s < 1
MIN_UNIFORM = 1.0e-7  # keeps log() finite
TWO_PI = 6.283185307179586


def _mulhilo(x: torch.Tensor, factor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of ``factor * x`` for words in [0, 2**32), exact in int64."""
    high = x * (factor >> 16)  # < 2**48; the full product is high * 2**16 + low
    low = x * (factor & 0xFFFF)  # < 2**48
    lo = ((high & 0xFFFF) << 16).add_(low).bitwise_and_(MASK32)
    hi = low.bitwise_right_shift_(16).add_(high).bitwise_right_shift_(16)
    return hi, lo


def philox4x32(counter: torch.Tensor, key: tuple[int, int], rounds: int = ROUNDS) -> torch.Tensor:
    """Philox4x32-``rounds`` of many counters under one key.

    Args:
        counter: [4, N] int64 words in [0, 2**32).
        key: two words in [0, 2**32).

    Returns:
        [4, N] int64 output words in [0, 2**32).
    """
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(rounds):
        hi0, lo0 = _mulhilo(c0, PHILOX_M0)
        hi2, lo2 = _mulhilo(c2, PHILOX_M1)
        # In place on fresh products only (never on the caller's counter): fewer allocations.
        c0, c1, c2, c3 = hi2.bitwise_xor_(c1).bitwise_xor_(k0), lo2, hi0.bitwise_xor_(c3).bitwise_xor_(k1), lo0
        k0, k1 = (k0 + PHILOX_W0) & MASK32, (k1 + PHILOX_W1) & MASK32
    return torch.stack([c0, c1, c2, c3])


def seed_key(seed: int) -> tuple[int, int]:
    """The Philox key of a uint64 seed: (low word, high word)."""
    return seed & MASK32, (seed >> 32) & MASK32


def philox_words(seed: int, offset: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The first two Philox words of elements 0..count-1 of the stream (seed, offset): [2, count] int64."""
    n = offset + torch.arange(count, dtype=torch.int64, device=device)
    zeros = torch.zeros_like(n)
    counter = torch.stack([n & MASK32, n >> 32, zeros, zeros])
    return philox4x32(counter, seed_key(seed))[:2]


# float32 constants as 0-dim CPU tensors, made once (a per-call torch.tensor would be an avoidable host op):
# products with them round like Triton's float32 multiplies.
_UNIFORM_SCALE_F32 = torch.tensor(UNIFORM_SCALE, dtype=torch.float32)
_TWO_PI_F32 = torch.tensor(TWO_PI, dtype=torch.float32)


def uniform(words: torch.Tensor) -> torch.Tensor:
    """uint32 words (int64 tensor) -> float32 uniforms in [0, 1), step 3 of the module docstring."""
    folded = torch.minimum(words, MASK32 - words)
    return folded.to(torch.float32) * _UNIFORM_SCALE_F32


def box_muller(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """Two words -> one standard normal in float32, step 4 of the module docstring."""
    u0 = uniform(x0).clamp_(min=MIN_UNIFORM)
    theta = _TWO_PI_F32 * uniform(x1)
    return torch.sqrt(-2.0 * torch.log(u0)) * torch.cos(theta)


def normal(seed: int, offset: int, shape: tuple[int, ...], device: torch.device | str = "cpu") -> torch.Tensor:
    """Standard normals of elements 0..numel-1 of the stream (seed, offset), row-major: float32 ``shape``."""
    count = 1
    for size in shape:
        count *= size
    x0, x1 = philox_words(seed, offset, count, device)
    return box_muller(x0, x1).reshape(shape)
