"""Promises of the data modules that no other test pinned (a mutation audit found each one could break
unnoticed): the renderer's shading and geometry, the sampler's sweeps and factors, the identity modes, mesh
files, folder and cache datasets, the preview and the generator streams."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dcign_fast.data import IdentitySpace, SweepSampler, load_asset, preview, render
from dcign_fast.data.cache import SweepCache, write_cache
from dcign_fast.data.folders import KIND_DIRS, SweepFolders
from dcign_fast.data.identity import MODES, mode_fields
from dcign_fast.data.meshes import load_mesh
from dcign_fast.data.render import light_direction
from dcign_fast.data.sweeps import SweepRanges


def _quad(z=0.0, s=0.5):
    """A square facing the camera (two triangles sharing a diagonal), at depth z."""
    v = torch.tensor([[-s, -s, z], [s, -s, z], [s, s, z], [-s, s, z]])
    return v, torch.tensor([[0, 1, 2], [0, 2, 3]])


def _r(v, f, az=0.0, el=0.0, laz=0.0, lel=0.0, **kw):
    """render() of one image at the given pose and light."""

    def t(x):
        return torch.tensor([float(x)])

    return render(v, f, azimuth=t(az), elevation=t(el), light_azimuth=t(laz), light_elevation=t(lel), **kw)


def test_light_elevation_lights_from_above():
    m = load_asset("meshmonk")
    up, down = (_r(m.vertices, m.faces, lel=e, size=48, zoom=1.4)[0, 0] for e in (0.8, -0.8))
    assert up[:24].sum() > up[24:].sum() and down[24:].sum() > down[:24].sum()


def test_light_direction_is_unit():
    a, e = torch.rand(50) * 6 - 3, torch.rand(50) * 3 - 1.5
    torch.testing.assert_close(light_direction(a, e).norm(dim=-1), torch.ones(50))


def test_shading_values():
    # Albedo x (ambient + (1 - ambient) x max(0, cos)): lit head-on 0.5 x 1; lit from behind, ambient alone.
    v, f = _quad()
    al = torch.full((4,), 0.5)
    lit = _r(v, f, size=16, albedo=al, ambient=0.15)[0, 0, 8, 8]
    back = _r(v, f, laz=math.pi, size=16, albedo=al, ambient=0.15)[0, 0, 8, 8]
    assert float(lit) == pytest.approx(0.5, abs=1e-5) and float(back) == pytest.approx(0.075, abs=1e-5)


def test_zoom_is_isotropic():
    v, f = _quad()
    mask = _r(v, f, size=40, zoom=1.5)[0, 0] > 0
    assert mask.any(0).sum() == mask.any(1).sum() == 30


def test_antialias_averages():
    m = load_asset("meshmonk")
    a = _r(m.vertices, m.faces, az=0.3, size=16, antialias=2, zoom=1.4)
    b = F.avg_pool2d(_r(m.vertices, m.faces, az=0.3, size=32, zoom=1.4), 2)
    torch.testing.assert_close(a, b)


def test_texture_v_is_up():
    v, f = _quad()
    tex = torch.tensor([[1.0], [0.0]])  # row 0 = top of the texture (v = 1)
    uv = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    img = _r(v, f, size=16, texture=tex, uv=uv, face_uv=f, ambient=1.0)[0, 0]
    assert img[4:8].mean() > img[8:12].mean() + 0.2


def test_gain_scales_albedo():
    m = load_asset("meshmonk")
    a = _r(m.vertices, m.faces, size=24, zoom=1.4)
    b = _r(m.vertices, m.faces, size=24, zoom=1.4, gain=torch.tensor([0.5]))
    torch.testing.assert_close(b, 0.5 * a)


def test_depth_above_two_refused():
    v, f = _quad(z=2.5)
    with pytest.raises(ValueError, match="within depth"):
        _r(v, f, size=8)


def test_shared_edge_through_pixel_centres_is_covered():
    v, f = _quad()
    img = _r(v, f, size=16)[0, 0]
    assert (img[4:12, 4:12] > 0).all()


def test_shared_and_per_image_vertices_agree():
    m = load_asset("meshmonk")
    # One [V, 3] mesh for the whole batch (every fixed-identity sweep) or a copy per image: the same images.
    kw = {
        "azimuth": torch.tensor([0.7, -0.5]),
        "elevation": torch.tensor([0.3, -0.2]),
        "light_azimuth": torch.tensor([0.5, -1.0]),
        "light_elevation": torch.tensor([0.2, 0.1]),
    }
    shared = render(m.vertices, m.faces, size=24, zoom=1.4, **kw)
    per_image = render(m.vertices.expand(2, -1, -1).clone(), m.faces, size=24, zoom=1.4, **kw)
    torch.testing.assert_close(shared, per_image, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["azimuth", "elevation", "light"])
def test_sweeps_are_stratified_and_sorted(kind):
    s = SweepSampler(size=8, batch_size=6, meshes=[load_asset("meshmonk")])
    f = s.factors(kind, torch.Generator().manual_seed(3))[kind]
    w = getattr(s.ranges, kind)
    assert torch.equal(((f / w + 1) / 2 * 6).floor().long(), torch.arange(6))


def test_sampler_renders_its_factors():
    mesh = load_asset("meshmonk")
    s = SweepSampler(size=24, batch_size=4, meshes=[mesh])
    for kind in ("light", "elevation"):
        f = s.factors(kind, torch.Generator().manual_seed(1))
        f["identity"] = torch.zeros(4, dtype=torch.int64)
        got = s.render(f)
        angles = {"azimuth": f["azimuth"], "elevation": f["elevation"], "light_azimuth": f["light"]}
        gain = s.identities.describe(f["identity"]).gain
        exp = render(
            mesh.vertices, mesh.faces, **angles, light_elevation=f["light_elevation"], size=24, zoom=s.zoom, gain=gain
        )
        torch.testing.assert_close(got, exp.float(), atol=1e-5, rtol=0)


def test_an_image_does_not_depend_on_its_batch():
    s = SweepSampler(size=24, batch_size=2, num_identities=10**6)
    f = s.factors("intrinsic", torch.Generator().manual_seed(0))
    f["identity"] = torch.tensor([3, 303])
    alone = {k: v[1:] for k, v in f.items()}
    torch.testing.assert_close(s.render(f)[1:], s.render(alone), atol=1e-4, rtol=0)


def test_light_elevation_range_is_honoured():
    ranges = SweepRanges(light_elevation=(0.3, 0.4))
    s = SweepSampler(size=8, batch_size=2, meshes=[load_asset("meshmonk")], ranges=ranges)
    for i in range(20):
        e = s.factors("azimuth", torch.Generator().manual_seed(i))["light_elevation"]
        assert (e >= 0.3).all() and (e <= 0.4).all()


def test_first_identity_past_the_scans_is_deformed():
    space = IdentitySpace([load_asset("meshmonk"), load_asset("james")])
    assert space.describe(torch.tensor([2])).coefficients.abs().sum() > 0


def test_modes_are_mirror_symmetric():
    p = torch.rand(200, 3) - 0.5
    mirror = torch.tensor([-1.0, 1.0, 1.0])
    torch.testing.assert_close(mode_fields(p * mirror, 0.1) * mirror, mode_fields(p, 0.1), atol=1e-6, rtol=0)


def test_mode_slope():
    h = 1e-3
    x, y = torch.meshgrid(torch.linspace(-0.6, 0.6, 121), torch.linspace(-0.6, 0.6, 121), indexing="ij")
    p = torch.stack([x.flatten(), y.flatten(), torch.zeros(x.numel())], 1).double()
    f = mode_fields(p, 0.1)
    gx = (mode_fields(p + torch.tensor([h, 0, 0]).double(), 0.1) - f) / h
    gy = (mode_fields(p + torch.tensor([0, h, 0]).double(), 0.1) - f) / h
    slope = torch.sqrt(gx**2 + gy**2).amax(dim=(1, 2))
    assert (slope < 0.1 * 1.02).all() and (slope > 0.1 * 0.7).all()


@pytest.mark.parametrize("name", ["meshmonk", "menpo3d", "james"])
def test_no_triangle_turns_past_60_degrees(name):
    mesh = load_asset(name)
    space = IdentitySpace([mesh], slope=0.6)
    c = torch.randint(0, 2, (12, len(MODES)), generator=torch.Generator().manual_seed(0)).float() * 2 - 1
    d = space.vertices(0, c)

    def n(v):
        a, b, c = (v[:, mesh.faces[:, i]] for i in range(3))
        return torch.linalg.cross(b - a, c - a)

    rest = n(mesh.vertices[None])
    proper = F.normalize(rest, dim=-1, eps=1e-12).norm(dim=-1) > 0.5
    cos = F.cosine_similarity(n(d), rest, dim=-1)
    assert (cos[proper.expand_as(cos)] >= 0.5 - 1e-4).all()


def test_to_keeps_options():
    s = IdentitySpace([load_asset("meshmonk")], slope=0.05, gain_range=(0.5, 0.6)).to("cpu")
    assert s.slope == 0.05 and tuple(s.gain_range) == (0.5, 0.6)


def test_obj_negative_indices(tmp_path):
    p = tmp_path / "t.obj"
    p.write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nv 0 0 1\nf -4 -3 -2\nf 1 2 4\n")
    assert load_mesh(p).faces.tolist() == [[0, 1, 2], [0, 1, 3]]


@pytest.mark.parametrize("endian", ["<", ">"])
def test_binary_ply(tmp_path, endian):
    fmt = "binary_little_endian" if endian == "<" else "binary_big_endian"
    header = (
        f"ply\nformat {fmt} 1.0\nelement vertex 3\nproperty float x\nproperty float y\nproperty float z\n"
        "element face 1\nproperty list uchar int vertex_indices\nend_header\n"
    )
    v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]], dtype=endian + "f4")
    face = np.array([(3, (0, 1, 2))], dtype=[("n", "u1"), ("i", endian + "i4", 3)])
    p = tmp_path / "b.ply"
    p.write_bytes(header.encode() + v.tobytes() + face.tobytes())
    m = load_mesh(p)
    assert m.faces.tolist() == [[0, 1, 2]] and m.vertices[1, 0] > m.vertices[0, 0]


def test_original_light_folders_are_light_sweeps(tmp_path):
    # The original DC-IGN layout's folder names (an export and import round trip would hide a swap).
    expected = {
        "azimuth": "AZ_VARIED",
        "elevation": "EL_VARIED",
        "light": "LIGHT_AZ_VARIED",
        "intrinsic": "SHAPE_VARIED",
    }
    assert expected == KIND_DIRS


def test_natural_order(tmp_path):
    for b in ("b2", "b10"):
        folder = tmp_path / "AZ_VARIED" / b
        folder.mkdir(parents=True)
        for i in (1, 2, 10):
            Image.fromarray(np.full((4, 4), i * 20, np.uint8)).save(folder / f"img_{i}.png")
    ds = SweepFolders(tmp_path, size=None)
    assert [p.name for p, _ in ds.folders] == ["b2", "b10"]
    assert (ds[0][0][:, 0, 0, 0] * 255).round().tolist() == [20, 40, 200]


@pytest.mark.parametrize("per_shard", [1, 5])
def test_epoch_order_depends_on_seed(tmp_path, per_shard):
    s = SweepSampler(size=8, batch_size=2, seed=0, num_batches=5, meshes=[load_asset("meshmonk")])
    write_cache(list(s), tmp_path, batches_per_shard=per_shard)
    c = SweepCache(tmp_path)
    orders = {tuple(float(f["azimuth"][0]) for _, f, _ in c.epoch(seed)) for seed in range(8)}
    assert len(orders) > 1


def test_preview_labels(tmp_path):
    s = SweepSampler(size=48, batch_size=3, meshes=[load_asset("meshmonk")])
    f = s.factors("light", torch.Generator().manual_seed(0))
    assert preview._label("light", f).splitlines()[1].startswith("light ")
    assert " .. " in preview._label("light", f).splitlines()[1] and "light = " not in preview._label("light", f)
    arr = np.asarray(Image.open(preview.preview_grid(s, tmp_path / "p.png", scale=2)))
    for i in range(4):
        assert arr[i * 96 : (i + 1) * 96, :230].max() > 200


def test_stream_kinds_are_distinct():
    from dcign_fast.data.seeds import BATCHES, EVAL_RECONSTRUCTION, EVAL_SWEEPS, LATENT_NOISE, stream_generator

    def seed(*key, **held_out):
        return stream_generator(*key, **held_out).initial_seed()

    assert seed(BATCHES, 0, 3, 1) != seed(LATENT_NOISE, 0, 3, 1)
    assert seed(EVAL_SWEEPS, 0, 2, held_out=True) != seed(EVAL_RECONSTRUCTION, 0, 2, held_out=True)


def test_obj_uv_indices(tmp_path):
    from dcign_fast.data.mesh_io import read_mesh

    p = tmp_path / "t.obj"
    p.write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nvt 0 0\nvt 1 0\nvt 0 1\nf 1/3 2/2 3/1\n")
    assert read_mesh(p).face_uv.tolist() == [[2, 1, 0]]


@pytest.mark.parametrize("corner", ["3/4", "3/-4"])
def test_obj_uv_indices_past_its_texture_coordinates_are_refused(tmp_path, corner):
    """A face naming a texture coordinate the file does not list was read without a word (read_mesh checked
    the vertex indices only)."""
    from dcign_fast.data.mesh_io import read_mesh

    p = tmp_path / "t.obj"
    p.write_text(f"v 0 0 0\nv 1 0 0\nv 0 1 0\nvt 0 0\nvt 1 0\nvt 0 1\nf 1/3 2/2 {corner}\n")
    with pytest.raises(ValueError, match=r"t\.obj has texture-coordinate indices out of range \(it lists 3\)"):
        read_mesh(p)
