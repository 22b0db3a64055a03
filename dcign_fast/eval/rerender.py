"""Re-rendering: encode an image, move one latent group along a sweep, decode."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from dcign_fast.bounds import Bounds
from dcign_fast.eval.grid import image_path, save_grid
from dcign_fast.eval.inference import check_images, check_model, eval_mode, model_input, require_groups
from dcign_fast.models import DCIGN
from dcign_fast.models.dcign import check_shape

EXTRINSIC = ("azimuth", "elevation", "light")


@torch.no_grad()
def rerender(model: DCIGN, image: torch.Tensor, group: str, values: torch.Tensor) -> torch.Tensor:
    """The image re-rendered with latent group ``group`` set to each of ``values``.

    image: [1, C, S, S] or [C, S, S] in [0, 1]; values: [V], finite (each latent of the group is set to the value,
    not shifted by it) -> [V, C, S, S] in the model's dtype. The other latents stay at the encoder's mean.
    """
    check_model(model)
    groups = model.config.latent_groups
    if not isinstance(group, str) or group not in groups:  # (a list is unhashable: a TypeError naming nothing)
        raise ValueError(f"group must be one of {sorted(groups)}, got {group!r}")
    if not isinstance(values, torch.Tensor) or values.dim() != 1:
        got = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        raise ValueError(f"values must be a 1-D tensor [V] of the group's latent values, got {got}")
    if values.dtype == torch.bool or values.is_complex():
        raise TypeError(f"values must be real numbers (a float or integer tensor), got {values.dtype}")
    if not torch.isfinite(values).all():  # NaN or inf decode to NaN or saturated images, without a word
        bad = int((~torch.isfinite(values)).sum())
        raise ValueError(f"values must be finite, got {bad} NaN or inf of {len(values)}: {values}")
    return _rerender(model, one_image(model, image), group, values)


def _rerender(model: DCIGN, image: torch.Tensor, group: str, values: torch.Tensor) -> torch.Tensor:
    """:func:`rerender` of a checked image, as :func:`one_image` gives it, and checked values."""
    with eval_mode(model):
        mu, _ = model.encode(image)
        z = mu.repeat(len(values), 1)
        start, stop = model.config.latent_groups[group]
        z[:, start:stop] = values.to(z).view(-1, 1)
        images = model.decode(z)
    if not torch.isfinite(images).all():  # (a black grid, without a word)
        raise ValueError("model: its re-rendered images are not finite (NaN or inf): its weights have diverged")
    return images


def one_image(model: DCIGN, image: torch.Tensor) -> torch.Tensor:
    """``image``, one image for ``model`` ([1, C, S, S] or [C, S, S], floating point in [0, 1]), as [1, C, S, S]
    on the model's device and in its dtype; an error naming ``image`` otherwise (the model's would name x)."""
    image = model_input(model, image, "image")
    c = model.config
    item = (c.in_channels, c.image_size, c.image_size)
    if tuple(image.shape) not in (item, (1, *item)):
        shapes = f"[1, {', '.join(map(str, item))}] or [{', '.join(map(str, item))}]"
        raise ValueError(f"image must be one image, {shapes} for this model, got shape {tuple(image.shape)}")
    return image.reshape(1, *item)


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

    ``references[group]`` ([N, C, S, S] in [0, 1], e.g. a sweep of that factor; ``group`` one of the extrinsic
    groups) sets the group's range to what its latent spans over those images; without it the range is the
    image's own value +- ``spread`` (> 0; the latents' prior is N(0, 1)). ``path``'s extension must name a
    format PIL writes (.png); it and every other argument are checked before anything is computed.
    """
    check_model(model)
    require_groups(model, EXTRINSIC, "sweep_grid")
    Bounds(2).check("count", count, integer=True)  # one frame would show an end of the range, not the image's value
    Bounds(0, strict=True).check("spread", spread)
    image = one_image(model, image)
    references = _checked_references(model, references)
    path = image_path("path", path)
    rows, labels = [image.float().cpu()], ["input"]
    for group in EXTRINSIC:
        if group in references:
            values = sweep_values(model, references[group], group, count)
        else:
            center = sweep_values(model, image, group, 1)
            values = center + torch.linspace(-spread, spread, count)
        rows.append(_rerender(model, image, group, values).float().cpu())
        labels.append(group)
    return save_grid(path, rows, labels, scale=2)


def _checked_references(model: DCIGN, references: object) -> dict[str, torch.Tensor]:
    """sweep_grid's ``references``: {} for None, else a dict from extrinsic groups to [N >= 1, C, S, S] images
    in [0, 1] for the model. A misspelt group was ignored (the range fell back to +- spread), and an empty
    tensor failed in torch's min()."""
    if references is None:
        return {}
    if not isinstance(references, Mapping):
        raise TypeError(
            f"references must be a dict {{group: [N, C, S, S] images}} for groups among {list(EXTRINSIC)}, "
            f"got {type(references).__name__}"
        )
    unknown = [group for group in references if group not in EXTRINSIC]
    if unknown:
        raise ValueError(f"references: unknown groups {unknown}; its keys must be among {list(EXTRINSIC)}")
    c = model.config
    for group, images in references.items():
        name = f"references[{group!r}]"
        check_images(name, images)
        check_shape(name, images, (c.in_channels, c.image_size, c.image_size), "images")
        if not len(images):
            raise ValueError(f"{name} must hold at least one image, got shape {tuple(images.shape)}")
    return dict(references)
