"""The fused ops: per op, a file with its public function and backend dispatch (unpool_conv.py,
latent_sampler.py) and one with its custom ops and autograd (unpool_conv_op.py, latent_sampler_op.py)."""

# First (they import the ops' modules, which call them at run time): registers torch.ops.dcign_fast.*
from dcign_fast.ops import latent_sampler_op, unpool_conv_op  # noqa: F401
from dcign_fast.ops.backends import BACKENDS
from dcign_fast.ops.latent_sampler import reparameterize, sample_latents
from dcign_fast.ops.unpool_conv import unpool_conv2d

__all__ = ["BACKENDS", "reparameterize", "sample_latents", "unpool_conv2d"]
