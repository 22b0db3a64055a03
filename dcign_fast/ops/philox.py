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

``seed`` and ``offset`` are Python ints, or 0-d int64 tensors holding them (the seed's uint64 bits) on the
device of the draw: read there, never on the host, so a draw in a captured CUDA graph uses the values each
replay finds (:func:`dcign_fast.ops.latent_sampler.draw_rng`).

The uint32 arithmetic runs on int64 tensors holding values in ``[0, 2**32)``; the 32x32-bit products
are split into two 32x16-bit products (< 2**48) so no int64 operation overflows. That is the readable
definition (``normal``, checked against Random123's known answers); the torch backend draws with
``normal_fast`` and ``normal_at``, the same bits from about a quarter of the tensor operations.
"""

from __future__ import annotations

import math
from typing import Any, Union

import torch

Value = Union[int, torch.Tensor]  # a seed or offset: an int, or a 0-d int64 tensor on the draw's device holding it
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


def philox4x32(counter: torch.Tensor, key: tuple[Value, Value]) -> torch.Tensor:
    """Philox4x32-10 of many counters under one key.

    Args:
        counter: [4, N] int64 words in [0, 2**32).
        key: two words in [0, 2**32) (ints or 0-d tensors).

    Returns:
        [4, N] int64 output words in [0, 2**32).
    """
    c0, c1, c2, c3 = counter
    for k0, k1 in round_keys(key):
        hi0, lo0 = _mulhilo(c0, PHILOX_M0)
        hi2, lo2 = _mulhilo(c2, PHILOX_M1)
        # In place on fresh products only (never on the caller's counter): fewer allocations.
        c0, c1, c2, c3 = hi2.bitwise_xor_(c1).bitwise_xor_(k0), lo2, hi0.bitwise_xor_(c3).bitwise_xor_(k1), lo0
    return torch.stack([c0, c1, c2, c3])


def round_keys(key: tuple[Value, Value]) -> list[tuple[Value, Value]]:
    """The key of each round: ``key`` bumped by (PHILOX_W0, PHILOX_W1) once per round before it (mod 2**32).
    A key held in 0-d tensors gets them from a few tensor ops, as views, not two small ops per round."""
    k0, k1 = key
    if isinstance(k0, int):
        return [((k0 + r * PHILOX_W0) & MASK32, (k1 + r * PHILOX_W1) & MASK32) for r in range(ROUNDS)]
    steps = torch.arange(ROUNDS, dtype=torch.int64, device=k0.device)
    keys0 = steps.mul(PHILOX_W0).add_(k0).bitwise_and_(MASK32)  # < 2**32 + ROUNDS * 2**32: no overflow
    keys1 = steps.mul(PHILOX_W1).add_(k1).bitwise_and_(MASK32)
    return list(zip(keys0.unbind(), keys1.unbind()))


def seed_key(seed: Value) -> tuple[Value, Value]:
    """The Philox key of a uint64 seed (or of an int64 tensor holding its bits): (low word, high word)."""
    return seed & MASK32, (seed >> 32) & MASK32


def philox_words(seed: Value, offset: Value, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
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


def normal(seed: Value, offset: Value, shape: tuple[int, ...], device: torch.device | str = "cpu") -> torch.Tensor:
    """Standard normals of elements 0..numel-1 of the stream (seed, offset), row-major: float32 ``shape``."""
    count = math.prod(shape)
    x0, x1 = philox_words(seed, offset, count, device)
    return box_muller(x0, x1).reshape(shape)


# ---------------------------------------------------------------------------------------------------- fast path
# The same stream as ``normal`` (tests check it bit for bit), computed with about a quarter of the tensor ops:
#  * one int64 multiply per 32x32-bit product: the product of two words is below 2**64, so the int64 product
#    (which wraps mod 2**64, as torch's integer multiply does on every device) holds its exact low word in bits
#    0..31 and its exact high word in bits 32..63 (read with an arithmetic shift, then masked);
#  * the low words of products stay unmasked (only their low 32 bits are ever read: they are xored into a word
#    that is then masked, or read as an int32 view at the end), so a Philox round is 10 ops instead of 22;
#  * the words that are zero or equal for every counter (c2 = c3 = 0 at the start, hi(n) when no counter crosses
#    a multiple of 2**32) are Python ints through rounds 1-3, which saves 11 of the ~100 ops;
#  * counters go through in chunks of ``CHUNK``, so the ~8 live int64 temporaries stay in cache;
#  * the uniform fold min(x, 0xffffffff - x) is x ^ (x >> 31) on the word's int32 view (int32 -> float32 rounds
#    the same value the same way), and Box-Muller runs in place. Same float32 operations, same order.
CHUNK = 1 << 16


def _xor_hi(product: Value, other: Value, key: Value) -> Value:
    """``hi(product) ^ lo(other) ^ key``, a clean word: ``product`` is a word times a multiplier (int64 product,
    exact or wrapped), ``other`` a word whose low 32 bits count (a tensor's high bits may hold garbage)."""
    if isinstance(product, int):
        return (product >> 32) ^ other ^ key if isinstance(other, int) else (other ^ ((product >> 32) ^ key)) & MASK32
    high = product >> 32
    if isinstance(other, int):
        return high.bitwise_xor_(other ^ key).bitwise_and_(MASK32)
    return high.bitwise_xor_(other).bitwise_xor_(key).bitwise_and_(MASK32)


def _x0x1(c0: torch.Tensor, c1: Value, key: tuple[Value, Value]) -> tuple[torch.Tensor, torch.Tensor]:
    """Philox4x32-10 of counters (c0, c1, 0, 0): the output words x0, x1 as int64 tensors whose low 32 bits are
    the words (the high bits may hold garbage). ``c0`` holds clean words; ``c1`` is a tensor or one int for all."""
    c: list[Any] = [c0, c1, 0, 0]  # each a tensor, an int, or None (a word never read again)
    for r, (k0, k1) in enumerate(round_keys(key)):
        # A product is an int when its word is; a zero word's product is 0 (round 1's c2). Only x0 and x1 are
        # output, so the last round skips c2, c3 (and p0) and the one before skips c0 (None: never read).
        p0 = None if r == ROUNDS - 1 else c[0] * PHILOX_M0
        p2 = c[2] * PHILOX_M1
        c = [
            None if r == ROUNDS - 2 else _xor_hi(p2, c[1], k0),
            p2 & MASK32 if isinstance(p2, int) else p2,  # low words stay unmasked in tensors
            None if p0 is None else _xor_hi(p0, c[3], k1),
            p0 & MASK32 if isinstance(p0, int) else p0,
        ]
    x0, x1 = c[0], c[1]
    # After round 2 both are tensors whatever the counters (only c1 and the zero words start as ints).
    assert isinstance(x0, torch.Tensor) and isinstance(x1, torch.Tensor)
    return x0, x1


def _folded_uniform(words: torch.Tensor) -> torch.Tensor:
    """``uniform`` of a contiguous 1-D int64 tensor whose low 32 bits are the words: float32, bit for bit the same."""
    low = words.view(torch.int32)[0::2]  # little-endian: the low halves
    return torch.bitwise_xor(low, low >> 31).to(torch.float32).mul_(_UNIFORM_SCALE_F32)


def _box_muller_fast(x0: torch.Tensor, x1: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``box_muller(x0, x1)`` written to ``out`` (float32), with the same float32 operations in the same order."""
    radius = _folded_uniform(x0).clamp_(min=MIN_UNIFORM).log_().mul_(-2.0).sqrt_()
    uniform1 = _folded_uniform(x1)
    angle = torch.mul(_TWO_PI_F32, uniform1, out=uniform1).cos_()
    return torch.mul(radius, angle, out=out)


def normal_at(seed: Value, offset: Value, index: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """Elements ``index`` (int64, any shape, each in [0, 2**63 - offset)) of the stream (seed, offset):
    float32 of ``index``'s shape, equal bit for bit to ``normal(seed, offset, ...)`` at those elements."""
    out = torch.empty(index.shape, dtype=torch.float32, device=index.device)
    flat_index, flat_out = index.reshape(-1), out.view(-1)
    key = seed_key(seed)
    for start in range(0, flat_index.numel(), chunk):
        counter = flat_index[start : start + chunk] + offset
        x0, x1 = _x0x1(counter & MASK32, counter >> 32, key)
        _box_muller_fast(x0, x1, flat_out[start : start + chunk])
    return out


def normal_fast(
    seed: Value, offset: Value, shape: tuple[int, ...], device: torch.device | str = "cpu", chunk: int | None = None
) -> torch.Tensor:
    """``normal(seed, offset, shape, device)``, bit for bit, in about a third of the time on CPUs. The
    counters ``offset + i`` must stay below 2**63 (int64 tensors hold them; checked for an int offset).
    ``chunk``: counters per pass, by default ``CHUNK`` on the CPU (cache-sized temporaries) and all of them
    elsewhere (fewer launches)."""
    count = math.prod(shape)
    if isinstance(offset, int) and not 0 <= offset <= 2**63 - count:
        raise ValueError(f"offset + numel must be in [0, 2**63], got offset {offset} and numel {count}")
    device = torch.device(device)
    chunk = chunk or (CHUNK if device.type == "cpu" else max(count, 1))
    out = torch.empty(count, dtype=torch.float32, device=device)
    key = seed_key(seed)
    for start in range(0, count, chunk):
        size = min(chunk, count - start)
        high = None  # the chunk's one high word, when it has one and it is known here
        if isinstance(offset, torch.Tensor):  # its value stays on the device
            counter = torch.arange(start, start + size, dtype=torch.int64, device=device).add_(offset)
        elif isinstance(seed, int) and (offset + start) >> 32 == (offset + start + size - 1) >> 32:
            high = (offset + start) >> 32  # (with an int key too: an int word xored with a tensor key is 0-d)
            first = offset + start - (high << 32)
            counter = torch.arange(first, first + size, dtype=torch.int64, device=device)
        else:
            counter = torch.arange(offset + start, offset + start + size, dtype=torch.int64, device=device)
        # With one high word it is an int through round 1.
        x0, x1 = _x0x1(counter & MASK32, counter >> 32, key) if high is None else _x0x1(counter, high, key)
        _box_muller_fast(x0, x1, out[start : start + size])
    return out.reshape(shape)
