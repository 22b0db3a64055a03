"""DC-IGN's disentangling procedure: which latents a one-factor batch leaves free, and its loss."""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from dcign_fast.data.sweeps import KINDS
from dcign_fast.models.dcign import DCIGN
from dcign_fast.train.config import TrainConfig
from dcign_fast.train.contrast import identity_contrast_loss, split_contrast_images


def kind_odds(config: TrainConfig) -> dict[str, float]:
    """Probability of each batch kind: 1:1:1:shape_bias unless ``kind_weights`` overrides."""
    weights = config.kind_weights_in_full()
    total = sum(weights[k] for k in KINDS)
    return {k: weights[k] / total for k in KINDS}


def unwrap(model: nn.Module) -> DCIGN:
    """The DCIGN inside torch.compile's and DistributedDataParallel's wrappers (either, both or none)."""
    inner = getattr(model, "_orig_mod", model)
    return cast(DCIGN, getattr(inner, "module", inner))


def batch_loss(
    model: nn.Module, images: torch.Tensor, kind: str, config: TrainConfig, seed: int, plain: bool
) -> dict[str, torch.Tensor]:
    """The loss of one batch: clamped + invariance for a one-factor batch, a plain VAE when ``plain``; with
    ``identity_contrast``, plus its term ("contrast": 0 for an intrinsic batch), which an extrinsic sweep's
    images carry the other identities for (see contrast.py)."""
    core = unwrap(model)
    images, others = split_contrast_images(images, kind, config)
    active = None
    if not plain:
        active = core.active_mask(kind).to(images.device)
    # The invariance pull ignores the loss's scale, and the loss is a mean over the batch's images (and the
    # step's micro-batches): the pull is divided likewise. So `invariance` keeps the paper's meaning, a pull
    # relative to the loss summed over the batch (its 1/100), and accumulated micro-batches pull as hard as
    # the same sweeps spread over DDP ranks.
    invariance = config.invariance / (config.accumulation * len(images))
    recon, mu, logvar, _, kl = model(
        images, active=active, clamp=config.clamp, invariance=invariance, seed=seed, return_kl=True
    )
    losses = core.loss(images, recon, mu, logvar, kl=kl)
    if not config.identity_contrast:
        return losses
    term = losses["total"].new_zeros(()) if others is None else identity_contrast_loss(core, mu, others, config)
    return {**losses, "total": losses["total"] + config.identity_contrast * term, "contrast": term}
