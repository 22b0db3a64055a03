"""How evaluation code runs a model someone hands it: in eval mode, restored afterwards, on inputs cast to the
model's own device and dtype (a model moved to bfloat16 or a GPU takes the same float32 CPU images)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from dcign_fast.models.dcign import DCIGN, outside_unit_range


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside the block; its train/eval mode as before after it."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def check_model(model: object) -> None:
    """A TypeError unless ``model`` is a DCIGN, or torch.compile's wrapper of one (which forwards ``config``,
    ``encode`` and ``decode`` to it): anything else failed on a missing attribute, naming no argument."""
    if not isinstance(getattr(model, "_orig_mod", model), DCIGN):
        raise TypeError(f"model must be a DCIGN, got {type(model).__name__}")


def check_images(name: str, images: object) -> None:
    """A TypeError naming ``name`` unless ``images`` is a floating-point tensor, a ValueError unless its values
    are in [0, 1]: cast as they are, uint8 pixels (or floats in 0..255, or NaN) would reach the model and give
    garbage, not an error. (One host sync: for evaluation, not for a training step.)"""
    if not (isinstance(images, torch.Tensor) and images.is_floating_point()):
        got = images.dtype if isinstance(images, torch.Tensor) else type(images).__name__
        raise TypeError(f"{name} must be floating-point images in [0, 1] (uint8 pixels: divide by 255), got {got}")
    if images.numel() and images.device.type != "meta":
        low, high = torch.stack(torch.aminmax(images.detach())).float().tolist()
        if error := outside_unit_range(name, "images in [0, 1]", low, high):
            raise error


def model_input(model: nn.Module, images: torch.Tensor, name: str = "images") -> torch.Tensor:
    """``images`` (floating point, in [0, 1]) on the device and in the floating dtype of ``model``'s parameters."""
    check_images(name, images)
    weight = next(model.parameters())
    return images.to(device=weight.device, dtype=weight.dtype)


def require_groups(model: DCIGN, names: tuple[str, ...], caller: str) -> None:
    """A ValueError unless the model's config has every latent group in ``names``."""
    missing = [name for name in names if name not in model.config.latent_groups]
    if missing:
        raise ValueError(f"model: {caller} needs the latent groups {list(names)}; its latent_groups lack {missing}")
