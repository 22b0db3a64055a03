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


def _render_case(device: str, size: int, batch: int, antialias: int = 1) -> dict:
    draw, faces = render_runner(device, size, batch, antialias)
    ms = time_side_by_side({"torch": draw}, device)["torch"]
    aa = f" antialias {antialias}" if antialias > 1 else ""
    return {
        "case": f"render {size}px batch {batch}{aa}",
        "backend": "torch",
        "median_ms": ms,
        "images_per_s": batch * 1e3 / ms,
        "faces": faces,
        "note": f"{batch * 1e3 / ms:.0f} img/s, {faces} faces",
    }


def _sampler_case(device: str, size: int, batches: int) -> dict:
    sampler = SweepSampler(size=size, batch_size=20, seed=0, device=device)
    index = iter(range(10**9))

    def draw() -> None:
        for _ in range(batches):
            sampler.batch_at(next(index))

    ms = time_side_by_side({"torch": draw}, device, warmup=1, repeats=5)["torch"] / batches
    return {
        "case": f"sampler {size}px batch 20",
        "backend": "torch",
        "median_ms": ms,
        "images_per_s": 20 * 1e3 / ms,
        "note": f"{20 * 1e3 / ms:.0f} img/s, mixed kinds 1:1:1:10",
    }


def run(device: str, quick: bool) -> Iterator[dict]:
    """Rows with case, backend, median_ms (per batch), images_per_s, one case at a time."""
    if quick:
        yield _render_case(device, 64, 16)
        yield _sampler_case(device, 64, 2)
        return
    for size, antialias in ((64, 1), (128, 1), (150, 1), (64, 2)):
        yield _render_case(device, size, 64, antialias=antialias)
    yield _sampler_case(device, 64, 8)
    yield _sampler_case(device, 128, 4)
