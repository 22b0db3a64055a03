"""How well a DC-IGN disentangles, on held-out renders with known factors.

- Per extrinsic group: within each one-factor sweep, z-score the group's mean latent (mu) and the true
  factor; pool all sweeps; report |Pearson r| (the paper's generalisation scatter plots, as a number).
- Mutual Information Gap (Chen et al. 2018) over all latents and the three extrinsic factors, on the pooled
  sweeps. Not identity: with hundreds of identities among a few thousand images, most seen once, its mutual
  information with any binned latent is mostly the estimator's bias (a latent of pure noise had 0.8 nats of
  it, a perfect code of identity 2.75, capped by 20 bins at log 20).
- Reconstruction BCE (summed per image) and MSE (per pixel).
- Invariant recognition: top-1 identity retrieval across poses (see recognition.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from dcign_fast.bounds import described
from dcign_fast.data.seeds import EVAL_SWEEPS, stream_generator
from dcign_fast.data.sweeps import images_and_factors
from dcign_fast.eval.inference import check_images, model_input
from dcign_fast.models import DCIGN, DCIGNConfig

EXTRINSIC = ("azimuth", "elevation", "light")
SWEEP_FACTORS = (*EXTRINSIC, "identity")  # the factors evaluation reads from each sweep
MIG_BINS = 20


def zscore(values: torch.Tensor) -> torch.Tensor:
    """[n] -> [n] float64 z-scores; zeros for a sweep with no spread (one image, or a latent that never moves).

    In float64 the mean of a constant float32 vector is that constant exactly, so a flat sweep gives exact
    zeros (in float32 a rounding residue, divided by a clamped std, gave scores near 1). The population std
    (not n - 1) keeps one-image sweeps finite and leaves the pooled r of equal-length sweeps unchanged.
    """
    centred = values.double() - values.double().mean()
    return centred / centred.square().mean().sqrt().clamp_min(1e-12)


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson's r of two [N] tensors, in float64 (0 where either is constant)."""
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-12))


def draw_sweep(
    model: DCIGN,
    batch: Callable[[str, torch.Generator], tuple],
    kind: str,
    generator: torch.Generator,
    what: str,
    factors_needed: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``batch(kind, generator)``'s (images, factors), checked against its contract (:func:`batch_contract`; the
    factors only when ``factors_needed``): else an error naming ``batch``, ``what`` it drew and the contract, at the
    first sweep that breaks it (torch's errors came after every sweep was encoded, and named no argument)."""
    images, factors = images_and_factors(batch(kind, generator), f"batch: {what}", batch_contract(model))
    try:
        check_images("images", images)
    except (TypeError, ValueError) as err:
        raise type(err)(f"batch: {what}'s {err}; {batch_contract(model)}") from None
    config = getattr(model, "config", None)  # (stand-in models have none)
    item = (config.in_channels, config.image_size, config.image_size) if isinstance(config, DCIGNConfig) else None
    if images.dim() != 4 or not len(images) or (item is not None and images.shape[1:] != item):
        raise ValueError(f"batch: {what}'s images have shape {tuple(images.shape)}; {batch_contract(model)}")
    if not factors_needed:
        return images, {}
    if not isinstance(factors, Mapping):
        raise TypeError(f"batch: {what}'s factors are a {type(factors).__name__}; {batch_contract(model)}")
    missing = [key for key in SWEEP_FACTORS if key not in factors]
    if missing:
        raise ValueError(f"batch: {what}'s factors lack {missing}; {batch_contract(model)}")
    for key in SWEEP_FACTORS:
        value = factors[key]
        if not isinstance(value, torch.Tensor) or value.shape != (len(images),):
            got = (
                f"has shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else f"is a {type(value).__name__}"
            )
            raise ValueError(f"batch: {what}'s factors[{key!r}] {got}; {batch_contract(model)}")
    return images, dict(factors)


def batch_contract(model: DCIGN) -> str:
    """What evaluation's ``batch`` callable must return, at ``model``'s image size."""
    config = getattr(model, "config", None)
    shape = "B, C, S, S"
    if isinstance(config, DCIGNConfig):
        shape = f"B, {config.in_channels}, {config.image_size}, {config.image_size}"
    return (
        f"batch(kind, generator) must return (images, factors): images a floating-point [{shape}] tensor in [0, 1] "
        f"with B >= 1, factors a dict with a [B] tensor for each of {list(SWEEP_FACTORS)}"
    )


@torch.no_grad()
def encode_sweeps(
    model: DCIGN,
    batch: Callable[[str, torch.Generator], tuple],
    kind: str,
    count: int,
    seed: int,
    first: int = 0,
) -> list[tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]:
    """Held-out sweeps ``first .. first + count - 1`` of one kind: (images, mu, factors) each, on the CPU.

    Each is checked (:func:`draw_sweep`) before the model encodes it. A ValueError when the model's latent means
    or the batch's extrinsic factors are not finite: every metric would be NaN (or, for a max over latents,
    depend on which latent held it) and eval.json invalid JSON.
    """
    sweeps = []
    for i in range(first, first + count):
        generator = stream_generator(EVAL_SWEEPS, seed, i, held_out=True)
        images, factors = draw_sweep(model, batch, kind, generator, f"its {kind} sweep {i}")
        mu, _ = model.encode(model_input(model, images))
        if not torch.isfinite(mu).all():
            raise ValueError(
                f"model: its latent means are not finite (NaN or inf) on held-out {kind} sweep {i}; "
                "its weights have diverged, evaluate an earlier checkpoint"
            )
        missing = [k for k in EXTRINSIC if not torch.isfinite(factors[k]).all()]
        if missing:
            raise ValueError(
                f"batch: the {kind} sweep's true factors {missing} are not finite; evaluation needs them "
                "(stored sweeps without a factors CSV have none)"
            )
        sweeps.append((images.cpu(), mu.float().cpu(), {k: v.cpu() for k, v in factors.items()}))
    return sweeps


def group_correlation(
    sweeps: list[tuple[torch.Tensor, torch.Tensor, dict]], latent_range: tuple[int, int], factor: str
) -> tuple[float, torch.Tensor, torch.Tensor]:
    """(|r| of pooled per-sweep z-scores, pooled latent z-scores, pooled factor z-scores)."""
    short = min(len(mu) for _, mu, _ in sweeps)
    if short < 3:  # (one image gave r = 0 silently; two, only the sign of each sweep's relation)
        raise ValueError(f"batch: its {factor} sweeps must hold 3 or more images for a correlation, got {short}")
    for i, (_, _, f) in enumerate(sweeps):
        if f[factor].min() == f[factor].max():  # (its z-scores would be zeros: r = 0, as of a model that failed)
            raise ValueError(
                f"batch: its {factor} sweep {i} does not vary {factor} (all {float(f[factor][0]):.4g}): a "
                f"{factor} sweep must vary its factor"
            )
    start, stop = latent_range
    latents = torch.cat([zscore(mu[:, start:stop].mean(dim=1)) for _, mu, _ in sweeps])
    truths = torch.cat([zscore(f[factor].float()) for _, _, f in sweeps])
    return abs(pearson(latents, truths)), latents, truths


def discrete_entropy(labels: torch.Tensor) -> float:
    """The entropy in nats of [N] integer labels' empirical distribution."""
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
    """Mutual Information Gap: mean over factors of (top-1 - top-2 latent MI) / H(factor).

    latents: [N, D] finite; factors: name -> [N], each varying (float: binned; integer: as labels).
    """
    if latents.dim() != 2 or not latents.shape[1]:
        raise ValueError(f"latents must be [N, D] with D >= 1, got shape {tuple(latents.shape)}")
    if not factors:
        raise ValueError("factors must name at least one factor, got none")
    if not torch.isfinite(latents).all():  # one NaN would put the whole latent in one bin, unnoticed
        raise ValueError("latents: mig needs finite values, got NaN or inf")
    for name, values in factors.items():
        if values.shape != latents.shape[:1]:
            raise ValueError(f"factors[{name!r}] must be [N] with latents' N = {len(latents)}, got {described(values)}")
        if values.is_floating_point() and not torch.isfinite(values).all():
            raise ValueError(f"factors[{name!r}]: mig needs finite values, got NaN or inf")
    codes = [binned(latents[:, j]) for j in range(latents.shape[1])]
    gaps = []
    for name, values in factors.items():
        labels = values if not values.is_floating_point() else binned(values)
        entropy = discrete_entropy(labels)
        if entropy <= 0:
            raise ValueError(f"factors[{name!r}] is constant: a gap normalised by its entropy (0) is undefined")
        mi = sorted((mutual_information(code, labels) for code in codes), reverse=True)
        gaps.append((mi[0] - (mi[1] if len(mi) > 1 else 0.0)) / entropy)
    return float(sum(gaps) / len(gaps))
