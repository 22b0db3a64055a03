"""dcign-fast: a fast Deep Convolutional Inverse Graphics Network (Kulkarni et al., 2015) for PyTorch."""

from dcign_fast import models, nn
from dcign_fast.ops import BACKENDS, reparameterize, sample_latents, unpool_conv2d

__version__ = "0.1.0"

__all__ = ["BACKENDS", "models", "nn", "reparameterize", "sample_latents", "unpool_conv2d", "__version__"]
