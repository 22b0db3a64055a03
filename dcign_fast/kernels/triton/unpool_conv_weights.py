"""The unpool-conv's weight transforms as Triton kernels: the K x K kernel collapsed into every phase's packed
kernel (forward and grad input), and the grad-weight partial sums folded back onto the K x K taps (backward).
The Triton counterpart of csrc/unpool_conv_weights.cu.

One launch each, where the torch formulation (einsums over 0/1 collapse matrices, a pad, casts, a split sum)
took some forty small ops per layer, each with its own host time, which a small layer's GEMMs cannot hide. The
sums run in float32, in a fixed order (deterministic, and no cuBLAS, which torch.use_deterministic_algorithms(True)
would refuse without CUBLAS_WORKSPACE_CONFIG).

Tap arithmetic: with padding p, original tap u of phase a reads low-resolution offset floor((a + u - p) / 2); the
union window starts at floor(-p / 2), so its union tap is (a + u + p % 2) // 2, whose numerator is never
negative (Triton's integer division truncates, Python's floors).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dcign_fast.kernels.triton.unpool_conv_layout import AxisUnion

# Elements per program's tile (taps x channel pairs) and its warps: 32 float32 accumulators and 64-bit addresses
# per thread (with 4 warps, the bf16 packing spilled).
_TILE = 8192
_WARPS = 8


def _tile(taps: int) -> dict[str, int]:
    """TAPS_BLOCK (``taps`` rounded up to a power of 2) and BLOCK (channel pairs) of a tile of _TILE elements,
    and the launch's warps."""
    taps_block = triton.next_power_of_2(taps)
    return {"TAPS_BLOCK": taps_block, "BLOCK": _TILE // taps_block, "num_warps": _WARPS}


@triton.jit
def _union_tap(phase, tap, PARITY: tl.constexpr):
    """The union tap that original tap ``tap`` of phase ``phase`` is collapsed into (padding parity PARITY)."""
    return (phase + tap + PARITY) // 2


@triton.jit
def _pack_weight_kernel(
    w_ptr, wp_ptr, ROWS, COLS, COLS_PACKED, sw_row, sw_col, sw_u, sw_v,
    KH: tl.constexpr, KW: tl.constexpr, ROW_PARITY: tl.constexpr, COL_PARITY: tl.constexpr,
    TR: tl.constexpr, TC: tl.constexpr, TAPS_BLOCK: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # Program: a block of [ROWS, COLS_PACKED] for every phase tap (a, b, ty, tx) at once:
    # wp[a, b, ty, tx, r, q] = sum of w[r, q, u, v] (strided through sw_*) over the taps u (v) that phase a (b)
    # maps to ty (tx), at most two per axis: u = 2 ty - a - ROW_PARITY and the one after it (either may lie
    # outside the kernel, and both do where ty is outside phase a's window); zero for the padding columns q >= COLS.
    taps = tl.arange(0, TAPS_BLOCK)
    tap_ok = taps < 4 * TR * TC
    a = taps // (2 * TR * TC)
    b = taps // (TR * TC) % 2
    u0 = 2 * (taps // TC % TR) - a - ROW_PARITY
    v0 = 2 * (taps % TC) - b - COL_PARITY
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_tap = offs < ROWS * COLS_PACKED
    ok = in_tap & (offs % COLS_PACKED < COLS)
    base = (offs // COLS_PACKED).to(tl.int64) * sw_row + (offs % COLS_PACKED).to(tl.int64) * sw_col
    acc = tl.zeros((TAPS_BLOCK, BLOCK), dtype=tl.float32)
    for du in tl.static_range(2):
        for dv in tl.static_range(2):
            u = u0 + du
            v = v0 + dv
            hit = tap_ok & (u >= 0) & (u < KH) & (v >= 0) & (v < KW)
            at = u.to(tl.int64) * sw_u + v.to(tl.int64) * sw_v  # O x C x KH x KW may pass int32's range
            w = tl.load(w_ptr + at[:, None] + base[None, :], mask=hit[:, None] & ok[None, :], other=0.0)
            acc += w.to(tl.float32)
    dst = wp_ptr + taps.to(tl.int64)[:, None] * ROWS * COLS_PACKED + offs[None, :]
    tl.store(dst, acc.to(wp_ptr.dtype.element_ty), mask=tap_ok[:, None] & in_tap[None, :])


@triton.jit
def _finalize_grad_weight_kernel(
    ws_ptr, dw_ptr, C_IN, C_OUT, SPLITS, sdo, sdc, sdu, sdv,
    KH: tl.constexpr, KW: tl.constexpr, ROW_PARITY: tl.constexpr, COL_PARITY: tl.constexpr,
    TR: tl.constexpr, TC: tl.constexpr, TAPS_BLOCK: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # Program: a block of [C_IN, C_OUT] pairs for every original tap (u, v) at once:
    # dw[o, c, u, v] = sum over splits s, then phases (a, b), of ws[s, a, b, tap of u, tap of v, c, o] (only
    # taps inside each phase's window are read: the kernels write no others).
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    uv = tl.arange(0, TAPS_BLOCK)
    uv_ok = uv < KH * KW
    u = uv // KW
    v = uv % KW
    ok = uv_ok[:, None] & (offs < C_IN * C_OUT)[None, :]
    acc = tl.zeros((TAPS_BLOCK, BLOCK), dtype=tl.float32)
    for s in range(SPLITS):
        for phase in tl.static_range(4):
            ty = _union_tap(phase // 2, u, ROW_PARITY)
            tx = _union_tap(phase % 2, v, COL_PARITY)
            start = (((s * 4 + phase) * TR + ty) * TC + tx).to(tl.int64) * C_IN * C_OUT
            acc += tl.load(ws_ptr + start[:, None] + offs[None, :], mask=ok, other=0.0)
    pair = (offs % C_OUT).to(tl.int64) * sdo + (offs // C_OUT).to(tl.int64) * sdc
    dw = dw_ptr + (u.to(tl.int64) * sdu + v.to(tl.int64) * sdv)[:, None] + pair[None, :]
    tl.store(dw, acc.to(dw_ptr.dtype.element_ty), mask=ok)


def _tap_constexprs(weight_shape: torch.Size, rows: AxisUnion, cols: AxisUnion) -> dict[str, int]:
    """The kernel size, the padding's parity per axis (see the module docstring) and the union taps."""
    return {
        "KH": weight_shape[2],
        "KW": weight_shape[3],
        "ROW_PARITY": rows.padding % 2,
        "COL_PARITY": cols.padding % 2,
        "TR": rows.taps,
        "TC": cols.taps,
    }


def pack_weight(weight: torch.Tensor, rows: AxisUnion, cols: AxisUnion, reduce_over: str) -> torch.Tensor:
    """[O, C, KH, KW] (any strides) -> every phase's collapsed kernel (summed in float32, stored in the weight's
    dtype), laid out for :func:`load_w`: the channels a GEMM reduces over contiguous and zero-padded to a
    multiple of 16, [2, 2, TR, TC, O, C16] for the forward (``reduce_over="in"``), [2, 2, TR, TC, C, O16] for
    grad input (``"out"``)."""
    c_out, c_in = weight.shape[:2]
    (rows_dim, row_stride), (cols_dim, col_stride) = (
        ((c_out, weight.stride(0)), (c_in, weight.stride(1)))
        if reduce_over == "in"
        else ((c_in, weight.stride(1)), (c_out, weight.stride(0)))
    )
    cols_packed = -(-cols_dim // 16) * 16
    wp = weight.new_empty((2, 2, rows.taps, cols.taps, rows_dim, cols_packed))
    tile = _tile(4 * rows.taps * cols.taps)
    _pack_weight_kernel[(triton.cdiv(rows_dim * cols_packed, tile["BLOCK"]),)](
        weight, wp, rows_dim, cols_dim, cols_packed, row_stride, col_stride, weight.stride(2), weight.stride(3),
        **_tap_constexprs(weight.shape, rows, cols), **tile,
    )  # fmt: skip
    return wp


def finalize_grad_weight(ws: torch.Tensor, weight: torch.Tensor, rows: AxisUnion, cols: AxisUnion) -> torch.Tensor:
    """ws [S, 2, 2, TR, TC, C, O] float32 (every split's grad-weight partial sums per phase tap, written inside each
    phase's window only) -> grad weight in ``torch.empty_like(weight)``'s layout and the weight's dtype."""
    c_out, c_in = weight.shape[:2]
    dw = torch.empty_like(weight)
    tile = _tile(weight.shape[2] * weight.shape[3])
    _finalize_grad_weight_kernel[(triton.cdiv(c_in * c_out, tile["BLOCK"]),)](
        ws, dw, c_in, c_out, ws.shape[0], *dw.stride(), **_tap_constexprs(weight.shape, rows, cols), **tile
    )
    return dw
