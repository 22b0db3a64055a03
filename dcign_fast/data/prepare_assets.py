"""One-off: build the packaged face meshes (dcign_fast/data/assets/*.npz) from the shared scans.

Usage (the decimation needs fast-simplification: ``pip install -e ".[assets]"`` pins the version used)::

    python -m dcign_fast.data.prepare_assets --source /work/shared/data/meshes/faces

Every mesh is put in one canonical frame so that a given (azimuth, elevation, light) looks the same on
all of them: y up, the face looking toward +z, x toward the subject's left (image right at azimuth 0),
counter-clockwise (outward) winding. All three source scans already use that axis convention and
winding (checked by rendering them from six sides); what differs is origin, scale and pitch.

The MeshMonk template defines the frame. Each scan is first placed by two landmarks read off its central
profile: the nose tip (found automatically: the most forward vertex near the vertical mid-line) and the
bottom of the chin (the ``chin_y`` values below, in the scan's own units, where the profile turns under
the chin toward the neck); the nose tip goes to (0, 0, 0.6) and the chin bottom 0.5 below it. The other
scans are then registered to the template: the pitch about the nose tip and the scale that lay their face
region on the template's (:func:`fit_pitch_and_scale`). Two landmarks alone left the James scan looking
0.23 rad further down than the template, which shifts the elevation latent of every James face. Anything
farther than 0.98 from the origin (shoulders, the back of the neck) is cut so that rotated depths stay
inside [-1, 1]. Meshes over 15k faces are decimated to 13k by quadric edge collapse, which keeps the
surface manifold (vertex clustering left 426 edges shared by three or more faces in menpo3d, and smeared
eyes). James's photo texture is kept as a grey (0.21 R + 0.72 G + 0.07 B) 512 x 512 image; the two
templates carry no skin colour.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from dcign_fast.data.mesh_io import RawMesh, read_mesh

ASSETS_DIR = Path(__file__).parent / "assets"
NOSE_TO_CHIN = 0.5  # canonical distance from nose tip down to the chin bottom
NOSE_DEPTH = 0.6  # canonical z of the nose tip: the head turns about a point this far behind it
NOSE = np.array([0.0, 0.0, NOSE_DEPTH])
MAX_RADIUS = 0.98
MAX_FACES = 15_000
TARGET_FACES = 13_000
TEXTURE_SIZE = 512
SKIN_GREY = 0.75
REFERENCE = "meshmonk"
# What registration compares, as [low, high) per axis: the part of the face every scan covers, from the
# brow to just above the chin bottom and about as wide as the outer eye corners, front side only. Hair, ears
# and the neck differ between scans and would pull the fit.
FACE_REGION = np.array([[-0.3, 0.3], [-0.45, 0.35], [0.2, 1.0]])
REGISTRATION_POINTS = 4000  # vertices sampled per mesh: fits with other samples move by up to about 0.006 rad
MIN_REGION_POINTS = 100  # fewer in the face region: the mesh is not a face in the canonical frame

# name -> (source file, chin-bottom height in the source's units)
SOURCES = {
    "meshmonk": ("meshmonk_template.ply", -1.20),
    "menpo3d": ("menpo3d_template.ply", -82_000.0),
    "james": ("james.obj", -117.0),
}


def nose_tip(vertices: np.ndarray) -> np.ndarray:
    """The most forward (+z) vertex within the middle 60% of the width. vertices: [V, 3] -> [3]."""
    width = np.ptp(vertices[:, 0])
    central = np.abs(vertices[:, 0] - np.median(vertices[:, 0])) < 0.3 * width
    return vertices[central][np.argmax(vertices[central][:, 2])]


def place(mesh: RawMesh, chin_y: float) -> RawMesh:
    """Translate and scale so that the nose tip lands on NOSE and the chin bottom NOSE_TO_CHIN below it."""
    nose = nose_tip(mesh.vertices)
    scale = NOSE_TO_CHIN / (nose[1] - chin_y)
    return replace(mesh, vertices=(mesh.vertices - nose) * scale + NOSE, colors=None)


def pitch_and_scale(vertices: np.ndarray, pitch: float, scale: float) -> np.ndarray:
    """Turn about the x axis through the nose tip (positive pitch tips the face down) and scale about it.

    vertices: [V, 3] -> [V, 3].
    """
    cos, sin = np.cos(pitch), np.sin(pitch)
    turn = np.array([[1.0, 0.0, 0.0], [0.0, cos, -sin], [0.0, sin, cos]])
    return (vertices - NOSE) @ turn.T * scale + NOSE


def registration_cost(vertices: np.ndarray, reference: np.ndarray) -> float:
    """Symmetric mean distance from each mesh's face-region vertices to the nearest vertex of the other.

    vertices: [V, 3], reference: [R, 3]; both in the canonical frame. Symmetric, so that shrinking one face
    onto a patch of the other does not pay.
    """
    points, target = torch.from_numpy(vertices).float(), torch.from_numpy(reference).float()
    total = 0.0
    for name, a, b in (("vertices", points, target), ("reference", target, points)):
        region = a[_in_face_region(a)]
        if len(region) < MIN_REGION_POINTS:  # the mean of nothing is NaN, which argmin would pick as the best
            raise ValueError(
                f"registration_cost: {name} has {len(region)} vertices in the face region {FACE_REGION.tolist()}; "
                f"expected at least {MIN_REGION_POINTS} (a face placed in the canonical frame)"
            )
        total += float(torch.cdist(region, b).amin(1).mean())
    return total


def _in_face_region(points: Tensor) -> Tensor:
    """[N, 3] -> [N] bool."""
    region = torch.from_numpy(FACE_REGION).to(points.dtype)
    return ((points >= region[:, 0]) & (points < region[:, 1])).all(1)


def fit_pitch_and_scale(vertices: np.ndarray, reference: np.ndarray, rounds: int = 5) -> tuple[float, float]:
    """The pitch and scale (:func:`pitch_and_scale`) that minimise :func:`registration_cost`.

    A 9 x 9 grid over pitch in [-0.6, 0.6] rad and scale in [0.8, 1.2], then ``rounds - 1`` grids a
    third as wide around the best point so far: the cost has no gradient to follow (nearest neighbours).
    vertices: [V, 3], reference: [R, 3].
    """
    rng = np.random.default_rng(0)
    if len(vertices) > REGISTRATION_POINTS:
        vertices = vertices[rng.choice(len(vertices), REGISTRATION_POINTS, replace=False)]
    if len(reference) > REGISTRATION_POINTS:
        reference = reference[rng.choice(len(reference), REGISTRATION_POINTS, replace=False)]
    best, half_width = np.array([0.0, 1.0]), np.array([0.6, 0.2])
    for _ in range(rounds):
        grid = best + np.stack(np.meshgrid(*(np.linspace(-h, h, 9) for h in half_width)), -1).reshape(-1, 2)
        costs = [registration_cost(pitch_and_scale(vertices, *candidate), reference) for candidate in grid]
        best, half_width = grid[int(np.argmin(costs))], half_width / 3
    return float(best[0]), float(best[1])


def cut(mesh: RawMesh) -> RawMesh:
    """Drop the faces with a corner beyond MAX_RADIUS (shoulders, the back of the neck)."""
    return _select_faces(mesh, (np.linalg.norm(mesh.vertices, axis=1) < MAX_RADIUS)[mesh.faces].all(1))


def _select_faces(mesh: RawMesh, keep_face: np.ndarray) -> RawMesh:
    """Keep the given faces and drop vertices no face uses. keep_face: [F] bool."""
    faces = mesh.faces[keep_face]
    used = np.unique(faces)
    remap = np.full(len(mesh.vertices), -1, dtype=np.int64)
    remap[used] = np.arange(len(used))
    face_uv = mesh.face_uv[keep_face] if mesh.face_uv is not None else None
    return RawMesh(mesh.vertices[used], remap[faces], None, mesh.uv, face_uv, mesh.texture_path)


def decimate(mesh: RawMesh) -> RawMesh:
    """Quadric edge collapse down to TARGET_FACES faces, for meshes over MAX_FACES. Untextured meshes only.

    The open border (the neck opening) stays in place, and a low aggressiveness keeps the
    eyes and lips, where small folds are.
    """
    if len(mesh.faces) <= MAX_FACES:
        return mesh
    if mesh.face_uv is not None:
        raise ValueError("decimate: a textured mesh would lose its uv seams; it expects an untextured one")
    try:
        import fast_simplification
    except ImportError as error:
        raise ImportError("decimating a mesh needs fast-simplification: pip install fast-simplification") from error
    vertices, faces = fast_simplification.simplify(
        mesh.vertices, mesh.faces.astype(np.int32), target_count=TARGET_FACES, agg=3, preserve_border=True
    )
    return RawMesh(vertices, faces.astype(np.int64))


def grey_texture(mesh: RawMesh) -> np.ndarray:
    """[TEXTURE_SIZE, TEXTURE_SIZE] uint8 grey texture (row 0 = v of 1, the image's top).

    The photo is dark; its gain is set so that the skin of the central face (|x| < 0.25, -0.4 < y < 0.3
    in the canonical frame) has a median of SKIN_GREY, like the untextured templates' albedo.
    """
    if mesh.texture_path is None or mesh.uv is None or mesh.face_uv is None:
        raise ValueError("grey_texture needs a mesh with a texture, uv and face_uv")
    rgb = np.asarray(
        Image.open(mesh.texture_path).convert("RGB").resize((TEXTURE_SIZE, TEXTURE_SIZE), Image.Resampling.LANCZOS)
    )
    grey = rgb.astype(np.float64) @ np.array([0.21, 0.72, 0.07])
    x, y = mesh.vertices[mesh.faces, 0], mesh.vertices[mesh.faces, 1]  # [F, 3] corner coordinates
    skin_uv = mesh.uv[mesh.face_uv[(np.abs(x) < 0.25) & (y > -0.4) & (y < 0.3)]]
    cols = np.clip((skin_uv[:, 0] * TEXTURE_SIZE).astype(int), 0, TEXTURE_SIZE - 1)
    rows = np.clip(((1 - skin_uv[:, 1]) * TEXTURE_SIZE).astype(int), 0, TEXTURE_SIZE - 1)
    grey *= SKIN_GREY * 255 / np.median(grey[rows, cols])
    return np.clip(np.round(grey), 0, 255).astype(np.uint8)


def prepare(source_dir: Path, out_dir: Path = ASSETS_DIR) -> list[Path]:
    """Write one .npz per entry of SOURCES into ``out_dir``; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    reference_file, reference_chin = SOURCES[REFERENCE]
    reference = cut(place(read_mesh(source_dir / reference_file), reference_chin)).vertices
    written = []
    for name, (file_name, chin_y) in SOURCES.items():
        mesh = place(read_mesh(source_dir / file_name), chin_y)
        if name != REFERENCE:
            pitch, scale = fit_pitch_and_scale(mesh.vertices, reference)
            print(f"{name}: pitch {pitch:+.3f} rad, scale {scale:.3f} onto {REFERENCE}")
            mesh = replace(mesh, vertices=pitch_and_scale(mesh.vertices, pitch, scale))
        mesh = decimate(cut(mesh))
        arrays: dict[str, Any] = {
            "vertices": mesh.vertices.astype(np.float32),
            "faces": mesh.faces.astype(np.int32),
            "source": np.array(file_name),
        }
        if mesh.texture_path is not None and mesh.uv is not None and mesh.face_uv is not None:
            arrays.update(
                uv=mesh.uv.astype(np.float32),
                face_uv=mesh.face_uv.astype(np.int32),
                texture=grey_texture(mesh),
            )
        path = out_dir / f"{name}.npz"
        np.savez_compressed(path, **arrays)
        print(f"{path}: {len(mesh.vertices)} vertices, {len(mesh.faces)} faces, {path.stat().st_size / 1e6:.2f} MB")
        written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", type=Path, default=Path("/work/shared/data/meshes/faces"))
    parser.add_argument("--out", type=Path, default=ASSETS_DIR)
    args = parser.parse_args()
    prepare(args.source, args.out)


if __name__ == "__main__":
    main()
