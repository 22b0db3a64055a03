"""A CPU memcheck for the kernel backends (the counterpart of compute-sanitizer's memcheck on a GPU).

Tensors end (or start) at an inaccessible page: a kernel that reads or writes one element past the end (or
before the start) of one dies with SIGSEGV instead of touching a neighbour's memory. The CUDA C++ kernels
run on the CPU emulation, the Triton kernels in Triton's interpreter; both ops' forward and backward run on
guarded inputs with every buffer the wrappers allocate guarded too, in a subprocess (a hit ends it). Linux.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import math
import mmap
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

PROT_NONE = 0
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_mappings: list[mmap.mmap] = []  # kept for the life of the (short) test process


def guarded_empty(
    shape: tuple[int, ...], dtype: torch.dtype, memory_format: torch.memory_format = torch.contiguous_format,
    guard_before: bool = False,
) -> torch.Tensor:  # fmt: skip
    """An uninitialised CPU tensor (NaN-filled if floating) whose storage ends at a PROT_NONE page, or starts
    right after one when ``guard_before``."""
    numel = math.prod(shape)
    nbytes = numel * dtype.itemsize
    if nbytes == 0:  # nothing to guard (and torch.empty may be this module's own, under guarded_allocations)
        return torch.zeros(shape, dtype=dtype)
    data_pages = -(-nbytes // mmap.PAGESIZE)
    mapping = mmap.mmap(-1, (data_pages + 1) * mmap.PAGESIZE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
    guard, offset = (
        (0, mmap.PAGESIZE) if guard_before else (data_pages * mmap.PAGESIZE, data_pages * mmap.PAGESIZE - nbytes)
    )
    if _libc.mprotect(base + guard, mmap.PAGESIZE, PROT_NONE) != 0:
        raise OSError(ctypes.get_errno(), "mprotect failed")
    _mappings.append(mapping)
    strides = torch.empty(shape, device="meta", memory_format=memory_format).stride()
    tensor = torch.frombuffer(mapping, dtype=dtype, count=numel, offset=offset).as_strided(shape, strides)
    return tensor.fill_(float("nan")) if dtype.is_floating_point else tensor


def guarded_copy(t: torch.Tensor, guard_before: bool = False) -> torch.Tensor:
    """``t``'s values in a guarded tensor of the same dense layout (contiguous or channels_last)."""
    channels_last = t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return guarded_empty(tuple(t.shape), t.dtype, layout, guard_before).copy_(t)


@contextlib.contextmanager
def guarded_allocations(guard_before: bool = False) -> Iterator[None]:
    """Routes torch.empty / empty_like / new_empty on the CPU through :func:`guarded_empty`."""
    originals = torch.empty, torch.empty_like, torch.Tensor.new_empty

    def shape_of(size: tuple) -> tuple[int, ...]:  # torch takes sizes as arguments or as one sequence
        return tuple(size[0]) if len(size) == 1 and not isinstance(size[0], int) else tuple(size)

    def empty(*size, dtype=None, device=None, memory_format=torch.contiguous_format, **kwargs):
        shape = shape_of(size)
        if (device is not None and torch.device(device).type != "cpu") or kwargs:
            return originals[0](*size, dtype=dtype, device=device, memory_format=memory_format, **kwargs)
        return guarded_empty(shape, dtype or torch.get_default_dtype(), memory_format, guard_before)

    def empty_like(t, *, dtype=None, **kwargs):
        if t.device.type != "cpu" or kwargs:
            return originals[1](t, dtype=dtype, **kwargs)
        copy = guarded_copy(originals[1](t, dtype=dtype), guard_before)
        return copy.fill_(float("nan")) if copy.is_floating_point() else copy

    def new_empty(self, *size, dtype=None, **kwargs):
        if self.device.type != "cpu" or kwargs:
            return originals[2](self, *size, dtype=dtype, **kwargs)
        return guarded_empty(shape_of(size), dtype or self.dtype, guard_before=guard_before)

    torch.empty, torch.empty_like, torch.Tensor.new_empty = empty, empty_like, new_empty
    try:
        yield
    finally:
        torch.empty, torch.empty_like, torch.Tensor.new_empty = originals


# (n, c_in, c_out, size, kernel, padding): both tile widths, one output channel, partial tiles, padding.
LAYERS = [(2, 17, 70, (5, 6), (5, 2), (3, 1)), (3, 20, 1, (7, 7), (7, 7), (0, 0)), (1, 33, 12, (4, 5), (3, 3), (1, 1))]
# (dtype, TF32 for float32, activation): every tile and load path whose addresses differ. Exact float32 and
# TF32 select different tiles; float16 addresses as bfloat16 does (the same templates on 2-byte elements);
# ReLU adds the forward's masked epilogue and the backward kernels' reads of the output, at grad_out's offsets.
CASES = ((torch.float32, True, "relu"), (torch.float32, False, None), (torch.bfloat16, False, "relu"))
# Triton addresses the same whether float32 multiplies in TF32 or not (a constexpr of the dot), and reads a
# subset of the ReLU's addresses without it: the exact float32 case adds nothing but interpreter time.
TRITON_CASES = tuple(case for case in CASES if case[1] or case[0] != torch.float32)


def run_ops_on_guarded_tensors(backend: str, guard_before: bool) -> None:
    """Forward and backward of unpool_conv2d and sample_latents with ``backend`` on guarded tensors."""
    import dcign_fast as dc
    from tests.helpers import cudnn_tf32

    torch.manual_seed(0)
    cases = TRITON_CASES if backend == "triton" else CASES
    for (dtype, tf32, activation), (n, c_in, c_out, size, kernel, padding) in itertools.product(cases, LAYERS):
        x = torch.randn(n, c_in, *size).to(dtype).contiguous(memory_format=torch.channels_last)
        params = torch.randn(c_out, c_in, *kernel).to(dtype), torch.randn(c_out).to(dtype)
        leaves = [guarded_copy(t, guard_before).requires_grad_() for t in (x, *params)]
        with cudnn_tf32(tf32), guarded_allocations(guard_before):
            y = dc.unpool_conv2d(*leaves, padding=padding, backend=backend, activation=activation)
            grad_out = guarded_copy(torch.randn_like(y), guard_before)
            grads = torch.autograd.grad(y, leaves, grad_out)
        assert all(torch.isfinite(g).all() for g in (y, *grads))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        mu, logvar = (guarded_copy(torch.randn(6, 40).to(dtype), guard_before) for _ in range(2))
        active = guarded_copy(torch.rand(40) < 0.5, guard_before)
        for m, lv in ((mu, logvar), (mu[:, :5].T, logvar[:, :5].T)):  # contiguous and strided
            m, lv = m.detach().requires_grad_(), lv.detach().requires_grad_()
            with guarded_allocations(guard_before):
                z, kl = dc.sample_latents(m, lv, active[: m.shape[1]], invariance=0.2, seed=5, backend=backend)
                grad_z, grad_kl = (guarded_copy(torch.randn_like(t), guard_before) for t in (z, kl))
                grads = torch.autograd.grad((z, kl), (m, lv), (grad_z, grad_kl))
            assert all(torch.isfinite(g).all() for g in (z, kl, *grads))


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    """``python -c code`` in the repository root with extra environment variables; output captured."""
    root = Path(__file__).resolve().parents[1]
    return subprocess.run(
        [sys.executable, "-c", code], cwd=root, env={**os.environ, **env}, capture_output=True, text=True, timeout=600
    )
