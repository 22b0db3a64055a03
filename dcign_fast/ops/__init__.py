"""The fused ops: one file per op, each with its public function, autograd and backend dispatch."""

from dcign_fast.ops import library  # noqa: F401  (registers torch.ops.dcign_fast.*)
from dcign_fast.ops.backends import BACKENDS
from dcign_fast.ops.latent_sampler import reparameterize, sample_latents
from dcign_fast.ops.unpool_conv import unpool_conv2d

__all__ = ["BACKENDS", "reparameterize", "sample_latents", "unpool_conv2d"]
