"""Sweeps as PNG folders in the original DC-IGN layout, written and read back.

Layout: ``<root>/<AZ_VARIED|EL_VARIED|LIGHT_AZ_VARIED|SHAPE_VARIED>/<batch folder>/<images>.png``, one
folder per batch. Our exports add ``factors.csv`` per batch (columns: file and FACTOR_KEYS). The
original DC-IGN face dataset has no CSV: its factors read back as NaN (identity -1). RGB images are
converted to grey as 0.21 R + 0.72 G + 0.07 B and resized to the requested size.
"""

from __future__ import annotations

import csv
import math
import operator
import re
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import SupportsIndex

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from dcign_fast.bounds import Bounds
from dcign_fast.data.sweeps import FACTOR_KEYS, KINDS, Batch

KIND_DIRS = {"azimuth": "AZ_VARIED", "elevation": "EL_VARIED", "light": "LIGHT_AZ_VARIED", "intrinsic": "SHAPE_VARIED"}
FACTORS_CSV = "factors.csv"
_GREY = np.array([0.21, 0.72, 0.07], dtype=np.float32)


class DatasetError(ValueError):
    """A dataset file or folder that cannot be used; the message names it."""


def batch_index(index: SupportsIndex, count: int) -> int:
    """``index`` of a dataset of ``count`` batches as a list reads it (negative from the end): a TypeError for a
    non-integer (numpy's integers serve), an IndexError naming the range for one outside it."""
    try:
        position = operator.index(index)
    except TypeError:
        raise TypeError(f"a batch index must be an integer, got {index!r}") from None
    if not -count <= position < count:
        raise IndexError(f"batch index {position} is out of range for {count} batches")
    return position % count


def write_batch(folder: Path, images: Tensor, factors: dict[str, Tensor]) -> None:
    """Write one batch: images [B, 1, S, S] in [0, 1] as 8-bit grey PNGs plus factors.csv."""
    folder.mkdir(parents=True, exist_ok=True)
    pixels = (images[:, 0].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    columns = {k: factors[k].cpu().tolist() for k in FACTOR_KEYS}
    with open(folder / FACTORS_CSV, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", *FACTOR_KEYS])
        for i, image in enumerate(pixels):
            name = f"{i:03d}.png"
            Image.fromarray(image).save(folder / name)
            writer.writerow([name, *(columns[k][i] for k in FACTOR_KEYS)])


def export_sweeps(batches: Iterable[Batch], root: str | Path, start: int = 0) -> int:
    """Write every batch of ``batches`` under ``root``; folder names count from ``start``. Returns the count."""
    root = Path(root)
    count = 0
    for count, (images, factors, kind) in enumerate(batches, start=1):
        write_batch(root / KIND_DIRS[kind] / f"batch_{start + count - 1:06d}", images, factors)
    return count


# White in each grey mode: 8 bits; 16 bits (PIL opens 16-bit PNGs as I;16 or I, TIFFs in either byte order);
# floating point, as in [0, 1].
_GREY_SCALE = {
    "L": 255.0,
    **{mode: 65535.0 for mode in ("I;16", "I;16B", "I;16L", "I;16N", "I")},
    "F": 1.0,
}
_EXIF_ORIENTATION = 0x0112


def read_grey(path: Path, size: int | None) -> np.ndarray:
    """One image as float32 grey in [0, 1], [size, size] (or native size when None). Names the file on error.
    Floating-point images are taken to be in [0, 1]; values outside are clipped. Transparent pixels are
    black, the renders' background; an image that is not square is centre-cropped to a square before it
    is resized, rather than stretched. A photo's EXIF orientation is applied (a phone's portrait JPEG is
    stored sideways)."""
    try:
        with Image.open(path) as opened:
            opened.load()
            upright = opened.getexif().get(_EXIF_ORIENTATION, 1) == 1
            image = opened if upright else ImageOps.exif_transpose(opened)
            if image.mode in _GREY_SCALE:
                raw = np.asarray(image.convert("F"), dtype=np.float32)
                grey = raw / _GREY_SCALE[image.mode]
                transparent = image.info.get("transparency")  # one grey level, in the image's own scale
                if isinstance(transparent, (int, float)):
                    grey[raw == transparent] = 0.0
            else:
                grey = np.asarray(_on_black(image), dtype=np.float32) @ _GREY / 255.0
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:  # (a bomb: over 2x PIL's pixels)
        raise DatasetError(f"cannot read image {path}: {err}") from err
    if size is not None and grey.shape != (size, size):
        grey = np.asarray(Image.fromarray(_centre_square(grey)).resize((size, size), Image.Resampling.BILINEAR))
    return np.clip(grey, 0.0, 1.0)


def _transparent(image: Image.Image) -> bool:
    """Whether some pixels may be transparent: an alpha channel, or a colour or palette entry marked so."""
    return image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info


def _on_black(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto black (convert("RGB") keeps whatever colour a transparent
    pixel stores)."""
    if _transparent(image):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def _centre_square(grey: np.ndarray) -> np.ndarray:
    rows, cols = grey.shape
    side = min(rows, cols)
    top, left = (rows - side) // 2, (cols - side) // 2
    return grey[top : top + side, left : left + side]


def _natural_key(path: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


class SweepFolders:
    """The PNG folder layout as a map-style dataset of whole batches (DataLoader(batch_size=None) works).

    root: dataset folder; size: output side (None: keep native sizes, which must then agree);
    kinds: which kinds to read; on_error: "raise" a DatasetError naming the file, or "skip" the batch,
    counting it in ``skipped`` (path, reason) and warning once per pass.
    Items are (images [B, 1, S, S] float in [0, 1], factors {FACTOR_KEYS: [B]}, kind).
    """

    def __init__(self, root: str | Path, size: int | None = 64, kinds: Iterable[str] = KINDS, on_error: str = "raise"):
        if on_error not in ("raise", "skip"):
            raise ValueError("on_error must be 'raise' or 'skip'")
        if size is not None:  # (checked here, not at the first image read)
            Bounds(1).check("size", size, integer=True)
        self.root, self.size, self.on_error = Path(root), size, on_error
        if not self.root.is_dir():
            raise DatasetError(f"dataset folder not found: {self.root}")
        if not isinstance(kinds, (str, Iterable)):
            raise TypeError(f"kinds must be a batch kind or a list of them, among {KINDS}, got {kinds!r}")
        kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)  # kinds="azimuth" means that one kind
        if not kinds or not all(isinstance(k, str) for k in kinds) or not set(kinds) <= set(KINDS):
            raise ValueError(f"kinds must name batch kinds among {KINDS}, got {kinds!r}")
        self.folders: list[tuple[Path, str]] = []
        for kind in kinds:
            kind_dir = self.root / KIND_DIRS[kind]
            if kind_dir.is_dir():
                subfolders = sorted((p for p in kind_dir.iterdir() if p.is_dir()), key=_natural_key)
                self.folders += [(p, kind) for p in subfolders]
        if not self.folders:
            expected = ", ".join(KIND_DIRS[k] for k in kinds)
            raise DatasetError(f"no batch folders under {self.root}: expected subfolders {expected}")
        self.skipped: list[tuple[Path, str]] = []
        self._native: tuple[int, int] | None = None

    def __len__(self) -> int:
        return len(self.folders)

    def kinds(self) -> list[str]:
        """The kind of every batch, in index order (as :meth:`SweepCache.kinds`)."""
        return [kind for _, kind in self.folders]

    def __getitem__(self, index: int) -> Batch:
        folder, kind = self.folders[batch_index(index, len(self))]
        files = sorted((p for p in folder.iterdir() if p.suffix.lower() == ".png"), key=_natural_key)
        if not files:
            raise DatasetError(f"batch folder has no PNG images: {folder}")
        images = []
        for path in files:
            image = read_grey(path, self.size)
            if self.size is None:
                self._native = self._native or image.shape
                if image.shape != self._native:
                    raise DatasetError(f"image {path} is {image.shape}, others are {self._native}; pass size=")
            images.append(image)
        factors = _read_factors(folder, [p.name for p in files])
        return torch.from_numpy(np.stack(images))[:, None], factors, kind

    def __iter__(self) -> Iterator[Batch]:
        skipped_before = len(self.skipped)
        for index in range(len(self)):
            try:
                yield self[index]
            except DatasetError as err:
                if self.on_error == "raise":
                    raise
                self.skipped.append((self.folders[index][0], str(err)))
        if len(self.skipped) > skipped_before:
            warnings.warn(
                f"skipped {len(self.skipped) - skipped_before} of {len(self)} batches under {self.root}; "
                f"first: {self.skipped[skipped_before][1]}",
                stacklevel=2,
            )


def _read_factors(folder: Path, names: list[str]) -> dict[str, Tensor]:
    """Factors of a batch from its factors.csv, in the order of ``names``; NaN / -1 without a CSV."""
    n = len(names)
    factors = {k: torch.full((n,), float("nan")) for k in FACTOR_KEYS if k != "identity"}
    factors["identity"] = torch.full((n,), -1, dtype=torch.int64)
    path = folder / FACTORS_CSV
    if not path.is_file():
        return factors
    try:
        # utf-8-sig: spreadsheets save "CSV UTF-8" with a byte-order mark, which would hide the "file" column.
        with open(path, newline="", encoding="utf-8-sig") as handle:
            listed = list(csv.DictReader(handle))
        rows = {row["file"]: row for row in listed}
        if len(rows) != len(listed):
            raise ValueError("a file is listed twice")
        for i, name in enumerate(names):
            for key in FACTOR_KEYS:
                value = float(rows[name][key])  # NaN stands for an unknown factor, as without a CSV
                if math.isinf(value) or (key == "identity" and not value.is_integer()):
                    raise ValueError(f"{key} of {name} is {rows[name][key]!r}")
                factors[key][i] = int(value) if key == "identity" else value
    except (KeyError, ValueError, TypeError) as err:
        raise DatasetError(f"bad factors file {path}: missing or invalid entry {err}") from err
    return factors
