"""The phase decomposition of nearest-upsample-then-convolve (see docs/phase-decomposition.md).

Upsampling by s then a K-tap stride-1 convolution with zero padding p equals, for each output phase
a in [0, s), a convolution of the low-resolution input whose taps are sums of the original taps that
land on the same low-resolution offset floor((a + u - p) / s). Rows and columns are independent, so
everything here works per axis; a 2-D phase is a pair of axis phases.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dcign_fast.ops.constants import constant


@dataclass(frozen=True)
class AxisPhase:
    """One phase of one axis.

    Output index ``phase + s * i`` (i < ``count``) reads low-resolution input indices
    ``i + first_offset + m`` for m < ``taps`` through the collapsed kernel.
    """

    phase: int
    first_offset: int
    taps: int
    count: int
    tap_offsets: tuple[int, ...]  # for each original tap u, its collapsed tap index m
    scale: int
    # Original tap u is the (lead + u)-th of the taps grouped s by s: collapsed tap m sums group m.
    lead: int

    def collapse(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """t with its axis ``dim`` (the K original taps) summed into this phase's collapsed taps: runs of at most
        ``scale`` consecutive taps, added in a fixed order. Exact and deterministic on every device, where a
        product with a 0/1 matrix goes through cuBLAS (TF32 rounding when matmuls allow it, and an error under
        deterministic algorithms without CUBLAS_WORKSPACE_CONFIG)."""
        dim %= t.dim()
        trailing = [0, 0] * (t.dim() - 1 - dim)
        padded = F.pad(t, [*trailing, self.lead, self.scale * self.taps - self.lead - t.shape[dim]])
        return padded.unflatten(dim, (self.taps, self.scale)).sum(dim + 1)

    def expand(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """The transpose of :meth:`collapse` along ``dim``: [.., taps, ..] -> [.., K, ..], every original tap
        taking the value of the collapsed tap it was summed into (how gradients flow back through the sum)."""
        return t.index_select(dim, constant(self.tap_offsets, torch.int64, t.device))

    def conv_padding(self, in_size: int) -> int:
        """Symmetric zero padding for a plain convolution that covers every row this phase reads."""
        return max(0, -self.first_offset, self.count + self.first_offset + self.taps - 1 - in_size)


def output_size(in_size: int, kernel: int, padding: int, scale: int) -> int:
    return scale * in_size + 2 * padding - kernel + 1


@functools.lru_cache(maxsize=1024)
def axis_phases(in_size: int, kernel: int, padding: int, scale: int) -> tuple[AxisPhase, ...]:
    """The non-empty phases of one axis."""
    out = output_size(in_size, kernel, padding, scale)
    phases = []
    for a in range(min(scale, out)):
        offsets = [(a + u - padding) // scale for u in range(kernel)]
        first = min(offsets)
        phases.append(
            AxisPhase(
                phase=a,
                first_offset=first,
                taps=max(offsets) - first + 1,
                count=(out - a + scale - 1) // scale,
                tap_offsets=tuple(o - first for o in offsets),
                scale=scale,
                lead=a - padding - scale * first,
            )
        )
    return tuple(phases)


def multiply_adds(in_size: tuple[int, int], kernel: tuple[int, int], padding: tuple[int, int], scale: int) -> int:
    """Multiply-adds per (batch, in-channel, out-channel) of the phase form (padding rows included)."""
    rows = axis_phases(in_size[0], kernel[0], padding[0], scale)
    cols = axis_phases(in_size[1], kernel[1], padding[1], scale)
    return sum(r.count * r.taps for r in rows) * sum(c.count * c.taps for c in cols)
