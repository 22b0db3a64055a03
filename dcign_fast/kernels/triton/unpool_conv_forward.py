"""The unpool-conv forward as one Triton implicit GEMM: the four phase convolutions of the low-resolution
input, bias and activation in the epilogue, written interleaved into the output (see unpool_conv.py)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dcign_fast.kernels.triton.unpool_conv_layout import (
    ACTIVATION_CODES,
    AxisUnion,
    nchw_strides,
    numeric_constexprs,
    shares_window,
    window_constexprs,
)
from dcign_fast.kernels.triton.unpool_conv_tiles import (
    GEMM_BLOCKS,
    GEMM_INTERPRETED,
    GEMM_KEY,
    autotune_configs,
    fit_columns,
    load_w,
    split_positions,
    tap_start,
    tile_ids,
)

# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages). Where the phases share a window, four fp32 accumulators (one per
# phase) of BLOCK_M x BLOCK_N are live at once: 64 x 128 with 8 warps is the most that stays in registers (phase
# by phase, 128 x 64 and 128 x 128 spilled too, compiled for K=3 same). Wide tiles keep the tensor cores busy
# where the channels allow them (an sm_90 tile of 64 x 64 spends more issue slots on addressing than its
# multiplies take); the narrow ones fit 1 to 32 output channels.
FORWARD_OPTIONS = [
    (64, 128, 32, 8, 3),
    (64, 64, 32, 8, 2),
    (64, 32, 32, 8, 2),
    (64, 16, 32, 8, 2),
]


_FORWARD_CONFIGS = autotune_configs(GEMM_BLOCKS, FORWARD_OPTIONS, GEMM_INTERPRETED)


@triton.jit
def _load_x(x_base, i, j, m_mask, offs_k, k_mask, ty, tx, H, W, sxc, sxh, sxw, ROW0, COL0, UPCAST: tl.constexpr):
    """Input tile [BLOCK_M, BLOCK_K] at low-resolution (i + ROW0 + ty, j + COL0 + tx), zero outside the image."""
    row = i + ROW0 + ty
    col = j + COL0 + tx
    ok = m_mask & (row >= 0) & (row < H) & (col >= 0) & (col < W)
    pix = x_base + row * sxh + col * sxw
    a = tl.load(pix[:, None] + offs_k[None, :] * sxc, mask=ok[:, None] & k_mask[None, :], other=0.0)
    if UPCAST:
        a = a.to(tl.float32)
    return a


@triton.jit
def _phase_gemm(
    x_base, w_ptr, i, j, m_mask, offs_n, n_mask, H, W, C_IN, C_OUT, K_PACKED, sxc, sxh, sxw,
    PHASE: tl.constexpr, ROW0: tl.constexpr, COL0: tl.constexpr, TR: tl.constexpr, TC: tl.constexpr,
    RS: tl.constexpr, RT: tl.constexpr, CS: tl.constexpr, CT: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One phase's [BLOCK_M, BLOCK_N] output tile: one dynamic loop over (its taps, C_in blocks)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    blocks = tl.cdiv(C_IN, BLOCK_K)
    for t in range(0, RT * CT * blocks):
        tap = t // blocks
        offs_k = (t % blocks) * BLOCK_K + tl.arange(0, BLOCK_K)
        k_mask = offs_k < C_IN
        ty = RS + tap // CT
        tx = CS + tap % CT
        a = _load_x(x_base, i, j, m_mask, offs_k, k_mask, ty, tx, H, W, sxc, sxh, sxw, ROW0, COL0, UPCAST)
        w_rows = tap_start(PHASE, ty, tx, TR, TC, K_PACKED, C_OUT) + offs_k
        w = load_w(w_ptr, w_rows, offs_k < K_PACKED, offs_n * K_PACKED, n_mask, UPCAST)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _store_phase(
    acc, y_ptr, bias, n, i, j, m_mask, o, o_ok, a, b, HO, WO, syn, syc, syh, syw, ACTIVATION: tl.constexpr
):  # fmt: skip
    """Epilogue: bias, activation, cast; column k of acc goes to channel o[k] of output pixel (2i + a, 2j + b),
    where phase (a, b) is one for the whole tile or, as [1, BLOCK_N] tensors, one per column."""
    acc = acc + bias[None, :]
    if ACTIVATION == 1:
        acc = tl.where(acc < 0, 0.0, acc)  # not tl.maximum, which turns NaN into 0: torch.relu keeps it
    row = 2 * i[:, None] + a
    col = 2 * j[:, None] + b
    ok = m_mask[:, None] & o_ok[None, :] & (row < HO) & (col < WO)
    offs = n.to(tl.int64)[:, None] * syn + row * syh + col * syw + o[None, :] * syc
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=ok)


@triton.autotune(
    configs=_FORWARD_CONFIGS,
    key=[*GEMM_KEY, "SHARED"],
    prune_configs_by=fit_columns(lambda args: args["C_OUT"] * (4 if args["PHASES_IN_N"] else 1)),
)
@triton.jit
def _forward_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, N, H, W, C_IN, C_OUT, K_PACKED, HO, WO, sxn, sxc, sxh, sxw, syn, syc, syh, syw,
    ROW0: tl.constexpr, COL0: tl.constexpr, TR: tl.constexpr, TC: tl.constexpr,
    RS0: tl.constexpr, RT0: tl.constexpr, RS1: tl.constexpr, RT1: tl.constexpr,
    CS0: tl.constexpr, CT0: tl.constexpr, CS1: tl.constexpr, CT1: tl.constexpr,
    SHARED: tl.constexpr, PHASES_IN_N: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    # Rows of the GEMM: low-resolution positions (n, i, j) of phase (0, 0), which has the most rows/cols.
    rows0 = (HO + 1) // 2
    cols0 = (WO + 1) // 2
    if PHASES_IN_N:
        pid_m, pid_n = tile_ids(4 * C_OUT, BLOCK_N)
    else:
        pid_m, pid_n = tile_ids(C_OUT, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < N * rows0 * cols0
    n, i, j = split_positions(offs_m, rows0, cols0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    phase_size = TR * TC * K_PACKED * C_OUT  # elements of one phase's packed kernel
    if PHASES_IN_N:
        # At most 4 output channels (an image layer), with every phase reading the whole window: the four
        # phases side by side in one dot's columns (phase k // C_OUT, channel k % C_OUT), instead of four
        # dots of mostly padding.
        phase = offs_n // C_OUT
        offs_o = offs_n % C_OUT
        n_mask = offs_n < 4 * C_OUT
        w_cols = phase * phase_size + offs_o * K_PACKED
    else:
        offs_o = offs_n
        n_mask = offs_n < C_OUT
        w_cols = offs_n * K_PACKED
    x_base = x_ptr + n.to(tl.int64) * sxn
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_o, mask=n_mask, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if SHARED:
        # Every phase reads the whole union window (K=5 same, K=7 valid): each input tile is loaded once and
        # feeds four dots, one per phase.
        acc00 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc01 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc10 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc11 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        blocks = tl.cdiv(C_IN, BLOCK_K)
        for t in range(0, TR * TC * blocks):
            tap = t // blocks
            offs_k = (t % blocks) * BLOCK_K + tl.arange(0, BLOCK_K)
            k_mask = offs_k < C_IN
            ty = tap // TC
            tx = tap % TC
            a = _load_x(x_base, i, j, m_mask, offs_k, k_mask, ty, tx, H, W, sxc, sxh, sxw, ROW0, COL0, UPCAST)
            w_rows = tap_start(0, ty, tx, TR, TC, K_PACKED, C_OUT) + offs_k
            w_ok = offs_k < K_PACKED
            w = load_w(w_ptr, w_rows, w_ok, w_cols, n_mask, UPCAST)
            acc00 = tl.dot(a, w, acc00, input_precision=PRECISION)
            if not PHASES_IN_N:
                w = load_w(w_ptr, w_rows + phase_size, w_ok, w_cols, n_mask, UPCAST)
                acc01 = tl.dot(a, w, acc01, input_precision=PRECISION)
                w = load_w(w_ptr, w_rows + 2 * phase_size, w_ok, w_cols, n_mask, UPCAST)
                acc10 = tl.dot(a, w, acc10, input_precision=PRECISION)
                w = load_w(w_ptr, w_rows + 3 * phase_size, w_ok, w_cols, n_mask, UPCAST)
                acc11 = tl.dot(a, w, acc11, input_precision=PRECISION)
        if PHASES_IN_N:
            a, b = (phase // 2)[None, :], (phase % 2)[None, :]
            _store_phase(acc00, y_ptr, bias, n, i, j, m_mask, offs_o, n_mask, a, b, HO, WO, syn, syc, syh, syw,
                         ACTIVATION)  # fmt: skip
        else:
            _store_phase(acc00, y_ptr, bias, n, i, j, m_mask, offs_o, n_mask, 0, 0, HO, WO, syn, syc, syh, syw,
                         ACTIVATION)  # fmt: skip
            _store_phase(acc01, y_ptr, bias, n, i, j, m_mask, offs_o, n_mask, 0, 1, HO, WO, syn, syc, syh, syw,
                         ACTIVATION)  # fmt: skip
            _store_phase(acc10, y_ptr, bias, n, i, j, m_mask, offs_o, n_mask, 1, 0, HO, WO, syn, syc, syh, syw,
                         ACTIVATION)  # fmt: skip
            _store_phase(acc11, y_ptr, bias, n, i, j, m_mask, offs_o, n_mask, 1, 1, HO, WO, syn, syc, syh, syw,
                         ACTIVATION)  # fmt: skip
    else:
        # Phases read different windows (K=3 same): one phase after another, each over its own taps only and
        # stored before the next, so that one accumulator is live at a time.
        for ab in tl.static_range(4):
            acc = _phase_gemm(
                x_base, w_ptr, i, j, m_mask, offs_n, n_mask, H, W, C_IN, C_OUT, K_PACKED, sxc, sxh, sxw,
                ab, ROW0, COL0, TR, TC, RS1 if ab // 2 else RS0, RT1 if ab // 2 else RT0,
                CS1 if ab % 2 else CS0, CT1 if ab % 2 else CT0, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
            )  # fmt: skip
            _store_phase(
                acc, y_ptr, bias, n, i, j, m_mask, offs_o, n_mask, ab // 2, ab % 2, HO, WO, syn, syc, syh, syw,
                ACTIVATION,
            )  # fmt: skip


def launch_forward(
    x: torch.Tensor,
    wp: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    rows: AxisUnion,
    cols: AxisUnion,
    activation: str | None,
) -> None:
    """Runs the forward kernel: x [N, C, H, W] (NHWC in memory) and wp (:func:`pack_weight`, ``"in"``) ->
    ``out`` [N, O, HO, WO], written in place."""
    n, c_in, h, w = x.shape
    c_out, ho, wo = out.shape[1:]
    positions = n * ((ho + 1) // 2) * ((wo + 1) // 2)
    shared = shares_window(rows, cols)
    phases_in_n = shared and 4 * c_out <= 16  # the four phases fit one dot of tl.dot's least width
    columns = 4 * c_out if phases_in_n else c_out

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(columns, meta["BLOCK_N"]) * triton.cdiv(positions, meta["BLOCK_M"]),)

    _forward_kernel[grid](
        x, wp, wp if bias is None else bias.contiguous(), out, n, h, w, c_in, c_out, wp.shape[-1], ho, wo,
        *nchw_strides(x), *nchw_strides(out),
        SHARED=shared, HAS_BIAS=bias is not None, PHASES_IN_N=phases_in_n, **window_constexprs(rows, cols),
        ACTIVATION=ACTIVATION_CODES[activation], **numeric_constexprs(x.dtype),
    )  # fmt: skip
