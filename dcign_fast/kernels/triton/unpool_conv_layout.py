"""Host side of the unpool-conv Triton kernels: the phases of each axis in union-tap coordinates and the
compile-time constants the kernels are specialised on."""

from __future__ import annotations

import functools

import torch

from dcign_fast.kernels.unpool_conv_common import KERNEL_SCALE, uses_tf32
from dcign_fast.ops.backends import triton_interpreting
from dcign_fast.ops.phases import axis_phases

ACTIVATION_CODES = {None: 0, "relu": 1}


class AxisUnion:
    """Both phases of one axis in union-tap coordinates (scale 2, kernel ``k``, padding ``p``)."""

    def __init__(self, k: int, p: int) -> None:
        # With in_size = k both phases are non-empty; first_offset does not depend on it.
        phases = axis_phases(k, k, p, KERNEL_SCALE)
        self.padding = p
        self.start = min(ph.first_offset for ph in phases)  # low-res offset of union tap 0
        self.taps = max(ph.first_offset + ph.taps for ph in phases) - self.start
        self.windows = tuple((ph.first_offset - self.start, ph.taps) for ph in phases)  # (first union tap, taps)


@functools.lru_cache(maxsize=64)
def unions(kh: int, kw: int, ph: int, pw: int) -> tuple[AxisUnion, AxisUnion]:
    """The union taps of a kernel (kh, kw) with padding (ph, pw): rows, columns."""
    return AxisUnion(kh, ph), AxisUnion(kw, pw)


def axis_constexprs(rows: AxisUnion, cols: AxisUnion) -> dict[str, int]:
    """Where the union window starts (low-resolution offsets ROW0, COL0) and its size in taps (TR, TC)."""
    return {"ROW0": rows.start, "COL0": cols.start, "TR": rows.taps, "TC": cols.taps}


def window_constexprs(rows: AxisUnion, cols: AxisUnion) -> dict[str, int]:
    """:func:`axis_constexprs` and each phase's window in union taps: rows [RS_a, RS_a + RT_a) of phase row a,
    columns [CS_b, CS_b + CT_b) of phase column b."""
    (rs0, rt0), (rs1, rt1) = rows.windows
    (cs0, ct0), (cs1, ct1) = cols.windows
    windows = {"RS0": rs0, "RT0": rt0, "RS1": rs1, "RT1": rt1, "CS0": cs0, "CT0": ct0, "CS1": cs1, "CT1": ct1}
    return {**axis_constexprs(rows, cols), **windows}


def shares_window(rows: AxisUnion, cols: AxisUnion) -> bool:
    """Whether every phase reads the whole union window (K=5 same, K=7 valid)."""
    return rows.windows == ((0, rows.taps),) * 2 and cols.windows == ((0, cols.taps),) * 2


def numeric_constexprs(dtype: torch.dtype) -> dict[str, object]:
    """Whether tiles are upcast to float32, and the dots' input precision."""
    return {
        # The interpreter computes bf16/fp16 wrongly; it gets fp32 tiles (the GPU keeps 16-bit tensor-core dots).
        "UPCAST": triton_interpreting(),
        "PRECISION": "tf32" if uses_tf32(dtype) else "ieee",
    }


def nchw_strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)
