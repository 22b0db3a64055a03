"""Renderer throughput: images per second of the z-buffer rasteriser and of the sweep sampler.

Cases: ``render`` draws one mesh (meshmonk, 14,050 faces) at random poses and lights, batch 64, at
64 / 128 / 150 px; ``sampler`` is SweepSampler end to end (kind draw, identity deformation, all
three scans) at batch 20. Targets on a 2-core CPU: >= 500 img/s at 64 px, >= 240 img/s at 128 px.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from benchmarks.harness import time_side_by_side
from dcign_fast.data import SweepSampler, load_asset, render


def render_runner(device: str, size: int, batch: int, antialias: int = 1) -> tuple[Callable[[], torch.Tensor], int]:
    """(a function that renders one batch of meshmonk at random poses and lights, its face count)."""
    mesh = load_asset("meshmonk").to(device)
    g = torch.Generator().manual_seed(0)
    pose: dict[str, Any] = {  # Any: render's other keywords take other types
        "azimuth": (torch.rand(batch, generator=g) * 2 - 1) * 1.5,
        "elevation": (torch.rand(batch, generator=g) * 2 - 1) * 0.4,
        "light_azimuth": (torch.rand(batch, generator=g) * 2 - 1) * 1.4,
        "light_elevation": torch.rand(batch, generator=g) * 0.4,
    }
    pose = {k: v.to(device) for k, v in pose.items()}

    def draw() -> torch.Tensor:
        return render(
            mesh.vertices, mesh.faces, **pose, size=size, incident=mesh.incident, zoom=1.4, antialias=antialias
        )

    return draw, mesh.num_faces


BACKEND = "torch"  # the rows' one backend: the renderer has no other
SAMPLER_BATCH = 20


def render_cases(quick: bool) -> list[tuple[int, int, int]]:
    """(size, batch, antialias) of the ``render`` rows, the pytest-benchmark front door's too."""
    if quick:
        return [(64, 16, 1)]
    return [(size, 64, antialias) for size, antialias in ((64, 1), (128, 1), (150, 1), (64, 2))]


def sampler_cases(quick: bool) -> list[tuple[int, int]]:
    """(size, batches drawn per timed call) of the ``sampler`` rows: a row is the time per batch, averaged over
    the call's batches, as the kinds of batch differ in cost."""
    return [(64, 2)] if quick else [(64, 8), (128, 4)]


def render_row(size: int, batch: int, antialias: int) -> dict:
    """The fields that name a ``render`` row (and its pytest-benchmark group)."""
    aa = f" antialias {antialias}" if antialias > 1 else ""
    return {"case": f"render {size}px batch {batch}{aa}"}


def sampler_row(size: int) -> dict:
    """The fields that name a ``sampler`` row (and its pytest-benchmark group)."""
    return {"case": f"sampler {size}px batch {SAMPLER_BATCH}"}


def sampler_runner(device: str, size: int, batches: int) -> Callable[[], None]:
    """A function that draws the next ``batches`` batches of a fresh SweepSampler (each call new ones)."""
    sampler = SweepSampler(size=size, batch_size=SAMPLER_BATCH, seed=0, device=device)
    index = iter(range(10**9))

    def draw() -> None:
        for _ in range(batches):
            sampler.batch_at(next(index))

    return draw


def _render_case(device: str, size: int, batch: int, antialias: int) -> dict:
    draw, faces = render_runner(device, size, batch, antialias)
    ms = time_side_by_side({BACKEND: draw}, device)[BACKEND]
    return {
        **render_row(size, batch, antialias),
        "backend": BACKEND,
        "median_ms": ms,
        "images_per_s": batch * 1e3 / ms,
        "faces": faces,
        "note": f"{batch * 1e3 / ms:.0f} img/s, {faces} faces",
    }


def _sampler_case(device: str, size: int, batches: int) -> dict:
    draw = sampler_runner(device, size, batches)
    ms = time_side_by_side({BACKEND: draw}, device, warmup=1, repeats=5)[BACKEND] / batches
    return {
        **sampler_row(size),
        "backend": BACKEND,
        "median_ms": ms,
        "images_per_s": SAMPLER_BATCH * 1e3 / ms,
        "note": f"{SAMPLER_BATCH * 1e3 / ms:.0f} img/s, mixed kinds 1:1:1:10",
    }


def run(device: str, quick: bool) -> Iterator[dict]:
    """Rows with case, backend, median_ms (per batch), images_per_s, one case at a time."""
    for size, batch, antialias in render_cases(quick):
        yield _render_case(device, size, batch, antialias)
    for size, batches in sampler_cases(quick):
        yield _sampler_case(device, size, batches)
