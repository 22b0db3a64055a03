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

    def conv_padding(self, in_size: int) -> int:
        """Symmetric zero padding for a plain convolution that covers every row this phase reads."""
        return max(0, -self.first_offset, self.count + self.first_offset + self.taps - 1 - in_size)


@dataclass(frozen=True)
class AxisGroup:
    """The phases of one axis that read the same low-resolution window (equal ``first_offset`` and ``taps``):
    one convolution serves them all, their collapsed kernels side by side along the axis, phase by phase."""

    phases: tuple[AxisPhase, ...]
    kernel: int

    @property
    def taps(self) -> int:
        return self.phases[0].taps

    @functools.cached_property
    def _sources(self) -> tuple[tuple[int, ...], ...]:
        """For each j < scale, the original tap (or ``kernel``: none, a zero) that is the j-th summed into each
        collapsed tap of each phase, in the order (phase, collapsed tap)."""
        scale = self.phases[0].scale
        columns = []
        for j in range(scale):
            column = []
            for phase in self.phases:
                for m in range(phase.taps):
                    u = scale * m + j - phase.lead  # the taps grouped s by s, after ``lead`` empty places
                    column.append(u if 0 <= u < self.kernel else self.kernel)
            columns.append(tuple(column))
        return tuple(columns)

    def collapse(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """t's axis ``dim`` (the K original taps) -> every phase's collapsed taps, phase after phase
        ([.., K, ..] -> [.., phases x taps, ..]): each collapsed tap adds its run of at most ``scale`` consecutive
        taps, gathered, in a fixed order. Exact and deterministic on every device, where a product with a 0/1
        matrix goes through cuBLAS (TF32 rounding when matmuls allow it, and an error under deterministic
        algorithms without CUBLAS_WORKSPACE_CONFIG)."""
        dim %= t.dim()
        padded = F.pad(t, [0, 0] * (t.dim() - 1 - dim) + [0, 1])  # tap K: the zero that fills short runs
        first, *rest = (padded.index_select(dim, constant(c, torch.int64, t.device)) for c in self._sources)
        for part in rest:
            first.add_(part)
        return first

    def expand(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """The transpose of :meth:`collapse` along ``dim``: [.., phases x taps, ..] -> [.., K, ..], every original
        tap taking the sum, over the phases, of the collapsed tap it was added into (how gradients flow back)."""
        dim %= t.dim()
        gathered = t.index_select(dim, constant(self._collapsed_of_taps, torch.int64, t.device))
        return gathered.unflatten(dim, (len(self.phases), self.kernel)).sum(dim)

    @functools.cached_property
    def _collapsed_of_taps(self) -> tuple[int, ...]:
        """For each phase and original tap, the index (phase, collapsed tap) it was added into."""
        return tuple(p * self.taps + m for p, phase in enumerate(self.phases) for m in phase.tap_offsets)


@functools.lru_cache(maxsize=1024)
def axis_groups(in_size: int, kernel: int, padding: int, scale: int) -> tuple[AxisGroup, ...]:
    """The non-empty phases of one axis, grouped by the window they read (phases in order within a group)."""
    windows: dict[tuple[int, int], list[AxisPhase]] = {}
    for phase in axis_phases(in_size, kernel, padding, scale):
        windows.setdefault((phase.first_offset, phase.taps), []).append(phase)
    return tuple(AxisGroup(tuple(phases), kernel) for phases in windows.values())


def output_size(in_size: int, kernel: int, padding: int, scale: int) -> int:
    """One side of upsampling x``scale`` then a ``kernel`` convolution with ``padding``: s*n + 2p - k + 1."""
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
