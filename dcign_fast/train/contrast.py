"""Identity contrast: a step beyond the paper that makes the intrinsic code tell identities apart across pose.

DC-IGN's procedure alone leaves pose in the intrinsic latents z[3:] (docs/results.md: a face is found across a
1.5 rad turn no better than by its raw pixels). With ``identity_contrast > 0`` every extrinsic sweep of one
identity also brings ``contrast_identities`` other identities rendered at ``contrast_views`` of its views (the
same azimuth, elevation and light), and the loss adds an InfoNCE term on the intrinsic posterior means: an image
must pick its own identity among all of them at another view. Every candidate shares that view, so pose cannot
tell them apart; only identity can. The other identities are only encoded (the sweep alone is reconstructed,
clamped and pulled as the paper says), so the term trains the encoder alone.

Between two of a sweep's views only its one factor changes, while a face met again has turned, been tilted and
been relit at once. With ``contrast_mixed_views`` the sweep's identity too is rendered with the others, at
``contrast_views`` views drawn afresh from the renderer's ranges, each factor on its own: a sweep's image must
find its identity at views that differ from it in every factor, as must each of those renders at the others.

The images of such a sweep travel as one tensor, the sweep's ``batch_size`` images followed by the renders
(identity-major: each identity at every contrast view in turn; with mixed views the sweep's identity first);
:func:`split_contrast_images` takes them apart.
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


def with_contrast_images(
    sampler: SweepSampler, identities: int, views: int, mixed_views: bool = False
) -> Callable[[str, torch.Generator], Batch]:
    """``sampler.batch``, whose extrinsic sweeps come with ``identities`` other identities (drawn distinct from
    the sweep's generator) rendered at the sweep's :func:`contrast_views`, appended to its images; with
    ``mixed_views``, the sweep's identity and then the others, each at ``views`` views drawn from the sweep's
    generator (:meth:`SweepRanges.random_views`)."""
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
        if mixed_views:
            drawn = sampler.ranges.random_views(views, generator)
            shown = {name: value.repeat(identities + 1) for name, value in drawn.items()}
            shown["identity"] = torch.cat([torch.tensor([own]), others]).repeat_interleave(views)
        else:
            at = contrast_views(len(images), views)
            shown = {name: value.cpu()[at].repeat(identities) for name, value in factors.items() if name != "identity"}
            shown["identity"] = others.repeat_interleave(views)
        return torch.cat([images, sampler.render(shown).to(images.device)]), factors, kind

    return batch


def split_contrast_images(
    images: torch.Tensor, kind: str, config: TrainConfig
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the sweep [batch_size, C, S, S], the renders [rendered_identities(config) * views, C, S, S]) of a drawn
    ``kind`` sweep's images under identity contrast; (images, None) where nothing was appended (an intrinsic
    batch, or the contrast off)."""
    if not config.identity_contrast or kind == "intrinsic":
        return images, None
    expected = config.batch_size + rendered_identities(config) * config.contrast_views
    if len(images) != expected:  # (a sweep that did not come from with_contrast_images)
        raise ValueError(
            f"an extrinsic sweep under identity_contrast must hold batch_size + {rendered_identities(config)} "
            f"identities x contrast_views = {expected} images, got {len(images)}"
        )
    return images[: config.batch_size], images[config.batch_size :]


def rendered_identities(config: TrainConfig) -> int:
    """How many identities are rendered with each extrinsic sweep: the others, and with mixed views its own."""
    return config.contrast_identities + config.contrast_mixed_views


def identity_contrast_loss(
    model: DCIGN, sweep_mu: torch.Tensor, others: torch.Tensor, config: TrainConfig
) -> torch.Tensor:
    """The InfoNCE term (a float32 scalar) of one sweep's latent means ``sweep_mu`` [n, D] and the renders
    ``others`` [rendered_identities(config) * views, C, S, S]: each image of all of them (anchor) against, at
    each contrast view but its own, the ``identities + 1`` identities there (cosine similarity of their intrinsic
    latent means over ``contrast_temperature``); the target is the anchor's own identity. With mixed views no
    contrast view is a sweep image's own."""
    start, stop = model.config.latent_groups["intrinsic"]
    identities, views = config.contrast_identities, config.contrast_views
    n, device = len(sweep_mu), sweep_mu.device
    # Every index is made on the device and the pairs are averaged by a mask, not selected by it: a host sync
    # (a copy to the GPU, or a boolean index's nonzero) would stall every extrinsic step's launches.
    sweep = F.normalize(sweep_mu[:, start:stop].float(), dim=1)  # [n, d]
    rendered = F.normalize(model.encode(others)[0][:, start:stop].float(), dim=1)  # [rendered * views, d]
    # candidates[q, j]: identity q (0: the sweep's, 1..: the others) at contrast view j; a view's place: its
    # index in the sweep, or with mixed views its draw (-1 for the sweep's images: at none of the draws)
    if config.contrast_mixed_views:
        at = torch.arange(views, device=device)
        candidates = rendered.view(identities + 1, views, -1)
        sweep_place = torch.full((n,), -1, device=device)
        first_rendered = 0  # (the sweep's own identity is rendered too)
    else:
        at = contrast_views(n, views, device)
        candidates = torch.cat([sweep[at].unsqueeze(0), rendered.view(identities, views, -1)])
        sweep_place = torch.arange(n, device=device)
        first_rendered = 1
    rendered_identity = torch.arange(first_rendered, identities + 1, device=device).repeat_interleave(views)
    anchors = torch.cat([sweep, rendered])
    identity = torch.cat([torch.zeros(n, dtype=torch.long, device=device), rendered_identity])  # each anchor's
    place = torch.cat([sweep_place, at.repeat(rendered_identities(config))])  # and its view's place
    elsewhere = place[:, None] != at[None, :]  # [anchors, views]: a view other than its own
    with torch.autocast(device.type, enabled=False):  # (a bfloat16 bmm would round logits near 10 by 1/16)
        logits = torch.einsum("ad,qjd->ajq", anchors, candidates) / config.contrast_temperature
        target = identity[:, None].expand(-1, views)
        losses = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none")
    return (losses * elsewhere.flatten()).sum() / elsewhere.sum()
