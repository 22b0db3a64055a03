"""How well a DC-IGN disentangles, on held-out renders with known factors.

- Per extrinsic group: within each one-factor sweep, z-score the group's mean latent (mu) and the true
  factor; pool all sweeps; report |Pearson r| (the paper's generalisation scatter plots, as a number).
- Mutual Information Gap (Chen et al. 2018) over all latents and the four factors, on the pooled sweeps.
- Reconstruction BCE (summed per image) and MSE (per pixel).
- Invariant recognition: top-1 identity retrieval across poses (see recognition.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dcign_fast.models import DCIGN

EXTRINSIC = ("azimuth", "elevation", "light")
MIG_BINS = 20


def zscore(values: torch.Tensor) -> torch.Tensor:
    return (values - values.mean()) / values.std().clamp_min(1e-8)


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-12))


@torch.no_grad()
def encode_sweeps(
    model: DCIGN, batch: Callable[[str, torch.Generator], tuple], kind: str, count: int, seed: int
) -> list[tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]:
    """``count`` held-out sweeps of one kind: (images, mu, factors) each, on the CPU."""
    device = next(model.parameters()).device
    sweeps = []
    for i in range(count):
        images, factors = batch(kind, torch.Generator().manual_seed(seed * 7_919 + i))[:2]
        mu, _ = model.encode(images.to(device))
        sweeps.append((images.cpu(), mu.float().cpu(), {k: v.cpu() for k, v in factors.items()}))
    return sweeps


def group_correlation(
    sweeps: list[tuple[torch.Tensor, torch.Tensor, dict]], latent_range: tuple[int, int], factor: str
) -> tuple[float, torch.Tensor, torch.Tensor]:
    """(|r| of pooled per-sweep z-scores, pooled latent z-scores, pooled factor z-scores)."""
    start, stop = latent_range
    latents = torch.cat([zscore(mu[:, start:stop].mean(dim=1)) for _, mu, _ in sweeps])
    truths = torch.cat([zscore(f[factor].float()) for _, _, f in sweeps])
    return abs(pearson(latents, truths)), latents, truths


def discrete_entropy(labels: torch.Tensor) -> float:
    p = torch.unique(labels, return_counts=True)[1].double()
    p = p / p.sum()
    return float(-(p * p.log()).sum())


def mutual_information(a: torch.Tensor, b: torch.Tensor) -> float:
    """I(a; b) in nats for two integer label vectors."""
    joint = torch.unique(torch.stack([a, b], dim=1), dim=0, return_counts=True)[1].double()
    return discrete_entropy(a) + discrete_entropy(b) - float(-(joint / joint.sum() * (joint / joint.sum()).log()).sum())


def binned(values: torch.Tensor, bins: int = MIG_BINS) -> torch.Tensor:
    """Equal-width bins over the observed range -> int64 labels."""
    low, high = values.min(), values.max()
    return ((values - low) / (high - low).clamp_min(1e-12) * bins).long().clamp(max=bins - 1)


def mig(latents: torch.Tensor, factors: dict[str, torch.Tensor]) -> float:
    """Mutual Information Gap: mean over factors of (top-1 - top-2 latent MI) / H(factor)."""
    codes = [binned(latents[:, j]) for j in range(latents.shape[1])]
    gaps = []
    for values in factors.values():
        labels = values if not values.is_floating_point() else binned(values)
        entropy = discrete_entropy(labels)
        if entropy <= 0:
            continue
        mi = sorted((mutual_information(code, labels) for code in codes), reverse=True)
        gaps.append((mi[0] - (mi[1] if len(mi) > 1 else 0.0)) / entropy)
    return float(sum(gaps) / len(gaps)) if gaps else 0.0
