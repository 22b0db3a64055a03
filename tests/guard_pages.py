"""Tensors that end (or start) at an inaccessible page: a CPU kernel that reads or writes one element past
the end (or before the start) of one dies with SIGSEGV instead of touching a neighbour's memory. For the
CPU emulation of the CUDA kernels, the counterpart of compute-sanitizer's memcheck. Linux; run the code
under test in a subprocess, since a hit ends the process."""

from __future__ import annotations

import contextlib
import ctypes
import math
import mmap
from collections.abc import Iterator

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
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
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

    def empty(*size, dtype=None, device=None, memory_format=torch.contiguous_format, **kwargs):
        shape = tuple(size[0]) if len(size) == 1 and not isinstance(size[0], int) else tuple(size)
        if (device is not None and torch.device(device).type != "cpu") or kwargs:
            return originals[0](*size, dtype=dtype, device=device, memory_format=memory_format, **kwargs)
        return guarded_empty(shape, dtype or torch.get_default_dtype(), memory_format, guard_before)

    def empty_like(t, *, dtype=None, **kwargs):
        if t.device.type != "cpu" or kwargs:
            return originals[1](t, dtype=dtype, **kwargs)
        copy = guarded_copy(originals[1](t, dtype=dtype), guard_before)
        return copy.fill_(float("nan")) if copy.is_floating_point() else copy

    def new_empty(self, size, *, dtype=None, **kwargs):
        if self.device.type != "cpu" or kwargs:
            return originals[2](self, size, dtype=dtype, **kwargs)
        return guarded_empty(tuple(size), dtype or self.dtype, guard_before=guard_before)

    torch.empty, torch.empty_like, torch.Tensor.new_empty = empty, empty_like, new_empty
    try:
        yield
    finally:
        torch.empty, torch.empty_like, torch.Tensor.new_empty = originals
