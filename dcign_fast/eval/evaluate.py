"""``evaluate(model, ...)``: every disentanglement metric on held-out sweeps, as JSON and plots.

``correlation[group]`` scores the latents the graphics code assigns to the group; ``best_single_latent``
the best |r| of any one latent with that factor (how a plain VAE is fairly compared).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from dcign_fast.bounds import Bounds
from dcign_fast.data.seeds import EVAL_RECONSTRUCTION, stream_generator
from dcign_fast.eval.grid import output_folder
from dcign_fast.eval.inference import check_model, eval_mode, model_input, require_groups
from dcign_fast.eval.metrics import EXTRINSIC, draw_sweep, encode_sweeps, group_correlation, mig
from dcign_fast.eval.recognition import cross_pose_retrieval, distinct_identity_sweeps, relit_probes
from dcign_fast.models import DCIGN

# Evaluation's sweeps are held out by their generators (data/seeds.py: their seeds are odd, training's even),
# whatever this seed. Identities are not held out: evaluation draws from the same renderer identities as
# training.
EVAL_SEED = 1_000_003


@torch.no_grad()
def evaluate(
    model: DCIGN,
    batch: Callable[[str, torch.Generator], tuple] | None = None,
    out: str | Path | None = None,
    sweeps: int = 40,
    identities: int = 100,
    seed: int = EVAL_SEED,
    checkpoint: str | Path | None = None,
) -> dict:
    """Metrics of ``model`` on held-out one-factor sweeps drawn by ``batch(kind, generator)``
    (default: the built-in renderer at the model's size), which must return (images [B, C, S, S] in [0, 1] at the
    model's size, factors: a dict with a [B] tensor for each of "azimuth", "elevation", "light" and "identity");
    each sweep is checked before it is encoded. ``seed``: an int. Writes eval.json and scatter.png to ``out``
    (a folder, made first); ``checkpoint``, where the model was loaded from, is recorded in eval.json.

    Returns:
        {"correlation": {group: |r|} per extrinsic group, "best_single_latent": {group: the best |r| of any one
        latent}, "sweeps_per_group": sweeps, "mig": the Mutual Information Gap, "reconstruction":
        {"bce_per_image", "mse_per_pixel"}, "identity_retrieval": {"intrinsic_latents", "raw_pixels" (top-1
        accuracies), "chance", "identities", "probe_view" (how the probes were made: recognition.py)}}, and
        "checkpoint" (its resolved path) when given.
    """
    check_model(model)
    require_groups(model, (*EXTRINSIC, "intrinsic"), "evaluate")
    for name, count in (("sweeps", sweeps), ("identities", identities)):
        Bounds(1).check(name, count, integer=True)
    Bounds(-math.inf).check("seed", seed, integer=True)  # (any int: stream_generator hashes it)
    seed = int(seed)
    if batch is not None and not callable(batch):
        raise TypeError(f"batch must be a callable, batch(kind, generator) -> (images, factors), got {batch!r}")
    if checkpoint is not None and not isinstance(checkpoint, (str, os.PathLike)):
        raise TypeError(f"checkpoint must be a path (str or Path), got {type(checkpoint).__name__}")
    from dcign_fast.data import SweepSampler

    with eval_mode(model):
        # The renderer behind batch, when it is one (None, or a SweepSampler's batch): it relights the probes.
        sampler = getattr(batch, "__self__", None)
        if batch is None:
            sampler = SweepSampler(size=model.config.image_size, device=next(model.parameters()).device)
            if identities > sampler.num_identities:  # refused now, not after thousands of sweeps drawn in vain
                raise ValueError(
                    f"identities must be at most the renderer's {sampler.num_identities}, got {identities}"
                )
            batch = sampler.batch
        if out is not None:  # made now: a file in its way is found before the evaluation, not after it
            out = output_folder("out", out)
        groups = model.config.latent_groups
        results: dict = {"correlation": {}, "best_single_latent": {}, "sweeps_per_group": sweeps}
        if checkpoint is not None:
            results = {"checkpoint": str(Path(checkpoint).resolve()), **results}
        scatter: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        pooled_mu: list[torch.Tensor] = []
        pooled_factors: dict[str, list[torch.Tensor]] = {}
        for kind in (*EXTRINSIC, "intrinsic"):
            encoded = encode_sweeps(model, batch, kind, sweeps, seed + len(scatter))
            if kind in EXTRINSIC:
                r, latents, truths = group_correlation(encoded, groups[kind], kind)
                results["correlation"][kind] = r
                scatter[kind] = (truths, latents)
                # The best any single latent does: a fair score for a model that was not told which latent to use.
                dims = range(model.config.latent_dim)
                results["best_single_latent"][kind] = max(group_correlation(encoded, (j, j + 1), kind)[0] for j in dims)
            for _, mu, factors in encoded:
                pooled_mu.append(mu)
                for key in EXTRINSIC:  # (not identity: see metrics.py)
                    pooled_factors.setdefault(key, []).append(factors[key])
        results["mig"] = mig(torch.cat(pooled_mu), {k: torch.cat(v) for k, v in pooled_factors.items()})
        results["reconstruction"] = reconstruction_errors(model, batch, seed)
        retrieval_sweeps = distinct_identity_sweeps(model, batch, identities, seed + 99)
        probes = None
        if isinstance(sampler, SweepSampler):
            probes = relit_probes(model, sampler, retrieval_sweeps, seed)
        results["identity_retrieval"] = cross_pose_retrieval(retrieval_sweeps, groups["intrinsic"], probes)
        if out is not None:
            (out / "eval.json").write_text(json.dumps(results, indent=2, allow_nan=False) + "\n")
            plot_scatter(scatter, results["correlation"], out / "scatter.png")
        return results


@torch.no_grad()
def reconstruction_errors(model: DCIGN, batch: Callable, seed: int, count: int = 10) -> dict[str, float]:
    """Mean BCE per image and MSE per pixel of reconstructions from the latent means."""
    bce, mse, images_seen = 0.0, 0.0, 0
    for i, kind in enumerate(("azimuth", "elevation", "light", "intrinsic") * (count // 4 + 1)):
        if i == count:
            break
        generator = stream_generator(EVAL_RECONSTRUCTION, seed, i, held_out=True)
        images = draw_sweep(model, batch, kind, generator, f"its {kind} sweep {i}", factors_needed=False)[0]
        # From the logits in float32: a 16-bit sigmoid rounds to exactly 1 from a logit of ~7 on, where the BCE of
        # a pixel below 1 is log(0), clamped to -100 (a bfloat16 model's BCE was 12x its float32 copy's).
        logits = model.decode_logits(model.encode(model_input(model, images))[0]).float()
        if not torch.isfinite(logits).all():
            raise ValueError(f"model: its reconstructions are not finite (NaN or inf) on held-out {kind} sweep {i}")
        images = images.to(logits.device).float()  # the float32 targets, not rounded to a 16-bit model's dtype
        bce += F.binary_cross_entropy_with_logits(logits, images, reduction="sum").item()
        mse += F.mse_loss(torch.sigmoid(logits), images, reduction="sum").item() / images[0].numel()
        images_seen += len(images)
    return {"bce_per_image": bce / images_seen, "mse_per_pixel": mse / images_seen}


def plot_scatter(scatter: dict, correlation: dict, path: Path) -> None:
    """Inferred vs true factor (per-sweep z-scores), one panel per extrinsic group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(scatter), figsize=(4 * len(scatter), 4))
    for ax, (group, (truth, latent)) in zip(axes, scatter.items()):
        ax.scatter(truth.numpy(), latent.numpy(), s=4, alpha=0.5)
        ax.set_title(f"{group}: |r| = {correlation[group]:.3f}")
        ax.set_xlabel(f"true {group} (z-score within sweep)")
        ax.set_ylabel(f"z[{group}] (z-score within sweep)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
