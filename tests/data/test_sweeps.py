"""One-factor sweeps: what varies, reproducibility, rank streams, identity deformations."""

import pytest
import torch

from dcign_fast.data import FACTOR_KEYS, KINDS, IdentitySpace, SweepSampler, load_asset, render, sweeps
from dcign_fast.data.identity import MODES
from dcign_fast.data.render import rotation
from dcign_fast.data.sweeps import SweepRanges

SWEPT = {"azimuth": "azimuth", "elevation": "elevation", "light": "light", "intrinsic": "identity"}


@pytest.fixture(scope="module")
def sampler():
    return SweepSampler(size=24, batch_size=6, seed=int(torch.randint(1000, ())))


@pytest.mark.parametrize("kind", KINDS)
def test_exactly_one_factor_varies(sampler, kind):
    images, factors, got = sampler.batch(kind, torch.Generator().manual_seed(int(torch.randint(10**6, ()))))
    assert got == kind
    assert images.shape == (6, 1, 24, 24) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1 and images.max() > 0.2
    assert set(factors) == set(FACTOR_KEYS)
    for key, values in factors.items():
        assert values.shape == (6,)
        distinct = len(values.unique())
        assert distinct == (6 if key == SWEPT[kind] else 1), key
    assert factors["identity"].dtype == torch.int64
    assert (images[1:] != images[:1]).flatten(1).any(1).all()  # every image differs from the first


def test_ranges(sampler):
    r = sampler.ranges
    for index in range(8):
        _, g = sampler.kind_at(index)
        factors = sampler.factors("azimuth", g)
        assert factors["azimuth"].abs().max() <= r.azimuth
        assert factors["azimuth"].max() - factors["azimuth"].min() > r.azimuth  # a sweep spans the range
        assert factors["elevation"].abs().max() <= r.elevation and factors["light"].abs().max() <= r.light


def test_same_seed_same_batches_other_seed_other_batches():
    seed = int(torch.randint(1000, ()))
    a = list(SweepSampler(size=16, batch_size=4, seed=seed, num_batches=3))
    b = list(SweepSampler(size=16, batch_size=4, seed=seed, num_batches=3))
    c = list(SweepSampler(size=16, batch_size=4, seed=seed + 1, num_batches=3))
    for (ia, fa, ka), (ib, fb, kb) in zip(a, b):
        assert ka == kb and torch.equal(ia, ib)
        assert all(torch.equal(fa[k], fb[k]) for k in FACTOR_KEYS)
    assert not all(torch.equal(fa["azimuth"], fc["azimuth"]) for (_, fa, _), (_, fc, _) in zip(a, c))


def test_ranks_split_one_stream_disjointly():
    seed = int(torch.randint(1000, ()))
    whole = SweepSampler(size=8, batch_size=3, seed=seed, num_batches=6)
    ranks = [SweepSampler(size=8, batch_size=3, seed=seed, num_batches=3, rank=r, world_size=2) for r in (0, 1)]
    expected = [f["azimuth"] for _, f, _ in whole]
    got = [f["azimuth"] for r in ranks for _, f, _ in r]
    assert all(torch.equal(x, y) for x, y in zip(got[:3], expected[0::2]))
    assert all(torch.equal(x, y) for x, y in zip(got[3:], expected[1::2]))
    ranks[1].set_epoch(1)  # the next epoch continues the global stream
    assert torch.equal(next(iter(ranks[1]))[1]["azimuth"], whole.batch_at(7)[1]["azimuth"])
    with pytest.raises(ValueError, match="rank"):
        SweepSampler(rank=2, world_size=2)


def test_kind_odds_follow_shape_bias():
    sampler = SweepSampler(shape_bias=10, seed=int(torch.randint(1000, ())))
    kinds = [sampler.kind_at(i)[0] for i in range(1300)]
    share = kinds.count("intrinsic") / len(kinds)
    assert 0.70 < share < 0.84  # 10 / 13 = 0.77
    assert all(kinds.count(k) > 50 for k in KINDS)


@pytest.mark.parametrize(
    "argument, value, error, words",
    [
        ("size", 0, ValueError, "size must be >= 1, got 0"),
        ("size", 64.0, TypeError, "size must be an integer, got 64.0"),
        ("batch_size", -2, ValueError, "batch_size must be >= 1"),
        ("antialias", 0, ValueError, "antialias must be >= 1"),
        ("num_batches", 0, ValueError, "num_batches must be >= 1"),
        ("num_identities", 0, ValueError, "num_identities must be >= 1"),
        # (was raised to 20)
        ("num_identities", 3, ValueError, r"batch_size must be at most num_identities \(3\).*got batch_size 20"),
        ("meshes", [], ValueError, "meshes must be a list of at least one Mesh"),  # was the packaged faces
        ("meshes", ["meshmonk"], TypeError, "meshes must hold Mesh objects .*got a str at 0"),
        ("ranges", {"azimuth": 1.0}, TypeError, "ranges must be a SweepRanges, got dict"),
        ("device", "tpu", ValueError, r"device must be 'auto', cpu, cuda or cuda:N, got 'tpu'"),
        ("seed", -1, ValueError, "seed must be >= 0, got -1"),
        ("seed", True, TypeError, "seed must be an integer"),
        ("shape_bias", float("nan"), ValueError, r"shape_bias must be in \[0, .* and finite, got nan"),
        ("shape_bias", -1, ValueError, r"shape_bias must be in \[0, 3.40\d*e\+38\) and finite, got -1"),
        ("shape_bias", 1e39, ValueError, r"shape_bias must be in \[0, 3.40\d*e\+38\) and finite, got 1e\+39"),
        ("zoom", 0, ValueError, "zoom must be > 0 and finite"),
        ("shape_bias", 10**400, ValueError, r"shape_bias must be in \[0, .* and finite, got an int too large"),
        ("rank", 1, ValueError, r"rank must be in \[0, 1\), got 1"),
        ("rank", 0.0, TypeError, "rank must be an integer"),
        # (torch.device(3) means an accelerator: "Cannot access accelerator device when none is available")
        (
            "device",
            3,
            TypeError,
            r"device must be a device name \('auto', cpu, cuda, cuda:N\) or a torch.device, got 3",
        ),
        ("meshes", "meshmonk", TypeError, r"meshes must be a list of Mesh objects .* or None .*got a str"),
    ],
)
def test_bad_arguments_are_refused_by_name(argument, value, error, words):
    """Refused when the sampler is made: otherwise they fail at the first batch inside numpy or
    torch.multinomial, or (size 0, zoom 0) silently yield empty or blank images."""
    with pytest.raises(error, match=words):
        SweepSampler(**{argument: value})


@pytest.mark.parametrize(
    "change, words",
    [
        ({"azimuth": float("nan")}, "azimuth must be >= 0 and finite, got nan"),
        ({"light": -1.0}, "light must be >= 0 and finite"),
        ({"light_elevation": (0.4, -5.0)}, r"light_elevation\[1\] must be >= 0.4"),
        ({"light_elevation": (0.0, 0.1, 0.2)}, r"light_elevation must be a \(low, high\) pair"),
    ],
)
def test_sweep_ranges_are_checked(change, words):
    with pytest.raises(ValueError, match=words):
        SweepRanges(**change)


def test_a_batch_needs_a_generator(sampler):
    with pytest.raises(TypeError, match="generator must be a CPU torch.Generator or None, got int"):
        sampler.batch("azimuth", 0)


def test_identity_changes_the_face_with_pose_fixed():
    sampler = SweepSampler(size=32, batch_size=2, seed=0, num_identities=10**6)
    factors = sampler.factors("intrinsic", torch.Generator().manual_seed(int(torch.randint(10**6, ()))))
    for start in range(3):  # same scan, different shape coefficients: identities differ by a multiple of 3
        factors["identity"] = torch.tensor([3 + start, 3 + start + 3 * int(torch.randint(1, 1000, ()))])
        images = sampler.render(factors)
        assert (images[0] - images[1]).abs().mean() > 1e-3


def test_an_identity_is_its_own_generator_seed():
    """An identity past the scans draws K coefficients in [-1, 1] and then the gain from a generator seeded with
    it, wherever it appears in a batch and however often; the scans themselves are undeformed, at mid gain."""
    space = IdentitySpace([load_asset("james"), load_asset("menpo3d")], gain_range=(0.5, 0.9))
    identity = torch.tensor([7, 1, 123456, 7, 0, 7])
    described = space.describe(identity)
    assert torch.equal(described.mesh_index, identity % 2)
    for row, ident in enumerate(identity.tolist()):
        if ident < 2:
            expected_coefficients, expected_gain = torch.zeros(len(MODES)), torch.tensor(0.7)
        else:
            g = torch.Generator().manual_seed(ident)
            expected_coefficients = torch.rand(len(MODES), generator=g) * 2 - 1
            expected_gain = 0.5 + 0.4 * torch.rand((), generator=g)
        assert torch.equal(described.coefficients[row], expected_coefficients)
        assert torch.equal(described.gain[row], expected_gain)


@pytest.mark.parametrize("num_identities", [2**62, 3 * 10**8, 40])
def test_an_intrinsic_batch_draws_distinct_identities_from_any_range(num_identities, monkeypatch):
    """Drawn as the head of a permutation of them all: 3e8 identities took 24 s and 2.4 GB a batch. Beyond 2**20,
    drawn one by one (Floyd's algorithm; forced at 40 here, where each identity must be as likely, at the
    batch's first place too)."""
    monkeypatch.setattr(sweeps, "_PERMUTED_UP_TO", 16)
    sampler = SweepSampler(size=8, batch_size=20, num_identities=num_identities, device="cpu")
    g = torch.Generator().manual_seed(0)
    counts, first = torch.zeros(min(num_identities, 40)), torch.zeros(min(num_identities, 40))
    for _ in range(400 if num_identities == 40 else 3):
        identity = sampler.factors("intrinsic", g)["identity"]
        assert identity.dtype == torch.int64 and len(set(identity.tolist())) == 20
        assert int(identity.min()) >= 0 and int(identity.max()) < num_identities
        if num_identities == 40:
            counts += torch.bincount(identity, minlength=40)
            first[identity[0]] += 1
    if num_identities == 40:  # each identity in half the batches: 200 +- 10 (binomial), by far within 60
        assert (counts - 200).abs().max() < 60
        # First of the batch 10 +- 3 times each (Floyd's own order put only the first 21 identities there).
        assert first[21:].sum() > 100 and first.max() < 30


@pytest.mark.parametrize("name", ["meshmonk", "menpo3d", "james"])
def test_identity_deformation_never_flips_a_triangle(name):
    mesh = load_asset(name)
    space = IdentitySpace([mesh], slope=0.12)
    # Random corners of the coefficient box are the hardest cases.
    coefficients = torch.randint(0, 2, (12, len(MODES))).float() * 2 - 1
    deformed = space.vertices(0, coefficients)

    def normals(v):
        a, b, c = (v[:, mesh.faces[:, i]] for i in range(3))
        return torch.linalg.cross(b - a, c - a)

    rest = normals(mesh.vertices[None])
    proper = rest.norm(dim=-1) > 1e-12
    cos = torch.nn.functional.cosine_similarity(normals(deformed), rest, dim=-1)
    assert (cos[proper.expand_as(cos)] > 0).all()
    # And the shapes really change (the guard does not just undo the deformation).
    assert ((deformed - mesh.vertices).norm(dim=-1).amax(1) > 0.02).float().mean() > 0.5


def test_a_single_mesh_is_not_a_list_of_meshes():
    """'Mesh' object is not iterable, from SweepSampler and IdentitySpace."""
    mesh = load_asset("meshmonk")
    with pytest.raises(TypeError, match="meshes must be a list of Mesh objects .*got a Mesh"):
        SweepSampler(meshes=mesh)
    with pytest.raises(TypeError, match="meshes must be a list of Mesh objects .*got a Mesh"):
        IdentitySpace(mesh)


@pytest.mark.parametrize(
    "change, error, words",
    [
        ({"meshes": []}, ValueError, "meshes must be a list of at least one Mesh, got none"),  # (ZeroDivisionError)
        ({"meshes": "abc"}, TypeError, "meshes must be a list of Mesh objects .*got a str"),
        ({"meshes": ["abc"]}, TypeError, "meshes must hold Mesh objects .*got a str at 0"),
        ({"slope": float("nan")}, ValueError, "slope must be >= 0 and finite, got nan"),  # (all-NaN vertices)
        ({"slope": -1.0}, ValueError, "slope must be >= 0 and finite, got -1.0"),
        ({"slope": "x"}, TypeError, "slope must be a number, got 'x'"),
        ({"gain_range": (0.9, 0.1)}, ValueError, r"gain_range\[1\] must be >= 0.9 and finite, got 0.1"),
        ({"gain_range": (float("nan"), 1)}, ValueError, r"gain_range\[0\] must be >= 0 and finite, got nan"),
        ({"gain_range": (0, 50)}, ValueError, r"gain_range\[1\] must be at most 1, got 50"),  # (gain 2.04)
        ({"gain_range": (-0.5, 0.5)}, ValueError, r"gain_range\[0\] must be >= 0"),
        ({"gain_range": (0.1, 0.2, 0.3)}, ValueError, r"gain_range must be a \(low, high\) pair"),
        ({"gain_range": 0.5}, ValueError, r"gain_range must be a \(low, high\) pair, got 0.5"),
    ],
)
def test_identity_space_arguments_are_checked(change, error, words):
    """IdentitySpace checked none: a reversed, NaN or > 1 gain range gave gains outside it, NaN or clipped."""
    with pytest.raises(error, match=words):
        IdentitySpace(**{"meshes": [load_asset("meshmonk")], **change})


def test_identity_space_edge_values_are_accepted():
    space = IdentitySpace([load_asset("meshmonk")], slope=0, gain_range=(1, 1))
    assert torch.equal(space.describe(torch.tensor([0, 5])).gain, torch.ones(2))


@pytest.mark.parametrize(
    "identity, words",
    [
        (torch.tensor([1.5]), r"identity must be a \[B\] integer tensor, got torch.float32"),  # (manual_seed's error)
        (torch.tensor([True]), r"identity must be a \[B\] integer tensor, got torch.bool"),
        (torch.tensor([[1, 2]]), r"identity must be a \[B\] integer tensor, got shape \(1, 2\)"),
        ([1, 2], r"identity must be a \[B\] integer tensor, got a list"),
        (torch.tensor([3, -5]), "identity must hold identities >= 0, got -5"),  # (was taken for a scan)
    ],
)
def test_describe_takes_a_vector_of_identities(identity, words):
    with pytest.raises(ValueError, match=words):
        IdentitySpace([load_asset("meshmonk")]).describe(identity)


def test_vertices_name_a_bad_mesh_index_or_coefficients():
    """A coefficient row of another length met torch's einsum error, which named neither argument."""
    space = IdentitySpace([load_asset("meshmonk")])
    k = len(space._fields[0])
    assert space.vertices(0, torch.zeros(2, k)).shape == (2, *space.meshes[0].vertices.shape)
    with pytest.raises(ValueError, match=rf"coefficients must be \[B, {k}\], got shape \(2, {k + 1}\)"):
        space.vertices(0, torch.zeros(2, k + 1))
    with pytest.raises(ValueError, match=r"mesh_index must be .* got 1"):
        space.vertices(1, torch.zeros(2, k))


def test_epoch_and_batch_index_are_checked():
    """set_epoch("a") failed at iteration ("can only concatenate str"), batch_at(1.5) inside numpy; a negative
    epoch or index read batches outside the stream."""
    sampler = SweepSampler(size=8, batch_size=2, meshes=[load_asset("meshmonk")], num_batches=1)
    with pytest.raises(TypeError, match="epoch must be an integer, got 'a'"):
        sampler.set_epoch("a")
    with pytest.raises(ValueError, match="epoch must be >= 0, got -1"):
        sampler.set_epoch(-1)
    with pytest.raises(TypeError, match="index must be an integer, got 1.5"):
        sampler.batch_at(1.5)
    with pytest.raises(ValueError, match="index must be >= 0, got -1"):
        sampler.kind_at(-1)
    sampler.set_epoch(2)
    assert torch.equal(next(iter(sampler))[0], sampler.batch_at(2)[0])


def test_deformed_scans_past_depth_one_still_render():
    """The deformed scans reach past the unit sphere (james: a depth of 1.005 at the sweeps' worst pose for 1 of
    10000 identities; 1.04 at corners of the coefficient box), which render's depth check must admit: a [-1, 1]
    check would stop a training run there."""
    space = IdentitySpace([load_asset("james")])
    corners = torch.randint(0, 2, (256, len(MODES)), generator=torch.Generator().manual_seed(0)).float() * 2 - 1
    deformed = space.vertices(0, corners)
    ranges = SweepRanges()
    azimuth, elevation = torch.meshgrid(
        torch.linspace(-ranges.azimuth, ranges.azimuth, 31),
        torch.tensor([-ranges.elevation, ranges.elevation]),
        indexing="ij",
    )
    azimuth, elevation = azimuth.flatten(), elevation.flatten()
    depth = torch.einsum("bvc,pc->bpv", deformed, rotation(azimuth, elevation)[:, 2]).abs().amax(-1)  # [256, P]
    shape, pose = divmod(int(depth.argmax()), depth.shape[1])
    assert depth.max() > 1  # (the case the check must admit)
    zero = torch.zeros(1)
    image = render(
        deformed[shape], space.meshes[0].faces, azimuth=azimuth[pose, None], elevation=elevation[pose, None],
        light_azimuth=zero, light_elevation=zero, size=16, incident=space.meshes[0].incident,
    )  # fmt: skip
    assert image.max() > 0
