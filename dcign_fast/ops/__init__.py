"""The fused ops: one file per op, each with its public function, autograd and backend dispatch."""

from dcign_fast.ops.backends import BACKENDS
from dcign_fast.ops.unpool_conv import unpool_conv2d

__all__ = ["BACKENDS", "unpool_conv2d"]
