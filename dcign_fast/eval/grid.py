"""Labelled image grids as PNG: one row per label, images in [0, 1]."""

from __future__ import annotations

import os
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
    """Writes :func:`grid_image` of ``rows`` (each [N, 1 or 3, S, S] in [0, 1]) to ``path``; returns it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid_image(rows, labels, scale).save(path)
    return path


def output_folder(name: str, folder: object) -> Path:
    """``folder`` (a str or Path) made if missing, as a Path; a TypeError or ValueError naming ``name`` if it is
    not a path or cannot be made (a file stands in its way, no permission). For a writer to call before its
    computation, not after it."""
    folder = Path(_text_path(name, folder, "a str or Path of a folder"))
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"{name}: cannot make the folder {str(folder)!r}: {err.strerror or err}") from None
    return folder


def image_path(name: str, path: object) -> Path:
    """``path`` as a Path to write a picture to: its extension one PIL writes (the command line's ``--out`` rule),
    its folder made now. A TypeError or ValueError naming ``name`` otherwise, before anything is computed (PIL
    would refuse the extension only when the picture is saved)."""
    text = _text_path(name, path, "a str or Path of an image file (.png...)")
    if problem := image_file_problem(text):
        raise ValueError(f"{name} {problem}")
    output_folder(f"{name}'s folder", Path(text).parent)
    return Path(text)


def image_file_problem(text: str) -> str | None:
    """What keeps ``text`` from naming a picture to write (a folder, an extension PIL does not write), else None."""
    path = Path(text)
    if path.is_dir():
        return f"must be a file to write, got the folder {text!r}"
    if Image.registered_extensions().get(path.suffix.lower()) not in Image.SAVE:
        return f"must end in an image extension such as .png, got {text!r}"
    return None


def _text_path(name: str, value: object, what: str) -> str:
    if not isinstance(value, (str, os.PathLike)) or not isinstance(os.fspath(value), str):
        raise TypeError(f"{name} must be {what}, got {type(value).__name__}")
    return os.fspath(value)
