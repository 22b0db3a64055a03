"""Invariant face recognition: retrieve a face's identity from a view at another pose.

Each held-out azimuth sweep shows one identity turning its head. The gallery holds every identity at one
pose (a quarter into its sweep), the probes the same identities at another (three quarters in); a probe is
recognised when its nearest gallery entry (cosine similarity) is its own identity. With the built-in
renderer each probe is rendered again under an elevation and a light drawn afresh: within a sweep they are
fixed, so a probe taken from its gallery entry's sweep shares them with it alone, and an embedding of the
lighting with no identity in it at all scored 1.0. Other data sources have no way to render a chosen
identity: their probes come from the same sweep (reported as such).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from dcign_fast.bounds import described
from dcign_fast.data.seeds import EVAL_PROBES, stream_generator
from dcign_fast.eval.inference import model_input
from dcign_fast.eval.metrics import encode_sweeps
from dcign_fast.models import DCIGN

if TYPE_CHECKING:
    from dcign_fast.data import SweepSampler

# A sweep of images, their latent means and its factors, as encode_sweeps returns them.
Sweep = tuple[torch.Tensor, torch.Tensor, dict]
# Each sweep's probe view: (image [C, S, S], latent means [D]).
Probes = list[tuple[torch.Tensor, torch.Tensor]]
GALLERY_AT, PROBE_AT = 0.25, 0.75  # where in its azimuth sweep an identity's gallery and probe views lie
SAME_SWEEP = "same sweep (elevation and light shared with the gallery entry)"
RELIT = "elevation and light drawn afresh"


def top1_retrieval(gallery: torch.Tensor, probes: torch.Tensor) -> float:
    """gallery, probes: [N, F], row i of each the same identity -> fraction of probes matched to row i."""
    if gallery.dim() != 2 or probes.shape != gallery.shape:
        got = f"{described(gallery)} and {described(probes)}"
        raise ValueError(f"gallery and probes must be [N, F] tensors of one shape, got {got}")
    similarity = F.normalize(probes.double(), dim=1) @ F.normalize(gallery.double(), dim=1).T
    return float((similarity.argmax(dim=1) == torch.arange(len(probes))).double().mean())


def _views(sweeps: list[Sweep], fraction: float) -> Probes:
    """Each sweep's image and latent means ``fraction`` of the way through it."""
    return [(images[int(fraction * len(images))], mu[int(fraction * len(images))]) for images, mu, _ in sweeps]


def cross_pose_retrieval(
    sweeps: list[Sweep], intrinsic: tuple[int, int], probes: Probes | None = None
) -> dict[str, float | int | str]:
    """Top-1 accuracy with the intrinsic latents and with raw pixels, from azimuth sweeps of distinct
    identities (see :func:`distinct_identity_sweeps`): gallery entries a quarter into each sweep; ``probes``
    one per sweep (see :func:`relit_probes`), else the views three quarters into the sweeps."""
    short = min(len(images) for images, _, _ in sweeps)
    if short < 2:  # the gallery view would be the probe itself
        raise ValueError(f"sweeps: cross-pose retrieval needs two poses per sweep, got a sweep of {short} image")
    if probes is not None and len(probes) != len(sweeps):
        raise ValueError(f"probes must hold one view per sweep ({len(sweeps)}), got {len(probes)}")
    gallery = _views(sweeps, GALLERY_AT)
    probe_view = RELIT if probes is not None else SAME_SWEEP
    probes = probes if probes is not None else _views(sweeps, PROBE_AT)
    start, stop = intrinsic

    def stacked(views: Probes, latents: bool) -> torch.Tensor:
        return torch.stack([mu[start:stop] if latents else image.flatten() for image, mu in views])

    return {
        "intrinsic_latents": top1_retrieval(stacked(gallery, True), stacked(probes, True)),
        "raw_pixels": top1_retrieval(stacked(gallery, False), stacked(probes, False)),
        "chance": 1.0 / len(sweeps),
        "identities": len(sweeps),
        "probe_view": probe_view,
    }


@torch.no_grad()
def relit_probes(model: DCIGN, sampler: SweepSampler, sweeps: list[Sweep], seed: int) -> Probes:
    """Each sweep's identity at the azimuth three quarters into it, rendered by ``sampler`` (a SweepSampler)
    under an elevation, light azimuth and light elevation drawn afresh from its ranges (held out), and
    encoded: a probe that shares only the identity with its gallery entry."""
    factors = {
        **sampler.ranges.random_views(len(sweeps), stream_generator(EVAL_PROBES, seed, held_out=True)),
        "azimuth": torch.stack([f["azimuth"][int(PROBE_AT * len(f["azimuth"]))] for _, _, f in sweeps]).float(),
        "identity": torch.stack([f["identity"][0] for _, _, f in sweeps]).long(),
    }
    images = sampler.render(factors)
    mu = model.encode(model_input(model, images))[0].float().cpu()
    return list(zip(images.cpu(), mu))


def distinct_identity_sweeps(
    model: DCIGN, batch: Callable[[str, torch.Generator], tuple], count: int, seed: int
) -> list[Sweep]:
    """``count`` held-out azimuth sweeps (images, mu, factors), each of an identity no other shows.

    Identities are drawn at random, so sweeps can repeat one (among 100 draws from 10,000, with odds of
    about 0.4); a probe matched to the other copy of its own identity would count as a miss. Later draws
    replace repeats; a ValueError names ``identities`` when the source holds too few.
    """
    sweeps: list[Sweep] = []
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
