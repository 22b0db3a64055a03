"""Identity variation: which scan, a smooth left-right symmetric shape deformation, an albedo gain.

An integer identity fixes everything about a face, independent of any sampler seed:
- mesh = meshes[identity % len(meshes)];
- identities below len(meshes) are the undeformed scans; others draw shape coefficients c in
  [-1, 1]^K and an albedo gain from a generator seeded with the identity.

Shape modes are smooth vector fields over the canonical frame (x across, y up; the same frame for every
mesh), mirror-symmetric about x = 0: x-displacements are odd in x (sin), y and z-displacements even
(cos), each times 1, cos or sin of y. Each mode's amplitude is scaled so its largest slope equals
``slope``; a sum of such fields can still fold a triangle over, so :meth:`IdentitySpace.vertices` halves
an image's coefficients until no triangle turns by more than 60 degrees (no flips, by construction).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from dcign_fast.bounds import Bounds, described
from dcign_fast.data.meshes import Mesh

_PERIOD = 1.2  # canonical units: cos(pi * x / 1.2) stays positive across the face (|x| < 0.6)
_MAX_TURN_COS = 0.5  # a triangle's normal may turn by at most 60 degrees
_MAX_HALVINGS = 8


def _modes() -> list[tuple[int, int, int, int]]:
    """(axis, x frequency, y frequency, y parity: 0 = cos, 1 = sin); translations left out."""
    modes = []
    for axis in range(3):
        x_freqs = (1, 2) if axis == 0 else (0, 1, 2)
        for fx in x_freqs:
            for fy, parity in ((0, 0), (1, 0), (1, 1)):
                if axis != 0 and fx == 0 and fy == 0:
                    continue  # a rigid shift along y or z
                modes.append((axis, fx, fy, parity))
    return modes


MODES = _modes()


def mode_fields(points: Tensor, slope: float) -> Tensor:
    """Displacement fields of all modes at ``points``.

    points: [V, 3] canonical coordinates -> [K, V, 3], each mode's largest slope equal to ``slope``.
    """
    x, y = points[:, 0] * (math.pi / _PERIOD), points[:, 1] * (math.pi / _PERIOD)
    fields = torch.zeros(len(MODES), *points.shape, dtype=points.dtype, device=points.device)
    for k, (axis, fx, fy, parity) in enumerate(MODES):
        across = torch.sin(fx * x) if axis == 0 else torch.cos(fx * x)
        along = torch.sin(fy * y) if parity else torch.cos(fy * y)
        gradient = math.pi / _PERIOD * math.hypot(fx, fy)
        fields[k, :, axis] = across * along * (slope / gradient)
    return fields


@dataclass(frozen=True)
class Identity:
    """What an identity fixes: mesh_index [B] int64, coefficients [B, K], gain [B]."""

    mesh_index: Tensor
    coefficients: Tensor
    gain: Tensor


def check_meshes(meshes: object, default: str = "") -> None:
    """A TypeError unless ``meshes`` is a list (or tuple) of Mesh objects; a ValueError when it is empty.
    default: what None means, for the message, where None is allowed."""
    if not isinstance(meshes, (list, tuple)):
        raise TypeError(
            f"meshes must be a list of Mesh objects (load_mesh, load_asset){default}, got a {type(meshes).__name__}"
        )
    if not meshes:
        raise ValueError(f"meshes must be a list of at least one Mesh{default}, got none")
    for i, mesh in enumerate(meshes):
        if not isinstance(mesh, Mesh):
            got = type(mesh).__name__
            raise TypeError(f"meshes must hold Mesh objects (load_mesh, load_asset), got a {got} at {i}")


class IdentitySpace:
    """Faces from a few scans times a K-dimensional symmetric shape space (K = len(MODES)).

    meshes: the scans, a non-empty list of Mesh; slope: each mode's largest slope, >= 0 (0: the scans alone);
    gain_range: (low, high) with 0 <= low <= high <= 1, the albedo gains drawn (an albedo of at most 1 times a
    gain above 1 would be clipped to white).
    """

    def __init__(self, meshes: list[Mesh], slope: float = 0.12, gain_range: tuple[float, float] = (0.6, 0.95)):
        check_meshes(meshes)
        Bounds(0).check("slope", slope)
        if not (isinstance(gain_range, (tuple, list)) and len(gain_range) == 2):
            raise ValueError(f"gain_range must be a (low, high) pair, got {gain_range!r}")
        Bounds(0).check("gain_range[0]", gain_range[0])
        Bounds(gain_range[0]).check("gain_range[1]", gain_range[1])
        if gain_range[1] > 1:  # (albedo at most 1 times a gain above 1: clipped to white)
            raise ValueError(f"gain_range[1] must be at most 1, got {gain_range[1]!r}")
        self.meshes = list(meshes)
        self.slope = slope
        self.gain_range = gain_range
        self._fields = [mode_fields(m.vertices, slope) for m in meshes]
        # The scans' own face normals, which every deformation is checked against for folds.
        self._rest_normals = [_face_normals(m.vertices[None], m.faces) for m in meshes]

    def to(self, device: torch.device | str) -> IdentitySpace:
        """The same space with meshes on ``device``."""
        return IdentitySpace([m.to(device) for m in self.meshes], self.slope, self.gain_range)

    def describe(self, identity: Tensor) -> Identity:
        """identity: [B] int64 (CPU), entries >= 0 -> its mesh, coefficients and gain (CPU tensors)."""
        if not isinstance(identity, Tensor) or identity.dim() != 1:
            raise ValueError(f"identity must be a [B] integer tensor, got {described(identity)}")
        if identity.is_floating_point() or identity.is_complex() or identity.dtype == torch.bool:
            raise ValueError(f"identity must be a [B] integer tensor, got {identity.dtype}")
        unique, inverse = identity.unique(return_inverse=True)
        # Uniform draws per distinct identity: K coefficients, then the gain (scans: none, see the module doc).
        ids = unique.tolist()  # (sorted: a negative one comes first)
        if ids and ids[0] < 0:
            raise ValueError(f"identity must hold identities >= 0, got {ids[0]}")
        rows = [_identity_draws(i) for i in ids]
        draws = torch.stack(rows) if rows else torch.empty(0, len(MODES) + 1)
        scan = (unique < len(self.meshes))[:, None]
        low, high = self.gain_range
        coefficients = torch.where(scan, 0.0, draws[:, :-1] * 2 - 1)
        gain = torch.where(scan[:, 0], (low + high) / 2, low + (high - low) * draws[:, -1])
        return Identity(identity % len(self.meshes), coefficients[inverse], gain[inverse])

    def vertices(self, mesh_index: int, coefficients: Tensor) -> Tensor:
        """Deformed vertices of one mesh, shrinking coefficients that would fold a triangle.

        mesh_index: which of the space's meshes; coefficients: [B, K] -> [B, V, 3] on the mesh's device.
        """
        Bounds(0, below=len(self.meshes)).check("mesh_index", mesh_index, integer=True)
        if not (isinstance(coefficients, Tensor) and coefficients.dim() == 2 and coefficients.shape[1] == len(MODES)):
            raise ValueError(f"coefficients must be [B, {len(MODES)}], got {described(coefficients)}")
        mesh, fields = self.meshes[mesh_index], self._fields[mesh_index]
        coefficients = coefficients.to(fields.device, fields.dtype)
        rest = self._rest_normals[mesh_index]
        proper = rest.norm(dim=-1) > 0.5  # degenerate (zero-area) scan triangles have no direction to keep
        for _ in range(_MAX_HALVINGS):
            deformed = mesh.vertices + torch.einsum("bk,kvc->bvc", coefficients, fields)
            turn = (_face_normals(deformed, mesh.faces) * rest).sum(-1).where(proper, 1.0).amin(1)  # [B]
            folded = turn < _MAX_TURN_COS
            if not folded.any():
                return deformed
            coefficients = torch.where(folded[:, None], coefficients / 2, coefficients)
        return torch.where(folded[:, None, None], mesh.vertices, deformed)


@functools.lru_cache(maxsize=1 << 16)
def _identity_draws(identity: int) -> Tensor:
    """[K + 1] uniform draws in [0, 1) of a generator seeded with ``identity``: K shape coefficients, then the
    albedo gain (cached: an intrinsic batch draws B identities, each a generator seeding; do not modify)."""
    g = torch.Generator().manual_seed(identity)
    return torch.rand(len(MODES) + 1, generator=g, dtype=torch.float32)  # (as drawn one by one: the same stream)


def _face_normals(vertices: Tensor, faces: Tensor) -> Tensor:
    """Unit face normals: vertices [B, V, 3], faces [F, 3] -> [B, F, 3]."""
    a, b, c = vertices.index_select(1, faces.reshape(-1)).view(vertices.shape[0], -1, 3, 3).unbind(2)
    return torch.nn.functional.normalize(torch.linalg.cross(b - a, c - a), dim=-1, eps=1e-12)
