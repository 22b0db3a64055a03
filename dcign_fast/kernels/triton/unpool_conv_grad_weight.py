"""The unpool-conv's weight gradient as Triton split-K GEMMs over batch x pixels: partial sums go
to a workspace that unpool_conv_weights.py's kernel reduces in a fixed order, so the result is deterministic
(see unpool_conv.py)."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from dcign_fast.kernels.triton.unpool_conv_layout import (
    AxisUnion,
    axis_constexprs,
    nchw_strides,
    numeric_constexprs,
    window_constexprs,
)
from dcign_fast.kernels.triton.unpool_conv_tiles import autotune_configs, load_grad_at, split_positions
from dcign_fast.kernels.triton.unpool_conv_weights import finalize_grad_weight
from dcign_fast.kernels.unpool_conv_common import FEW_OUTPUTS
from dcign_fast.ops.backends import triton_interpreting
from dcign_fast.ops.constants import constant

# Sizes the grad-weight split aims for: enough programs to fill a GPU (132 SMs on H100) a few times over.
_TARGET_PROGRAMS = 1024


_GRAD_WEIGHT_KEY = ["N", "H", "W", "C_IN", "C_OUT", "TR", "TC", "CHUNK"]


# Grad weight: channel tiles are chosen by the launcher; the reduction runs over pixels, BLOCK_P at a time.
# Its [C_in tile, pixels] and [pixels, C_out tile] operand tiles take 64-bit pointers: 8 warps keep them in
# registers (4 warps, or 128 pixels, spilled).
GRAD_WEIGHT_BLOCKS = ("BLOCK_P",)


GRAD_WEIGHT_OPTIONS = [(64, 8, 3), (32, 8, 3)]


_GRAD_WEIGHT_CONFIGS = autotune_configs(GRAD_WEIGHT_BLOCKS, GRAD_WEIGHT_OPTIONS, (64,))


@triton.autotune(configs=_GRAD_WEIGHT_CONFIGS, key=_GRAD_WEIGHT_KEY)
@triton.jit
def _grad_weight_kernel(
    x_ptr, g_ptr, taps_ptr, dw_ptr, N, C_IN, C_OUT, HO, WO, CHUNK, sxn, sxc, sxh, sxw, sgn, sgc, sgh, sgw,
    H: tl.constexpr, W: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr,
    ROW0: tl.constexpr, COL0: tl.constexpr, TR: tl.constexpr, TC: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_O: tl.constexpr,
    BLOCK_P: tl.constexpr,
):  # fmt: skip
    # One (phase, union tap) from the table taps_ptr[k] = (a, b, ty, tx), one (C_in, C_out) tile, one split
    # [split * CHUNK, (split + 1) * CHUNK) of the positions N x ROWS x COLS that phase (0, 0) has (the most: a
    # phase with a row or column fewer skips it). The image sizes are constexprs so that splitting positions
    # into (n, row, column), at every step, divides by constants.
    pid_co = tl.program_id(0)
    k = tl.program_id(1)
    split = tl.program_id(2)
    pid_c = pid_co // tl.cdiv(C_OUT, BLOCK_O)
    pid_o = pid_co % tl.cdiv(C_OUT, BLOCK_O)
    a = tl.load(taps_ptr + 4 * k)
    b = tl.load(taps_ptr + 4 * k + 1)
    ty = tl.load(taps_ptr + 4 * k + 2)
    tx = tl.load(taps_ptr + 4 * k + 3)
    rows = (HO - a + 1) // 2
    cols = (WO - b + 1) // 2
    start = split * CHUNK
    # (start + CHUNK would wrap int32 for the last split of a reduction near TRITON_INDEX_LIMIT positions)
    end = start + tl.minimum(CHUNK, N * ROWS * COLS - start)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C_IN
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    o_mask = offs_o < C_OUT
    acc = tl.zeros((BLOCK_C, BLOCK_O), dtype=tl.float32)
    for p0 in range(start, end, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        n, io, jo = split_positions(offs_p, ROWS, COLS)
        p_mask = (offs_p < end) & (io < rows) & (jo < cols)
        n = n.to(tl.int64)
        r = io + ROW0 + ty
        c = jo + COL0 + tx
        x_ok = p_mask & (r >= 0) & (r < H) & (c >= 0) & (c < W)
        x_offs = n * sxn + r * sxh + c * sxw
        xt = tl.load(x_ptr + x_offs[None, :] + offs_c[:, None] * sxc, mask=c_mask[:, None] & x_ok[None, :], other=0.0)
        if UPCAST:
            xt = xt.to(tl.float32)
        g_offs = n * sgn + (2 * io + a) * sgh + (2 * jo + b) * sgw
        g = tl.load(g_ptr + g_offs[:, None] + offs_o[None, :] * sgc, mask=p_mask[:, None] & o_mask[None, :], other=0.0)
        acc = tl.dot(xt, g.to(xt.dtype), acc, input_precision=PRECISION)
    phase = a * 2 + b
    dw = dw_ptr + ((((split * 4 + phase) * TR + ty) * TC + tx) * C_IN).to(tl.int64) * C_OUT
    tl.store(dw + offs_c[:, None] * C_OUT + offs_o[None, :], acc, mask=c_mask[:, None] & o_mask[None, :])


@triton.autotune(configs=_GRAD_WEIGHT_CONFIGS, key=_GRAD_WEIGHT_KEY)
@triton.jit
def _grad_weight_few_outputs_kernel(
    x_ptr, g_ptr, dw_ptr, N, C_IN, C_OUT, HO, WO, CHUNK, sxn, sxc, sxh, sxw, sgn, sgc, sgh, sgw,
    H: tl.constexpr, W: tl.constexpr, ROW0: tl.constexpr, COL0: tl.constexpr, TR: tl.constexpr, TC: tl.constexpr,
    RS0: tl.constexpr, RT0: tl.constexpr, RS1: tl.constexpr, RT1: tl.constexpr,
    CS0: tl.constexpr, CT0: tl.constexpr, CS1: tl.constexpr, CT1: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    # Grad weight for C_out <= FEW_OUTPUTS: one phase, one C_in tile, one tile of the phase's (union tap, C_out)
    # pairs, one split of the *input* pixels [split * CHUNK, (split + 1) * CHUNK). Input pixel (i, j) meets
    # grad_out of output position (i - ROW0 - ty, j - COL0 - tx) through tap (ty, tx): x is read once per
    # phase instead of once per tap, and the GEMM's columns are real (tap, channel) pairs, not padding.
    pid_cn = tl.program_id(0)
    phase = tl.program_id(1)
    split = tl.program_id(2)
    a = phase // 2
    b = phase % 2
    pairs = TR * TC * C_OUT
    pid_c = pid_cn // tl.cdiv(pairs, BLOCK_O)
    pid_n = pid_cn % tl.cdiv(pairs, BLOCK_O)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C_IN
    offs_n = pid_n * BLOCK_O + tl.arange(0, BLOCK_O)
    tap = offs_n // C_OUT
    o = offs_n % C_OUT
    ty = tap // TC
    tx = tap % TC
    # Only the taps of this phase's window: the fold (unpool_conv_weights.py) reads no others.
    rs = RS0 + a * (RS1 - RS0)
    cs = CS0 + b * (CS1 - CS0)
    n_ok = (offs_n < pairs) & (ty >= rs) & (ty < rs + RT0 + a * (RT1 - RT0))
    n_ok = n_ok & (tx >= cs) & (tx < cs + CT0 + b * (CT1 - CT0))
    start = split * CHUNK
    end = start + tl.minimum(CHUNK, N * H * W - start)  # (not start + CHUNK: see _grad_weight_kernel)
    acc = tl.zeros((BLOCK_C, BLOCK_O), dtype=tl.float32)
    for p0 in range(start, end, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        p_mask = offs_p < end
        n, i, j = split_positions(offs_p, H, W)
        n = n.to(tl.int64)
        x_offs = n * sxn + i * sxh + j * sxw
        xt = tl.load(x_ptr + x_offs[None, :] + offs_c[:, None] * sxc, mask=c_mask[:, None] & p_mask[None, :], other=0.0)
        if UPCAST:
            xt = xt.to(tl.float32)
        io = i[:, None] - (ROW0 + ty)[None, :]
        jo = j[:, None] - (COL0 + tx)[None, :]
        g = load_grad_at(
            g_ptr, n[:, None] * sgn, io, jo, o[None, :], p_mask[:, None] & n_ok[None, :],
            (HO - a + 1) // 2, (WO - b + 1) // 2, a, b, sgc, sgh, sgw, UPCAST,
        )  # fmt: skip
        acc = tl.dot(xt, g.to(xt.dtype), acc, input_precision=PRECISION)
    # dw[split, a, b, ty, tx, c, o]
    dw = dw_ptr + ((split * 4 + phase) * TR * TC).to(tl.int64) * C_IN * C_OUT
    dw_offs = (tap[None, :] * C_IN + offs_c[:, None]) * C_OUT + o[None, :]
    tl.store(dw + dw_offs, acc, mask=c_mask[:, None] & n_ok[None, :])


def _channel_tile(channels: int, dtype: torch.dtype) -> int:
    """Channel tile of the grad-weight GEMM: at least tl.dot's 16, at most 128 (64 for float32, whose 128 x 128
    tiles over 64 pixels and 3 stages would need 256 KiB of shared memory, over sm_90's 227)."""
    return max(16, min(128 if dtype.itemsize == 2 else 64, triton.next_power_of_2(channels)))


def split_chunk(positions: int, programs: int) -> int:
    """Pixels per split of the grad-weight reduction: enough splits to fill the GPU, chunks of >= 512 pixels
    (64 when interpreting, so that small test shapes still take the split path)."""
    granule = 64 if triton_interpreting() else 512
    splits = max(1, min(triton.cdiv(_TARGET_PROGRAMS, programs), triton.cdiv(positions, granule)))
    return triton.cdiv(triton.cdiv(positions, splits), granule) * granule


def _launch(kernel, grid: tuple[int, ...], *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``, autotuned; under ``torch.use_deterministic_algorithms(True)`` with its
    first config. The timer may pick another BLOCK_P in another process or on another machine, and the sums
    (tl.dot over BLOCK_P pixels at a time) round differently with it: pinned, their bits repeat."""
    if torch.are_deterministic_algorithms_enabled():
        kernel.fn[grid](*args, **kwargs, **kernel.configs[0].all_kwargs())
    else:
        kernel[grid](*args, **kwargs)


@functools.lru_cache(maxsize=64)
def _window_taps(
    row_windows: tuple[tuple[int, int], ...], col_windows: tuple[tuple[int, int], ...]
) -> tuple[tuple[int, int, int, int], ...]:
    """(phase row a, phase column b, union tap ty, tx) of every tap inside each phase's window
    (``AxisUnion.windows`` of rows and columns): the per-tap kernel's program table."""
    return tuple(
        (a, b, ty, tx)
        for a, (rs, rt) in enumerate(row_windows)
        for b, (cs, ct) in enumerate(col_windows)
        for ty in range(rs, rs + rt)
        for tx in range(cs, cs + ct)
    )


def launch_grad_weight(
    x: torch.Tensor, g: torch.Tensor, weight: torch.Tensor, rows: AxisUnion, cols: AxisUnion
) -> torch.Tensor:
    """Grad weight in ``torch.empty_like(weight)``'s layout and the weight's dtype, summed in float32 in a fixed
    order, from x [N, C, H, W] and grad_out ``g`` [N, O, HO, WO] (both NHWC in memory; g with the fused
    activation's mask applied)."""
    n, c_in, h, w = x.shape
    c_out, ho, wo = g.shape[1:]
    if not (x.numel() and g.numel()):  # nothing to sum, no program to launch
        return torch.zeros_like(weight)
    few_outputs = c_out <= FEW_OUTPUTS
    if few_outputs:  # programs: (C_in tile, (tap, C_out) tile) x phase x split of the input pixels
        columns, groups, positions = rows.taps * cols.taps * c_out, 4, n * h * w
    else:  # programs: (C_in tile, C_out tile) x (phase, tap) x split of phase (0, 0)'s output pixels
        taps = _window_taps(rows.windows, cols.windows)
        rows0, cols0 = (ho + 1) // 2, (wo + 1) // 2
        columns, groups, positions = c_out, len(taps), n * rows0 * cols0
    block_c, block_o = _channel_tile(c_in, x.dtype), _channel_tile(columns, x.dtype)
    tiles = triton.cdiv(c_in, block_c) * triton.cdiv(columns, block_o)
    chunk = split_chunk(positions, tiles * groups)
    splits = triton.cdiv(positions, chunk)
    # Uninitialised: the kernels write every split's sums of each phase's window taps, the only ones folded.
    ws = torch.empty((splits, 2, 2, rows.taps, cols.taps, c_in, c_out), dtype=torch.float32, device=x.device)
    # What both kernels take after their pointers: sizes and strides, then constexprs.
    args = (n, c_in, c_out, ho, wo, chunk, *nchw_strides(x), *nchw_strides(g))
    constexprs = {"H": h, "W": w, "BLOCK_C": block_c, "BLOCK_O": block_o, **numeric_constexprs(x.dtype)}
    grid = (tiles, groups, splits)
    if few_outputs:
        _launch(_grad_weight_few_outputs_kernel, grid, x, g, ws, *args, **constexprs, **window_constexprs(rows, cols))
    else:
        _launch(  # each program's window comes from the taps table
            _grad_weight_kernel, grid, x, g, constant(taps, torch.int32, x.device), ws, *args,
            ROWS=rows0, COLS=cols0, **constexprs, **axis_constexprs(rows, cols),
        )  # fmt: skip
    return finalize_grad_weight(ws, weight, rows, cols)
