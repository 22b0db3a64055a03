"""Read triangle meshes from .ply (ascii or binary), .obj and .off files with numpy only.

These readers cover the files the package ships and common exports (MeshLab, trimesh, CGAL). Anything
else goes through trimesh when it is installed (``pip install dcign-fast[mesh]``).
Polygons with more than three corners are fan-triangulated.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class RawMesh:
    """A mesh as read from disk, before any centring or scaling.

    vertices: [V, 3] float64; faces: [F, 3] int64; colors: [V, 3] float in [0, 1] or None (a reader's own
    RawMesh holds them as stored, 0..255 or 0..1; :func:`read_mesh` checks and scales them);
    uv: [T, 2] texture coordinates or None; face_uv: [F, 3] int64 indices into ``uv`` or None;
    texture_path: image file named by an .obj material, or None.
    """

    vertices: np.ndarray
    faces: np.ndarray
    colors: np.ndarray | None = None
    uv: np.ndarray | None = None
    face_uv: np.ndarray | None = None
    texture_path: Path | None = None


def read_mesh(path: str | Path) -> RawMesh:
    """Read ``path`` by its suffix; other formats need trimesh. Raises ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mesh file not found: {path}")
    readers = {".ply": _read_ply, ".obj": _read_obj, ".off": _read_off}
    reader = readers.get(path.suffix.lower(), _read_with_trimesh)
    try:
        mesh = reader(path)
    except (ValueError, IndexError, UnicodeDecodeError, OverflowError) as err:  # (Overflow: an index past int64)
        raise ValueError(f"cannot read mesh {path}: {err}") from err
    if len(mesh.faces) == 0 or not _indexes_within(mesh.faces, len(mesh.vertices)):
        raise ValueError(f"mesh {path} has no faces or face indices out of range")
    if mesh.uv is not None and mesh.face_uv is not None and not _indexes_within(mesh.face_uv, len(mesh.uv)):
        raise ValueError(f"mesh {path} has texture-coordinate indices out of range (it lists {len(mesh.uv)})")
    if not np.isfinite(mesh.vertices).all():
        raise ValueError(f"mesh {path} has vertex coordinates that are not finite")
    if mesh.colors is not None:
        # Readers give colours as stored: 0..255 or 0..1. (A NaN compared false with 1, leaving the rest unscaled.)
        if not (np.isfinite(mesh.colors).all() and mesh.colors.min() >= 0 and mesh.colors.max() <= 255):
            raise ValueError(f"mesh {path} has vertex colours that are not finite numbers in [0, 1] or [0, 255]")
        mesh.colors = mesh.colors / (255.0 if mesh.colors.max() > 1 else 1.0)
    return mesh


def _indexes_within(indices: np.ndarray, count: int) -> bool:
    """Whether every entry of ``indices`` is in [0, count)."""
    return indices.size == 0 or bool(indices.min() >= 0 and indices.max() < count)


def _fan(polygon: list[int]) -> list[list[int]]:
    return [[polygon[0], polygon[i], polygon[i + 1]] for i in range(1, len(polygon) - 1)]


def _read_off(path: Path) -> RawMesh:
    lines = [line.split("#", 1)[0].split() for line in path.read_text().splitlines()]
    lines = [parts for parts in lines if parts]
    header = lines[0][0]
    if not header.endswith("OFF"):
        raise ValueError("missing OFF header")
    # The counts may follow the keyword on its line or sit on the next one.
    if len(lines[0]) > 1:
        counts, body = lines[0][1:], 1
    else:
        counts, body = (lines[1] if len(lines) > 1 else []), 2
    if len(counts) < 2:
        raise ValueError("its header has no vertex and face counts")
    n_vertices, n_faces = int(counts[0]), int(counts[1])
    if len(lines) < body + n_vertices + n_faces:
        raise ValueError(f"it ends before the {n_vertices} vertices and {n_faces} faces its header counts")
    vertex_lines = lines[body : body + n_vertices]
    if any(len(parts) < 3 for parts in vertex_lines):
        raise ValueError("a vertex line has fewer than 3 coordinates")
    table = np.array([[float(x) for x in parts[:7]] for parts in vertex_lines])
    faces = []
    for parts in lines[body + n_vertices : body + n_vertices + n_faces]:
        count = int(parts[0])  # anything after the indices is a face colour
        if len(parts) < 1 + count:
            raise ValueError(f"a face line counts {count} corners and lists {len(parts) - 1} numbers")
        faces.extend(_fan([int(t) for t in parts[1 : 1 + count]]))
    colors = table[:, 3:6] if header.startswith("C") and table.shape[1] >= 6 else None  # (scaled by read_mesh)
    return RawMesh(table[:, :3], np.asarray(faces, dtype=np.int64), colors)


def _read_obj(path: Path) -> RawMesh:
    vertices, uv, faces, face_uv, material_lib = [], [], [], [], None
    for line in path.read_text(errors="replace").splitlines():
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "v":
            if len(parts) < 4:
                raise ValueError(f"a vertex line has fewer than 3 coordinates: {line.strip()!r}")
            vertices.append([float(x) for x in parts[1:4]])
        elif parts[0] == "vt":
            uv.append([float(x) for x in parts[1:3]])
        elif parts[0] == "f":
            corners = [p.split("/") for p in parts[1:]]
            # OBJ indices are 1-based; negative ones count back from the end.
            vi = [int(c[0]) - 1 if int(c[0]) > 0 else len(vertices) + int(c[0]) for c in corners]
            faces.extend(_fan(vi))
            if len(corners[0]) > 1 and corners[0][1]:
                ti = [int(c[1]) - 1 if int(c[1]) > 0 else len(uv) + int(c[1]) for c in corners]
                face_uv.extend(_fan(ti))
        elif parts[0] == "mtllib":
            material_lib = path.parent / " ".join(parts[1:])
    has_uv = bool(uv) and len(face_uv) == len(faces)
    return RawMesh(
        np.asarray(vertices, dtype=np.float64),
        np.asarray(faces, dtype=np.int64),
        uv=np.asarray(uv, dtype=np.float64) if has_uv else None,
        face_uv=np.asarray(face_uv, dtype=np.int64) if has_uv else None,
        texture_path=_texture_from_mtl(material_lib) if has_uv else None,
    )


def _texture_from_mtl(material_lib: Path | None) -> Path | None:
    if material_lib is None or not material_lib.is_file():
        return None
    for line in material_lib.read_text(errors="replace").splitlines():
        parts = line.split()
        if parts and parts[0] == "map_Kd":
            texture = material_lib.parent / parts[-1]
            return texture if texture.is_file() else None
    return None


_PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2",
    "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}  # fmt: skip


def _read_ply(path: Path) -> RawMesh:
    data = path.read_bytes()
    end = data.find(b"end_header")
    if not data.startswith(b"ply") or end < 0:
        raise ValueError("missing PLY header")
    body_start = data.index(b"\n", end) + 1
    header = data[:end].decode("ascii").splitlines()
    fmt = next((line.split()[1] for line in header if line.startswith("format")), None)
    if fmt is None:
        raise ValueError("no format line in its header")
    if fmt not in ("ascii", "binary_little_endian", "binary_big_endian"):
        raise ValueError(f"unknown PLY format {fmt!r} (ascii, binary_little_endian or binary_big_endian)")
    elements: list[tuple[str, int, list[tuple[str, ...]]]] = []
    for line in header:
        parts = line.split()
        if parts and parts[0] == "element":
            elements.append((parts[1], int(parts[2]), []))
        elif parts and parts[0] == "property":
            prop = tuple(parts[1:])
            for kind in prop[1:3] if prop[0] == "list" else prop[:1]:
                _ply_type(kind)  # (every format: ascii's numbers would load, whatever their declared type)
            elements[-1][2].append(prop)
    if fmt == "ascii":
        try:
            tables = _ply_ascii(data[body_start:].decode("ascii").split(), elements)
        except IndexError:
            raise ValueError("its body ends before the elements its header declares") from None
    else:
        endian = "<" if fmt == "binary_little_endian" else ">"
        tables = _ply_binary(data, body_start, endian, elements)
    missing = [k for k in ("vertex", "face") if k not in tables] or [k for k in "xyz" if k not in tables["vertex"]]
    if missing:
        raise ValueError(f"no {missing[0]!r} in its header")
    vertex = tables["vertex"]
    vertices = np.stack([vertex["x"], vertex["y"], vertex["z"]], axis=1).astype(np.float64)
    colors = None
    if all(k in vertex for k in ("red", "green", "blue")):
        colors = np.stack([vertex["red"], vertex["green"], vertex["blue"]], axis=1).astype(np.float64)
    if "faces" not in tables["face"]:  # (a face element of scalar properties only)
        raise ValueError("its face element has no list property of vertex indices")
    faces = [tri for polygon in tables["face"]["faces"] for tri in _fan(list(polygon))]
    return RawMesh(vertices, np.asarray(faces, dtype=np.int64), colors)


def _ply_ascii(tokens: list[str], elements: list) -> dict[str, dict[str, np.ndarray | list]]:
    pos, tables = 0, {}
    for name, count, props in elements:
        columns: dict[str, list] = {("faces" if p[0] == "list" else p[-1]): [] for p in props}
        for _ in range(count):
            for prop in props:
                if prop[0] == "list":
                    n = int(tokens[pos])
                    columns["faces"].append([int(t) for t in tokens[pos + 1 : pos + 1 + n]])
                    pos += 1 + n
                else:
                    columns[prop[-1]].append(float(tokens[pos]))
                    pos += 1
        tables[name] = {k: (v if k == "faces" else np.asarray(v)) for k, v in columns.items()}
    return tables


def _ply_type(name: str) -> str:
    if name not in _PLY_TYPES:
        raise ValueError(f"unsupported PLY property type {name!r}")
    return _PLY_TYPES[name]


def _ply_rows(data: bytes, row: np.dtype, count: int, pos: int) -> np.ndarray:
    if len(data) - pos < row.itemsize * count:
        raise ValueError("its body ends before the elements its header declares")
    return np.frombuffer(data, dtype=row, count=count, offset=pos)


def _ply_binary(data: bytes, pos: int, endian: str, elements: list) -> dict[str, dict[str, np.ndarray | list]]:
    tables = {}
    for name, count, props in elements:
        if any(p[0] == "list" for p in props):
            # Faces: lists whose length is stored per row. Fast path when every row is a triangle.
            (count_type, index_type), other = props[0][1:3], props[1:]
            if other:
                raise ValueError(f"unsupported PLY element '{name}': list plus other properties")
            row = np.dtype([("n", endian + _ply_type(count_type)), ("i", endian + _ply_type(index_type), 3)])
            rows = _ply_rows(data, row, count, pos)
            if not np.all(rows["n"] == 3):
                raise ValueError("binary PLY with non-triangle faces is not supported; triangulate it first")
            tables[name] = {"faces": rows["i"].astype(np.int64).tolist()}
            pos += rows.nbytes
        else:
            row = np.dtype([(p[-1], endian + _ply_type(p[0])) for p in props])
            rows = _ply_rows(data, row, count, pos)
            tables[name] = {p[-1]: rows[p[-1]].astype(np.float64) for p in props}
            pos += rows.nbytes
    return tables


def _read_with_trimesh(path: Path) -> RawMesh:
    try:
        import trimesh
    except ImportError as err:
        raise ImportError(
            f"reading {path.suffix} meshes needs trimesh: pip install 'dcign-fast[mesh]' (or convert to .ply/.obj/.off)"
        ) from err
    loaded = trimesh.load(path, force="mesh", process=False)
    return RawMesh(np.asarray(loaded.vertices, dtype=np.float64), np.asarray(loaded.faces, dtype=np.int64))
