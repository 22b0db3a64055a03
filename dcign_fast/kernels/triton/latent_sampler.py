"""Triton kernels of ``sample_latents``: one forward, one backward.

Each program owns BLOCK_D columns and a range of rows, which it walks BLOCK_B rows at a time. When a
column statistic over the whole batch is needed (the batch mean of clamped columns in the forward,
of pulled columns in the backward), a program owns all rows of its columns and first sums them
(pass 1) before writing outputs (pass 2); otherwise rows are split among programs as well. The
forward writes each column block's partial KL sums to a [column blocks, B] float32 buffer that the
launcher sums, so the result does not depend on scheduling. eps is ``tl.randn(seed, offset + b*D + j)``,
the mapping defined in :mod:`dcign_fast.ops.philox`; seed and offset are arguments, or are loaded from the
device when the launcher is given them as tensors (RNG_IN_MEMORY: seed=None draws them there). Math is
float32 whatever the storage dtype (loads are cast right away: the interpreter computes bf16 wrongly).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dcign_fast.kernels import device_guard
from dcign_fast.ops import philox

TILE = 1024  # elements per BLOCK_B x BLOCK_D tile: 8 per thread at 4 warps keeps Philox in registers
MAX_BLOCK_D = 64
MIN_BLOCK_D = 8  # 8 float32 = one 32-byte memory sector per row


@triton.jit
def _load_f32(ptr, rows, cols, stride_b, stride_d, mask):
    """A [rows, cols] tile as float32, cast right after the load (the interpreter computes bf16 wrongly)."""
    return tl.load(ptr + rows[:, None] * stride_b + cols[None, :] * stride_d, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _row_tile(start, row_end, col_ok, BLOCK_B: tl.constexpr):
    """Rows start.. of a BLOCK_B x BLOCK_D tile (int64), which of them lie before row_end, and the tile mask."""
    rows = (start + tl.arange(0, BLOCK_B)).to(tl.int64)
    row_ok = rows < row_end
    return rows, row_ok, row_ok[:, None] & col_ok[None, :]


@triton.jit
def _column_means(ptr, stride_b, stride_d, cols, col_ok, B, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """Float32 means over all B rows of the given columns: [BLOCK_D]."""
    total = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(0, B, BLOCK_B):
        rows = (start + tl.arange(0, BLOCK_B)).to(tl.int64)
        mask = (rows < B)[:, None] & col_ok[None, :]
        total += tl.sum(_load_f32(ptr, rows, cols, stride_b, stride_d, mask), axis=0)
    return total / B


@triton.jit
def _batch_means(
    mu_ptr, logvar_ptr, stride_mu_b, stride_mu_d, stride_lv_b, stride_lv_d, inactive, cols, col_ok, B,
    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """(mean mu, mean logvar) [BLOCK_D] over the batch (pass 1); zeros for a block with no inactive column,
    whose means are never read."""
    mean_mu = tl.zeros([BLOCK_D], dtype=tl.float32)
    mean_lv = tl.zeros([BLOCK_D], dtype=tl.float32)
    if tl.sum(inactive.to(tl.int32)) > 0:
        mean_mu = _column_means(mu_ptr, stride_mu_b, stride_mu_d, cols, col_ok, B, BLOCK_B, BLOCK_D)
        mean_lv = _column_means(logvar_ptr, stride_lv_b, stride_lv_d, cols, col_ok, B, BLOCK_B, BLOCK_D)
    return mean_mu, mean_lv


@triton.jit
def _seed_offset(seed, offset, RNG_IN_MEMORY: tl.constexpr):
    """The draw's (seed, offset): the arguments themselves, or the values they point to."""
    if RNG_IN_MEMORY:
        return tl.load(seed), tl.load(offset)
    else:  # not a fall-through, which Triton would compile too and type as pointers beside the loads
        return seed, offset


@triton.jit(do_not_specialize=["seed", "offset"])
def _forward_kernel(
    mu_ptr,
    logvar_ptr,
    active_ptr,  # uint8 [D]
    z_ptr,  # [B, D] contiguous
    kl_partial_ptr,  # float32 [column blocks, B]
    B,
    D,
    rows_per_program,
    stride_mu_b,
    stride_mu_d,
    stride_lv_b,
    stride_lv_d,
    seed,  # int64 value, or a pointer to it when RNG_IN_MEMORY
    offset,  # likewise
    HAS_MASK: tl.constexpr,
    CLAMP_FIRST: tl.constexpr,
    RNG_IN_MEMORY: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    seed, offset = _seed_offset(seed, offset, RNG_IN_MEMORY)
    pid_d = tl.program_id(0)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    if HAS_MASK:
        inactive = tl.load(active_ptr + cols, mask=col_ok, other=1) == 0
        if CLAMP_FIRST:
            stat_mu = tl.load(mu_ptr + cols * stride_mu_d, mask=col_ok, other=0.0).to(tl.float32)
            stat_lv = tl.load(logvar_ptr + cols * stride_lv_d, mask=col_ok, other=0.0).to(tl.float32)
        else:
            stat_mu, stat_lv = _batch_means(
                mu_ptr, logvar_ptr, stride_mu_b, stride_mu_d, stride_lv_b, stride_lv_d, inactive, cols, col_ok, B,
                BLOCK_B, BLOCK_D,
            )  # fmt: skip
    row_begin = tl.program_id(1) * rows_per_program
    row_end = tl.minimum(row_begin + rows_per_program, B)
    for start in range(row_begin, row_end, BLOCK_B):
        rows, row_ok, mask = _row_tile(start, row_end, col_ok, BLOCK_B)
        mu = _load_f32(mu_ptr, rows, cols, stride_mu_b, stride_mu_d, mask)
        lv = _load_f32(logvar_ptr, rows, cols, stride_lv_b, stride_lv_d, mask)
        if HAS_MASK:
            mu = tl.where(inactive[None, :], stat_mu[None, :], mu)
            lv = tl.where(inactive[None, :], stat_lv[None, :], lv)
        index = rows[:, None] * D + cols[None, :]
        eps = tl.randn(seed, offset + index)
        std = tl.exp(0.5 * lv)
        z = mu + std * eps
        tl.store(z_ptr + index, z.to(z_ptr.dtype.element_ty), mask=mask)
        terms = tl.where(mask, 1.0 + lv - mu * mu - std * std, 0.0)
        tl.store(kl_partial_ptr + pid_d * B + rows, -0.5 * tl.sum(terms, axis=1), mask=row_ok)


@triton.jit(do_not_specialize=["seed", "offset"])
def _backward_kernel(
    mu_ptr,
    logvar_ptr,
    active_ptr,  # uint8 [D]
    grad_z_ptr,
    grad_kl_ptr,
    grad_mu_ptr,  # [B, D] contiguous
    grad_lv_ptr,  # [B, D] contiguous
    B,
    D,
    rows_per_program,
    stride_mu_b,
    stride_mu_d,
    stride_lv_b,
    stride_lv_d,
    stride_gz_b,
    stride_gz_d,
    stride_gkl,
    invariance,
    seed,  # int64 value, or a pointer to it when RNG_IN_MEMORY
    offset,  # likewise
    HAS_MASK: tl.constexpr,
    HAS_PULL: tl.constexpr,
    RNG_IN_MEMORY: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    seed, offset = _seed_offset(seed, offset, RNG_IN_MEMORY)
    pid_d = tl.program_id(0)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    if HAS_MASK:
        inactive = tl.load(active_ptr + cols, mask=col_ok, other=1) == 0
        if HAS_PULL:
            mean_mu, mean_lv = _batch_means(
                mu_ptr, logvar_ptr, stride_mu_b, stride_mu_d, stride_lv_b, stride_lv_d, inactive, cols, col_ok, B,
                BLOCK_B, BLOCK_D,
            )  # fmt: skip
    row_begin = tl.program_id(1) * rows_per_program
    row_end = tl.minimum(row_begin + rows_per_program, B)
    for start in range(row_begin, row_end, BLOCK_B):
        rows, row_ok, mask = _row_tile(start, row_end, col_ok, BLOCK_B)
        mu = _load_f32(mu_ptr, rows, cols, stride_mu_b, stride_mu_d, mask)
        lv = _load_f32(logvar_ptr, rows, cols, stride_lv_b, stride_lv_d, mask)
        gz = _load_f32(grad_z_ptr, rows, cols, stride_gz_b, stride_gz_d, mask)
        gkl = tl.load(grad_kl_ptr + rows * stride_gkl, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        index = rows[:, None] * D + cols[None, :]
        eps = tl.randn(seed, offset + index)
        std = tl.exp(0.5 * lv)
        # d z / d mu = 1, d kl / d mu = mu; d z / d logvar = std * eps / 2, d kl / d logvar = (exp(logvar) - 1) / 2.
        grad_mu = gz + gkl * mu
        grad_lv = 0.5 * (gz * std * eps + gkl * (std * std - 1.0))
        if HAS_MASK:
            if HAS_PULL:
                grad_mu = tl.where(inactive[None, :], invariance * (mu - mean_mu[None, :]), grad_mu)
                grad_lv = tl.where(inactive[None, :], invariance * (lv - mean_lv[None, :]), grad_lv)
            else:
                grad_mu = tl.where(inactive[None, :], 0.0, grad_mu)
                grad_lv = tl.where(inactive[None, :], 0.0, grad_lv)
        tl.store(grad_mu_ptr + index, grad_mu.to(grad_mu_ptr.dtype.element_ty), mask=mask)
        tl.store(grad_lv_ptr + index, grad_lv.to(grad_lv_ptr.dtype.element_ty), mask=mask)


def block_sizes(D: int) -> tuple[int, int]:
    """(BLOCK_B, BLOCK_D): enough column blocks to spread a large D over the GPU, tiles of TILE elements."""
    block_d = min(MAX_BLOCK_D, max(MIN_BLOCK_D, triton.next_power_of_2(triton.cdiv(D, 128))))
    return TILE // block_d, block_d


def program_target(device: torch.device) -> int:
    """How many programs a launch wants: enough to fill the GPU a few times over; the interpreter prefers few."""
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _grid(B: int, D: int, whole_columns: bool, device: torch.device) -> tuple[tuple[int, int], int, int, int]:
    """(grid, rows_per_program, BLOCK_B, BLOCK_D); programs own whole columns when a batch statistic is needed."""
    block_b, block_d = block_sizes(D)
    column_blocks = triton.cdiv(D, block_d)
    if whole_columns:
        row_blocks = 1
    else:
        row_blocks = max(1, min(triton.cdiv(B, block_b), triton.cdiv(program_target(device), column_blocks)))
    rows_per_program = block_b * triton.cdiv(triton.cdiv(B, row_blocks), block_b)
    return (column_blocks, triton.cdiv(B, rows_per_program)), rows_per_program, block_b, block_d


def _columns_in_int32(t: torch.Tensor) -> torch.Tensor:
    """t, or a contiguous copy when its column offsets (D - 1) x stride pass int32, in which the kernels
    compute them (row offsets are 64-bit): e.g. a transposed view of a huge [D, B] tensor."""
    return t if (t.shape[1] - 1) * t.stride(1) < 2**31 else t.contiguous()


def _mask_arg(active: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    # Bool and uint8 share a layout; a pointer to mu stands in when there is no mask (never read).
    return like if active is None else active.contiguous().view(torch.uint8)


def forward(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    active: torch.Tensor | None,
    clamp_first: bool,
    seed: philox.Value,
    offset: philox.Value,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(z [B, D], kl [B]) in mu's dtype."""
    B, D = mu.shape
    mu, logvar = _columns_in_int32(mu), _columns_in_int32(logvar)
    grid, rows_per_program, block_b, block_d = _grid(B, D, active is not None and not clamp_first, mu.device)
    z = torch.empty((B, D), dtype=mu.dtype, device=mu.device)
    kl_partial = torch.empty((grid[0], B), dtype=torch.float32, device=mu.device)
    with device_guard(mu.device):
        _forward_kernel[grid](
            mu, logvar, _mask_arg(active, mu), z, kl_partial, B, D, rows_per_program,
            *mu.stride(), *logvar.stride(), seed, offset,
            HAS_MASK=active is not None, CLAMP_FIRST=clamp_first, RNG_IN_MEMORY=isinstance(seed, torch.Tensor),
            BLOCK_B=block_b, BLOCK_D=block_d,
        )  # fmt: skip
    return z, kl_partial.sum(0).to(mu.dtype)


def backward(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    active: torch.Tensor | None,
    invariance: float,
    seed: philox.Value,
    offset: philox.Value,
    grad_z: torch.Tensor,
    grad_kl: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_mu, grad_logvar), each [B, D] in mu's dtype."""
    B, D = mu.shape
    mu, logvar, grad_z = (_columns_in_int32(t) for t in (mu, logvar, grad_z))
    has_pull = active is not None and invariance > 0
    grid, rows_per_program, block_b, block_d = _grid(B, D, has_pull, mu.device)
    grad_mu = torch.empty((B, D), dtype=mu.dtype, device=mu.device)
    grad_logvar = torch.empty((B, D), dtype=mu.dtype, device=mu.device)
    with device_guard(mu.device):
        _backward_kernel[grid](
            mu, logvar, _mask_arg(active, mu), grad_z, grad_kl, grad_mu, grad_logvar, B, D, rows_per_program,
            *mu.stride(), *logvar.stride(), *grad_z.stride(), grad_kl.stride(0), invariance, seed, offset,
            HAS_MASK=active is not None, HAS_PULL=has_pull, RNG_IN_MEMORY=isinstance(seed, torch.Tensor),
            BLOCK_B=block_b, BLOCK_D=block_d,
        )  # fmt: skip
    return grad_mu, grad_logvar
