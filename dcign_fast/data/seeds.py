"""The CPU generators that draw training and evaluation data, one per stream.

torch's CPU generator (a Mersenne twister) keeps only the low 32 bits of its seed. Seeds built by arithmetic
on (seed, step, shard) therefore wrapped around and repeated whole streams (step t + 65_535 of shard 1 drew
what step t of shard 0 drew). Each stream's key is hashed instead (numpy's SeedSequence) to 31 bits, and a
32nd bit tells training data (0) from evaluation's held-out data (1): the two never share a generator.
Distinct keys share a seed only by chance, once in about 2e9 pairs.
"""

from __future__ import annotations

import numpy as np
import torch

# The first word of each stream's key: what it draws.
BATCHES, POOL, LATENT_NOISE, SWEEPS, EVAL_SWEEPS, EVAL_RECONSTRUCTION, GRID_REFERENCES, EVAL_PROBES = range(8)


def stream_generator(*key: int, held_out: bool = False) -> torch.Generator:
    """The CPU generator of the data stream named by ``key`` (integers of either sign; the first names the
    stream's kind, e.g. :data:`BATCHES`); ``held_out`` for evaluation data, which training never draws."""
    words = [k % 2**64 for k in key]
    hashed = int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint32)[0])
    return torch.Generator().manual_seed((hashed & ~1) | int(held_out))
