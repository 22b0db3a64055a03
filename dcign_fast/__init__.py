"""dcign-fast: a fast Deep Convolutional Inverse Graphics Network (Kulkarni et al., 2015) for PyTorch."""

import importlib

from dcign_fast import models, nn
from dcign_fast.ops import BACKENDS, reparameterize, sample_latents, unpool_conv2d
from dcign_fast.patch import PatchReport, patch, unpatch

__version__ = "0.1.0"

# (Not "eval": `from dcign_fast import *` would hide Python's eval. dcign_fast.eval stays importable.)
__all__ = [
    "BACKENDS",
    "data",
    "models",
    "nn",
    "patch",
    "PatchReport",
    "reparameterize",
    "sample_latents",
    "train",
    "unpatch",
    "unpool_conv2d",
    "__version__",
]

_LAZY = ("data", "eval", "train")  # heavier subpackages (renderer, plotting, distributed): loaded on use


def __getattr__(name: str):
    if name in _LAZY:
        return importlib.import_module(f"dcign_fast.{name}")
    raise AttributeError(f"module 'dcign_fast' has no attribute {name!r}")
