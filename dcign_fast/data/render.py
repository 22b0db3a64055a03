"""A batched z-buffer rasteriser in pure PyTorch: same code on CPU and CUDA, deterministic.

Conventions (camera frame, orthographic, looking down -z):
- x to image right, y to image top, +z toward the camera. Meshes face +z at azimuth 0.
- ``azimuth`` (radians) turns the object about the vertical axis; positive turns the nose toward
  image right (the subject turns to their own left).
- ``elevation`` (radians) tilts it about the image's horizontal axis, applied after azimuth so that
  positive elevation always moves the nose up in the image (face tilted up, seen a little from below),
  whatever the azimuth.
- ``light_azimuth`` / ``light_elevation`` (radians) give a directional light fixed in the camera frame:
  direction (sin az * cos el, sin el, cos az * cos el). Positive light azimuth lights the image-right
  side (the subject's left cheek at azimuth 0); positive light elevation lights from above.
- Scene units: the visible region is [-1/zoom, 1/zoom] in x and y; depth must lie in [-2, 2] (render checks:
  a mesh inside the unit sphere always fits, and so do the sweeps' deformed scans, which reach a little past it).

How: each front-facing triangle tests the pixel centres inside its bounding box (the (box, pixel) pairs of
all boxes flat, in passes of bounded size); a pixel keeps the nearest triangle through a scatter-min over
int64 keys that pack (quantised depth, face index). Barycentrics of the winning triangle then
interpolate vertex normals and albedo for Lambertian + ambient shading.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from dcign_fast.bounds import Bounds, described
from dcign_fast.ops._checks import check_on_device

_DEPTH_LEVELS = 1 << 30  # depth quantisation steps over [-1, 1]; the face index takes the low 32 bits
# Depths allowed: the same steps carry on to +-2, whose keys (1 - z in [-1, 3] times 2^29, shifted by 32 bits)
# still fit an int64 and keep their order (the sweeps' deformed scans reach a depth of 1.005).
DEPTH_LIMIT = 2.0
_EMPTY = torch.iinfo(torch.int64).max
# Pixel centres on a shared edge must land in at least one triangle despite rounding: accept slightly
# negative barycentrics (the overlap is harmless, the depth test picks one).
_EDGE_TOLERANCE = 1e-5
# (box, pixel) pairs a rasterizer pass tests at once (some 200 bytes each): on a CPU 512K, a pass near 100 MB; on
# a GPU 4M (800 MB), as its ~40 ops a pass are kernel launches that take longer than a small pass's work.
_PAIRS_PER_PASS = {"cpu": 1 << 19, "gpu": 1 << 22}


def rotation(azimuth: Tensor, elevation: Tensor) -> Tensor:
    """Object-to-camera rotations R = R_elevation @ R_azimuth.

    azimuth, elevation: [B] radians -> [B, 3, 3].
    """
    ca, sa, ce, se = azimuth.cos(), azimuth.sin(), elevation.cos(), elevation.sin()
    zero, one = torch.zeros_like(ca), torch.ones_like(ca)
    r_az = torch.stack([ca, zero, sa, zero, one, zero, -sa, zero, ca], -1).view(-1, 3, 3)
    r_el = torch.stack([one, zero, zero, zero, ce, se, zero, -se, ce], -1).view(-1, 3, 3)
    return r_el @ r_az


def light_direction(light_azimuth: Tensor, light_elevation: Tensor) -> Tensor:
    """Unit vectors toward the light in the camera frame: [B], [B] -> [B, 3]."""
    ce = light_elevation.cos()
    return torch.stack([light_azimuth.sin() * ce, light_elevation.sin(), light_azimuth.cos() * ce], -1)


def vertex_faces(faces: Tensor, num_vertices: int) -> Tensor:
    """Padded vertex -> incident faces table, for deterministic normal sums (no atomics on CUDA).

    faces: [F, 3] int64 (or int32) -> [V, D] int64, padded with F (an index one past the last face).
    """
    _check_faces(faces)
    check_indices("faces", faces, num_vertices, "vertices")
    return _incident_table(faces, num_vertices)


def _incident_table(faces: Tensor, num_vertices: int) -> Tensor:
    """:func:`vertex_faces` for faces already checked (render checks them with its other values, in one sync)."""
    num_faces = faces.shape[0]
    vertex = faces.reshape(-1)
    face = torch.arange(num_faces, device=faces.device).repeat_interleave(3)
    order = torch.argsort(vertex, stable=True)
    vertex, face = vertex[order], face[order]
    counts = torch.bincount(vertex, minlength=num_vertices)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(vertex.numel(), device=faces.device) - starts[vertex]
    table = torch.full((num_vertices, int(counts.max())), num_faces, dtype=torch.int64, device=faces.device)
    table[vertex, slot] = face
    return table


def vertex_normals(vertices: Tensor, faces: Tensor, incident: Tensor) -> Tensor:
    """Area-weighted unit vertex normals.

    vertices: [B, V, 3]; faces: [F, 3]; incident: [V, D] from :func:`vertex_faces` -> [B, V, 3].
    """
    batch, num_faces = vertices.shape[0], faces.shape[0]
    corners = vertices.index_select(1, faces.reshape(-1)).view(batch, num_faces, 3, 3)
    face_n = torch.linalg.cross(corners[:, :, 1] - corners[:, :, 0], corners[:, :, 2] - corners[:, :, 0])
    face_n = F.pad(face_n, (0, 0, 0, 1))  # the padding row that ``incident`` points to
    summed = face_n.index_select(1, incident.reshape(-1)).view(batch, *incident.shape, 3).sum(2)
    return F.normalize(summed, dim=-1, eps=1e-12)


def _check_faces(faces: Tensor) -> None:
    if not isinstance(faces, Tensor) or faces.dim() != 2 or faces.shape[1] != 3:
        raise ValueError(f"faces must be an integer [F, 3] tensor, got {described(faces)}")
    if faces.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"faces must be an integer [F, 3] tensor, got {faces.dtype}")


def check_indices(name: str, indices: Tensor, count: int, what: str) -> None:
    """A ValueError unless every entry of ``indices`` is in [0, count): it indexes one of ``count`` ``what``.
    (A host sync on CUDA: run where a mesh's tables are built, by Mesh and by :func:`vertex_faces`; render checks
    its index tensors with its other values, in one sync.)"""
    if indices.numel():
        _check_all([_index_check(name, indices, count, what)])


# A check whose outcome lives on the device: (holds, a 0-dim bool tensor; the error to raise when it does not).
_Check = tuple[Tensor, Callable[[], ValueError]]


def _check_all(checks: list[_Check]) -> None:
    """Raise the error of the first check that does not hold; one host sync for all of them (each check is a
    reduction queued on the device), and an error's message (which may sync again) is made only on failure."""
    if checks and not bool(torch.stack([holds for holds, _ in checks]).all()):
        raise next(error for holds, error in checks if not bool(holds))()


def _index_check(name: str, indices: Tensor, count: int, what: str) -> _Check:
    """Whether the (non-empty) ``indices`` all lie in [0, count)."""
    low, high = torch.aminmax(indices)
    return (low >= 0) & (high < count), lambda: ValueError(
        f"{name} must index the {count} {what}, entries in [0, {count}), got entries in [{int(low)}, {int(high)}]"
    )


def _finite_check(name: str, value: Tensor) -> _Check:
    """Whether ``value`` is free of NaN and infinities (the message shows a small tensor, counts a large one's)."""

    def error() -> ValueError:
        bad = ~torch.isfinite(value)
        got = f"{value}" if value.numel() <= 16 else f"{int(bad.sum())} of its {value.numel()} entries not finite"
        return ValueError(f"{name} must be finite, got {got}")

    return torch.isfinite(value).all(), error


def _depth_check(depth: Tensor) -> _Check:
    """Whether the depths (camera z of the rotated vertices) lie in [-2, 2], as the depth keys need."""
    low, high = torch.aminmax(depth)
    return (low >= -DEPTH_LIMIT) & (high <= DEPTH_LIMIT), lambda: ValueError(
        f"vertices must lie within depth [-{DEPTH_LIMIT:g}, {DEPTH_LIMIT:g}] once rotated (a radius of at most "
        f"{DEPTH_LIMIT:g} always does), "
        f"got depths in [{float(low):.4g}, {float(high):.4g}]"
    )


def _check_devices(vertices: Tensor, tensors: dict[str, Tensor | None]) -> None:
    """A ValueError naming the first of ``tensors`` (None: not given) not on the vertices' device."""
    for name, value in tensors.items():
        check_on_device(name, value, vertices.device, "the vertices' device")


def check_mesh(
    vertices: Tensor, faces: Tensor, texture: Tensor | None, uv: Tensor | None, face_uv: Tensor | None
) -> None:
    """A ValueError naming the first of a mesh's tensors that is not what :func:`render` takes (shapes and dtypes:
    no host sync); the entries of faces and face_uv are checked by :func:`check_indices` (by Mesh, and by render
    with its other values)."""
    if not isinstance(vertices, Tensor) or vertices.dim() not in (2, 3) or vertices.shape[-1] != 3:
        raise ValueError(f"vertices must be [V, 3] or [B, V, 3], got {described(vertices)}")
    if vertices.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"vertices must be float32 or float64, got {vertices.dtype}")
    _check_faces(faces)
    _check_devices(vertices, {"faces": faces, "texture": texture, "uv": uv, "face_uv": face_uv})
    if vertices.shape[-2] == 0 or faces.shape[0] == 0:
        raise ValueError(
            f"a mesh needs vertices and faces, got {vertices.shape[-2]} vertices and {faces.shape[0]} faces"
        )
    if (texture is None) != (uv is None) or (uv is None) != (face_uv is None):
        raise ValueError("texture, uv and face_uv go together: give all three or none")
    if texture is None or uv is None or face_uv is None:  # (then all three are None)
        return
    for name, value, dims, shape in (("texture", texture, 2, "[H, W]"), ("uv", uv, 2, "[T, 2]")):
        if not isinstance(value, Tensor) or value.dim() != dims or not value.is_floating_point():
            raise ValueError(f"{name} must be a floating-point {shape} tensor, got {described(value)}")
    if texture.numel() == 0:
        raise ValueError(f"texture must be a floating-point [H, W] tensor with H, W >= 1, got {described(texture)}")
    if uv.shape[1] != 2:
        raise ValueError(f"uv must be a floating-point [T, 2] tensor, got shape {tuple(uv.shape)}")
    if not isinstance(face_uv, Tensor) or tuple(face_uv.shape) != tuple(faces.shape):
        raise ValueError(
            f"face_uv must be an integer [F, 3] tensor with F = {faces.shape[0]}, got {described(face_uv)}"
        )
    if face_uv.dtype not in (torch.int32, torch.int64):  # (bool would mask, int16 cannot index)
        raise ValueError(f"face_uv must be an int32 or int64 [F, 3] tensor, got {face_uv.dtype}")


def _check_render_inputs(
    vertices: Tensor,
    faces: Tensor,
    batch: int,
    per_image: dict[str, Tensor],
    albedo: Tensor | None,
    incident: Tensor | None,
) -> None:
    """A ValueError naming the first argument of :func:`render` that does not fit the others (torch's own
    errors, deep inside, named none): shapes and dtypes, no host sync (values: :func:`_value_checks`).
    per_image: azimuth, the other angles and gain (when given) by name."""
    _check_devices(vertices, {**per_image, "albedo": albedo, "incident": incident})
    if vertices.dim() == 3 and vertices.shape[0] != batch:
        raise ValueError(f"vertices [B, V, 3] must have B = {batch} (azimuth's), got {tuple(vertices.shape)}")
    for name, value in per_image.items():
        if not isinstance(value, Tensor) or tuple(value.shape) != (batch,):
            raise ValueError(f"{name} must be [B] with B = {batch} (azimuth's), got {described(value)}")
        if value.dtype == torch.bool or value.is_complex():
            raise ValueError(f"{name} must be a real (floating-point or integer) tensor, got {value.dtype}")
    num_vertices = vertices.shape[-2]
    if albedo is not None and (
        not isinstance(albedo, Tensor) or tuple(albedo.shape) not in ((num_vertices,), (batch, num_vertices))
    ):
        raise ValueError(f"albedo must be [V] or [B, V] with V = {num_vertices}, got {described(albedo)}")
    if incident is not None and (
        not isinstance(incident, Tensor) or incident.dim() != 2 or incident.shape[0] != num_vertices
        or incident.shape[1] == 0 or incident.dtype not in (torch.int32, torch.int64)
    ):  # fmt: skip
        raise ValueError(
            f"incident must be vertex_faces(faces, {num_vertices}), an integer [V, D] tensor with D >= 1, "
            f"got {described(incident, dtype=True)}"
        )


def _value_checks(
    faces: Tensor,
    depth: Tensor,
    finite: dict[str, Tensor | None],
    incident: Tensor | None,
    uv: Tensor | None,
    face_uv: Tensor | None,
) -> list[_Check]:
    """Render's checks of values, in the order their errors are raised: every tensor of ``finite`` (None: not
    given) is finite, the depths of the rotated vertices lie in [-2, 2], and faces, face_uv and incident index
    what they index (Mesh checked its tables once, but render takes any)."""
    checks = [_finite_check(name, value) for name, value in finite.items() if value is not None]
    checks += [_depth_check(depth), _index_check("faces", faces, depth.shape[-1], "vertices")]
    if face_uv is not None and uv is not None:
        checks.append(_index_check("face_uv", face_uv, len(uv), "uv coordinates"))
    if incident is not None:
        what = f"face slots ({faces.shape[0]} faces, then vertex_faces' padding)"
        checks.append(_index_check("incident", incident, faces.shape[0] + 1, what))
    return checks


def rasterize(screen: Tensor, depth: Tensor, faces: Tensor, size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Nearest front-facing triangle per pixel.

    screen: [B, V, 2] pixel coordinates (x right, y down); depth: [B, V] (larger = nearer, in [-2, 2]);
    faces: [F, 3] -> (hit [B, S, S] int64: index into the candidate list, -1 for background;
    candidates [N] int64: flat b * F + f of the faces that may cover a pixel;
    planes [N, 3, 3]: barycentric weight i at pixel centre (cx, cy) is planes[n, i] @ (cx, cy, 1)).
    """
    batch, num_faces = screen.shape[0], faces.shape[0]
    points = torch.cat([screen, depth[..., None]], -1)  # [B, V, 3]
    # index_select is much faster than advanced indexing on CPU.
    tri = points.index_select(1, faces.reshape(-1)).view(batch * num_faces, 3, 3)
    x, y = tri[..., 0], tri[..., 1]  # [BF, 3]
    x0, x1, x2 = x.unbind(-1)
    y0, y1, y2 = y.unbind(-1)
    # Twice the signed area; front faces (counter-clockwise seen from +z) are clockwise once y points down.
    area = (x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0)
    # Pixel-centre bounding boxes (pixel p has its centre at p + 0.5).
    left = torch.ceil(x.amin(-1) - 0.5).clamp(min=0)
    right = torch.floor(x.amax(-1) - 0.5).clamp(max=size - 1)
    top = torch.ceil(y.amin(-1) - 0.5).clamp(min=0)
    bottom = torch.floor(y.amax(-1) - 0.5).clamp(max=size - 1)
    live = (area < -1e-12) & (right >= left) & (bottom >= top)
    candidates = live.nonzero().squeeze(1)
    tri, inv = tri.index_select(0, candidates), -1.0 / area.index_select(0, candidates)
    left, right, top, bottom = (t.index_select(0, candidates).long() for t in (left, right, top, bottom))
    # Barycentric weight of corner i is the area of (pixel, corner j, corner k), j and k the next two.
    x, y, z = tri.unbind(-1)
    xj, yj, xk, yk = x.roll(-1, 1), y.roll(-1, 1), x.roll(-2, 1), y.roll(-2, 1)
    planes = torch.stack([yk - yj, xj - xk, xk * yj - xj * yk], -1) * inv[:, None, None]  # [N, 3, 3]
    z_plane = (planes * z[..., None]).sum(1)  # [N, 3]: depth as a plane in (cx, cy, 1)

    width = right - left + 1
    pixels = width * (bottom - top + 1)
    starts = pixels.cumsum(0) - pixels  # where each box's (box, pixel) pairs start among all boxes' pairs
    first_pixel = ((candidates // num_faces) * size + top) * size + left  # flat index of a box's top left pixel
    keys = torch.full((batch * size * size,), _EMPTY, dtype=torch.int64, device=screen.device)
    # The (box, pixel of its box) pairs are tested flat, in passes of whole boxes (see _passes and _PAIRS_PER_PASS):
    # a fixed number of tensor ops per pass (kernel launches on a GPU) whatever the boxes' sizes, no padding of
    # small boxes to the size of large ones, and memory bounded by the pass.
    for lo, hi, begin, end in _passes(pixels, starts):
        box = torch.repeat_interleave(pixels[lo:hi], output_size=end - begin) + lo  # [P]
        per_pair = functools.partial(torch.index_select, dim=0, index=box)  # (index_select: see above)
        k = torch.arange(begin, end, device=screen.device) - per_pair(starts)  # row-major in its box
        w = per_pair(width)
        row = k // w
        col = k - row * w
        cx, cy = per_pair(left) + col + 0.5, per_pair(top) + row + 0.5
        p, zp = per_pair(planes), per_pair(z_plane)
        edges = p[..., 0] * cx[:, None] + p[..., 1] * cy[:, None] + p[..., 2]  # [P, 3]
        inside = (edges >= -_EDGE_TOLERANCE).all(1)
        z = zp[:, 0] * cx + zp[:, 1] * cy + zp[:, 2]
        # (Vertex depths are in [-2, 2], render checks; the clamp catches pixels a hair outside a triangle.)
        depth_q = ((1.0 - z.clamp(-DEPTH_LIMIT, DEPTH_LIMIT)) * (_DEPTH_LEVELS / 2 - 1)).long()
        key = (depth_q << 32) | box
        pixel = per_pair(first_pixel) + row * size + col
        keys.scatter_reduce_(0, pixel[inside], key[inside], reduce="amin")
    hit = torch.where(keys == _EMPTY, -1, keys & 0xFFFFFFFF)
    return hit.view(batch, size, size), candidates, planes


def _passes(pixels: Tensor, starts: Tensor) -> list[tuple[int, int, int, int]]:
    """(first box, end box, first pair, end pair) of each pass over the boxes' (box, pixel) pairs: whole boxes,
    a new pass at the box holding every n-th pair (n: _PAIRS_PER_PASS for the tensors' device). pixels, starts:
    [N] int64 (starts: the exclusive cumulative sum of pixels). One host sync, two with more than one pass."""
    total = int(pixels.sum()) if len(pixels) else 0
    limit = _PAIRS_PER_PASS["cpu" if pixels.device.type == "cpu" else "gpu"]
    if total <= limit:
        return [(0, len(pixels), 0, total)] if total else []
    marks = torch.arange(0, total, limit, device=pixels.device)
    boxes = torch.searchsorted(starts, marks, right=True) - 1  # the box holding each mark
    # (box, its first pair) where each pass starts; a box holding several marks starts one pass (deduplicated on
    # the host: unique would be one more sync on a GPU).
    firsts = list(dict.fromkeys(zip(*torch.stack([boxes, starts[boxes]]).tolist())))
    ends = [*firsts[1:], (len(pixels), total)]
    return [(lo, hi, begin, end) for (lo, begin), (hi, end) in zip(firsts, ends)]


def render(
    vertices: Tensor,
    faces: Tensor,
    *,
    azimuth: Tensor,
    elevation: Tensor,
    light_azimuth: Tensor,
    light_elevation: Tensor,
    size: int = 64,
    albedo: Tensor | None = None,
    gain: Tensor | None = None,
    texture: Tensor | None = None,
    uv: Tensor | None = None,
    face_uv: Tensor | None = None,
    incident: Tensor | None = None,
    ambient: float = 0.15,
    zoom: float = 1.0,
    antialias: int = 1,
) -> Tensor:
    """Render grey images of a triangle mesh.

    vertices: [V, 3] or [B, V, 3] (per-image shapes), float32 or float64 (float16 and bfloat16 are rendered
    in float32); once rotated, their depths must lie in [-2, 2] (a radius of at most 2 always does);
    faces: [F, 3] int64 (or int32) with counter-clockwise (outward) winding;
    azimuth, elevation, light_azimuth, light_elevation: [B] radians, of any real dtype (computed in the
    vertices' dtype). albedo: [V] or [B, V] vertex albedo (default 1; ignored with a texture); gain: [B]
    albedo multiplier. texture: [H, W] grey texture with uv: [T, 2] in [0, 1] (v up) and face_uv: [F, 3] int64
    or int32 (all or none); albedo, gain, texture and uv are read in the vertices' dtype, whatever theirs.
    incident: [V, D] from :func:`vertex_faces` (computed when None; pass it to save time).
    antialias: supersampling factor (renders at size * antialias and averages).
    Returns [B, 1, size, size] in [0, 1] (float64 for float64 vertices, else float32), background 0.

    Bad arguments raise a ValueError naming them: shapes, dtypes and devices, and values (tensors not finite, depths
    outside [-2, 2], index entries out of range), the values in one host sync (computing incident takes one
    more, for its table's width).
    """
    for name, value in (("size", size), ("antialias", antialias)):
        Bounds(1).check(name, value, integer=True)
    Bounds(0, strict=True).check("zoom", zoom)
    Bounds(0).check("ambient", ambient)
    if ambient > 1:  # then 1 - ambient < 0: lit surfaces would come out darker than unlit ones
        raise ValueError(f"ambient must be in [0, 1], got {ambient!r}")
    if not isinstance(azimuth, Tensor) or azimuth.dim() != 1 or azimuth.shape[0] == 0:
        raise ValueError(f"azimuth must be [B] with B >= 1, got {described(azimuth)}")
    batch = azimuth.shape[0]
    if isinstance(vertices, Tensor) and vertices.dtype in (torch.float16, torch.bfloat16):
        vertices = vertices.float()  # (half precision would quantise depth and shading coarsely)
    check_mesh(vertices, faces, texture, uv, face_uv)
    per_image = {"azimuth": azimuth, "elevation": elevation, "light_azimuth": light_azimuth}
    per_image |= {"light_elevation": light_elevation} | ({} if gain is None else {"gain": gain})
    _check_render_inputs(vertices, faces, batch, per_image, albedo, incident)
    # Angles of any real dtype, in the vertices' (float16 and float64 angles met float32 in one matmul before).
    azimuth, elevation, light_azimuth, light_elevation = (
        v.to(vertices.dtype) for v in (azimuth, elevation, light_azimuth, light_elevation)
    )
    finite = {"vertices": vertices, **per_image, "albedo": albedo, "texture": texture, "uv": uv}
    shared = vertices.dim() == 2
    if shared:
        vertices = vertices.expand(batch, -1, -1)
    rot = rotation(azimuth, elevation)
    cam = vertices @ rot.transpose(1, 2)  # [B, V, 3]
    _check_all(_value_checks(faces, cam[..., 2], finite, incident, uv, face_uv))  # (one host sync for all)
    if incident is None:
        incident = _incident_table(faces, vertices.shape[1])
    full = size * antialias
    screen = torch.stack([cam[..., 0] * zoom + 1.0, 1.0 - cam[..., 1] * zoom], -1) * (full / 2)
    hit, candidates, planes = rasterize(screen, cam[..., 2], faces, full)

    b, py, px = (hit >= 0).nonzero(as_tuple=True)
    n_idx = hit[b, py, px]
    f = candidates.index_select(0, n_idx) % faces.shape[0]
    p = planes.index_select(0, n_idx)  # [N, 3, 3]
    bary = p[..., 0] * (px + 0.5)[:, None] + p[..., 1] * (py + 0.5)[:, None] + p[..., 2]  # [N, 3]
    corner = faces.index_select(0, f)  # [N, 3]
    if shared:  # one shape for the batch: normals once, then rotated
        normals = vertex_normals(vertices[:1], faces, incident)[0]  # [V, 3]
        n = (normals[corner] * bary[..., None]).sum(1)[:, None] @ rot[b].transpose(1, 2)
    else:
        normals = vertex_normals(cam, faces, incident)  # [B, V, 3]
        n = (normals[b[:, None], corner] * bary[..., None]).sum(1)
    n = F.normalize(n.view(-1, 3), dim=-1, eps=1e-12)
    light = light_direction(light_azimuth, light_elevation).to(n.dtype)[b]
    shade = ambient + (1.0 - ambient) * (n * light).sum(-1).clamp(min=0)

    if texture is not None and uv is not None and face_uv is not None:  # (all or none: check_mesh)
        tex_uv = (uv[face_uv[f]].to(bary.dtype) * bary[..., None]).sum(1)  # [N, 2]
        grid = torch.stack([tex_uv[:, 0] * 2 - 1, 1 - tex_uv[:, 1] * 2], -1).view(1, 1, -1, 2)
        rho = F.grid_sample(texture[None, None].to(grid.dtype), grid, align_corners=False).view(-1)
    elif albedo is None:
        rho = torch.ones_like(shade)
    elif albedo.dim() == 1:
        rho = (albedo[corner].to(bary.dtype) * bary).sum(1)
    else:
        rho = (albedo[b[:, None], corner].to(bary.dtype) * bary).sum(1)
    if gain is not None:
        rho = rho * gain.to(rho.dtype)[b]

    image = torch.zeros(batch, full, full, dtype=shade.dtype, device=shade.device)
    image[b, py, px] = (rho * shade).clamp(0.0, 1.0)
    image = image[:, None]
    if antialias > 1:
        image = F.avg_pool2d(image, antialias)
    return image
