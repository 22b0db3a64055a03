"""What the unpool-conv Triton kernels share: tile loads of the packed weight and of grad_out, program and
position indexing (``@triton.jit`` helpers), and the GEMM kernels' autotune configs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable

import triton
import triton.language as tl

from dcign_fast.ops.backends import triton_interpreting


def config(names: tuple[str, ...], option: tuple[int, ...]) -> triton.Config:
    """An autotune config from a tuple (*block sizes named by ``names``, num_warps, num_stages)."""
    return triton.Config(dict(zip(names, option[:-2])), num_warps=option[-2], num_stages=option[-1])


def autotune_configs(
    names: tuple[str, ...], options: Sequence[tuple[int, ...]], interpreted: tuple[int, ...]
) -> list[triton.Config]:
    """The autotune configs of ``options``. The interpreter cannot time configs and runs one Python step per
    program: it gets the single config ``interpreted`` (block sizes only), a big tile (the tests force each
    of ``options`` in turn)."""
    return [config(names, option) for option in ([(*interpreted, 4, 1)] if triton_interpreting() else options)]


def fit_columns(columns: Callable[[dict], int], largest_tile: Callable[[dict], int | None] = lambda args: None):
    """Early config pruning: drop configs whose BLOCK_N is wider than the GEMM's N, ``columns(arguments)``, or
    whose BLOCK_M x BLOCK_N tile is larger than ``largest_tile(arguments)`` (None: any size)."""

    def prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        args = {**named_args, **kwargs}
        width = max(16, triton.next_power_of_2(columns(args)))
        largest = largest_tile(args) or 2**31
        blocks = [(c, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in configs]
        kept = [c for c, m, n in blocks if n <= width and m * n <= largest]
        return kept or configs[-1:]  # (the narrowest)

    return {"early_config_prune": prune}


# The GEMM kernels' autotuning key: the shapes and the kernel's union window (two layers of one shape but
# different kernel sizes compile different code and may want different configs).
GEMM_KEY = ["N", "H", "W", "C_IN", "C_OUT", "TR", "TC"]


GEMM_BLOCKS = ("BLOCK_M", "BLOCK_N", "BLOCK_K")


# The GEMMs' interpreted config: a big tile (one Python step per program), whose block sizes the tests force
# like every other config's.
GEMM_INTERPRETED = (64, 32, 32)


@triton.jit
def tap_start(phase, ty, tx, TR, TC, K_PACKED, N):
    """Element offset of packed tap wp[phase, ty, tx], an [N, K_PACKED] matrix (see pack_weight). In int64: the
    packed weight of a wide layer (4 x 5 x 5 taps of 5120 x 5120 channels for K=9) passes int32's range."""
    return ((phase * TR + ty) * TC + tx).to(tl.int64) * K_PACKED * N


@triton.jit
def load_w(w_ptr, rows, row_ok, cols, col_ok, UPCAST):
    """Weight tile [BLOCK_K, BLOCK_N] of the packed weight: element rows[k] + cols[n] (rows: a tap's start + a
    reduced channel, see tap_start; cols: K_PACKED x the other channel).

    K-major because TF32 tensor-core multiplies (wgmma) take only K-major operands from shared memory: an
    N-major tile is copied 4 bytes at a time to be transposed, a K-major one 16 bytes at a time, which
    needs rows that start on 16 bytes (K_PACKED, a multiple of 16, is specialised as such).
    """
    w = tl.load(w_ptr + rows[:, None] + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    if UPCAST:
        w = w.to(tl.float32)
    return w


@triton.jit
def tile_ids(columns, BLOCK_N: tl.constexpr):
    """(row tile, column tile) of this program in a 1-D grid, column tiles fastest (programs that share an
    input tile run together). 1-D because grid axes 1 and 2 stop at 65535 programs (batch 256 at 256 x 256)."""
    tiles = tl.cdiv(columns, BLOCK_N)
    return tl.program_id(0) // tiles, tl.program_id(0) % tiles


@triton.jit
def split_positions(offs, rows, cols):
    """Flat indices over [N, rows, cols] -> (n, i, j)."""
    return offs // (cols * rows), (offs // cols) % rows, offs % cols


@triton.jit
def load_grad_at(g_ptr, g_base, io, jo, o, ok, rows, cols, A, B, sgc, sgh, sgw, UPCAST: tl.constexpr):
    """grad_out (the fused activation's mask already applied, see unpool_conv.py) at phase (A, B)'s output
    positions (io, jo) and channels o, all broadcast to the tile's shape; zero where not ok or outside the
    phase's rows x cols."""
    ok = ok & (io >= 0) & (io < rows) & (jo >= 0) & (jo < cols)
    g = tl.load(g_ptr + g_base + (2 * io + A) * sgh + (2 * jo + B) * sgw + o * sgc, mask=ok, other=0.0)
    if UPCAST:
        g = g.to(tl.float32)
    return g
