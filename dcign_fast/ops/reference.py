"""Plain PyTorch oracles: what the tests compare every backend with and what the benchmarks beat.

These are written for clarity, not speed; they define each op's semantics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def unpool_conv2d_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    padding: tuple[int, int] = (0, 0),
    scale_factor: int = 2,
) -> torch.Tensor:
    """Nearest-neighbour upsampling by ``scale_factor`` followed by a stride-1 convolution.

    Shapes: x [N, C, H, W], weight [O, C, KH, KW], bias [O] -> [N, O, s*H + 2*ph - KH + 1, s*W + 2*pw - KW + 1].
    """
    upsampled = F.interpolate(x, scale_factor=scale_factor, mode="nearest")
    return F.conv2d(upsampled, weight, bias, padding=padding)
