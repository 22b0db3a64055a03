"""Identity contrast: a step beyond the paper that makes the intrinsic code tell identities apart across pose.

DC-IGN's procedure alone leaves pose in the intrinsic latents z[3:] (docs/results.md: a face is found across a
1.5 rad turn no better than by its raw pixels). With ``identity_contrast > 0`` every extrinsic sweep of one
identity also brings ``contrast_identities`` other identities rendered at ``contrast_views`` of its views (the
same azimuth, elevation and light), and the loss adds an InfoNCE term on the intrinsic posterior means: an image
must pick its own identity among all of them at another view. Every candidate shares that view, so pose cannot
tell them apart; only identity can. The other identities are only encoded (the sweep alone is reconstructed,
clamped and pulled as the paper says), so the term trains the encoder alone.

The images of such a sweep travel as one tensor, the sweep's ``batch_size`` images followed by the others
(identity-major: each identity at every contrast view in turn); :func:`split_contrast_images` takes them apart.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from dcign_fast.data.sweeps import Batch, SweepSampler
from dcign_fast.models.dcign import DCIGN
from dcign_fast.train.config import TrainConfig


def contrast_views(sweep_size: int, views: int, device: torch.device | None = None) -> torch.Tensor:
    """[views] int64 on ``device``: the positions in a sweep of ``sweep_size`` images at which the other
    identities are rendered, spread evenly from its first to its last (so both near and distant poses are
    contrasted); distinct while ``views <= sweep_size``. (Made where it is used: a copy to a GPU waits for it.)"""
    return torch.linspace(0, sweep_size - 1, views, device=device).round().long()


def with_contrast_images(sampler: SweepSampler, identities: int, views: int) -> Callable[[str, torch.Generator], Batch]:
    """``sampler.batch``, whose extrinsic sweeps come with ``identities`` other identities (drawn distinct from
    the sweep's generator) rendered at the sweep's :func:`contrast_views`, appended to its images."""
    if identities >= sampler.num_identities:
        raise ValueError(
            f"contrast_identities must be below the renderer's {sampler.num_identities} identities, got {identities}"
        )

    def batch(kind: str, generator: torch.Generator) -> Batch:
        images, factors, kind = sampler.batch(kind, generator)
        if kind == "intrinsic":  # (its images vary identity at one pose already)
            return images, factors, kind
        own = int(factors["identity"][0])
        others = torch.randperm(sampler.num_identities - 1, generator=generator)[:identities]
        others += (others >= own).long()  # (skipping the sweep's own)
        at = contrast_views(len(images), views)
        shown = {name: value.cpu()[at].repeat(identities) for name, value in factors.items() if name != "identity"}
        shown["identity"] = others.repeat_interleave(views)
        return torch.cat([images, sampler.render(shown).to(images.device)]), factors, kind

    return batch


def split_contrast_images(
    images: torch.Tensor, kind: str, config: TrainConfig
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the sweep [batch_size, C, S, S], the other identities [identities * views, C, S, S]) of a drawn ``kind``
    sweep's images under identity contrast; (images, None) where nothing was appended (an intrinsic batch, or
    the contrast off)."""
    if not config.identity_contrast or kind == "intrinsic":
        return images, None
    expected = config.batch_size + config.contrast_identities * config.contrast_views
    if len(images) != expected:  # (a sweep that did not come from with_contrast_images)
        raise ValueError(
            f"an extrinsic sweep under identity_contrast must hold batch_size + contrast_identities x contrast_views "
            f"= {expected} images, got {len(images)}"
        )
    return images[: config.batch_size], images[config.batch_size :]


def identity_contrast_loss(
    model: DCIGN, sweep_mu: torch.Tensor, others: torch.Tensor, config: TrainConfig
) -> torch.Tensor:
    """The InfoNCE term (a float32 scalar) of one sweep's latent means ``sweep_mu`` [n, D] and the other
    identities' images ``others`` [identities * views, C, S, S]: each image of all of them (anchor) against, at
    each contrast view but its own, the ``identities + 1`` identities there (cosine similarity of their intrinsic
    latent means over ``contrast_temperature``); the target is the anchor's own identity."""
    start, stop = model.config.latent_groups["intrinsic"]
    identities, views = config.contrast_identities, config.contrast_views
    n, device = len(sweep_mu), sweep_mu.device
    # Every index is made on the device and the pairs are averaged by a mask, not selected by it: a host sync
    # (a copy to the GPU, or a boolean index's nonzero) would stall every extrinsic step's launches.
    at = contrast_views(n, views, device)
    sweep = F.normalize(sweep_mu[:, start:stop].float(), dim=1)  # [n, d]
    other = F.normalize(model.encode(others)[0][:, start:stop].float(), dim=1)  # [identities * views, d]
    # candidates[q, j]: identity q (0: the sweep's, 1..: the others) at contrast view j
    candidates = torch.cat([sweep[at].unsqueeze(0), other.view(identities, views, -1)])
    anchors = torch.cat([sweep, other])
    others_identity = torch.arange(1, identities + 1, device=device).repeat_interleave(views)
    identity = torch.cat([torch.zeros(n, dtype=torch.long, device=device), others_identity])  # each anchor's
    position = torch.cat([torch.arange(n, device=device), at.repeat(identities)])  # and its place in the sweep
    elsewhere = position[:, None] != at[None, :]  # [anchors, views]: a view other than the anchor's own
    pairs = (n - 1) * views + identities * views * (views - 1)  # its True count (at's views are distinct)
    with torch.autocast(device.type, enabled=False):  # (a bfloat16 bmm would round logits near 10 by 1/16)
        logits = torch.einsum("ad,qjd->ajq", anchors, candidates) / config.contrast_temperature
        target = identity[:, None].expand(-1, views)
        losses = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none")
    return (losses * elsewhere.flatten()).sum() / pairs
