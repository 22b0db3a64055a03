"""The trainer's batches: a pure function of (seed, step, shard), so a resumed or distributed run sees
exactly the batches an uninterrupted single run would.

A shard is one sweep batch of a step: ``shard = rank * accumulation + micro_batch``. One process that
accumulates two sweeps therefore sees the same sweeps as two ranks with one each, as long as sweeps are
rendered per step: a pool (``data_pool > 0``) is rendered per rank, so more ranks draw from more sweeps.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from dcign_fast.data.seeds import BATCHES, LATENT_NOISE, POOL, stream_generator
from dcign_fast.data.sweeps import images_and_factors
from dcign_fast.train.config import TrainConfig
from dcign_fast.train.contrast import split_contrast_images, with_contrast_images
from dcign_fast.train.procedure import KINDS, kind_odds

Batch = tuple[torch.Tensor, dict[str, torch.Tensor], str]


def dataset_location(data: str) -> str:
    """``data`` as a resume compares it: "render", or the absolute path of the folder it names (so that
    data/png, data/png/ and ./data/png are one dataset, and a checkpoint records where it is)."""
    return data if data == "render" else str(Path(data).resolve())


def default_source(config: TrainConfig, image_size: int, device: torch.device) -> tuple[Callable, tuple[str, ...]]:
    """(render(kind, generator) -> (images, factors), the kinds it has): the built-in renderer, or stored
    batches when ``config.data`` is a path: folders in the DC-IGN layout, or a cache (``render --format
    cache``, held in memory as uint8 once read)."""
    if config.data == "render":
        from dcign_fast.data import KINDS, SweepSampler

        # Only sampler.batch is used, with the trainer's generators: the sampler's own seeded stream is not.
        sampler = SweepSampler(size=image_size, batch_size=config.batch_size, device=device)
        if config.identity_contrast:
            return with_contrast_images(
                sampler, config.contrast_identities, config.contrast_views, config.contrast_mixed_views
            ), KINDS
        return sampler.batch, KINDS
    from dcign_fast.data.cache import INDEX, SweepCache, is_cache
    from dcign_fast.data.folders import DatasetError, SweepFolders

    dataset: SweepCache | SweepFolders
    if is_cache(config.data):
        dataset = SweepCache(config.data, keep_shards=True)
        if dataset.size != image_size:  # a cache is read as stored: resizing every batch would cost more
            raise ValueError(
                f"data={config.data} holds {dataset.size}px images but this model takes {image_size}px: "
                f"render a cache with --size {image_size}"
            )
        if config.data_workers:
            dataset.load_all()  # before the workers are forked, which then share it
    elif any(Path(config.data).glob("shard_*.npz")):  # the index is written last: the cache's writing stopped
        raise DatasetError(
            f"data={config.data} holds cache shards but no {INDEX}: its render --format cache did not finish; "
            "render it again"
        )
    else:
        dataset = SweepFolders(config.data, size=image_size)
    by_kind: dict[str, list[int]] = {}
    for index, kind in enumerate(dataset.kinds()):
        by_kind.setdefault(kind, []).append(index)

    def pick(kind: str, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        choices = by_kind[kind]
        images, factors = dataset[choices[int(torch.randint(len(choices), (1,), generator=generator))]][:2]
        if len(images) != config.batch_size:
            warnings.warn(
                f"batch_size={config.batch_size} does not apply to data={config.data}: its sweeps are used "
                f"whole ({len(images)} images here)",
                stacklevel=2,
            )
        return images, factors

    return pick, tuple(by_kind)


def shard_generator(seed: int, step: int, shard: int) -> torch.Generator:
    """The CPU generator of one shard's batch at one step of a run."""
    return stream_generator(BATCHES, seed, step, shard)


def latent_seed(seed: int, step: int, shard: int) -> int:
    """The latent sampler's Philox seed for one shard (independent of the data draw)."""
    return int(torch.randint(0, 2**62, (1,), generator=stream_generator(LATENT_NOISE, seed, step, shard)).item())


def checked_sweep(sweep: object, kind: str, source: str, disentangle: bool) -> tuple[torch.Tensor, dict]:
    """``sweep``, what ``source`` gave for a ``kind`` sweep, as the trainer takes it: (images [B, C, S, S],
    factors dict) with B >= 1, and B >= 2 with ``disentangle`` (as TrainConfig refuses batch_size=1: one image
    has no batch mean to clamp to); values after those two (SweepSampler.batch's kind) are ignored. A TypeError
    or ValueError naming ``source`` otherwise; the model checks the images' size, dtype and values."""
    images, factors = images_and_factors(
        sweep, f"{source}'s {kind} sweep", f"{source} must return (images [B, 1, S, S], factors dict)"
    )
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{source} must return images as a tensor [B, 1, S, S], got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(f"{source} must return images as a tensor [B, 1, S, S], got shape {tuple(images.shape)}")
    if not isinstance(factors, dict):
        raise TypeError(f"{source} must return factors as a dict of [B] tensors, got {type(factors).__name__}")
    if not len(images):
        raise ValueError(f"{source} gave an empty {kind} sweep (0 images)")
    if disentangle and len(images) == 1:
        raise ValueError(
            f"{source} gave a {kind} sweep of 1 image: with disentangle=true a sweep needs 2 or more (one image has "
            "no batch mean to clamp to)"
        )
    return images, factors


class BatchStream:
    """Draws the kind of each batch with the procedure's odds and renders (or picks) a sweep of it.

    ``render(kind, generator)`` returns (images [B, 1, S, S], factors dict of [B] tensors), checked as
    :func:`checked_sweep` says (``source`` names it in errors). With
    ``pool > 0``, ``pool`` sweeps per kind are rendered once up front (deterministically from the seed
    and rank) and batches are drawn from them: rendering then costs nothing per step. ``kinds`` limits
    the kinds to those the source has (e.g. a folder dataset without light sweeps).
    """

    def __init__(
        self,
        render: Callable[[str, torch.Generator], tuple[torch.Tensor, dict[str, torch.Tensor]]],
        config: TrainConfig,
        rank: int = 0,
        kinds: tuple[str, ...] | None = None,
        show_progress: bool = True,
        source: str = "render(kind, generator)",
    ) -> None:
        self.render = lambda kind, generator: checked_sweep(render(kind, generator), kind, source, config.disentangle)
        self.config = config
        odds = kind_odds(config)
        self.kinds = [k for k in KINDS if odds[k] > 0 and (kinds is None or k in kinds)]
        if not self.kinds:
            raise ValueError(f"no batch kind both has data ({kinds}) and a positive weight ({odds})")
        self.probabilities = torch.tensor([odds[k] for k in self.kinds], dtype=torch.float64)
        self.pool: dict[str, list[tuple[torch.Tensor, dict[str, torch.Tensor]]]] = {}
        if config.data_pool > 0:
            work = [(k, i) for k in self.kinds for i in range(config.data_pool)]
            self.pool = {k: [] for k in self.kinds}
            for kind, i in tqdm(work, desc="rendering the training pool", disable=not show_progress, leave=False):
                generator = stream_generator(POOL, config.seed, KINDS.index(kind), i, rank)
                self.pool[kind].append(self.render(kind, generator))

    def sweep_of(self, images: torch.Tensor, kind: str) -> torch.Tensor:
        """The sweep's own images among a drawn ``kind`` sweep's ``images``: without the other identities that
        identity contrast appends to an extrinsic sweep's."""
        return split_contrast_images(images, kind, self.config)[0]

    def batch(self, step: int, shard: int) -> Batch:
        generator = shard_generator(self.config.seed, step, shard)
        kind = self.kinds[int(torch.multinomial(self.probabilities, 1, generator=generator).item())]
        if self.pool:
            index = int(torch.randint(0, len(self.pool[kind]), (1,), generator=generator).item())
            images, factors = self.pool[kind][index]
        else:
            images, factors = self.render(kind, generator)
        return images, factors, kind
