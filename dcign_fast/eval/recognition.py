"""Invariant face recognition: retrieve a face's identity from a view at another pose.

Each held-out azimuth sweep shows one identity turning its head. The gallery holds every identity at
one pose (a quarter into the sweep), the probes the same identities at another (three quarters in);
a probe is recognised when its nearest gallery entry (cosine similarity) is its own identity.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from dcign_fast.eval.metrics import encode_sweeps
from dcign_fast.models import DCIGN


def top1_retrieval(gallery: torch.Tensor, probes: torch.Tensor) -> float:
    """gallery, probes: [N, F], row i of each the same identity -> fraction of probes matched to row i."""
    similarity = F.normalize(probes.double(), dim=1) @ F.normalize(gallery.double(), dim=1).T
    return float((similarity.argmax(dim=1) == torch.arange(len(probes))).double().mean())


def cross_pose_retrieval(
    sweeps: list[tuple[torch.Tensor, torch.Tensor, dict]], intrinsic: tuple[int, int]
) -> dict[str, float]:
    """Top-1 accuracy with the intrinsic latents and with raw pixels, from azimuth sweeps of distinct
    identities (see :func:`distinct_identity_sweeps`)."""
    n = sweeps[0][0].shape[0]
    if n < 2:  # the gallery view would be the probe itself
        raise ValueError(f"sweeps: cross-pose retrieval needs two poses per sweep, got sweeps of {n} image")
    g, p = n // 4, (3 * n) // 4
    start, stop = intrinsic
    gallery_z = torch.stack([mu[g, start:stop] for _, mu, _ in sweeps])
    probe_z = torch.stack([mu[p, start:stop] for _, mu, _ in sweeps])
    gallery_x = torch.stack([images[g].flatten() for images, _, _ in sweeps])
    probe_x = torch.stack([images[p].flatten() for images, _, _ in sweeps])
    return {
        "intrinsic_latents": top1_retrieval(gallery_z, probe_z),
        "raw_pixels": top1_retrieval(gallery_x, probe_x),
        "chance": 1.0 / len(sweeps),
        "identities": len(sweeps),
    }


def distinct_identity_sweeps(
    model: DCIGN, batch: Callable[[str, torch.Generator], tuple], count: int, seed: int
) -> list[tuple[torch.Tensor, torch.Tensor, dict]]:
    """``count`` held-out azimuth sweeps (images, mu, factors), each of an identity no other shows.

    Identities are drawn at random, so sweeps can repeat one (among 100 draws from 10,000, with odds of
    about 0.4); a probe matched to the other copy of its own identity would count as a miss. Later draws
    replace repeats; a ValueError names ``identities`` when the source holds too few.
    """
    sweeps: list[tuple[torch.Tensor, torch.Tensor, dict]] = []
    seen: set[int] = set()
    drawn = 0
    while len(sweeps) < count:
        if drawn >= 4 * count + 100:
            raise ValueError(f"identities={count}, but {drawn} azimuth sweeps showed only {len(seen)} distinct ones")
        more = encode_sweeps(model, batch, "azimuth", count - len(sweeps), seed, first=drawn)
        drawn += len(more)
        for sweep in more:
            identity = int(sweep[2]["identity"][0])
            if identity not in seen:
                seen.add(identity)
                sweeps.append(sweep)
    return sweeps
