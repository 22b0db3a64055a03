"""Invariant face recognition: retrieve a face's identity from a view at another pose.

Each held-out azimuth sweep shows one identity turning its head. The gallery holds every identity at
one pose (a quarter into the sweep), the probes the same identities at another (three quarters in);
a probe is recognised when its nearest gallery entry (cosine similarity) is its own identity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def top1_retrieval(gallery: torch.Tensor, probes: torch.Tensor) -> float:
    """gallery, probes: [N, F], row i of each the same identity -> fraction of probes matched to row i."""
    similarity = F.normalize(probes.double(), dim=1) @ F.normalize(gallery.double(), dim=1).T
    return float((similarity.argmax(dim=1) == torch.arange(len(probes))).double().mean())


def cross_pose_retrieval(
    sweeps: list[tuple[torch.Tensor, torch.Tensor, dict]], intrinsic: tuple[int, int]
) -> dict[str, float]:
    """Top-1 accuracy with the intrinsic latents and with raw pixels, from azimuth sweeps."""
    n = sweeps[0][0].shape[0]
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
