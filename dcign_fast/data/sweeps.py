"""One-factor sweeps: DC-IGN training batches in which exactly one factor of variation changes.

Each batch is ``(images [B, 1, S, S] float in [0, 1], factors, kind)``. ``kind`` is one of KINDS:

- ``"azimuth"``: the head turns, everything else fixed;
- ``"elevation"``: the head tilts up/down;
- ``"light"``: the light's azimuth moves;
- ``"intrinsic"``: B different identities under one pose and light.

``factors`` maps stable keys to [B] tensors on the sampler's device:
``"azimuth"``, ``"elevation"``, ``"light"`` (light azimuth), ``"light_elevation"`` (all radians,
float32) and ``"identity"`` (int64; see :mod:`dcign_fast.data.identity`). Angle conventions are those
of :mod:`dcign_fast.data.render`: positive azimuth turns the nose toward image right, positive
elevation tilts the face up (nose up), positive light azimuth lights the image-right side.

Kinds are drawn with odds 1:1:1:shape_bias. Batch number i is fully determined by (seed, i): it draws
from its own generator, so a stream can be split across distributed ranks (rank r takes batches
r, r + world_size, ...) and any batch can be reproduced alone. Random numbers come from CPU generators
and rendering is deterministic, so ``device="cuda"`` gives the same batches as the CPU up to float
rounding.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from dcign_fast.bounds import FLOAT32_MAX, Bounds
from dcign_fast.data.identity import IdentitySpace, check_meshes
from dcign_fast.data.meshes import FACE_ASSETS, Mesh, load_asset
from dcign_fast.data.render import render
from dcign_fast.data.seeds import SWEEPS, stream_generator
from dcign_fast.devices import resolve_device

KINDS = ("azimuth", "elevation", "light", "intrinsic")
FACTOR_KEYS = ("azimuth", "elevation", "light", "light_elevation", "identity")
Batch = tuple[Tensor, dict[str, Tensor], str]


@dataclass(frozen=True)
class SweepRanges:
    """Half-widths (radians) of the uniform factor ranges, and the light elevation interval.

    Azimuth stays within +-1.5 rad (86 degrees, the paper's range): the face scans are open masks whose
    hollow back would show past 90 degrees. Elevation +-0.4 rad and light +-80 degrees follow the paper.
    """

    azimuth: float = 1.5
    elevation: float = 0.4
    light: float = 1.3963  # 80 degrees
    light_elevation: tuple[float, float] = (0.0, 0.4)

    def __post_init__(self) -> None:  # a NaN or reversed range rendered garbage without a word
        for name in ("azimuth", "elevation", "light"):
            Bounds(0).check(name, getattr(self, name))
        if not (isinstance(self.light_elevation, (tuple, list)) and len(self.light_elevation) == 2):
            raise ValueError(f"light_elevation must be a (low, high) pair, got {self.light_elevation!r}")
        low, high = self.light_elevation
        Bounds(-math.pi / 2).check("light_elevation[0]", low)
        Bounds(low).check("light_elevation[1]", high)

    def random_views(self, n: int, generator: torch.Generator | None) -> dict[str, Tensor]:
        """``n`` views drawn uniformly from the ranges, every factor on its own ([n] CPU tensors: elevation, light,
        light_elevation, azimuth; no identity). Azimuth is drawn last, so a caller that sets its own azimuth
        draws the others as it would without it."""

        def uniform(low: float, high: float) -> Tensor:
            return low + (high - low) * torch.rand(n, generator=generator)

        return {
            "elevation": uniform(-self.elevation, self.elevation),
            "light": uniform(-self.light, self.light),
            "light_elevation": uniform(*self.light_elevation),
            "azimuth": uniform(-self.azimuth, self.azimuth),
        }


def device_argument(device: object) -> torch.device:
    """:func:`resolve_device` for a ``device`` argument, a name or a torch.device; a TypeError naming it when it
    is neither (torch.device(3) means an accelerator's index, and failed without a name where there is none)."""
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a device name ('auto', cpu, cuda, cuda:N) or a torch.device, got {device!r}")
    return resolve_device(str(device), "device")


def images_and_factors(drawn: object, what: str, contract: str) -> tuple[Any, Any]:
    """(images, factors): the first two values a sweep source returned, as the trainer and evaluation read them,
    so that SweepSampler.batch's (images, factors, kind) and a renderer's (images, factors) both serve. A
    TypeError naming ``what`` was drawn and stating the source's ``contract`` when ``drawn`` is not a tuple or
    list of two or more values; the caller checks what the two are."""
    if isinstance(drawn, (tuple, list)) and len(drawn) >= 2:
        return drawn[0], drawn[1]
    got = f" of {len(drawn)}" if isinstance(drawn, (tuple, list)) else ""
    raise TypeError(f"{what} is a {type(drawn).__name__}{got}; {contract}")


# Up to this many identities, an intrinsic batch takes the first of a permutation of them all (the stream
# every run so far drew); beyond, a permutation would cost seconds and gigabytes a batch.
_PERMUTED_UP_TO = 1 << 20


def _distinct(count: int, n: int, g: torch.Generator) -> Tensor:
    """n distinct integers of range(count) [n] int64, drawn with ``g``."""
    if count <= _PERMUTED_UP_TO:
        return torch.randperm(count, generator=g)[:n]
    chosen: set[int] = set()  # Floyd's algorithm: a uniform subset in n draws, whatever count
    for j in range(count - n, count):
        t = int(torch.randint(j + 1, (), generator=g))
        chosen.add(j if t in chosen else t)
    # In a random order (sorted first: a set's order is not the generator's to decide).
    return torch.tensor(sorted(chosen), dtype=torch.int64)[torch.randperm(n, generator=g)]


class SweepSampler:
    """Iterable of one-factor batches rendered on the fly (see the module docstring).

    size: image side (64, 128, 150, ...); batch_size: images per batch; shape_bias: odds k of the
    intrinsic kind against 1 for each of the others; seed: fixes the whole stream; device: where to
    render; num_batches: batches per iteration (epoch, see :meth:`set_epoch`) for this rank (None:
    endless); rank / world_size: this process's share of the stream; meshes: the scans (default: the
    packaged faces); num_identities: identities are drawn from range(num_identities); zoom: the
    visible half-width is 1 / zoom (canonical face: nose tip to chin 0.5); antialias: supersampling.
    """

    def __init__(
        self,
        size: int = 64,
        batch_size: int = 20,
        shape_bias: float = 10,
        seed: int = 0,
        device: torch.device | str = "cpu",
        *,
        num_batches: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        meshes: list[Mesh] | None = None,
        num_identities: int = 10_000,
        ranges: SweepRanges = SweepRanges(),  # noqa: B008 (frozen, so sharing the default is safe)
        zoom: float = 1.4,
        antialias: int = 1,
    ):
        counts = {"size": size, "batch_size": batch_size, "antialias": antialias, "world_size": world_size}
        counts |= {"num_identities": num_identities} | ({} if num_batches is None else {"num_batches": num_batches})
        for name, value in counts.items():
            Bounds(1).check(name, value, integer=True)
        Bounds(0, below=world_size).check("rank", rank, integer=True)
        Bounds(0).check("seed", seed, integer=True)  # (numpy's SeedSequence takes no negative entropy)
        Bounds(0, below=FLOAT32_MAX).check("shape_bias", shape_bias)  # (odds are float32)
        Bounds(0, strict=True).check("zoom", zoom)
        if num_identities < batch_size:  # an intrinsic batch shows batch_size different identities
            raise ValueError(
                f"batch_size must be at most num_identities ({num_identities}): an intrinsic batch shows batch_size "
                f"different identities; got batch_size {batch_size}"
            )
        if meshes is not None:
            check_meshes(meshes, " or None (the packaged faces)")
        if not isinstance(ranges, SweepRanges):
            raise TypeError(f"ranges must be a SweepRanges, got {type(ranges).__name__}")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.device = device_argument(device)
        self.num_batches, self.rank, self.world_size, self.epoch = num_batches, rank, world_size, 0
        self.identities = IdentitySpace(meshes or [load_asset(n) for n in FACE_ASSETS]).to(self.device)
        self.num_identities = num_identities
        self.ranges, self.zoom, self.antialias = ranges, zoom, antialias
        self.kind_odds = torch.tensor([1.0, 1.0, 1.0, float(shape_bias)])

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("an endless SweepSampler has no length; pass num_batches")
        return self.num_batches

    def set_epoch(self, epoch: int) -> None:
        """With num_batches set, epoch e iterates this rank's share of global batches
        [e * num_batches * world_size, (e + 1) * num_batches * world_size): fresh data every epoch."""
        Bounds(0).check("epoch", epoch, integer=True)
        self.epoch = epoch

    def __iter__(self) -> Iterator[Batch]:
        if self.num_batches is None:
            steps: Iterable[int] = itertools.count()
        else:
            steps = range(self.epoch * self.num_batches, (self.epoch + 1) * self.num_batches)
        for step in steps:
            yield self.batch_at(step * self.world_size + self.rank)

    def generator(self, index: int) -> torch.Generator:
        """The CPU generator of global batch ``index`` >= 0 (a well-mixed function of seed and index)."""
        Bounds(0).check("index", index, integer=True)
        return stream_generator(SWEEPS, self.seed, index)

    def kind_at(self, index: int) -> tuple[str, torch.Generator]:
        """Kind of global batch ``index`` (1:1:1:k odds) and its generator, ready for :meth:`batch`."""
        g = self.generator(index)
        return KINDS[int(torch.multinomial(self.kind_odds, 1, generator=g))], g

    def batch_at(self, index: int) -> Batch:
        """Global batch ``index`` of this seed's stream."""
        return self.batch(*self.kind_at(index))

    def batch(self, kind: str, generator: torch.Generator) -> Batch:
        """A batch of the given kind drawn from ``generator`` (a CPU torch.Generator; None: torch's global one)."""
        if kind not in KINDS:
            raise ValueError(f"unknown sweep kind {kind!r}; expected one of {KINDS}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a CPU torch.Generator or None, got {type(generator).__name__}")
        factors = self.factors(kind, generator)
        images = self.render(factors)
        return images, {k: v.to(self.device) for k, v in factors.items()}, kind

    def factors(self, kind: str, generator: torch.Generator) -> dict[str, Tensor]:
        """The factor values of one batch: kind's factor swept, the others fixed (CPU [B] tensors)."""
        n, r, g = self.batch_size, self.ranges, generator

        def fixed(half_width: float) -> Tensor:
            return ((torch.rand((), generator=g) * 2 - 1) * half_width).expand(n).clone()

        def swept(half_width: float) -> Tensor:
            # Stratified: one value per 1/n of the range, sorted, so every sweep spans the range.
            return ((torch.arange(n) + torch.rand(n, generator=g)) / n * 2 - 1) * half_width

        low, high = r.light_elevation
        factors = {
            "azimuth": swept(r.azimuth) if kind == "azimuth" else fixed(r.azimuth),
            "elevation": swept(r.elevation) if kind == "elevation" else fixed(r.elevation),
            "light": swept(r.light) if kind == "light" else fixed(r.light),
            "light_elevation": (low + (high - low) * torch.rand((), generator=g)).expand(n).clone(),
        }
        if kind == "intrinsic":
            factors["identity"] = _distinct(self.num_identities, n, g)
        else:
            factors["identity"] = torch.randint(self.num_identities, (), generator=g).expand(n).clone()
        return factors

    def render(self, factors: dict[str, Tensor]) -> Tensor:
        """Render the faces given by ``factors`` (as from :meth:`factors`) -> [B, 1, S, S] on the device."""
        ident = self.identities.describe(factors["identity"].cpu())
        images = torch.empty(len(ident.gain), 1, self.size, self.size, device=self.device)
        for mesh_index in ident.mesh_index.unique().tolist():
            rows = (ident.mesh_index == mesh_index).nonzero().squeeze(1)
            coefficients = ident.coefficients[rows]
            # One shared shape when the identity is fixed: normals are then computed once.
            shared = bool((coefficients == coefficients[:1]).all())
            vertices = self.identities.vertices(mesh_index, coefficients[:1] if shared else coefficients)
            mesh = self.identities.meshes[mesh_index]
            images[rows.to(self.device)] = render(
                vertices[0] if shared else vertices,
                mesh.faces,
                azimuth=factors["azimuth"][rows].to(self.device),
                elevation=factors["elevation"][rows].to(self.device),
                light_azimuth=factors["light"][rows].to(self.device),
                light_elevation=factors["light_elevation"][rows].to(self.device),
                size=self.size,
                albedo=mesh.albedo,
                gain=ident.gain[rows].to(self.device),
                texture=mesh.texture,
                uv=mesh.uv,
                face_uv=mesh.face_uv,
                incident=mesh.incident,
                zoom=self.zoom,
                antialias=self.antialias,
            )
        return images
