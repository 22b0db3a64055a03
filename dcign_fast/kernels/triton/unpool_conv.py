"""Fused nearest-upsample-by-2 + convolution as Triton implicit GEMMs, forward and backward.

The math is the phase decomposition (dcign_fast/ops/phases.py): output pixel (2i + a, 2j + b) is a small
convolution of the LOW-resolution input with the phase's collapsed kernel. Per axis the two phases read
windows of low-resolution offsets that overlap; their union ("union taps", ``TR`` rows x ``TC`` cols)
starts at ``ROW0``/``COL0`` and phase a occupies union taps [RS_a, RS_a + RT_a). All four phase kernels are
packed into one tensor in union coordinates (zero outside a phase's window), with the channels each GEMM
reduces over contiguous and zero-padded to a multiple of 16: ``wp[a, b, ty, tx, c_out, c_in16]`` for the
forward, ``wp[a, b, ty, tx, c_in, c_out16]`` for grad input. TF32 tensor cores take only such K-major
operands, and 16-byte rows let Triton copy them 16 bytes at a time (tests/test_triton_aot.py checks the
compiled kernels for it).

Layouts: tensors are read and written through their strides; the launchers hand the kernels
channels_last (NHWC) tensors so that the GEMM reduction over channels reads contiguous memory.

Kernels (each an implicit GEMM, fp32 accumulation; fp32 operands use TF32 when
``torch.backends.cudnn.allow_tf32`` is set, as cuDNN does for the reference convolution):
  _forward_kernel   M = N x phase-0 rows x phase-0 cols, N = C_out, K = (union taps, C_in). Where every phase
                    reads the whole union window (K=5 same, K=7 valid) each input tile is loaded once and
                    feeds four dots, one per phase; otherwise the phases run one after another over their
                    own taps. The four phases are written interleaved, with bias and ReLU in the epilogue.
  _grad_input_kernel M = N x H x W, N = C_in, K = (phases, phase taps, C_out): the transposed phase
                    convolutions summed; the ReLU mask is applied to grad_out tiles as they are loaded.
                    With at most FEW_OUTPUTS output channels, (tap, C_out) pairs are flattened into K so
                    that the dots do not multiply padding.
  _grad_weight_kernel one program per (phase tap, C_in tile, C_out tile, split of batch x pixels); split
                    partial sums go to a workspace that torch reduces in a fixed order, so grad weight and
                    grad bias are deterministic (no atomics). Grad bias rides along in the programs of
                    each phase's first tap.
  _grad_weight_few_outputs_kernel the same sums for at most FEW_OUTPUTS output channels, one program per
                    (phase, C_in tile, tile of (tap, C_out) pairs, split of the input pixels): x is read once
                    per phase, not once per tap. Grad bias is then a torch sum of the (masked) grad_out.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import triton
import triton.language as tl

from dcign_fast.kernels import device_guard
from dcign_fast.kernels.unpool_conv_common import (
    FEW_OUTPUTS,
    KERNEL_SCALE,
    check_kernel_args,
    grad_and_output_alike,
    masked_grad_sum,
    nhwc,
    uses_tf32,
)
from dcign_fast.ops.backends import triton_interpreting
from dcign_fast.ops.constants import constant, one_hot_rows
from dcign_fast.ops.phases import axis_phases
from dcign_fast.ops.unpool_conv import empty_output

ACTIVATION_CODES = {None: 0, "relu": 1}
# Sizes the grad-weight split aims for: enough programs to fill a GPU (132 SMs on H100) a few times over.
_TARGET_PROGRAMS = 1024


def config(names: tuple[str, ...], option: tuple[int, ...]) -> triton.Config:
    """An autotune config from a tuple (*block sizes named by ``names``, num_warps, num_stages)."""
    return triton.Config(dict(zip(names, option[:-2])), num_warps=option[-2], num_stages=option[-1])


def _configs(
    names: tuple[str, ...], options: list[tuple[int, ...]], interpreted: tuple[int, ...]
) -> list[triton.Config]:
    """The autotune configs of ``options``. The interpreter cannot time configs and runs one Python step per
    program: it gets the single config ``interpreted`` (block sizes only), a big tile (the tests force each
    of ``options`` in turn)."""
    return [config(names, option) for option in ([(*interpreted, 4, 1)] if triton_interpreting() else options)]


def _fit_columns(columns: Callable[[dict], int]):
    """Early config pruning: drop configs whose BLOCK_N is wider than the GEMM's N, ``columns(arguments)``."""

    def prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        width = max(16, triton.next_power_of_2(columns({**named_args, **kwargs})))
        return [c for c in configs if c.kwargs["BLOCK_N"] <= width] or configs[:1]

    return {"early_config_prune": prune}


# Autotuning keys: the shapes and the kernel's union window (two layers of one shape but different kernel
# sizes compile different code and may want different configs).
_GEMM_KEY = ["N", "H", "W", "C_IN", "C_OUT", "TR", "TC", "SHARED"]
_GRAD_WEIGHT_KEY = ["N", "H", "W", "C_IN", "C_OUT", "TR", "TC", "CHUNK"]
# Four fp32 accumulators (one per phase) of BLOCK_M x BLOCK_N plus 64-bit pointer tiles: with 8 warps and
# 64 rows nothing spills (tests/test_triton_aot.py checks; 4 warps or 128 rows spilled in some cases).
# Channel counts of 16-128 take one to four 32-channel reduction steps; BLOCK_N 16 suits C_out = 1.
GEMM_BLOCKS = ("BLOCK_M", "BLOCK_N", "BLOCK_K")
GEMM_OPTIONS = [(64, 64, 32, 8, 2), (64, 32, 32, 8, 2), (64, 16, 32, 8, 2)]
_GEMM_CONFIGS = _configs(GEMM_BLOCKS, GEMM_OPTIONS, (64, 32, 32))
# Grad weight: channel tiles are chosen by the launcher; the reduction runs over pixels, BLOCK_P at a time.
# Its [C_in tile, pixels] and [pixels, C_out tile] operand tiles take 64-bit pointers: 8 warps keep them in
# registers (4 warps, or 128 pixels, spilled).
GRAD_WEIGHT_BLOCKS = ("BLOCK_P",)
GRAD_WEIGHT_OPTIONS = [(64, 8, 3), (32, 8, 3)]
_GRAD_WEIGHT_CONFIGS = _configs(GRAD_WEIGHT_BLOCKS, GRAD_WEIGHT_OPTIONS, (64,))


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
def _tap_start(phase, ty, tx, TR, TC, K_PACKED, N):
    """Element offset of packed tap wp[phase, ty, tx], an [N, K_PACKED] matrix (see _pack_weight)."""
    return ((phase * TR + ty) * TC + tx) * K_PACKED * N


@triton.jit
def _load_w(w_ptr, rows, row_ok, cols, col_ok, UPCAST):
    """Weight tile [BLOCK_K, BLOCK_N] of the packed weight: element rows[k] + cols[n] (rows: a tap's start + a
    reduced channel, see _tap_start; cols: K_PACKED x the other channel).

    K-major because TF32 tensor-core multiplies (wgmma) take only K-major operands from shared memory: an
    N-major tile is copied 4 bytes at a time to be transposed, a K-major one 16 bytes at a time, which
    needs rows that start on 16 bytes (K_PACKED, a multiple of 16, is specialised as such).
    """
    w = tl.load(w_ptr + rows[:, None] + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    if UPCAST:
        w = w.to(tl.float32)
    return w


@triton.jit
def _tile_ids(columns, BLOCK_N: tl.constexpr):
    """(row tile, column tile) of this program in a 1-D grid, column tiles fastest (programs that share an
    input tile run together). 1-D because grid axes 1 and 2 stop at 65535 programs (batch 256 at 256 x 256)."""
    tiles = tl.cdiv(columns, BLOCK_N)
    return tl.program_id(0) // tiles, tl.program_id(0) % tiles


@triton.jit
def _split_positions(offs, rows, cols):
    """Flat indices over [N, rows, cols] -> (n, i, j)."""
    return offs // (cols * rows), (offs // cols) % rows, offs % cols


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
        w_rows = _tap_start(PHASE, ty, tx, TR, TC, K_PACKED, C_OUT) + offs_k
        w = _load_w(w_ptr, w_rows, offs_k < K_PACKED, offs_n * K_PACKED, n_mask, UPCAST)
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
        acc = tl.maximum(acc, 0.0)
    row = 2 * i[:, None] + a
    col = 2 * j[:, None] + b
    ok = m_mask[:, None] & o_ok[None, :] & (row < HO) & (col < WO)
    offs = n.to(tl.int64)[:, None] * syn + row * syh + col * syw + o[None, :] * syc
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=ok)


@triton.autotune(
    configs=_GEMM_CONFIGS,
    key=_GEMM_KEY,
    prune_configs_by=_fit_columns(lambda args: args["C_OUT"] * (4 if args["PHASES_IN_N"] else 1)),
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
        pid_m, pid_n = _tile_ids(4 * C_OUT, BLOCK_N)
    else:
        pid_m, pid_n = _tile_ids(C_OUT, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < N * rows0 * cols0
    n, i, j = _split_positions(offs_m, rows0, cols0)
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
            w_rows = _tap_start(0, ty, tx, TR, TC, K_PACKED, C_OUT) + offs_k
            w_ok = offs_k < K_PACKED
            w = _load_w(w_ptr, w_rows, w_ok, w_cols, n_mask, UPCAST)
            acc00 = tl.dot(a, w, acc00, input_precision=PRECISION)
            if not PHASES_IN_N:
                w = _load_w(w_ptr, w_rows + phase_size, w_ok, w_cols, n_mask, UPCAST)
                acc01 = tl.dot(a, w, acc01, input_precision=PRECISION)
                w = _load_w(w_ptr, w_rows + 2 * phase_size, w_ok, w_cols, n_mask, UPCAST)
                acc10 = tl.dot(a, w, acc10, input_precision=PRECISION)
                w = _load_w(w_ptr, w_rows + 3 * phase_size, w_ok, w_cols, n_mask, UPCAST)
                acc11 = tl.dot(a, w, acc11, input_precision=PRECISION)
    else:
        # Phases read different windows (K=3 same): one phase after another, each over its own taps only.
        acc00 = _phase_gemm(
            x_base, w_ptr, i, j, m_mask, offs_n, n_mask, H, W, C_IN, C_OUT, K_PACKED, sxc, sxh, sxw,
            0, ROW0, COL0, TR, TC, RS0, RT0, CS0, CT0, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip
        acc01 = _phase_gemm(
            x_base, w_ptr, i, j, m_mask, offs_n, n_mask, H, W, C_IN, C_OUT, K_PACKED, sxc, sxh, sxw,
            1, ROW0, COL0, TR, TC, RS0, RT0, CS1, CT1, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip
        acc10 = _phase_gemm(
            x_base, w_ptr, i, j, m_mask, offs_n, n_mask, H, W, C_IN, C_OUT, K_PACKED, sxc, sxh, sxw,
            2, ROW0, COL0, TR, TC, RS1, RT1, CS0, CT0, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip
        acc11 = _phase_gemm(
            x_base, w_ptr, i, j, m_mask, offs_n, n_mask, H, W, C_IN, C_OUT, K_PACKED, sxc, sxh, sxw,
            3, ROW0, COL0, TR, TC, RS1, RT1, CS1, CT1, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip
    if PHASES_IN_N:
        a, b = (phase // 2)[None, :], (phase % 2)[None, :]
        _store_phase(acc00, y_ptr, bias, n, i, j, m_mask, offs_o, n_mask, a, b, HO, WO, syn, syc, syh, syw, ACTIVATION)
    else:
        _store_phase(acc00, y_ptr, bias, n, i, j, m_mask, offs_o, n_mask, 0, 0, HO, WO, syn, syc, syh, syw, ACTIVATION)
        _store_phase(acc01, y_ptr, bias, n, i, j, m_mask, offs_o, n_mask, 0, 1, HO, WO, syn, syc, syh, syw, ACTIVATION)
        _store_phase(acc10, y_ptr, bias, n, i, j, m_mask, offs_o, n_mask, 1, 0, HO, WO, syn, syc, syh, syw, ACTIVATION)
        _store_phase(acc11, y_ptr, bias, n, i, j, m_mask, offs_o, n_mask, 1, 1, HO, WO, syn, syc, syh, syw, ACTIVATION)


@triton.jit
def _load_grad(g_ptr, y_ptr, offs, mask, ACTIVATION: tl.constexpr, UPCAST: tl.constexpr):
    """A tile of grad_out with the activation's derivative applied (ReLU: where the saved output > 0)."""
    g = tl.load(g_ptr + offs, mask=mask, other=0.0)
    if UPCAST:
        g = g.to(tl.float32)
    if ACTIVATION == 1:
        y = tl.load(y_ptr + offs, mask=mask, other=0.0)
        if UPCAST:
            y = y.to(tl.float32)
        g = tl.where(y > 0, g, 0.0)
    return g


@triton.jit
def _load_grad_at(g_ptr, y_ptr, g_base, io, jo, o, ok, rows, cols, A, B, sgc, sgh, sgw, ACTIVATION, UPCAST):
    """grad_out (activation's mask applied) at phase (A, B)'s output positions (io, jo) and channels o, all
    broadcast to the tile's shape; zero where not ok or outside the phase's rows x cols."""
    ok = ok & (io >= 0) & (io < rows) & (jo >= 0) & (jo < cols)
    offs = g_base + (2 * io + A) * sgh + (2 * jo + B) * sgw + o * sgc
    return _load_grad(g_ptr, y_ptr, offs, ok, ACTIVATION, UPCAST)


@triton.jit
def _grad_input_phase(
    acc, g_ptr, y_ptr, w_ptr, n, i, j, m_mask, offs_c, c_mask, C_IN, C_OUT, K_PACKED, HO, WO, sgn, sgc, sgh, sgw,
    A: tl.constexpr, B: tl.constexpr, ROW0: tl.constexpr, COL0: tl.constexpr, TR: tl.constexpr, TC: tl.constexpr,
    RS: tl.constexpr, RT: tl.constexpr, CS: tl.constexpr, CT: tl.constexpr, TAPS_IN_K: tl.constexpr,
    ACTIVATION: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_K: tl.constexpr,
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
            g = _load_grad_at(
                g_ptr, y_ptr, g_base, io, jo, offs_o[None, :], valid, rows, cols, A, B, sgc, sgh, sgw,
                ACTIVATION, UPCAST,
            )  # fmt: skip
            w_rows = _tap_start(A * 2 + B, ty, tx, TR, TC, K_PACKED, C_IN) + offs_o
            w = _load_w(w_ptr, w_rows, pairs < RT * CT * C_OUT, offs_c * K_PACKED, c_mask, UPCAST)
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
            g = _load_grad_at(
                g_ptr, y_ptr, g_base, io, jo, offs_o[None, :], valid, rows, cols, A, B, sgc, sgh, sgw,
                ACTIVATION, UPCAST,
            )  # fmt: skip
            w_rows = _tap_start(A * 2 + B, ty, tx, TR, TC, K_PACKED, C_IN) + offs_o
            w = _load_w(w_ptr, w_rows, offs_o < K_PACKED, offs_c * K_PACKED, c_mask, UPCAST)
            acc = tl.dot(g.to(w.dtype), w, acc, input_precision=PRECISION)
    return acc


@triton.autotune(
    configs=_GEMM_CONFIGS,
    key=_GEMM_KEY,
    prune_configs_by=_fit_columns(lambda args: args["C_IN"]),
)
@triton.jit
def _grad_input_kernel(
    g_ptr, y_ptr, w_ptr, dx_ptr, N, H, W, C_IN, C_OUT, K_PACKED, HO, WO, sgn, sgc, sgh, sgw, sxn, sxc, sxh, sxw,
    ROW0: tl.constexpr, COL0: tl.constexpr, TR: tl.constexpr, TC: tl.constexpr,
    RS0: tl.constexpr, RT0: tl.constexpr, RS1: tl.constexpr, RT1: tl.constexpr,
    CS0: tl.constexpr, CT0: tl.constexpr, CS1: tl.constexpr, CT1: tl.constexpr,
    SHARED: tl.constexpr, TAPS_IN_K: tl.constexpr, ACTIVATION: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # Rows of the GEMM: input positions (n, i, j); columns: input channels; reduction: phases, taps, C_out.
    # (SHARED is unused: every phase gathers its own grad_out pixels.)
    pid_m, pid_c = _tile_ids(C_IN, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < N * H * W
    n, i, j = _split_positions(offs_m, H, W)
    offs_c = pid_c * BLOCK_N + tl.arange(0, BLOCK_N)
    c_mask = offs_c < C_IN
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _grad_input_phase(
        acc, g_ptr, y_ptr, w_ptr, n, i, j, m_mask, offs_c, c_mask, C_IN, C_OUT, K_PACKED, HO, WO, sgn, sgc, sgh, sgw,
        0, 0, ROW0, COL0, TR, TC, RS0, RT0, CS0, CT0, TAPS_IN_K, ACTIVATION, UPCAST, PRECISION, BLOCK_K,
    )  # fmt: skip
    acc = _grad_input_phase(
        acc, g_ptr, y_ptr, w_ptr, n, i, j, m_mask, offs_c, c_mask, C_IN, C_OUT, K_PACKED, HO, WO, sgn, sgc, sgh, sgw,
        0, 1, ROW0, COL0, TR, TC, RS0, RT0, CS1, CT1, TAPS_IN_K, ACTIVATION, UPCAST, PRECISION, BLOCK_K,
    )  # fmt: skip
    acc = _grad_input_phase(
        acc, g_ptr, y_ptr, w_ptr, n, i, j, m_mask, offs_c, c_mask, C_IN, C_OUT, K_PACKED, HO, WO, sgn, sgc, sgh, sgw,
        1, 0, ROW0, COL0, TR, TC, RS1, RT1, CS0, CT0, TAPS_IN_K, ACTIVATION, UPCAST, PRECISION, BLOCK_K,
    )  # fmt: skip
    acc = _grad_input_phase(
        acc, g_ptr, y_ptr, w_ptr, n, i, j, m_mask, offs_c, c_mask, C_IN, C_OUT, K_PACKED, HO, WO, sgn, sgc, sgh, sgw,
        1, 1, ROW0, COL0, TR, TC, RS1, RT1, CS1, CT1, TAPS_IN_K, ACTIVATION, UPCAST, PRECISION, BLOCK_K,
    )  # fmt: skip
    offs = n.to(tl.int64) * sxn + i * sxh + j * sxw
    tl.store(
        dx_ptr + offs[:, None] + offs_c[None, :] * sxc,
        acc.to(dx_ptr.dtype.element_ty),
        mask=m_mask[:, None] & c_mask[None, :],
    )


@triton.autotune(configs=_GRAD_WEIGHT_CONFIGS, key=_GRAD_WEIGHT_KEY)
@triton.jit
def _grad_weight_kernel(
    x_ptr,
    g_ptr,
    y_ptr,
    taps_ptr,
    dw_ptr,
    db_ptr,
    N,
    H,
    W,
    C_IN,
    C_OUT,
    HO,
    WO,
    CHUNK,
    sxn,
    sxc,
    sxh,
    sxw,
    sgn,
    sgc,
    sgh,
    sgw,
    ROW0: tl.constexpr,
    COL0: tl.constexpr,
    TR: tl.constexpr,
    TC: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    # One (phase, union tap) from the table taps_ptr[k] = (a, b, ty, tx, first tap of its phase?),
    # one (C_in, C_out) tile, one split of the phase's pixels [split * CHUNK, (split + 1) * CHUNK).
    pid_co = tl.program_id(0)
    k = tl.program_id(1)
    split = tl.program_id(2)
    pid_c = pid_co // tl.cdiv(C_OUT, BLOCK_O)
    pid_o = pid_co % tl.cdiv(C_OUT, BLOCK_O)
    a = tl.load(taps_ptr + 5 * k)
    b = tl.load(taps_ptr + 5 * k + 1)
    ty = tl.load(taps_ptr + 5 * k + 2)
    tx = tl.load(taps_ptr + 5 * k + 3)
    first = tl.load(taps_ptr + 5 * k + 4)
    rows = (HO - a + 1) // 2
    cols = (WO - b + 1) // 2
    total = N * rows * cols
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, total)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C_IN
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    o_mask = offs_o < C_OUT
    acc = tl.zeros((BLOCK_C, BLOCK_O), dtype=tl.float32)
    gsum = tl.zeros((BLOCK_O,), dtype=tl.float32)
    for p0 in range(start, end, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        p_mask = offs_p < end
        n, io, jo = _split_positions(offs_p, rows, cols)
        n = n.to(tl.int64)
        r = io + ROW0 + ty
        c = jo + COL0 + tx
        x_ok = p_mask & (r >= 0) & (r < H) & (c >= 0) & (c < W)
        x_offs = n * sxn + r * sxh + c * sxw
        xt = tl.load(x_ptr + x_offs[None, :] + offs_c[:, None] * sxc, mask=c_mask[:, None] & x_ok[None, :], other=0.0)
        if UPCAST:
            xt = xt.to(tl.float32)
        g_offs = n * sgn + (2 * io + a) * sgh + (2 * jo + b) * sgw
        g = _load_grad(
            g_ptr, y_ptr, g_offs[:, None] + offs_o[None, :] * sgc, p_mask[:, None] & o_mask[None, :], ACTIVATION, UPCAST
        )
        acc = tl.dot(xt, g.to(xt.dtype), acc, input_precision=PRECISION)
        if HAS_BIAS:
            gsum += tl.sum(g.to(tl.float32), axis=0)
    phase = a * 2 + b
    dw = dw_ptr + ((((split * 4 + phase) * TR + ty) * TC + tx) * C_IN).to(tl.int64) * C_OUT
    tl.store(dw + offs_c[:, None] * C_OUT + offs_o[None, :], acc, mask=c_mask[:, None] & o_mask[None, :])
    # Each phase's grad bias once: from its first tap's programs of the first C_in tile.
    if HAS_BIAS and (first != 0) and (pid_c == 0):
        tl.store(db_ptr + (split * 4 + phase) * C_OUT + offs_o, gsum, mask=o_mask)


@triton.autotune(configs=_GRAD_WEIGHT_CONFIGS, key=_GRAD_WEIGHT_KEY)
@triton.jit
def _grad_weight_few_outputs_kernel(
    x_ptr, g_ptr, y_ptr, dw_ptr, N, H, W, C_IN, C_OUT, HO, WO, CHUNK, sxn, sxc, sxh, sxw, sgn, sgc, sgh, sgw,
    ROW0: tl.constexpr, COL0: tl.constexpr, TR: tl.constexpr, TC: tl.constexpr,
    RS0: tl.constexpr, RT0: tl.constexpr, RS1: tl.constexpr, RT1: tl.constexpr,
    CS0: tl.constexpr, CT0: tl.constexpr, CS1: tl.constexpr, CT1: tl.constexpr,
    ACTIVATION: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
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
    # Only the taps of this phase's window: the others stay zero in dw, out of the sum in _unpack_grad.
    rs = RS0 + a * (RS1 - RS0)
    cs = CS0 + b * (CS1 - CS0)
    n_ok = (offs_n < pairs) & (ty >= rs) & (ty < rs + RT0 + a * (RT1 - RT0))
    n_ok = n_ok & (tx >= cs) & (tx < cs + CT0 + b * (CT1 - CT0))
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, N * H * W)
    acc = tl.zeros((BLOCK_C, BLOCK_O), dtype=tl.float32)
    for p0 in range(start, end, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        p_mask = offs_p < end
        n, i, j = _split_positions(offs_p, H, W)
        n = n.to(tl.int64)
        x_offs = n * sxn + i * sxh + j * sxw
        xt = tl.load(x_ptr + x_offs[None, :] + offs_c[:, None] * sxc, mask=c_mask[:, None] & p_mask[None, :], other=0.0)
        if UPCAST:
            xt = xt.to(tl.float32)
        io = i[:, None] - (ROW0 + ty)[None, :]
        jo = j[:, None] - (COL0 + tx)[None, :]
        g = _load_grad_at(
            g_ptr, y_ptr, n[:, None] * sgn, io, jo, o[None, :], p_mask[:, None] & n_ok[None, :],
            (HO - a + 1) // 2, (WO - b + 1) // 2, a, b, sgc, sgh, sgw, ACTIVATION, UPCAST,
        )  # fmt: skip
        acc = tl.dot(xt, g.to(xt.dtype), acc, input_precision=PRECISION)
    # dw[split, a, b, ty, tx, c, o]
    dw = dw_ptr + ((split * 4 + phase) * TR * TC).to(tl.int64) * C_IN * C_OUT
    dw_offs = (tap[None, :] * C_IN + offs_c[:, None]) * C_OUT + o[None, :]
    tl.store(dw + dw_offs, acc, mask=c_mask[:, None] & n_ok[None, :])


class _AxisUnion:
    """Both phases of one axis in union-tap coordinates (scale 2, kernel ``k``, padding ``p``)."""

    def __init__(self, k: int, p: int) -> None:
        # With in_size = k both phases are non-empty; first_offset and tap_offsets do not depend on it.
        phases = axis_phases(k, k, p, KERNEL_SCALE)
        self.start = min(ph.first_offset for ph in phases)  # low-res offset of union tap 0
        self.taps = max(ph.first_offset + ph.taps for ph in phases) - self.start
        self.windows = [(ph.first_offset - self.start, ph.taps) for ph in phases]  # (first union tap, taps)
        self._tap_of = [[ph.first_offset - self.start + t for t in ph.tap_offsets] for ph in phases]

    def collapse(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """[2, taps, k] 0/1: phase a's union tap t sums the original taps u with R[a, t, u] = 1."""
        return constant(tuple(one_hot_rows(tap_of, self.taps) for tap_of in self._tap_of), dtype, torch.device(device))


@functools.lru_cache(maxsize=64)
def _unions(kh: int, kw: int, ph: int, pw: int) -> tuple[_AxisUnion, _AxisUnion]:
    return _AxisUnion(kh, ph), _AxisUnion(kw, pw)


def _constexprs(rows: _AxisUnion, cols: _AxisUnion, activation: str | None, dtype: torch.dtype) -> dict[str, object]:
    (rs0, rt0), (rs1, rt1) = rows.windows
    (cs0, ct0), (cs1, ct1) = cols.windows
    return {
        "ROW0": rows.start,
        "COL0": cols.start,
        "TR": rows.taps,
        "TC": cols.taps,
        "RS0": rs0,
        "RT0": rt0,
        "RS1": rs1,
        "RT1": rt1,
        "CS0": cs0,
        "CT0": ct0,
        "CS1": cs1,
        "CT1": ct1,
        "SHARED": rows.windows == [(0, rows.taps)] * 2 and cols.windows == [(0, cols.taps)] * 2,
        "ACTIVATION": ACTIVATION_CODES[activation],
        # The interpreter computes bf16/fp16 wrongly; it gets fp32 tiles (the GPU keeps 16-bit tensor-core dots).
        "UPCAST": triton_interpreting(),
        "PRECISION": "tf32" if uses_tf32(dtype) else "ieee",
    }


def _pack_weight(weight: torch.Tensor, rows: _AxisUnion, cols: _AxisUnion, reduce_over: str) -> torch.Tensor:
    """[O, C, KH, KW] -> every phase's collapsed kernel (summed in float32), laid out for :func:`_load_w`: the
    channels a GEMM reduces over contiguous and zero-padded to a multiple of 16, [2, 2, TR, TC, O, C16] for
    the forward (``reduce_over="in"``), [2, 2, TR, TC, C, O16] for grad input (``"out"``)."""
    r = rows.collapse(torch.float32, weight.device)
    c = cols.collapse(torch.float32, weight.device)
    layout = {"in": "abtsoc", "out": "abtsco"}[reduce_over]
    packed = torch.einsum(f"atu,ocuv,bsv->{layout}", r, weight.float(), c).to(weight.dtype)
    # contiguous: einsum may return a permuted view, which a zero-width pad keeps
    return torch.nn.functional.pad(packed, (0, -packed.shape[-1] % 16)).contiguous()


def _unpack_grad(grad_wp: torch.Tensor, rows: _AxisUnion, cols: _AxisUnion) -> torch.Tensor:
    """[2, 2, TR, TC, C, O] -> [O, C, KH, KW]: each original tap's gradient, summed over the phase taps it was
    collapsed into (the transpose of :func:`_pack_weight`'s collapse)."""
    r = rows.collapse(torch.float32, grad_wp.device)
    c = cols.collapse(torch.float32, grad_wp.device)
    return torch.einsum("atu,abtsco,bsv->ocuv", r, grad_wp, c)


def _nchw_strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


def _channel_tile(channels: int, dtype: torch.dtype) -> int:
    """Channel tile of the grad-weight GEMM: at least tl.dot's 16, at most 128 (64 for float32, whose 128 x 128
    tiles over 64 pixels and 3 stages would need 256 KiB of shared memory, over sm_90's 227)."""
    return max(16, min(128 if dtype.itemsize == 2 else 64, triton.next_power_of_2(channels)))


def _forward(
    x: torch.Tensor,
    wp: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    rows: _AxisUnion,
    cols: _AxisUnion,
    activation: str | None,
) -> None:
    n, c_in, h, w = x.shape
    c_out, ho, wo = out.shape[1:]
    positions = n * ((ho + 1) // 2) * ((wo + 1) // 2)

    constexprs = _constexprs(rows, cols, activation, x.dtype)
    phases_in_n = constexprs["SHARED"] and 4 * c_out <= 16  # the four phases fit one dot of tl.dot's least width
    columns = 4 * c_out if phases_in_n else c_out

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(columns, meta["BLOCK_N"]) * triton.cdiv(positions, meta["BLOCK_M"]),)

    _forward_kernel[grid](
        x, wp, wp if bias is None else bias.contiguous(), out, n, h, w, c_in, c_out, wp.shape[-1], ho, wo,
        *_nchw_strides(x), *_nchw_strides(out),
        HAS_BIAS=bias is not None, PHASES_IN_N=phases_in_n, **constexprs,
    )  # fmt: skip


def _grad_input(
    g: torch.Tensor,
    y: torch.Tensor,
    wp: torch.Tensor,
    dx: torch.Tensor,
    rows: _AxisUnion,
    cols: _AxisUnion,
    activation: str | None,
) -> None:
    n, c_in, h, w = dx.shape
    c_out, ho, wo = g.shape[1:]

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(c_in, meta["BLOCK_N"]) * triton.cdiv(n * h * w, meta["BLOCK_M"]),)

    _grad_input_kernel[grid](
        g, y, wp, dx, n, h, w, c_in, c_out, wp.shape[-1], ho, wo, *_nchw_strides(g), *_nchw_strides(dx),
        TAPS_IN_K=c_out <= FEW_OUTPUTS, **_constexprs(rows, cols, activation, g.dtype),
    )  # fmt: skip


def _split_chunk(positions: int, programs: int) -> int:
    """Pixels per split of the grad-weight reduction: enough splits to fill the GPU, chunks of >= 512 pixels
    (64 when interpreting, so that small test shapes still take the split path)."""
    granule = 64 if triton_interpreting() else 512
    splits = max(1, min(triton.cdiv(_TARGET_PROGRAMS, programs), triton.cdiv(positions, granule)))
    return triton.cdiv(triton.cdiv(positions, splits), granule) * granule


def _grad_weight(
    x: torch.Tensor,
    g: torch.Tensor,
    y: torch.Tensor,
    rows: _AxisUnion,
    cols: _AxisUnion,
    has_bias: bool,
    activation: str | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad wp [2, 2, TR, TC, C, O], grad bias [O]), both float32 and reduced in a fixed order."""
    n, c_in, h, w = x.shape
    c_out, ho, wo = g.shape[1:]
    if not (x.numel() and g.numel()):  # nothing to sum, no program to launch
        zeros = functools.partial(x.new_zeros, dtype=torch.float32)
        return zeros((2, 2, rows.taps, cols.taps, c_in, c_out)), zeros(c_out)
    constexprs = _constexprs(rows, cols, activation, x.dtype)
    del constexprs["SHARED"]
    few_outputs = c_out <= FEW_OUTPUTS
    if few_outputs:  # programs: (C_in tile, (tap, C_out) tile) x phase x split of the input pixels
        columns, groups, positions = rows.taps * cols.taps * c_out, 4, n * h * w
    else:  # programs: (C_in tile, C_out tile) x (phase, tap) x split of the phase's output pixels
        taps = [
            (a, b, ty, tx, int(ty == rs and tx == cs))
            for a, (rs, rt) in enumerate(rows.windows)
            for b, (cs, ct) in enumerate(cols.windows)
            for ty in range(rs, rs + rt)
            for tx in range(cs, cs + ct)
        ]
        columns, groups, positions = c_out, len(taps), n * ((ho + 1) // 2) * ((wo + 1) // 2)
    block_c, block_o = _channel_tile(c_in, x.dtype), _channel_tile(columns, x.dtype)
    tiles = triton.cdiv(c_in, block_c) * triton.cdiv(columns, block_o)
    chunk = _split_chunk(positions, tiles * groups)
    splits = triton.cdiv(positions, chunk)
    # Taps outside a phase's window are never written: zeros keep them out of the sum.
    dw = torch.zeros((splits, 2, 2, rows.taps, cols.taps, c_in, c_out), dtype=torch.float32, device=x.device)
    if few_outputs:
        _grad_weight_few_outputs_kernel[(tiles, groups, splits)](
            x, g, y, dw, n, h, w, c_in, c_out, ho, wo, chunk, *_nchw_strides(x), *_nchw_strides(g),
            BLOCK_C=block_c, BLOCK_O=block_o, **constexprs,
        )  # fmt: skip
        # The programs see each grad_out pixel once per tap that reaches an input pixel: its sum is done apart.
        grad_bias = masked_grad_sum(g, y if activation == "relu" else None) if has_bias else dw.new_zeros(c_out)
        return dw.sum(0), grad_bias
    db = torch.zeros((splits, 4, c_out), dtype=torch.float32, device=x.device)
    for name in ("RS0", "RT0", "RS1", "RT1", "CS0", "CT0", "CS1", "CT1"):  # windows come from the table
        del constexprs[name]
    _grad_weight_kernel[(tiles, groups, splits)](
        x, g, y, constant(tuple(taps), torch.int32, x.device), dw, db, n, h, w, c_in, c_out, ho, wo, chunk,
        *_nchw_strides(x), *_nchw_strides(g), HAS_BIAS=has_bias, BLOCK_C=block_c, BLOCK_O=block_o, **constexprs,
    )  # fmt: skip
    return dw.sum(0), db.sum((0, 1))


def unpool_conv2d_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    padding: tuple[int, int],
    scale_factor: int,
    activation: str | None = None,
) -> torch.Tensor:
    """Fused upsample-by-2 + convolution (+ ReLU): [N, C, H, W] -> [N, O, 2H + 2ph - KH + 1, 2W + 2pw - KW + 1].

    Output in x's memory format. float32 runs its dots in TF32 when ``torch.backends.cudnn.allow_tf32`` is
    set. Not differentiable by itself: :func:`unpool_conv2d_triton_backward` gives its gradients (the custom
    op ``dcign_fast::unpool_conv2d`` pairs the two).
    """
    check_kernel_args("triton", x, weight, scale_factor, activation)
    rows, cols = _unions(*weight.shape[2:], *padding)
    with device_guard(x.device):
        out = empty_output(x, weight, padding, scale_factor)
        if out.numel():
            _forward(nhwc(x), _pack_weight(weight, rows, cols, "in"), bias, out, rows, cols, activation)
    return out


def unpool_conv2d_triton_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    out: torch.Tensor | None,
    has_bias: bool,
    padding: tuple[int, int],
    activation: str | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(grad x, grad weight, grad bias or None) of :func:`unpool_conv2d_triton`, from its inputs and, with
    ``activation="relu"``, its output ``out``: the kernels mask grad_out by ``out > 0`` as they load it.

    Grad x is laid out like x (``torch.empty_like``); grad weight and grad bias are deterministic.
    """
    rows, cols = _unions(*weight.shape[2:], *padding)
    g, y = grad_and_output_alike(grad_out, out if activation == "relu" else None)
    if y is None:
        y = g  # not read: only the ReLU backward loads the output
    with device_guard(x.device):
        grad_x = torch.empty_like(x)
        if grad_x.numel():
            _grad_input(g, y, _pack_weight(weight, rows, cols, "out"), grad_x, rows, cols, activation)
        grad_wp, grad_bias = _grad_weight(nhwc(x), g, y, rows, cols, has_bias, activation)
    return grad_x, _unpack_grad(grad_wp, rows, cols).to(weight.dtype), grad_bias.to(weight.dtype) if has_bias else None
