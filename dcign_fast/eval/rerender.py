"""Re-rendering: encode an image, move one latent group along a sweep, decode."""

from __future__ import annotations

from pathlib import Path

import torch

from dcign_fast.eval.grid import save_grid
from dcign_fast.models import DCIGN

EXTRINSIC = ("azimuth", "elevation", "light")


@torch.no_grad()
def rerender(model: DCIGN, image: torch.Tensor, group: str, values: torch.Tensor) -> torch.Tensor:
    """The image re-rendered with latent group ``group`` set to each of ``values``.

    image: [1, C, S, S] or [C, S, S] in [0, 1]; values: [V] (added to every latent of the group as an
    absolute value) -> [V, C, S, S]. The other latents stay at the encoder's mean.
    """
    groups = model.config.latent_groups
    if group not in groups:
        raise ValueError(f"group must be one of {sorted(groups)}, got {group!r}")
    if image.dim() == 3:
        image = image.unsqueeze(0)
    model.eval()
    mu, _ = model.encode(image.to(next(model.parameters()).device))
    z = mu.repeat(len(values), 1)
    start, stop = groups[group]
    z[:, start:stop] = values.to(z).view(-1, 1)
    return model.decode(z)


@torch.no_grad()
def sweep_values(model: DCIGN, images: torch.Tensor, group: str, count: int, spread: float = 2.0) -> torch.Tensor:
    """``count`` values spanning the group's latent over ``images`` (mean +- spread x std)."""
    mu, _ = model.encode(images)
    start, stop = model.config.latent_groups[group]
    latent = mu[:, start:stop].mean(dim=1)
    center, std = latent.mean(), latent.std().clamp_min(1e-3) if len(latent) > 1 else torch.tensor(1.0)
    return torch.linspace(-spread, spread, count) * std.cpu() + center.cpu()


def sweep_grid(
    model: DCIGN, image: torch.Tensor, path: str | Path, count: int = 9, reference: torch.Tensor | None = None
) -> Path:
    """A PNG: the input, then one row per extrinsic group re-rendered along its sweep.

    ``reference`` ([N, C, S, S]) sets each sweep's range from the spread of the latents over those
    images (defaults to the image alone with a unit range).
    """
    image = image if image.dim() == 4 else image.unsqueeze(0)
    device = next(model.parameters()).device
    reference = image if reference is None else reference
    rows, labels = [image.cpu()], ["input"]
    for group in EXTRINSIC:
        values = sweep_values(model, reference.to(device), group, count)
        rows.append(rerender(model, image, group, values).cpu())
        labels.append(group)
    return save_grid(path, rows, labels, scale=2)
