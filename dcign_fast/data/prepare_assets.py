"""One-off: build the packaged face meshes (dcign_fast/data/assets/*.npz) from the shared scans.

Usage::

    python -m dcign_fast.data.prepare_assets --source /work/shared/data/meshes/faces

Every mesh is put in one canonical frame so that a given (azimuth, elevation, light) looks the same on
all of them: y up, the face looking toward +z, x toward the subject's left (image right at azimuth 0),
counter-clockwise (outward) winding. All three source scans already use that axis convention and
winding (checked by rendering them from six sides); what differs is origin and scale. We align on two
landmarks read off each scan's central profile: the nose tip (found automatically: the most forward
vertex near the vertical mid-line) and the bottom of the chin (the ``chin_y`` values below, in the
scan's own units, where the profile turns under the chin toward the neck). After alignment the nose
tip is at (0, 0, 0.6), the chin bottom 0.5 below it, and anything farther than 0.98 from the origin
(shoulders, the back of the neck) is cut so that rotated depths stay inside [-1, 1].
Meshes over 15k faces are decimated by vertex clustering to 10-15k faces. James's photo texture is
kept as a grey (0.21 R + 0.72 G + 0.07 B) 512 x 512 image; the two templates carry no skin colour.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dcign_fast.data.mesh_io import RawMesh, read_mesh

ASSETS_DIR = Path(__file__).parent / "assets"
NOSE_TO_CHIN = 0.5  # canonical distance from nose tip down to the chin bottom
NOSE_DEPTH = 0.6  # canonical z of the nose tip: the head turns about a point this far behind it
MAX_RADIUS = 0.98
MAX_FACES = 15_000
TARGET_FACES = (12_000, 14_000)
TEXTURE_SIZE = 512
SKIN_GREY = 0.75

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


def canonicalize(mesh: RawMesh, chin_y: float) -> RawMesh:
    """Translate and scale to the canonical frame, then cut what lies beyond MAX_RADIUS."""
    nose = nose_tip(mesh.vertices)
    scale = NOSE_TO_CHIN / (nose[1] - chin_y)
    vertices = (mesh.vertices - nose) * scale + np.array([0.0, 0.0, NOSE_DEPTH])
    keep_face = (np.linalg.norm(vertices, axis=1) < MAX_RADIUS)[mesh.faces].all(1)
    return _select_faces(RawMesh(vertices, mesh.faces, None, mesh.uv, mesh.face_uv, mesh.texture_path), keep_face)


def _select_faces(mesh: RawMesh, keep_face: np.ndarray) -> RawMesh:
    """Keep the given faces and drop vertices no face uses. keep_face: [F] bool."""
    faces = mesh.faces[keep_face]
    used = np.unique(faces)
    remap = np.full(len(mesh.vertices), -1, dtype=np.int64)
    remap[used] = np.arange(len(used))
    face_uv = mesh.face_uv[keep_face] if mesh.face_uv is not None else None
    return RawMesh(mesh.vertices[used], remap[faces], None, mesh.uv, face_uv, mesh.texture_path)


def cluster_decimate(mesh: RawMesh, cell: float) -> RawMesh:
    """Vertex clustering: merge all vertices in each cubic cell of side ``cell`` into their mean.

    Faces that collapse (two corners in one cell), that the merge turns over (their normal now opposes
    the source face's) or that repeat are dropped. Untextured meshes only.
    """
    cells = np.floor(mesh.vertices / cell).astype(np.int64)
    _, cluster, counts = np.unique(cells, axis=0, return_inverse=True, return_counts=True)
    cluster = cluster.reshape(-1)
    centres = np.zeros((len(counts), 3))
    np.add.at(centres, cluster, mesh.vertices)
    centres /= counts[:, None]
    faces = cluster[mesh.faces]
    proper = (faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) & (faces[:, 2] != faces[:, 0])
    # A fold turns faces over: kept, such a face and its outward twin on the same three corners cancel in
    # the summed vertex normals, and those vertices render as black specks.
    upright = np.einsum("fi,fi->f", _face_normals(centres, faces), _face_normals(mesh.vertices, mesh.faces)) > 0
    faces = faces[proper & upright]
    _, unique_rows = np.unique(np.sort(faces, axis=1), axis=0, return_index=True)
    return _select_faces(RawMesh(centres, faces), np.isin(np.arange(len(faces)), unique_rows))


def _face_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """[F, 3] unnormalised normals (counter-clockwise winding points them outward)."""
    a, b, c = (vertices[faces[:, k]] for k in range(3))
    return np.cross(b - a, c - a)


def decimate(mesh: RawMesh) -> RawMesh:
    """Bisect the clustering cell size until the face count lands in TARGET_FACES."""
    if len(mesh.faces) <= MAX_FACES:
        return mesh
    low, high = 1e-4, 0.2
    for _ in range(40):
        cell = (low * high) ** 0.5
        result = cluster_decimate(mesh, cell)
        if len(result.faces) > TARGET_FACES[1]:
            low = cell
        elif len(result.faces) < TARGET_FACES[0]:
            high = cell
        else:
            return result
    raise RuntimeError("decimation did not reach the target face count")


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
    written = []
    for name, (file_name, chin_y) in SOURCES.items():
        mesh = decimate(canonicalize(read_mesh(source_dir / file_name), chin_y))
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
