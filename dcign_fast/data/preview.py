"""A labelled grid PNG with one row per sweep kind, to check renders by eye."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from dcign_fast.data.sweeps import KINDS, SweepSampler

_LABEL_WIDTH = 230
_SWEPT = {"azimuth": "azimuth", "elevation": "elevation", "light": "light", "intrinsic": "identity"}


def preview_grid(sampler: SweepSampler, path: str | Path, seed: int = 0, scale: int = 2) -> Path:
    """Render one batch of each kind and save them as rows of a grid, each row labelled with its kind,
    the swept factor's range and the fixed factors. Images are enlarged ``scale`` times (nearest), or more
    where a row would be shorter than its label (small sizes)."""
    rows, labels = [], []
    for i, kind in enumerate(KINDS):
        images, factors, _ = sampler.batch(kind, torch.Generator().manual_seed(seed * len(KINDS) + i))
        rows.append(torch.cat(list(images[:, 0].cpu()), dim=1))
        labels.append(_label(kind, {k: v.cpu() for k, v in factors.items()}))
    grid = (torch.cat(rows, dim=0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    measure = ImageDraw.Draw(Image.new("L", (1, 1)))
    label_height = math.ceil(max(measure.multiline_textbbox((0, 0), label)[3] for label in labels)) + 12
    scale = max(scale, -(-label_height // sampler.size))  # labels of neighbouring rows overlapped below ~40 px
    tile = sampler.size * scale
    picture = Image.fromarray(np.kron(grid, np.ones((scale, scale), dtype=np.uint8)))
    canvas = Image.new("L", (picture.width + _LABEL_WIDTH, picture.height), color=40)
    canvas.paste(picture, (_LABEL_WIDTH, 0))
    draw = ImageDraw.Draw(canvas)
    for i, label in enumerate(labels):
        draw.multiline_text((6, i * tile + 6), label, fill=255)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def _label(kind: str, factors: dict[str, torch.Tensor]) -> str:
    swept = _SWEPT[kind]
    lines = [f"{kind.upper()} sweep"]
    if swept == "identity":
        lines.append("identities " + ", ".join(str(i) for i in factors["identity"][:3].tolist()) + ", ...")
    else:
        values = factors[swept]
        lines.append(f"{swept} {values.min():+.2f} .. {values.max():+.2f} rad")
    for key in ("azimuth", "elevation", "light", "light_elevation", "identity"):
        if key != swept:
            lines.append(
                f"{key} = {factors[key][0].item():+.2f}" if key != "identity" else f"identity = {int(factors[key][0])}"
            )
    return "\n".join(lines)
