"""Small constant tensors (index tables) made once per (values, dtype, device).

A ``torch.tensor(values, device="cuda")`` inside an op copies from pageable host memory on every call: the
host waits for the GPU each time, and under CUDA-graph capture the copy is an error. Cached, the copy
happens at the first call (the warm-up, outside any capture) and never again.
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=1024)
def constant(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.tensor(values, dtype=dtype)`` on ``device``, shared between callers: never write to it."""
    return torch.tensor(values, dtype=dtype).to(device)
