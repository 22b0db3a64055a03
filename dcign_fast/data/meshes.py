"""Meshes ready to render: the packaged face scans (assets/*.npz) and users' own mesh files."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dcign_fast.bounds import Bounds, described
from dcign_fast.data.mesh_io import read_mesh
from dcign_fast.data.render import DEPTH_LIMIT, check_indices, check_mesh, vertex_faces

ASSETS_DIR = Path(__file__).parent / "assets"
FACE_ASSETS = ("meshmonk", "menpo3d", "james")


@dataclass(frozen=True)
class Mesh:
    """A triangle mesh in the canonical frame (y up, facing +z, inside the unit sphere).

    vertices: [V, 3] float32; faces: [F, 3] int64 (counter-clockwise seen from outside);
    albedo: [V] float32 or None (then 1); texture: [H, W] float32 in [0, 1] with uv: [T, 2] and
    face_uv: [F, 3], or all None. incident: [V, D] vertex -> face table (derived). float64 vertices, and albedo,
    texture and uv of another real dtype, are stored as float32 (the sweeps render in it).
    """

    name: str
    vertices: Tensor
    faces: Tensor
    albedo: Tensor | None = None
    texture: Tensor | None = None
    uv: Tensor | None = None
    face_uv: Tensor | None = None
    incident: Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.vertices, Tensor) and self.vertices.dim() != 2:
            raise ValueError(f"vertices must be [V, 3], got shape {tuple(self.vertices.shape)}")
        check_mesh(self.vertices, self.faces, self.texture, self.uv, self.face_uv)
        num_vertices = self.vertices.shape[0]
        if self.albedo is not None and (
            not isinstance(self.albedo, Tensor) or tuple(self.albedo.shape) != (num_vertices,)
            or self.albedo.dtype == torch.bool or self.albedo.is_complex()
        ):  # fmt: skip
            got = described(self.albedo, dtype=True)
            raise ValueError(f"albedo must be a real [V] tensor with V = {num_vertices}, got {got}")
        for name in ("vertices", "albedo", "texture", "uv"):
            value = getattr(self, name)
            if value is not None and value.dtype != torch.float32:
                object.__setattr__(self, name, value.float())
        if self.face_uv is not None and self.uv is not None:
            check_indices("face_uv", self.face_uv, len(self.uv), "uv coordinates")
        object.__setattr__(self, "incident", vertex_faces(self.faces, self.vertices.shape[0]))

    @property
    def num_faces(self) -> int:
        """F, the rows of ``faces`` [F, 3]."""
        return self.faces.shape[0]

    def to(self, device: torch.device | str) -> Mesh:
        """A copy with every tensor on ``device``."""
        moved: dict[str, Any] = {
            k: getattr(self, k).to(device) if getattr(self, k) is not None else None
            for k in ("vertices", "faces", "albedo", "texture", "uv", "face_uv")
        }
        return replace(self, **moved)


def list_assets() -> list[str]:
    """Names of the packaged meshes."""
    return sorted(p.stem for p in ASSETS_DIR.glob("*.npz"))


def load_asset(name: str) -> Mesh:
    """Load a packaged mesh by name (see :func:`list_assets`)."""
    if name not in list_assets():  # (a name, not a path: "../x" reached any .npz)
        raise ValueError(f"no packaged mesh named {name!r}; available: {', '.join(list_assets())}")
    with np.load(ASSETS_DIR / f"{name}.npz") as data:
        texture = data.get("texture", None)
        return Mesh(
            name=name,
            vertices=torch.from_numpy(data["vertices"]),
            faces=torch.from_numpy(data["faces"].astype(np.int64)),
            texture=torch.from_numpy(texture.astype(np.float32) / 255.0) if texture is not None else None,
            uv=torch.from_numpy(data["uv"]) if texture is not None else None,
            face_uv=torch.from_numpy(data["face_uv"].astype(np.int64)) if texture is not None else None,
        )


def load_mesh(path: str | Path, radius: float = 0.9) -> Mesh:
    """Load a user's mesh (.ply, .obj, .off; other formats through trimesh).

    The mesh is assumed to be y-up and facing +z already; it is centred on its bounding box and scaled
    to fit a sphere of ``radius`` (at most 2: render's depth range). Vertex colours become grey albedo.
    A malformed file, or one with coordinates or colours that are not finite, raises a ValueError naming it.
    """
    Bounds(0, strict=True).check("radius", radius)
    if radius > DEPTH_LIMIT:  # a larger mesh would turn out of render's depth range
        raise ValueError(f"radius must be at most {DEPTH_LIMIT:g} (render's depth range), got {radius!r}")
    raw = read_mesh(path)
    with np.errstate(over="ignore", invalid="ignore"):  # (coordinates near the float limit: refused below)
        vertices = raw.vertices - (raw.vertices.max(0) + raw.vertices.min(0)) / 2
        extent = np.linalg.norm(vertices, axis=1).max()
    if not np.isfinite(extent):  # then every vertex scaled to 0 (radius / inf), without a word
        raise ValueError(f"mesh {path}: its coordinates span more than a float holds (extent {extent})")
    if extent == 0:  # scaling it to the sphere would divide by 0
        raise ValueError(f"mesh {path}: all its vertices coincide")
    vertices *= radius / extent
    albedo = None
    if raw.colors is not None:
        albedo = torch.from_numpy((raw.colors @ np.array([0.21, 0.72, 0.07])).astype(np.float32))
    return Mesh(
        name=Path(path).stem,
        vertices=torch.from_numpy(vertices.astype(np.float32)),
        faces=torch.from_numpy(raw.faces),
        albedo=albedo,
    )
