"""Compiled and JIT kernels behind the ops' "triton" and "cuda" backends."""

from __future__ import annotations

import contextlib

import torch


def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """Makes ``device`` current for the launches and allocations inside.

    Both Triton and the extension launch on the *current* CUDA device, which need not be the tensors'
    (tensors on cuda:1 while cuda:0 is current would be read through the wrong context). Nothing to do for
    CPU tensors (Triton's interpreter, the CUDA emulation).
    """
    return contextlib.nullcontext() if device.type == "cpu" else torch.cuda.device(device)
