"""Training data: a batched face renderer, one-factor sweeps, and images on disk.

``SweepSampler`` yields DC-IGN batches rendered on the fly; ``render`` draws any mesh under given
pose and light; ``load_asset`` / ``load_mesh`` give meshes (packaged face scans or your own files).
"""

from dcign_fast.data.identity import IdentitySpace
from dcign_fast.data.meshes import Mesh, list_assets, load_asset, load_mesh
from dcign_fast.data.render import render
from dcign_fast.data.sweeps import FACTOR_KEYS, KINDS, SweepRanges, SweepSampler

__all__ = [
    "FACTOR_KEYS",
    "KINDS",
    "IdentitySpace",
    "Mesh",
    "SweepRanges",
    "SweepSampler",
    "list_assets",
    "load_asset",
    "load_mesh",
    "render",
]
