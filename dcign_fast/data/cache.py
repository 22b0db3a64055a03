"""A sharded uint8 cache of sweep batches, for fast repeated epochs.

Layout: ``<dir>/index.json`` (size, shard list with batch counts) and ``<dir>/shard_00000.npz``, ...
Each shard holds ``images`` uint8 [N, S, S] (all images of its batches, in order), ``offsets`` int64
[n + 1] (batch i is images[offsets[i]:offsets[i + 1]]), ``kinds`` int8 [n] (index into KINDS) and one
[N] array per factor key. Grey levels are quantised to 1/255, like PNGs.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dcign_fast.bounds import Bounds
from dcign_fast.data.folders import DatasetError, batch_index
from dcign_fast.data.sweeps import FACTOR_KEYS, KINDS, Batch, device_argument

INDEX = "index.json"


def write_cache(batches: Iterable[Batch], out_dir: str | Path, batches_per_shard: int = 256) -> int:
    """Store ``batches`` as shards under ``out_dir``; returns the number of batches written.

    batches: (images [B, 1, S, S] floating point in [0, 1], factors {key: [B]} for every key of FACTOR_KEYS,
    kind in KINDS), as :class:`SweepSampler` and :class:`SweepFolders` give them; stored as uint8 pixels.
    """
    Bounds(1).check("batches_per_shard", batches_per_shard, integer=True)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards: list[dict] = []
    pending: list[Batch] = []
    size = None
    for number, (images, factors, kind) in enumerate(batches):
        _check_batch(f"batches[{number}]", images, factors, kind)
        if size is not None and images.shape[-1] != size:
            raise ValueError(f"batch of size {images.shape[-1]} in a cache of size {size}")
        size = images.shape[-1]
        # As uint8 on the CPU at once: a shard's worth of float32 batches held 4x the memory (on the GPU, too).
        pending.append(((images * 255).round().to(torch.uint8).cpu(), factors, kind))
        if len(pending) == batches_per_shard:
            shards.append(_write_shard(out_dir, len(shards), pending))
            pending = []
    if pending:
        shards.append(_write_shard(out_dir, len(shards), pending))
    if not shards:  # an index of no size would be refused on reading
        raise ValueError("batches is empty: a cache needs at least one batch")
    (out_dir / INDEX).write_text(json.dumps({"size": size, "shards": shards}, indent=1) + "\n")
    return sum(s["batches"] for s in shards)


def _check_batch(name: str, images: object, factors: object, kind: object) -> None:
    """A ValueError naming batch ``name`` unless it is what :func:`write_cache` stores: pixels outside [0, 1]
    (0..255 values, NaN) would be stored clipped, without a word."""
    if not (isinstance(images, torch.Tensor) and images.is_floating_point() and images.dim() == 4):
        got = (
            f"{images.dtype} shape {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        )
        raise ValueError(f"{name}: images must be floating-point [B, 1, S, S], got {got}")
    if images.shape[1] != 1 or images.shape[2] != images.shape[3]:
        raise ValueError(f"{name}: a cache holds square grey images [B, 1, S, S], got shape {tuple(images.shape)}")
    if images.shape[0] == 0 or images.shape[2] == 0:  # (the reader refuses a batch of no images)
        raise ValueError(f"{name}: images must be one or more images of one or more pixels, got {tuple(images.shape)}")
    if not bool(((images >= 0) & (images <= 1)).all()):  # (NaN fails both)
        raise ValueError(f"{name}: images must lie in [0, 1] (0..255 pixels: divide by 255), and be free of NaN")
    if kind not in KINDS:
        raise ValueError(f"{name}: kind must be one of {KINDS}, got {kind!r}")
    for key in FACTOR_KEYS:
        value = factors.get(key) if isinstance(factors, dict) else None
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != (len(images),):
            got = f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(
                f"{name}: factors must map each of {FACTOR_KEYS} to a [B] tensor, B = {len(images)}; {key!r} is {got}"
            )


def _write_shard(out_dir: Path, number: int, batches: list[Batch]) -> dict:
    """One shard of ``batches`` (their images already uint8 [B, 1, S, S] on the CPU); returns its index entry."""
    name = f"shard_{number:05d}.npz"
    arrays: dict[str, Any] = {
        "images": torch.cat([b[0][:, 0] for b in batches]).numpy(),
        "offsets": np.cumsum([0] + [len(b[0]) for b in batches]),
        "kinds": np.array([KINDS.index(b[2]) for b in batches], dtype=np.int8),
    }
    for key in FACTOR_KEYS:
        arrays[key] = torch.cat([b[1][key].cpu() for b in batches]).numpy()
    np.savez(out_dir / name, **arrays)  # uncompressed: loading speed matters more than disk
    return {"file": name, "batches": len(batches)}


def is_cache(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by :func:`write_cache` (it holds the index)."""
    return (Path(path) / INDEX).is_file()


class SweepCache:
    """Read a cache written by :func:`write_cache` as a map-style dataset of batches.

    device: where images and factors go ('auto': a GPU when there is one). Keeps the most recently used shard
    in memory, so reading in order (or shuffling shard by shard, see :meth:`epoch`) loads each shard once;
    ``keep_shards=True`` keeps every shard once read (uint8: a quarter of the images' float32 size), for random
    access.
    """

    def __init__(self, cache_dir: str | Path, device: torch.device | str = "cpu", keep_shards: bool = False):
        self.dir, self.device, self.keep_shards = Path(cache_dir), device_argument(device), keep_shards
        index_path = self.dir / INDEX
        try:
            index = json.loads(index_path.read_text())
            self.size = int(index["size"])
            self.shards = [(str(s["file"]), int(s["batches"])) for s in index["shards"]]
            if self.size < 1 or not self.shards or min(n for _, n in self.shards) < 1:
                raise ValueError("its size, its number of shards and each shard's batches must be >= 1")
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise DatasetError(f"cannot read cache index {index_path}: {err}") from err
        self.starts = np.cumsum([0] + [n for _, n in self.shards])
        self._loaded: dict[int, dict[str, np.ndarray]] = {}

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _read(self, number: int, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
        """Arrays ``keys`` of shard ``number`` (an .npz reads only the members asked for)."""
        path = self.dir / self.shards[number][0]
        try:
            with np.load(path) as data:
                arrays = {k: data[k] for k in keys}
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as err:
            raise DatasetError(f"cannot read cache shard {path}: {err}") from err
        images, kinds = arrays.get("images"), arrays["kinds"]
        if kinds.dtype.kind not in "iu":  # (0.7 was read as kind 0)
            raise DatasetError(f"cache shard {path}: batch kinds must be integers, got {kinds.dtype}")
        if len(kinds) != self.shards[number][1] or (images is not None and images.shape[1:] != (self.size, self.size)):
            raise DatasetError(f"cache shard {path} does not match {self.dir / INDEX}")
        outside = sorted({int(k) for k in kinds if not 0 <= k < len(KINDS)})
        if outside:
            raise DatasetError(f"cache shard {path}: batch kinds must index {KINDS}, got {outside}")
        if images is not None:  # a shard read whole: every batch's images and factors must line up
            if images.dtype != np.uint8:  # read as pixels / 255: floats in [0, 1] would train on black images
                raise DatasetError(f"cache shard {path}: images must be uint8 pixels, got {images.dtype}")
            offsets = arrays["offsets"]
            lined_up = len(offsets) == len(kinds) + 1 and offsets[0] == 0 and offsets[-1] == len(images)
            if not lined_up or (np.diff(offsets) <= 0).any():
                raise DatasetError(
                    f"cache shard {path}: offsets do not split its {len(images)} images into batches of one or more"
                )
            short = [k for k in FACTOR_KEYS if len(arrays[k]) != len(images)]
            if short:
                raise DatasetError(f"cache shard {path}: factors {short} do not have one value per image")
            # Identities are integers (float ones were read as float64); the others numbers (text failed unnamed).
            wrong = [k for k in FACTOR_KEYS if arrays[k].dtype.kind not in ("iu" if k == "identity" else "iuf")]
            if wrong:
                raise DatasetError(
                    f"cache shard {path}: factors {wrong} must be numbers (identity: integers), got "
                    f"{[str(arrays[k].dtype) for k in wrong]}"
                )
        return arrays

    def _shard(self, number: int) -> dict[str, np.ndarray]:
        if number not in self._loaded:
            if not self.keep_shards:
                self._loaded.clear()
            self._loaded[number] = self._read(number, ("images", "offsets", "kinds", *FACTOR_KEYS))
        return self._loaded[number]

    def load_all(self) -> None:
        """Reads every shard now and keeps it (``keep_shards``): processes forked after (the trainer's data
        workers) then share one copy of it, instead of each reading and keeping its own."""
        self.keep_shards = True
        for number in range(len(self.shards)):
            self._shard(number)

    def kinds(self) -> list[str]:
        """The kind of every batch, in index order (reads only the shards' kind arrays)."""
        return [
            KINDS[int(k)]
            for number in range(len(self.shards))
            for k in (self._loaded.get(number) or self._read(number, ("kinds",)))["kinds"]
        ]

    def __getitem__(self, index: int) -> Batch:
        index = batch_index(index, len(self))
        number = int(np.searchsorted(self.starts, index, side="right")) - 1
        arrays, local = self._shard(number), index - int(self.starts[number])
        lo, hi = int(arrays["offsets"][local]), int(arrays["offsets"][local + 1])
        images = torch.from_numpy(arrays["images"][lo:hi]).to(self.device)[:, None].float() / 255.0
        factors = {k: torch.from_numpy(arrays[k][lo:hi]).to(self.device) for k in FACTOR_KEYS}
        return images, factors, KINDS[int(arrays["kinds"][local])]

    def __iter__(self) -> Iterator[Batch]:
        return (self[i] for i in range(len(self)))

    def epoch(self, seed: int) -> Iterator[Batch]:
        """All batches once in a seed-determined order: shards shuffled, then batches within each."""
        g = torch.Generator().manual_seed(seed)
        for number in torch.randperm(len(self.shards), generator=g).tolist():
            start = int(self.starts[number])
            for local in torch.randperm(self.shards[number][1], generator=g).tolist():
                yield self[start + local]
