"""Small constant tensors (index tables, 0/1 collapse matrices) made once per (values, dtype, device).

A ``torch.tensor(values, device="cuda")`` inside an op copies from pageable host memory on every call: the
host waits for the GPU each time, and under CUDA-graph capture the copy is an error. Cached, the copy
happens at the first call (the warm-up, outside any capture) and never again.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch


@functools.lru_cache(maxsize=1024)
def constant(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.tensor(values, dtype=dtype)`` on ``device``, shared between callers: never write to it."""
    return torch.tensor(values, dtype=dtype).to(device)


def one_hot_rows(index: Sequence[int], classes: int) -> tuple[tuple[int, ...], ...]:
    """[classes, len(index)] 0/1 rows: entry (m, u) is 1 where index[u] == m."""
    return tuple(tuple(int(i == m) for i in index) for m in range(classes))
