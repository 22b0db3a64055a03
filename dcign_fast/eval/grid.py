"""Labelled image grids as PNG: one row per label, images in [0, 1]."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

LABEL_WIDTH = 110
PAD = 2


def grid_image(rows: list[torch.Tensor], labels: list[str], scale: int = 1) -> Image.Image:
    """rows: each [N, 1 or 3, S, S] in [0, 1] (N may differ per row) -> one labelled RGB picture."""
    if len(rows) != len(labels):
        raise ValueError(f"got {len(rows)} rows but {len(labels)} labels")
    size = rows[0].shape[-1] * scale
    columns = max(r.shape[0] for r in rows)
    width = LABEL_WIDTH + columns * (size + PAD)
    canvas = Image.new("RGB", (width, len(rows) * (size + PAD) + PAD), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (row, label) in enumerate(zip(rows, labels)):
        top = PAD + i * (size + PAD)
        draw.text((4, top + size // 2 - 6), label, fill="black")
        pixels = (row.detach().float().clamp(0, 1).cpu() * 255).round().to(torch.uint8)
        for j, image in enumerate(pixels):
            array = image.expand(3, -1, -1).permute(1, 2, 0).numpy()  # grey -> RGB; RGB unchanged
            tile = Image.fromarray(np.ascontiguousarray(array)).resize((size, size), Image.Resampling.NEAREST)
            canvas.paste(tile, (LABEL_WIDTH + j * (size + PAD), top))
    return canvas


def save_grid(path: str | Path, rows: list[torch.Tensor], labels: list[str], scale: int = 1) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid_image(rows, labels, scale).save(path)
    return path
