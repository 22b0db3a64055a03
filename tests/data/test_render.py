"""The rasteriser: depth order, smoothness in pose, light conventions, one orientation for all meshes."""

import dataclasses
import math
import re
import sys

import pytest
import torch

from dcign_fast.data import Mesh, list_assets, load_asset, load_mesh, render
from dcign_fast.data.prepare_assets import REFERENCE, pitch_and_scale, registration_cost
from dcign_fast.data.render import _EDGE_TOLERANCE, _passes, rasterize, vertex_faces, vertex_normals


def _render(mesh, size=48, azimuth=0.0, elevation=0.0, light=0.0, light_elevation=0.0, device="cpu", **kw):
    n = max(len(t) if isinstance(t, torch.Tensor) else 1 for t in (azimuth, elevation, light, light_elevation))

    def full(v):
        return (v if isinstance(v, torch.Tensor) else torch.full((n,), float(v))).to(device)

    mesh = mesh.to(device)
    return render(
        mesh.vertices,
        mesh.faces,
        azimuth=full(azimuth),
        elevation=full(elevation),
        light_azimuth=full(light),
        light_elevation=full(light_elevation),
        size=size,
        albedo=mesh.albedo,
        texture=mesh.texture,
        uv=mesh.uv,
        face_uv=mesh.face_uv,
        zoom=1.4,
        **kw,
    )


def _nose(mesh, **pose):
    """(column, row) of the nose tip in the image: the mesh painted dark except a bright nose, flat light."""
    nose = (mesh.vertices - torch.tensor([0.0, 0.0, 0.6])).norm(dim=1) < 0.06
    marked = Mesh(mesh.name, mesh.vertices, mesh.faces, albedo=0.1 + 0.9 * nose.float())
    image = _render(marked, size=64, ambient=1.0, **pose)[0, 0]
    bright = (image > 0.5).float()
    rows, cols = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    return float((bright * cols).sum() / bright.sum()), float((bright * rows).sum() / bright.sum())


def _quad(z, albedo):
    """A square in the plane at depth z, facing +z (counter-clockwise seen from +z)."""
    v = torch.tensor([[-0.5, -0.5, z], [0.5, -0.5, z], [0.5, 0.5, z], [-0.5, 0.5, z]])
    return v, torch.tensor([[0, 1, 2], [0, 2, 3]]), torch.full((4,), albedo)


def test_nearer_surface_wins_whatever_the_face_order():
    z_far, z_near = sorted(torch.rand(2).tolist())  # +z points toward the camera
    a_far, a_near = 0.3 + 0.3 * torch.rand(2)
    v1, f1, al1 = _quad(z_far, float(a_far))
    v2, f2, al2 = _quad(z_near, float(a_near))
    for order in ((0, 1), (1, 0)):
        parts = [(v1, f1, al1), (v2, f2, al2)]
        (va, fa, aa), (vb, fb, ab) = parts[order[0]], parts[order[1]]
        vertices, faces, albedo = torch.cat([va, vb]), torch.cat([fa, fb + 4]), torch.cat([aa, ab])
        zero = torch.zeros(1)
        image = render(vertices, faces, azimuth=zero, elevation=zero, light_azimuth=zero,
                       light_elevation=zero, size=16, albedo=albedo, ambient=0.0)  # fmt: skip
        assert image[0, 0, 8, 8] == pytest.approx(float(a_near), abs=1e-5)
        assert image[0, 0, 0, 0] == 0  # background outside the squares


@pytest.mark.parametrize("pairs_per_pass", [None, 50])
def test_rasterize_matches_a_per_pixel_search(pairs_per_pass, monkeypatch):
    """Every pixel shows the nearest front-facing triangle that covers its centre, found here by testing every
    triangle at every pixel in float64: random triangles from slivers to wider than the image, partly off it,
    of both windings. Pixels whose answer hangs on rounding (a centre on an edge, two depths alike) are left
    out. In one pass over the (box, pixel) pairs, or in many, some smaller than a box."""
    if pairs_per_pass is not None:
        monkeypatch.setattr(
            sys.modules["dcign_fast.data.render"], "_PAIRS_PER_PASS", dict.fromkeys(("cpu", "gpu"), pairs_per_pass)
        )
    generator = torch.Generator().manual_seed(7)
    batch, vertices, size = 3, 90, 24
    scale = torch.rand(batch, vertices // 3, 1, 1, generator=generator) ** 3 * 40  # sizes from 0 to 40 px
    centre = torch.rand(batch, vertices // 3, 1, 2, generator=generator) * 32 - 4
    screen = (centre + scale * torch.randn(batch, vertices // 3, 3, 2, generator=generator)).view(batch, vertices, 2)
    depth = torch.rand(batch, vertices, generator=generator) * 2 - 1
    faces = torch.arange(vertices).view(-1, 3)
    hit, candidates, _ = rasterize(screen, depth, faces, size)
    shown = torch.where(hit >= 0, candidates[hit.clamp(min=0)] % len(faces), -1)

    corners = screen.double()[:, faces]  # [B, F, 3, 2]
    z = depth.double()[:, faces]  # [B, F, 3]
    centres = torch.stack(torch.meshgrid(torch.arange(size), torch.arange(size), indexing="xy"), -1).double() + 0.5
    p = centres.view(1, 1, -1, 2)  # [1, 1, P, 2] (x, y)
    edges = []
    for i in range(3):  # twice the signed area of (pixel, corner j, corner k) for corner i's weight
        a, b = corners[:, :, (i + 1) % 3, None] - p, corners[:, :, (i + 2) % 3, None] - p
        edges.append(a[..., 0] * b[..., 1] - b[..., 0] * a[..., 1])
    area = sum(edges)  # [B, F, P]: the triangle's twice signed area, negative when it faces the camera
    weights = torch.stack(edges, -1) / area[..., None]
    front = area < -1e-9
    covers = front & (weights >= 0).all(-1)
    band = 2 * _EDGE_TOLERANCE  # the rasteriser counts a centre this close outside an edge as inside
    near_edge = front & (weights > -band).all(-1) & (weights.abs() < band).any(-1)
    nearness = torch.where(covers, (weights * z[:, :, None]).sum(-1), -math.inf)  # larger is nearer
    top2 = nearness.topk(2, dim=1).values  # [B, 2, P]
    expected = torch.where(top2[:, 0] > -math.inf, nearness.argmax(1), -1)  # [B, P]
    clear = ~near_edge.any(1) & ((top2[:, 1] == -math.inf) | (top2[:, 0] - top2[:, 1] > 1e-6))
    shown = shown.view(batch, -1)
    assert clear.float().mean() > 0.9 and (expected[clear] >= 0).float().mean() > 0.15
    assert torch.equal(shown[clear], expected[clear])


def test_rasterizer_passes_cover_every_pair_once_in_whole_boxes(monkeypatch):
    monkeypatch.setattr(sys.modules["dcign_fast.data.render"], "_PAIRS_PER_PASS", {"cpu": 10, "gpu": 20})
    pixels = torch.tensor([3, 1, 25, 4, 4, 9, 1, 1, 12])
    passes = _passes(pixels, pixels.cumsum(0) - pixels)
    # A new pass at the box holding pair 0, 10, 20, ...: boxes 0, 2 (pairs 10 and 20), 3, 5 and 8.
    assert passes == [(0, 2, 0, 4), (2, 3, 4, 29), (3, 5, 29, 37), (5, 8, 37, 48), (8, 9, 48, 60)]
    assert _passes(pixels[:2], torch.tensor([0, 3])) == [(0, 2, 0, 4)] and _passes(pixels[:0], pixels[:0]) == []


def test_back_faces_are_culled():
    v, f, a = _quad(0.0, 0.8)
    pi = torch.full((1,), math.pi)
    zero = torch.zeros(1)
    image = render(v, f, azimuth=pi, elevation=zero, light_azimuth=zero, light_elevation=zero, size=16, albedo=a)
    assert image.abs().max() == 0


def test_vertex_normals_match_a_scatter_sum():
    mesh = load_asset("meshmonk")
    vertices = mesh.vertices + 0.01 * torch.randn(2, *mesh.vertices.shape)
    corners = vertices[:, mesh.faces]
    face_n = torch.linalg.cross(corners[:, :, 1] - corners[:, :, 0], corners[:, :, 2] - corners[:, :, 0])
    expected = torch.zeros_like(vertices)
    for i in range(3):
        expected.index_add_(1, mesh.faces[:, i], face_n)
    got = vertex_normals(vertices, mesh.faces, vertex_faces(mesh.faces, vertices.shape[1]))
    torch.testing.assert_close(got, torch.nn.functional.normalize(expected, dim=-1), atol=1e-5, rtol=1e-4)


def test_small_azimuth_step_changes_the_image_a_little():
    mesh = load_asset("meshmonk")
    base = float(torch.empty(()).uniform_(-1.0, 1.0))
    images = _render(mesh, size=64, azimuth=torch.tensor([base, base + 0.01, base + 0.3]), antialias=2)
    small, large = (images[1] - images[0]).abs().mean(), (images[2] - images[0]).abs().mean()
    assert 0 < small < 0.01
    assert large > 5 * small


def test_light_changes_shading_not_silhouette():
    mesh = load_asset("menpo3d")
    light = (torch.rand(4) * 2 - 1) * 1.4
    images = _render(mesh, azimuth=float(torch.rand(()) - 0.5), light=light, light_elevation=0.2)
    masks = images > 0
    assert (masks == masks[:1]).all()
    assert (images[1:] - images[:1]).abs().amax() > 0.1


@pytest.mark.parametrize("name", list_assets())
def test_packaged_meshes_have_no_folded_faces(name):
    """Decimation once left a face and an upside-down twin on the same three corners (351 in menpo3d): their
    normals cancelled in the vertex sums, and 54 vertices rendered as black specks."""
    mesh = load_asset(name)
    corners = torch.sort(mesh.faces, dim=1).values
    assert len(torch.unique(corners, dim=0)) == len(corners)
    face_area = torch.linalg.cross(*(mesh.vertices[mesh.faces[:, k]] - mesh.vertices[mesh.faces[:, 0]] for k in (1, 2)))
    summed = torch.zeros_like(mesh.vertices).index_add_(0, mesh.faces.reshape(-1), face_area.repeat_interleave(3, 0))
    largest = torch.zeros(len(mesh.vertices)).scatter_reduce_(
        0, mesh.faces.reshape(-1), face_area.norm(dim=1).repeat_interleave(3), "amax"
    )
    assert (summed.norm(dim=1) > 0.05 * largest).all()


@pytest.mark.parametrize("name", list_assets())
def test_packaged_meshes_are_manifold_and_consistently_wound(name):
    """Vertex-clustering decimation once left 426 edges shared by three or more faces in menpo3d (its eyes
    smeared). Every edge must border at most two faces, and those two must run it in opposite directions."""
    faces = load_asset(name).faces
    directed = torch.cat([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    _, per_edge = torch.unique(torch.sort(directed, dim=1).values, dim=0, return_counts=True)
    _, per_directed_edge = torch.unique(directed, dim=0, return_counts=True)
    assert per_edge.max() <= 2
    assert per_directed_edge.max() == 1


@pytest.mark.parametrize("name", sorted(set(list_assets()) - {REFERENCE}))
def test_packaged_faces_are_registered_to_the_reference(name):
    """Placed by the nose tip and the chin alone, the James scan looked 0.23 rad further down than the
    template, which shifted the elevation of every James face. Turning a packaged face 0.04 rad up or down,
    or scaling it by 4%, must make its registration cost worse."""
    vertices = load_asset(name).vertices.double().numpy()
    reference = load_asset(REFERENCE).vertices.double().numpy()
    packaged = registration_cost(vertices, reference)
    for pitch, scale in ((0.04, 1.0), (-0.04, 1.0), (0.0, 1.04), (0.0, 0.96)):
        assert registration_cost(pitch_and_scale(vertices, pitch, scale), reference) > packaged


def test_registration_refuses_a_mesh_outside_the_face_region():
    reference = load_asset(REFERENCE).vertices.double().numpy()
    behind = reference - [0.0, 0.0, 2.0]  # no vertex in front any more: the cost would be NaN
    with pytest.raises(ValueError, match="vertices has 0 vertices in the face region"):
        registration_cost(behind, reference)


@pytest.mark.parametrize("name", list_assets())
def test_one_orientation_convention_for_every_mesh(name):
    mesh = load_asset(name)
    # Positive azimuth turns the nose toward image right; positive elevation moves it up (rows decrease).
    centre = _nose(mesh)
    assert abs(centre[0] - 32) < 3 and abs(centre[1] - 32) < 3
    assert _nose(mesh, azimuth=0.4)[0] > centre[0] + 3 > _nose(mesh, azimuth=-0.4)[0] + 6
    assert _nose(mesh, elevation=0.4)[1] < centre[1] - 3 < _nose(mesh, elevation=-0.4)[1] - 6
    # Elevation keeps its sense when the head is turned (a sign flip here broke the elevation latent).
    for azimuth in (-1.0, 1.0):
        assert _nose(mesh, azimuth=azimuth, elevation=0.3)[1] < _nose(mesh, azimuth=azimuth, elevation=-0.3)[1] - 4
    # Positive light azimuth lights the image-right half of a frontal face.
    lit_left, lit_right = _render(mesh, light=torch.tensor([-1.2, 1.2]))
    half = lit_left.shape[-1] // 2
    assert lit_right[..., half:].sum() > lit_right[..., :half].sum()
    assert lit_left[..., :half].sum() > lit_left[..., half:].sum()


def test_render_is_deterministic_and_in_range():
    mesh = load_asset("james")
    azimuth = (torch.rand(3) * 2 - 1) * 1.5
    a = _render(mesh, size=40, azimuth=azimuth, light=0.4, antialias=2)
    b = _render(mesh, size=40, azimuth=azimuth, light=0.4, antialias=2)
    assert a.shape == (3, 1, 40, 40)
    assert torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1
    int32 = dataclasses.replace(mesh, faces=mesh.faces.int())  # as they rendered before faces were checked
    assert torch.equal(_render(int32, size=40, azimuth=azimuth, light=0.4, antialias=2), a)


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["james", "menpo3d"])
def test_cpu_and_cuda_agree(name):
    """Measured on an H200 over 8 poses: the untextured scans agree to 4e-4 everywhere. James's photo texture
    differs by 1e-3 or more at 0.6% of pixels (at most 0.05, mean 3e-5; the silhouettes identical): the texture
    lookup differs, not the geometry or the shading."""
    mesh = load_asset(name)
    azimuth, light = (torch.rand(4) * 2 - 1) * 1.5, (torch.rand(4) * 2 - 1) * 1.4
    cpu = _render(mesh, size=64, azimuth=azimuth, light=light)
    gpu = _render(mesh, size=64, azimuth=azimuth, light=light, device="cuda").cpu()
    assert torch.equal(cpu > 0, gpu > 0)
    difference = (cpu - gpu).abs()
    if mesh.texture is None:
        assert difference.max() < 1e-3
    else:
        assert (difference < 1e-3).float().mean() > 0.98 and difference.max() < 0.2


def test_no_pinholes_inside_a_surface():
    mesh = load_asset("meshmonk")
    images = _render(mesh, size=96, azimuth=(torch.rand(6) * 2 - 1) * 1.4, elevation=(torch.rand(6) * 2 - 1) * 0.4)
    covered = images[:, 0] > 0
    inner = covered[:, :-2, 1:-1] & covered[:, 2:, 1:-1] & covered[:, 1:-1, :-2] & covered[:, 1:-1, 2:]
    assert not (inner & ~covered[:, 1:-1, 1:-1]).any()


def _tetrahedron():
    vertices = torch.rand(4, 3, dtype=torch.float64) + torch.eye(4, 3, dtype=torch.float64)
    faces = torch.tensor([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]])
    return vertices, faces


@pytest.mark.parametrize("suffix", [".off", ".ply", ".obj"])
def test_mesh_files_load(tmp_path, suffix):
    vertices, faces = _tetrahedron()
    v_lines = [" ".join(f"{x:.9f}" for x in row) for row in vertices.tolist()]
    f_rows = faces.tolist()
    if suffix == ".off":
        text = ["OFF", "4 4 0", *v_lines, *(f"3 {a} {b} {c}" for a, b, c in f_rows)]
    elif suffix == ".ply":
        header = ["ply", "format ascii 1.0", "element vertex 4", "property float x", "property float y"]
        header += ["property float z", "element face 4", "property list uchar int vertex_indices", "end_header"]
        text = [*header, *v_lines, *(f"3 {a} {b} {c}" for a, b, c in f_rows)]
    else:
        text = [*(f"v {line}" for line in v_lines), *(f"f {a + 1} {b + 1} {c + 1}" for a, b, c in f_rows)]
    path = tmp_path / f"tetra{suffix}"
    path.write_text("\n".join(text) + "\n")
    mesh = load_mesh(path, radius=0.5)
    assert torch.equal(mesh.faces, faces)
    centred = vertices - (vertices.amax(0) + vertices.amin(0)) / 2
    expected = centred * 0.5 / centred.norm(dim=1).max()
    torch.testing.assert_close(mesh.vertices.double(), expected, atol=1e-6, rtol=0)


_PLY_HEADER = ["ply", "format ascii 1.0", "element vertex 3", "property float x", "property float y"]
_PLY_HEADER += ["property float z", "element face 1", "property list uchar int vertex_indices", "end_header"]
_BINARY_INT64_PLY = ["ply", "format binary_little_endian 1.0", "element vertex 1", "property int64 x", "end_header"]


@pytest.mark.parametrize(
    "header, body, words",
    [
        ([h for h in _PLY_HEADER if h != "property float z"], ["0 0", "1 0", "0 1", "3 0 1 2"], "no 'z' in its header"),
        (_PLY_HEADER[:6] + ["end_header"], ["0 0 0", "1 0 0", "0 1 0"], "no 'face' in its header"),
        ([h for h in _PLY_HEADER if not h.startswith("format")], ["0 0 0"], "no format line in its header"),
        (_PLY_HEADER, ["0 0 nan", "1 0 0", "0 1 0", "3 0 1 2"], "not finite"),
        (_PLY_HEADER, ["1 1 1", "1 1 1", "1 1 1", "3 0 1 2"], "all its vertices coincide"),
        (_BINARY_INT64_PLY, ["x"], "unsupported PLY property type 'int64'"),
    ],
)
def test_broken_mesh_files_are_refused_naming_the_file(header, body, words, tmp_path):
    """A KeyError, a bare StopIteration or NaN vertices (with a numpy warning) before."""
    path = tmp_path / "broken.ply"
    path.write_text("\n".join([*header, *body]) + "\n")
    with pytest.raises(ValueError, match=f"broken.ply.*{words}"):
        load_mesh(path)


def test_unknown_mesh_format_needs_trimesh(tmp_path):
    path = tmp_path / "thing.stl"
    path.write_bytes(b"solid x\nendsolid x\n")
    try:
        import trimesh  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="trimesh"):
            load_mesh(path)
    else:
        pytest.skip("trimesh is installed")


@pytest.mark.parametrize(
    "change, words",
    [
        ({"size": 0}, "size must be >= 1"),
        ({"antialias": 0}, "antialias must be >= 1"),
        ({"azimuth": torch.zeros(0)}, r"azimuth must be \[B\] with B >= 1"),
        ({"azimuth": [0.0, 0.0]}, r"azimuth must be \[B\] with B >= 1, got a list"),
        ({"elevation": torch.zeros(3)}, r"elevation must be \[B\] with B = 2 \(azimuth's\), got shape \(3,\)"),
        ({"light_elevation": torch.zeros(2, 1)}, r"light_elevation must be \[B\] with B = 2"),
        ({"gain": torch.ones(3)}, r"gain must be \[B\] with B = 2"),
        ({"light_azimuth": torch.tensor([0.0, float("nan")])}, "light_azimuth must be finite"),
        ({"vertices": torch.zeros(3, 5, 3)}, r"vertices \[B, V, 3\] must have B = 2"),
        ({"vertices": torch.zeros(4, 3, dtype=torch.int64)}, "vertices must be float32 or float64"),
        ({"faces": torch.zeros(4, 3)}, r"faces must be an integer \[F, 3\] tensor, got torch.float32"),
        ({"albedo": torch.ones(7)}, r"albedo must be \[V\] or \[B, V\]"),
        ({"albedo": [1.0] * 4}, r"albedo must be \[V\] or \[B, V\] with V = 4, got a list"),
        # (meta stands in for a GPU: torch's "Tensor on device meta is not on the expected device cpu!" before)
        ({"albedo": torch.ones(4, device="meta")}, r"albedo must be on the vertices' device \(cpu\), got meta"),
        ({"elevation": torch.zeros(2, device="meta")}, r"elevation must be on the vertices' device \(cpu\)"),
        ({"faces": torch.zeros(2, 3, dtype=torch.long, device="meta")}, r"faces must be on the vertices' device"),
        ({"ambient": float("nan")}, "ambient must be >= 0 and finite"),
        ({"ambient": -1.0}, "ambient must be >= 0"),
        ({"ambient": 5.0}, r"ambient must be in \[0, 1\], got 5.0"),
        (
            {"faces": torch.tensor([[0, 1, 5]])},
            r"faces must index the 4 vertices, entries in \[0, 4\), got .* \[0, 5\]",
        ),
        ({"faces": torch.tensor([[0, 1, -1]])}, r"faces must index the 4 vertices, .* got entries in \[-1, 1\]"),
        (
            {"vertices": torch.zeros(0, 3), "faces": torch.zeros(0, 3).long()},
            "needs vertices and faces, got 0 vertices",
        ),
        ({"texture": torch.ones(4, 4)}, "texture, uv and face_uv go together"),
        (
            {"texture": torch.ones(4, 4), "uv": torch.zeros(3), "face_uv": torch.zeros(2, 3).long()},
            r"uv must be .*\[T, 2\]",
        ),
        (
            {"texture": torch.ones(3, 4, 4), "uv": torch.zeros(3, 2), "face_uv": torch.zeros(2, 3).long()},
            r"texture must",
        ),
        (
            {"texture": torch.ones(4, 4), "uv": torch.zeros(3, 2), "face_uv": torch.zeros(1, 3).long()},
            r"face_uv .*F = 2",
        ),
        (
            {"incident": torch.zeros(1, 1).long()},
            r"incident must be vertex_faces\(faces, 4\), an integer \[V, D\] tensor with D >= 1, got shape \(1, 1\)",
        ),
    ],
)
def test_bad_arguments_are_refused_by_name(change, words):
    """Size or antialias 0 returned empty images, a batch of 0 raised IndexError, and mismatched tensors
    failed deep inside torch ("stack expects each tensor to be equal size") or rendered NaN angles."""
    vertices, faces, _ = _quad(0.0, 1.0)
    angles = {k: torch.zeros(2) for k in ("azimuth", "elevation", "light_azimuth", "light_elevation")}
    with pytest.raises(ValueError, match=words):
        render(**{"vertices": vertices, "faces": faces, **angles, "size": 8, **change})


def test_a_mesh_is_checked_once_when_made():
    """Its face indices (and uv indices) are checked here, so rendering it need not check them each time."""
    vertices, faces, _ = _quad(0.0, 1.0)
    with pytest.raises(ValueError, match=r"faces must be an integer \[F, 3\] tensor, got torch.float32"):
        Mesh("quad", vertices, faces.float())
    with pytest.raises(ValueError, match=r"faces must index the 4 vertices"):
        Mesh("quad", vertices, torch.tensor([[0, 1, 9]]))
    with pytest.raises(ValueError, match=r"face_uv must index the 3 uv coordinates, .* got entries in \[0, 7\]"):
        Mesh(
            "quad",
            vertices,
            faces,
            texture=torch.ones(4, 4),
            uv=torch.zeros(3, 2),
            face_uv=faces * 0 + 7 * (faces == 2),
        )
    with pytest.raises(ValueError, match=r"albedo must be a real \[V\] tensor with V = 4, got shape \(5,\)"):
        Mesh("quad", vertices, faces, albedo=torch.ones(5))  # (was refused by render only)
    with pytest.raises(ValueError, match=r"faces must be an integer \[F, 3\] tensor, got torch.float32"):
        vertex_faces(faces.float(), 4)  # (render's docstring offers it: "bincount_cpu" not implemented for 'Float')


def test_load_asset_takes_a_name_not_a_path():
    for name in ("../assets/james", "nobody"):  # (the first loaded: a path reached any .npz)
        with pytest.raises(ValueError, match=f"no packaged mesh named '{re.escape(name)}'; available: james, "):
            load_asset(name)


def test_albedo_and_texture_of_other_dtypes_are_read_in_the_vertices_dtype():
    """A float64 albedo or uv with float32 vertices raised "Index put requires the source and destination dtypes
    match"; so did a Mesh of float64 vertices in a sweep. A Mesh stores float32; render reads them as its vertices'."""
    vertices, faces, _ = _quad(0.0, 1.0)
    albedo, uv = torch.rand(4), torch.rand(4, 2)
    angles = {k: torch.rand(2) for k in ("azimuth", "elevation", "light_azimuth", "light_elevation")}
    for dtype in (torch.float16, torch.float64):
        for inputs in ({"albedo": albedo}, {"texture": torch.rand(4, 4), "uv": uv, "face_uv": faces}):
            expected = render(vertices, faces, **angles, size=8, **inputs)
            rounded = {k: v.to(dtype).float() if k != "face_uv" else v for k, v in inputs.items()}
            got = render(
                vertices,
                faces,
                **angles,
                size=8,
                **{k: v.to(dtype) if k != "face_uv" else v for k, v in inputs.items()},
            )
            assert got.dtype == torch.float32
            torch.testing.assert_close(got, render(vertices, faces, **angles, size=8, **rounded))
            assert dtype == torch.float16 or torch.equal(got, expected)
    mesh = Mesh("quad", vertices.double(), faces, albedo=albedo.double())
    assert mesh.vertices.dtype == mesh.albedo.dtype == torch.float32


@pytest.mark.parametrize("radius", [0, -1.0, float("nan")])
def test_load_mesh_refuses_a_radius_that_is_not_positive(radius, tmp_path):
    with pytest.raises(ValueError, match="radius must be > 0"):
        load_mesh(tmp_path / "never-read.ply", radius=radius)


def _mesh_args(mesh, batch=2, **change):
    """render's arguments for ``mesh`` at a small pose (incident passed, as the sampler does), then ``change``."""
    angles = {k: torch.full((batch,), 0.2) for k in ("azimuth", "elevation", "light_azimuth", "light_elevation")}
    textured = {"texture": mesh.texture, "uv": mesh.uv, "face_uv": mesh.face_uv} if mesh.texture is not None else {}
    base = {"vertices": mesh.vertices, "faces": mesh.faces, **angles, "size": 16, "incident": mesh.incident}
    return {**base, "albedo": mesh.albedo, **textured, **change}


@pytest.fixture(scope="module")
def james():
    return load_asset("james")  # (the textured scan)


def _nan_at(t, index=5):
    t = t.clone()
    t.view(-1)[index] = float("nan")
    return t


@pytest.mark.parametrize(
    "change, words",
    [
        # D3: vertices not finite (faces touching them were dropped; all NaN gave a black image)
        (lambda m: {"vertices": _nan_at(m.vertices)}, "vertices must be finite, got 1 of its .* entries not finite"),
        (lambda m: {"vertices": m.vertices.expand(2, -1, -1) * float("inf")}, "vertices must be finite"),
        # D3: depths outside the range the keys hold (clamped, so that two surfaces tied)
        (
            lambda m: {"vertices": m.vertices * 5},
            r"vertices must lie within depth \[-2, 2\] once rotated .*got depths in \[-",
        ),
        # D4: NaN albedo, texture, uv (NaN pixels)
        (lambda m: {"albedo": _nan_at(torch.ones(len(m.vertices)))}, "albedo must be finite"),
        (lambda m: {"texture": _nan_at(m.texture)}, "texture must be finite"),
        (lambda m: {"uv": _nan_at(m.uv)}, "uv must be finite"),
        (lambda m: {"texture": m.texture[:0]}, r"texture must be a floating-point \[H, W\] tensor with H, W >= 1"),
        # D5: index tensors with incident= given (torch's INDICES / IndexError; silent flat shading)
        (lambda m: {"faces": m.faces.clamp(max=len(m.vertices) + 5) + 6}, "faces must index the .* vertices"),
        (lambda m: {"faces": m.faces - 1}, r"faces must index the .* vertices, .* got entries in \[-1,"),
        (lambda m: {"uv": m.uv[:10]}, r"face_uv must index the 10 uv coordinates, entries in \[0, 10\)"),
        (lambda m: {"face_uv": m.face_uv - 10**6}, r"face_uv must index the .* uv coordinates"),
        (lambda m: {"face_uv": m.face_uv.bool()}, "face_uv must be an int32 or int64 .* got torch.bool"),
        (lambda m: {"face_uv": m.face_uv.short()}, "face_uv must be an int32 or int64 .* got torch.int16"),
        (lambda m: {"incident": m.incident + 10**6}, r"incident must index the \d+ face slots"),
        (lambda m: {"incident": m.incident - 10**6}, r"incident must index .* got entries in \[-1000000"),
        (lambda m: {"incident": m.incident[:, :0]}, r"incident must be .* with D >= 1, got shape \(\d+, 0\)"),
        (lambda m: {"incident": m.incident.short()}, r"incident must be .* an integer \[V, D\] .* torch.int16"),
        # D6: angles that are not real numbers (complex: the imaginary part was dropped)
        (lambda m: {"azimuth": torch.zeros(2, dtype=torch.complex64)}, "azimuth must be a real .*complex64"),
        (lambda m: {"light_elevation": torch.zeros(2, dtype=torch.bool)}, "light_elevation must be a real"),
        (lambda m: {"gain": torch.ones(2, dtype=torch.bool)}, "gain must be a real"),
    ],
)
def test_bad_values_are_refused_by_name_with_incident_given(james, change, words):
    with pytest.raises(ValueError, match=words):
        render(**_mesh_args(james, **change(james)))


def test_depth_beyond_one_keeps_the_nearer_surface():
    """Depths outside [-1, 1] were clamped, so the back triangle (lower face index) won the tie."""

    def tri(z):
        return [[-0.5, -0.5, z], [0.5, -0.5, z], [0.0, 0.5, z]]

    for back, front in ((1.5, 2.0), (-2.0, -1.2), (-1.9, 1.9)):
        vertices, faces = torch.tensor(tri(back) + tri(front)), torch.tensor([[0, 1, 2], [3, 4, 5]])
        z = torch.zeros(1)
        image = render(
            vertices, faces, azimuth=z, elevation=z, light_azimuth=z, light_elevation=z, size=9,
            albedo=torch.tensor([0.2] * 3 + [1.0] * 3), ambient=1.0,
        )  # fmt: skip
        assert image[0, 0, 4, 4] == 1.0, (back, front)


@pytest.mark.parametrize(
    "angles, vertices",
    [
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float64, torch.float32),
        (torch.float16, torch.float64),
        (torch.int64, torch.float32),
        (torch.float32, torch.float16),
        (torch.float32, torch.bfloat16),
    ],
)
def test_angles_and_vertices_of_other_dtypes_render_as_float32(angles, vertices):
    """A float16 or bfloat16 azimuth raised "expected scalar type Float but found Half" (as did float64 vertices
    with a float16 azimuth); float16 vertices were refused. Now angles are computed in the vertices' dtype and
    half-precision vertices in float32: the same images as float32 inputs, up to the inputs' rounding."""
    mesh = load_asset("meshmonk")
    pose = {"azimuth": torch.tensor([0.0, 1.0]), "elevation": torch.tensor([0.0, -1.0])}
    pose |= {"light_azimuth": torch.tensor([1.0, 0.0]), "light_elevation": torch.tensor([0.0, 0.0])}
    rounded = {k: v.to(angles).to(torch.float32) for k, v in pose.items()}  # (what the other dtype can hold)
    reference = render(mesh.vertices.to(vertices).float(), mesh.faces, **rounded, size=32)
    got = render(mesh.vertices.to(vertices), mesh.faces, **{k: v.to(angles) for k, v in pose.items()}, size=32)
    assert got.dtype == (torch.float64 if vertices == torch.float64 else torch.float32)
    # (float64 vertices: the same image but for pixels on a silhouette edge, where rounding moves the coverage)
    assert ((got.float() - reference).abs() > 1e-4).float().mean() < 0.01


_MALFORMED_MESH_FILES = [
    ("huge.obj", "v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 1180591620717411303424\n", "too large"),
    ("huge.off", "OFF\n3 1 0\n0 0 0\n1 0 0\n0 1 0\n3 0 1 99999999999999999999999\n", "too large"),
    (
        "huge.ply",
        "\n".join([*_PLY_HEADER, "0 0 0", "1 0 0", "0 1 0", "3 0 1 99999999999999999999999"]),
        "too large",
    ),
    (
        "nolist.ply",
        "\n".join(
            [*_PLY_HEADER[:6], "element face 1", "property int foo", "end_header", "0 0 0", "1 0 0", "0 1 0", "3"]
        ),
        "its face element has no list property",
    ),
    ("big.obj", "v 1e308 0 0\nv -1e308 0 0\nv 0 1 0\nf 1 2 3\n", "coordinates span more than a float holds"),
    ("nan.off", "COFF\n3 1 0\n0 0 0 nan 0 0 255\n1 0 0 0 255 0 255\n0 1 0 0 0 255 255\n3 0 1 2\n", "colours"),
    ("neg.off", "COFF\n3 1 0\n0 0 0 -500 0 0 255\n1 0 0 0 255 0 255\n0 1 0 0 0 255 255\n3 0 1 2\n", "colours"),
    (
        "nan.ply",
        "\n".join(
            [
                *_PLY_HEADER[:6],
                "property uchar red",
                "property float green",
                "property uchar blue",
                *_PLY_HEADER[6:],
            ]
        )
        + "\n0 0 0 1 nan 1\n1 0 0 1 2 3\n0 1 0 1 2 3\n3 0 1 2",
        "vertex colours that are not finite numbers in",
    ),
    ("nocounts.off", "OFF\n", "no vertex and face counts"),
    ("short.off", "OFF\n3 1 0\n0 0 0\n1 0 0\n", "ends before the 3 vertices and 1 faces"),
    ("flat.off", "OFF\n3 1 0\n0 0\n1 0\n0 1\n3 0 1 2\n", "fewer than 3 coordinates"),
    ("corners.off", "OFF\n3 1 0\n0 0 0\n1 0 0\n0 1 0\n5 0 1 2\n", "counts 5 corners and lists 3"),
    ("flat.obj", "v 0 0 0\nv 1 0\nv 0 1 0\nf 1 2 3\n", "fewer than 3 coordinates: 'v 1 0'"),
    ("short.ply", "\n".join([*_PLY_HEADER, "0 0 0", "1 0 0", "0 1"]), "body ends before the elements"),
    ("quad.ply", "\n".join([*_PLY_HEADER[:3], "property quad x", *_PLY_HEADER[4:]]), "type 'quad'"),
    ("fmt.ply", "\n".join(["ply", "format binary_little_endain 1.0", *_PLY_HEADER[2:]]), "unknown PLY format"),
    (
        "short_binary.ply",
        "\n".join(["ply", "format binary_little_endian 1.0", *_PLY_HEADER[2:], "xyz"]),
        "body ends before the elements",
    ),
]


@pytest.mark.parametrize("name, text, words", _MALFORMED_MESH_FILES, ids=[case[0] for case in _MALFORMED_MESH_FILES])
def test_malformed_mesh_files_are_refused_naming_the_file(name, text, words, tmp_path):
    """An OverflowError and a KeyError that named no file; a mesh of zero vertices (extent inf); NaN albedo,
    with the other vertices' colours left unscaled (a NaN maximum compares false with 1). Then the reasons of
    the rest were Python's ("list index out of range", numpy's "inhomogeneous shape"), a misspelt format was
    read as big-endian (and failed on its indices), and an OFF face of 5 corners listing 3 loaded as one."""
    path = tmp_path / name
    path.write_text(text + "\n")
    with pytest.raises(ValueError, match=f"{name}.*{words}"):
        load_mesh(path)


def test_mesh_colours_are_scaled_alike_by_every_reader(tmp_path):
    """Colours in 0..255 and in 0..1 give the same albedo, from .off and .ply (the scaling moved to read_mesh)."""
    rows = ["0 0 0", "1 0 0", "0 1 0"]
    albedos = []
    for scale in (255, 1):
        colours = [f"{r * scale} {g * scale} {b * scale}" for r, g, b in ((1, 0, 0), (0, 1, 0), (0.2, 0.2, 1))]
        off = tmp_path / f"c{scale}.off"
        off.write_text("\n".join(["COFF", "3 1 0", *(f"{v} {c} 255" for v, c in zip(rows, colours)), "3 0 1 2"]))
        header = [*_PLY_HEADER[:6], "property float red", "property float green", "property float blue"]
        ply = tmp_path / f"c{scale}.ply"
        ply.write_text("\n".join([*header, *_PLY_HEADER[6:], *(f"{v} {c}" for v, c in zip(rows, colours)), "3 0 1 2"]))
        albedos += [load_mesh(off).albedo, load_mesh(ply).albedo]
    for albedo in albedos:
        torch.testing.assert_close(albedo, torch.tensor([0.21, 0.72, 0.21 * 0.2 + 0.72 * 0.2 + 0.07]))


def test_load_mesh_refuses_a_radius_past_the_depth_range(tmp_path):
    with pytest.raises(ValueError, match=r"radius must be at most 2 \(render's depth range\), got 2.5"):
        load_mesh(tmp_path / "never-read.ply", radius=2.5)


class _ScalarReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts reads of a tensor's value on the host (a sync each on a GPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default)
        return func(*args, **(kwargs or {}))


FACTORS = ("azimuth", "elevation", "light_azimuth", "light_elevation")


def test_render_reads_its_checks_back_once_and_once_more_to_compute_incident():
    """Every value check in one read, and one read of the rasterizer's count of (box, pixel) pairs; vertex_faces'
    own check of faces repeated render's when incident was None."""
    mesh, angles = load_asset("meshmonk"), torch.full((2,), 0.3)
    reads = {}
    for incident in (mesh.incident, None):
        with _ScalarReads() as counted:
            render(mesh.vertices, mesh.faces, **dict.fromkeys(FACTORS, angles), incident=incident)
        reads[incident is None] = counted.count
    assert reads == {False: 2, True: 3}  # (the third: the width of incident's table)
