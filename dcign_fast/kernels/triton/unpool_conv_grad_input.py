"""The unpool-conv's input gradient as one Triton implicit GEMM: the transposed phase convolutions summed
(see unpool_conv.py)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dcign_fast.kernels.triton.unpool_conv_layout import AxisUnion, nchw_strides, numeric_constexprs, window_constexprs
from dcign_fast.kernels.triton.unpool_conv_tiles import (
    GEMM_BLOCKS,
    GEMM_INTERPRETED,
    GEMM_KEY,
    autotune_configs,
    fit_columns,
    load_grad_at,
    load_w,
    split_positions,
    tap_start,
    tile_ids,
)
from dcign_fast.kernels.unpool_conv_common import FEW_OUTPUTS

# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages). One fp32 accumulator: 128 x 128 tiles fit (not with BLOCK_K 64 in
# float32, nor with the few-outputs gathers: see the pruning below), and on sm_90 they spend fewer issue slots
# per multiply on addressing than 64 x 64 ones. BLOCK_K 32 wastes nothing on 96 channels. The narrow tiles
# fit 1 to 32 input channels.
GRAD_INPUT_OPTIONS = [
    (128, 128, 32, 8, 3),
    (64, 128, 32, 4, 4),
    (64, 64, 32, 8, 2),
    (64, 32, 32, 8, 2),
    (64, 16, 32, 8, 2),
]


_GRAD_INPUT_CONFIGS = autotune_configs(GEMM_BLOCKS, GRAD_INPUT_OPTIONS, GEMM_INTERPRETED)


@triton.jit
def _grad_input_phase(
    acc, g_ptr, w_ptr, n, i, j, m_mask, offs_c, c_mask, C_IN, C_OUT, K_PACKED, HO, WO, sgn, sgc, sgh, sgw,
    A: tl.constexpr, B: tl.constexpr, ROW0: tl.constexpr, COL0: tl.constexpr, TR: tl.constexpr, TC: tl.constexpr,
    RS: tl.constexpr, RT: tl.constexpr, CS: tl.constexpr, CT: tl.constexpr, TAPS_IN_K: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """acc[(n, i, j), c] += sum over (A, B)'s taps t and C_out of grad_out[n, 2io+A, 2jo+B, o] * wp[A, B, t, c, o].
    Input row i is read by output row io = i - ROW0 - ty through union tap ty (likewise for columns).

    The reduction runs over (tap, C_out block) pairs, or with TAPS_IN_K (few output channels) over
    (tap, channel) pairs flattened, BLOCK_K of them per step, so that no step multiplies padding.
    """
    rows = (HO - A + 1) // 2
    cols = (WO - B + 1) // 2
    g_base = n.to(tl.int64)[:, None] * sgn
    if TAPS_IN_K:
        for k0 in range(0, RT * CT * C_OUT, BLOCK_K):
            pairs = k0 + tl.arange(0, BLOCK_K)
            offs_o = pairs % C_OUT
            ty = RS + pairs // C_OUT // CT
            tx = CS + pairs // C_OUT % CT
            valid = m_mask[:, None] & (pairs < RT * CT * C_OUT)[None, :]
            io = i[:, None] - (ROW0 + ty)[None, :]
            jo = j[:, None] - (COL0 + tx)[None, :]
            g = load_grad_at(g_ptr, g_base, io, jo, offs_o[None, :], valid, rows, cols, A, B, sgc, sgh, sgw, UPCAST)
            w_rows = tap_start(A * 2 + B, ty, tx, TR, TC, K_PACKED, C_IN) + offs_o
            w = load_w(w_ptr, w_rows, pairs < RT * CT * C_OUT, offs_c * K_PACKED, c_mask, UPCAST)
            acc = tl.dot(g.to(w.dtype), w, acc, input_precision=PRECISION)
    else:
        blocks = tl.cdiv(C_OUT, BLOCK_K)
        for t in range(0, RT * CT * blocks):
            tap = t // blocks
            offs_o = (t % blocks) * BLOCK_K + tl.arange(0, BLOCK_K)
            ty = RS + tap // CT
            tx = CS + tap % CT
            io = (i - (ROW0 + ty))[:, None]
            jo = (j - (COL0 + tx))[:, None]
            valid = m_mask[:, None] & (offs_o < C_OUT)[None, :]
            g = load_grad_at(g_ptr, g_base, io, jo, offs_o[None, :], valid, rows, cols, A, B, sgc, sgh, sgw, UPCAST)
            w_rows = tap_start(A * 2 + B, ty, tx, TR, TC, K_PACKED, C_IN) + offs_o
            w = load_w(w_ptr, w_rows, offs_o < K_PACKED, offs_c * K_PACKED, c_mask, UPCAST)
            acc = tl.dot(g.to(w.dtype), w, acc, input_precision=PRECISION)
    return acc


@triton.autotune(
    configs=_GRAD_INPUT_CONFIGS,
    key=GEMM_KEY,
    # The few-outputs path gathers grad_out element by element: its 64-bit pointer tiles spill at 128 x 128.
    prune_configs_by=fit_columns(lambda args: args["C_IN"], lambda args: 64 * 128 if args["TAPS_IN_K"] else None),
)
@triton.jit
def _grad_input_kernel(
    g_ptr, w_ptr, dx_ptr, N, H, W, C_IN, C_OUT, K_PACKED, HO, WO, sgn, sgc, sgh, sgw, sxn, sxc, sxh, sxw,
    ROW0: tl.constexpr, COL0: tl.constexpr, TR: tl.constexpr, TC: tl.constexpr,
    RS0: tl.constexpr, RT0: tl.constexpr, RS1: tl.constexpr, RT1: tl.constexpr,
    CS0: tl.constexpr, CT0: tl.constexpr, CS1: tl.constexpr, CT1: tl.constexpr,
    TAPS_IN_K: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # Rows of the GEMM: input positions (n, i, j); columns: input channels; reduction: phases, taps, C_out.
    pid_m, pid_c = tile_ids(C_IN, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < N * H * W
    n, i, j = split_positions(offs_m, H, W)
    offs_c = pid_c * BLOCK_N + tl.arange(0, BLOCK_N)
    c_mask = offs_c < C_IN
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _grad_input_phase(
        acc, g_ptr, w_ptr, n, i, j, m_mask, offs_c, c_mask, C_IN, C_OUT, K_PACKED, HO, WO, sgn, sgc, sgh, sgw,
        0, 0, ROW0, COL0, TR, TC, RS0, RT0, CS0, CT0, TAPS_IN_K, UPCAST, PRECISION, BLOCK_K,
    )  # fmt: skip
    acc = _grad_input_phase(
        acc, g_ptr, w_ptr, n, i, j, m_mask, offs_c, c_mask, C_IN, C_OUT, K_PACKED, HO, WO, sgn, sgc, sgh, sgw,
        0, 1, ROW0, COL0, TR, TC, RS0, RT0, CS1, CT1, TAPS_IN_K, UPCAST, PRECISION, BLOCK_K,
    )  # fmt: skip
    acc = _grad_input_phase(
        acc, g_ptr, w_ptr, n, i, j, m_mask, offs_c, c_mask, C_IN, C_OUT, K_PACKED, HO, WO, sgn, sgc, sgh, sgw,
        1, 0, ROW0, COL0, TR, TC, RS1, RT1, CS0, CT0, TAPS_IN_K, UPCAST, PRECISION, BLOCK_K,
    )  # fmt: skip
    acc = _grad_input_phase(
        acc, g_ptr, w_ptr, n, i, j, m_mask, offs_c, c_mask, C_IN, C_OUT, K_PACKED, HO, WO, sgn, sgc, sgh, sgw,
        1, 1, ROW0, COL0, TR, TC, RS1, RT1, CS1, CT1, TAPS_IN_K, UPCAST, PRECISION, BLOCK_K,
    )  # fmt: skip
    offs = n.to(tl.int64) * sxn + i * sxh + j * sxw
    tl.store(
        dx_ptr + offs[:, None] + offs_c[None, :] * sxc,
        acc.to(dx_ptr.dtype.element_ty),
        mask=m_mask[:, None] & c_mask[None, :],
    )


def launch_grad_input(g: torch.Tensor, wp: torch.Tensor, dx: torch.Tensor, rows: AxisUnion, cols: AxisUnion) -> None:
    """Runs the grad-input kernel: grad_out ``g`` [N, O, HO, WO] (NHWC in memory; the fused activation's mask
    applied) and wp (:func:`pack_weight`, ``"out"``) -> ``dx`` [N, C, H, W], written in place."""
    n, c_in, h, w = dx.shape
    c_out, ho, wo = g.shape[1:]

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(c_in, meta["BLOCK_N"]) * triton.cdiv(n * h * w, meta["BLOCK_M"]),)

    _grad_input_kernel[grid](
        g, wp, dx, n, h, w, c_in, c_out, wp.shape[-1], ho, wo, *nchw_strides(g), *nchw_strides(dx),
        TAPS_IN_K=c_out <= FEW_OUTPUTS, **window_constexprs(rows, cols), **numeric_constexprs(g.dtype),
    )  # fmt: skip
