"""Re-rendering: encode an image, move one latent group along a sweep, decode."""

from __future__ import annotations

from pathlib import Path

import torch

from dcign_fast.bounds import Bounds
from dcign_fast.eval.grid import save_grid
from dcign_fast.eval.inference import check_images, eval_mode, model_input, require_groups
from dcign_fast.models import DCIGN

EXTRINSIC = ("azimuth", "elevation", "light")


@torch.no_grad()
def rerender(model: DCIGN, image: torch.Tensor, group: str, values: torch.Tensor) -> torch.Tensor:
    """The image re-rendered with latent group ``group`` set to each of ``values``.

    image: [1, C, S, S] or [C, S, S] in [0, 1]; values: [V] (each latent of the group is set to the value,
    not shifted by it) -> [V, C, S, S] in the model's dtype. The other latents stay at the encoder's mean.
    """
    groups = model.config.latent_groups
    if group not in groups:
        raise ValueError(f"group must be one of {sorted(groups)}, got {group!r}")
    if not isinstance(values, torch.Tensor) or values.dim() != 1:
        got = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        raise ValueError(f"values must be a 1-D tensor [V] of the group's latent values, got {got}")
    image = model_input(model, image, "image")
    if image.dim() == 3:
        image = image.unsqueeze(0)
    if image.dim() != 4 or len(image) != 1:
        raise ValueError(f"image must be one image, [1, C, S, S] or [C, S, S], got shape {tuple(image.shape)}")
    with eval_mode(model):
        mu, _ = model.encode(image)
        z = mu.repeat(len(values), 1)
        start, stop = groups[group]
        z[:, start:stop] = values.to(z).view(-1, 1)
        return model.decode(z)


@torch.no_grad()
def sweep_values(model: DCIGN, images: torch.Tensor, group: str, count: int) -> torch.Tensor:
    """``count`` values spanning the range the group's latent takes over ``images`` (e.g. one sweep of
    that group's factor, so the re-rendering covers the factor's range)."""
    with eval_mode(model):
        mu, _ = model.encode(model_input(model, images))
    start, stop = model.config.latent_groups[group]
    latent = mu[:, start:stop].mean(dim=1).float().cpu()
    return torch.linspace(latent.min().item(), latent.max().item(), count)


def sweep_grid(
    model: DCIGN,
    image: torch.Tensor,
    path: str | Path,
    count: int = 9,
    references: dict[str, torch.Tensor] | None = None,
    spread: float = 2.5,
) -> Path:
    """A PNG: the input, then one row per extrinsic group re-rendered along its sweep of ``count`` (>= 2) images.

    ``references[group]`` ([N, C, S, S], e.g. a sweep of that factor) sets the group's range to what its
    latent spans over those images; without it the range is the image's own value +- ``spread`` (the
    latents' prior is N(0, 1)).
    """
    require_groups(model, EXTRINSIC, "sweep_grid")
    Bounds(2).check("count", count, integer=True)  # one frame would show an end of the range, not the image's value
    check_images("image", image)
    image = image if image.dim() == 4 else image.unsqueeze(0)
    rows, labels = [image.float().cpu()], ["input"]
    for group in EXTRINSIC:
        if references is not None and group in references:
            values = sweep_values(model, references[group], group, count)
        else:
            center = sweep_values(model, image, group, 1)
            values = center + torch.linspace(-spread, spread, count)
        rows.append(rerender(model, image, group, values).float().cpu())
        labels.append(group)
    return save_grid(path, rows, labels, scale=2)
