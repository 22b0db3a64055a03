"""End-to-end training steps (forward, backward, Adam) of DC-IGN's one-factor procedure.

Variants, timed side by side: ``eager reference`` (every op's reference backend: what a plain PyTorch
port does), ``compiled reference`` (torch.compile of that model; default and max-autotune on CUDA),
``dcign_fast`` (backend="auto") and ``dcign_fast compiled``. Reports images/s, the speedup over the
eager reference and peak memory (CUDA). Steps train on a fixed random batch; a ``renderer`` row per case
says whether rendering the same sweep on the fly on that device would keep up with the fastest step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from benchmarks.harness import CompileBudget, compare, time_side_by_side
from dcign_fast.data import SweepSampler
from dcign_fast.models import DCIGN
from dcign_fast.train.procedure import active_mask

INVARIANCE = 0.01


def cases(device: str, quick: bool) -> list[tuple[str, int]]:
    if quick:
        return [("demo64", 8)]
    if device == "cpu":
        return [("demo64", 64), ("paper150", 20)]
    return [("demo64", 64), ("paper150", 20), ("paper150", 128)]


def _step(model: torch.nn.Module, images: torch.Tensor, bf16: bool) -> Callable[[], None]:
    core = getattr(model, "_orig_mod", model)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-4, betas=(0.9, 0.99))
    active = active_mask(core.config.latent_groups, "azimuth", core.config.latent_dim).to(images.device)

    def run() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=bf16):
            recon, mu, logvar, _, kl = model(images, active, invariance=INVARIANCE, seed=0, return_kl=True)
        core.loss(images, recon, mu, logvar, kl=kl)["total"].backward()
        optimizer.step()

    return run


def _models(preset: str, device: str, quick: bool) -> dict[str, torch.nn.Module]:
    def build(backend: str) -> torch.nn.Module:
        torch.manual_seed(0)
        model = DCIGN.from_preset(preset, backend=backend).to(device)
        return model.to(memory_format=torch.channels_last) if device == "cuda" else model

    models = {"eager reference": build("reference"), "dcign_fast": build("auto")}
    if not quick:
        models["compiled reference"] = torch.compile(build("reference"))
        if device == "cuda":
            models["compiled reference (max-autotune)"] = torch.compile(build("reference"), mode="max-autotune")
        models["dcign_fast compiled"] = torch.compile(build("auto"))
    return models


def run(device: str, quick: bool) -> Iterator[dict]:
    dtypes = [False] if device == "cpu" else [False, True]
    budget = CompileBudget(None if not quick else 0.0)
    repeats, warmup = (2, 1) if quick else (7, 3)
    for preset, batch in cases(device, quick):
        for bf16 in dtypes:
            models = _models(preset, device, quick)
            size = next(iter(models.values())).config.image_size if not quick else 64
            images = torch.rand(batch, 1, size, size, device=device)
            steps = {name: _step(model, images, bf16) for name, model in models.items()}
            row = {"case": f"{preset} b{batch} train step", "dtype": "bf16 autocast" if bf16 else "float32"}
            measured = compare(steps, device, row, "eager reference", warmup, repeats, budget)
            for r in measured:
                if "median_ms" in r:
                    r["images_per_s"] = batch / r["median_ms"] * 1e3
            yield from measured
            if not bf16:
                fastest = min(r["median_ms"] for r in measured if "median_ms" in r)
                yield _data_row(preset, batch, size, device, fastest)


def _data_row(preset: str, batch: int, size: int, device: str, step_ms: float) -> dict:
    """Does the built-in renderer keep up? One sweep batch rendered on the training device vs the step."""
    sampler = SweepSampler(size=size, batch_size=batch, device=device)
    counter = iter(range(10**9))
    ms = time_side_by_side({"r": lambda: sampler.batch_at(next(counter))}, device, warmup=1, repeats=3)["r"]
    verdict = "keeps up with" if ms <= step_ms else "would stall"
    return {
        "case": f"{preset} b{batch} data",
        "backend": "renderer",
        "median_ms": ms,
        "images_per_s": batch / ms * 1e3,
        "note": f"rendering on the fly {verdict} the fastest step ({step_ms:.3g} ms)",
    }
