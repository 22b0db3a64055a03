"""Images on disk: PNG folders in the DC-IGN layout, the original dataset's RGB files, the uint8 cache."""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from dcign_fast.data import FACTOR_KEYS, SweepSampler
from dcign_fast.data.cache import SweepCache, write_cache
from dcign_fast.data.folders import FACTORS_CSV, KIND_DIRS, DatasetError, SweepFolders, export_sweeps


@pytest.fixture(scope="module")
def batches():
    sampler = SweepSampler(size=16, batch_size=3, seed=int(torch.randint(1000, ())), num_batches=5)
    return list(sampler)


def _assert_same_batches(got, expected):
    assert len(got) == len(expected)
    for (gi, gf, gk), (ei, ef, ek) in zip(got, expected):
        assert gk == ek and gi.shape == ei.shape
        assert (gi - ei).abs().max() <= 0.5 / 255 + 1e-6  # 8-bit quantisation
        for key in FACTOR_KEYS:
            assert torch.equal(gf[key], ef[key]), key


def test_export_then_read_round_trip(tmp_path, batches):
    assert export_sweeps(batches, tmp_path) == len(batches)
    folders = SweepFolders(tmp_path, size=16)
    # Folders come back grouped by kind, each kind in export order.
    by_kind = sorted(range(len(batches)), key=lambda i: list(KIND_DIRS).index(batches[i][2]))
    _assert_same_batches(list(folders), [batches[i] for i in by_kind])
    assert folders.kinds() == [batches[i][2] for i in by_kind]


def test_cache_round_trip_and_epoch(tmp_path, batches):
    assert write_cache(batches, tmp_path, batches_per_shard=2) == len(batches)
    assert len(list(tmp_path.glob("shard_*.npz"))) == 3
    cache = SweepCache(tmp_path)
    _assert_same_batches(list(cache), batches)
    seen = sorted(int(f["identity"][0]) * 1000 + int(f["identity"][-1]) for _, f, _ in cache.epoch(seed=1))
    assert seen == sorted(int(f["identity"][0]) * 1000 + int(f["identity"][-1]) for _, f, _ in batches)


def test_cache_kinds_and_kept_shards(tmp_path, batches):
    write_cache(batches, tmp_path, batches_per_shard=2)
    assert SweepCache(tmp_path).kinds() == [kind for _, _, kind in batches]
    kept = SweepCache(tmp_path, keep_shards=True)
    _assert_same_batches([kept[i] for i in (4, 0, 2)], [batches[i] for i in (4, 0, 2)])
    for shard in tmp_path.glob("shard_*.npz"):
        shard.unlink()  # every batch now comes from memory, in any order
    _assert_same_batches([kept[i] for i in (2, 4, 0)], [batches[i] for i in (2, 4, 0)])


def test_original_layout_rgb_without_factors(tmp_path):
    folder = tmp_path / "EL_VARIED" / "face_7"
    folder.mkdir(parents=True)
    rgb = np.random.randint(0, 256, size=(3, 30, 30, 3), dtype=np.uint8)
    for i, image in enumerate(rgb):
        Image.fromarray(image).save(folder / f"img_{i + 1}.png")
    images, factors, kind = SweepFolders(tmp_path, size=None)[0]
    assert kind == "elevation" and images.shape == (3, 1, 30, 30)
    expected = torch.from_numpy(rgb.astype(np.float32) @ np.array([0.21, 0.72, 0.07], dtype=np.float32) / 255)
    torch.testing.assert_close(images[:, 0], expected, atol=1e-5, rtol=0)
    assert torch.isnan(factors["azimuth"]).all() and (factors["identity"] == -1).all()
    resized, _, _ = SweepFolders(tmp_path, size=12)[0]
    assert resized.shape == (3, 1, 12, 12)


def test_corrupt_png_names_the_file_or_is_skipped(tmp_path, batches):
    export_sweeps(batches[:2], tmp_path)
    bad = sorted(tmp_path.glob("*/*/001.png"))[0]
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(np.random.randint(0, 256, 40, dtype=np.uint8)))
    with pytest.raises(DatasetError, match=str(bad)):
        list(SweepFolders(tmp_path, size=16))
    skipping = SweepFolders(tmp_path, size=16, on_error="skip")
    with pytest.warns(UserWarning, match="skipped 1 of 2"):
        kept = list(skipping)
    assert len(kept) == 1 and skipping.skipped[0][0] == bad.parent


def test_missing_and_inconsistent_inputs(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        SweepFolders(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="size must be >= 1, got 0"):  # (was PIL's error at the first read)
        SweepFolders(tmp_path, size=0)
    with pytest.raises(DatasetError, match="AZ_VARIED"):
        SweepFolders(tmp_path)
    folder = tmp_path / "AZ_VARIED" / "b0"
    folder.mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "0.png")
    Image.fromarray(np.zeros((9, 9), np.uint8)).save(folder / "1.png")
    with pytest.raises(DatasetError, match="1.png"):
        SweepFolders(tmp_path, size=None)[0]
    assert SweepFolders(tmp_path, size=8)[0][0].shape == (2, 1, 8, 8)


def test_corrupt_cache_shard_names_the_file(tmp_path, batches):
    write_cache(batches, tmp_path, batches_per_shard=3)
    shard = tmp_path / "shard_00001.npz"
    shard.write_bytes(shard.read_bytes()[:100])
    cache = SweepCache(tmp_path)
    cache[0]
    with pytest.raises(DatasetError, match="shard_00001.npz"):
        cache[len(cache) - 1]
    index = json.loads((tmp_path / "index.json").read_text())
    for shards in ([{**index["shards"][0], "batches": -1}], []):  # (len(cache) raised "__len__() should return >= 0")
        (tmp_path / "index.json").write_text(json.dumps({**index, "shards": shards}))
        with pytest.raises(DatasetError, match="index.json: its size, its number of shards and each shard's batches"):
            SweepCache(tmp_path)
    (tmp_path / "index.json").unlink()
    with pytest.raises(DatasetError, match="index.json"):
        SweepCache(tmp_path)


@pytest.mark.parametrize(
    "damage, words",
    [
        (lambda a: a.update(azimuth=a["azimuth"][:3]), r"factors \['azimuth'\] do not have one value per image"),
        (lambda a: a.update(offsets=a["offsets"][:-1]), "offsets do not split its"),
        (lambda a: a["kinds"].__setitem__(0, 9), "batch kinds must index"),
        # A batch of no images (a ZeroDivisionError mid-run, before), float or 16-bit pixels (read as / 255).
        (lambda a: a["offsets"].__setitem__(1, 0), "offsets do not split its .* into batches of one or more"),
        (lambda a: a.update(images=a["images"] / 255.0), "images must be uint8 pixels, got float64"),
        (lambda a: a.update(images=a["images"].astype(np.uint16) * 257), "images must be uint8 pixels, got uint16"),
        # Float kinds were truncated (0.7: azimuth), float identities read as float64, text failed unnamed.
        (lambda a: a.update(kinds=a["kinds"] + 0.7), "batch kinds must be integers, got float64"),
        (lambda a: a.update(identity=a["identity"] * 1.0), r"factors \['identity'\] must be numbers .*float64"),
        (lambda a: a.update(azimuth=a["azimuth"].astype(str)), r"factors \['azimuth'\] must be numbers .*<U"),
    ],
)
def test_a_shard_whose_arrays_disagree_is_refused(damage, words, tmp_path, batches):
    """Empty factors beside a batch's images, or an IndexError, before; a batch of no images failed mid-run,
    and float or 16-bit pixels trained on nearly black images."""
    write_cache(batches, tmp_path, batches_per_shard=2)
    shard = tmp_path / "shard_00000.npz"
    with np.load(shard) as data:
        arrays = dict(data)
    damage(arrays)
    np.savez(shard, **arrays)
    with pytest.raises(DatasetError, match=f"shard_00000.npz: {words}"):
        SweepCache(tmp_path)[0]


def test_a_factors_csv_from_a_spreadsheet_or_with_bad_rows(tmp_path, batches):
    export_sweeps(batches[:1], tmp_path)
    csv_path = next(tmp_path.rglob(FACTORS_CSV))
    text = csv_path.read_text()
    csv_path.write_text("\ufeff" + text, encoding="utf-8")  # "CSV UTF-8" with a byte-order mark
    _assert_same_batches(list(SweepFolders(tmp_path, size=16)), batches[:1])
    header, first, *rest = text.splitlines()
    columns = header.split(",")

    def changed(key: str, value: str) -> str:
        cells = first.split(",")
        cells[columns.index(key)] = value
        return ",".join(cells)

    for rows, words in (
        ([first, first, *rest], "listed twice"),
        ([changed("identity", "12.7"), *rest], "identity of .* is '12.7'"),
        ([changed("azimuth", "inf"), *rest], "azimuth of .* is 'inf'"),
    ):
        csv_path.write_text("\n".join([header, *rows]) + "\n")
        with pytest.raises(DatasetError, match=f"bad factors file .*{words}"):
            SweepFolders(tmp_path, size=16)[0]


@pytest.mark.parametrize(
    "mode, white, suffix",
    [("L", 255, "png"), ("I;16", 65535, "png"), ("I", 65535, "tiff"), ("F", 1.0, "tiff")],
)
def test_every_grey_mode_reads_into_zero_to_one(mode, white, suffix, tmp_path):
    """Float images were divided by 65535, as if 16-bit: a [0, 1] TIFF read as black."""
    from dcign_fast.data.folders import read_grey

    grey = np.random.default_rng(0).random((6, 5), dtype=np.float32)
    stored = grey * white if mode == "F" else np.round(grey * white)
    dtype = {"L": np.uint8, "I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]
    path = tmp_path / f"image.{suffix}"
    Image.fromarray(stored.astype(dtype)).save(path)  # the dtype picks the mode
    with Image.open(path) as image:
        assert image.mode == mode or (mode == "I;16" and image.mode in ("I", "I;16"))
    assert np.allclose(read_grey(path, None), grey, atol=0.6 / white)


def test_a_photo_is_centre_cropped_not_stretched_and_transparency_is_black(tmp_path):
    from dcign_fast.data.folders import read_grey

    rng = np.random.default_rng(1)
    square = rng.random((8, 8), dtype=np.float32)
    wide = np.concatenate([np.ones((8, 3), np.float32), square, np.zeros((8, 3), np.float32)], axis=1)
    Image.fromarray(wide).save(tmp_path / "wide.tiff")
    Image.fromarray(square).save(tmp_path / "square.tiff")
    assert np.allclose(read_grey(tmp_path / "wide.tiff", 4), read_grey(tmp_path / "square.tiff", 4))
    assert read_grey(tmp_path / "wide.tiff", None).shape == (8, 14)  # native size: untouched
    rgba = rng.integers(0, 256, (6, 6, 4), dtype=np.uint8)
    rgba[:3, :, 3] = 0  # the top half transparent, storing colours
    rgba[3:, :, 3] = 255
    Image.fromarray(rgba).save(tmp_path / "alpha.png")
    grey = read_grey(tmp_path / "alpha.png", None)
    assert np.all(grey[:3] == 0)
    keyed = np.array([[255, 255, 200, 200]], dtype=np.uint8)  # grey, with 255 as the transparent value
    Image.fromarray(keyed).save(tmp_path / "keyed.png", transparency=255)
    assert np.allclose(read_grey(tmp_path / "keyed.png", None), [[0, 0, 200 / 255, 200 / 255]], atol=1e-3)
    assert np.allclose(grey[3:], rgba[3:, :, :3].astype(np.float32) @ np.array([0.21, 0.72, 0.07]) / 255, atol=1e-3)


def test_an_image_past_pils_pixel_limit_names_the_file(tmp_path, monkeypatch):
    """PIL's DecompressionBombError (an image of over twice MAX_IMAGE_PIXELS) came as a traceback, unnamed."""
    from dcign_fast.data.folders import read_grey

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)
    with pytest.raises(DatasetError, match="cannot read image .*bomb.png: Image size .*exceeds limit"):
        read_grey(tmp_path / "bomb.png", None)


def test_16_bit_grey_in_either_byte_order_or_with_a_transparent_level(tmp_path):
    """A big-endian 16-bit TIFF (mode I;16B) and a 16-bit PNG with a transparent grey level went through an
    8-bit RGB conversion that clipped them to white."""
    from dcign_fast.data.folders import read_grey

    grey = np.random.default_rng(2).random((6, 5), dtype=np.float32)
    levels = np.round(grey * 65535).astype(">u2")
    Image.frombuffer("I;16B", (5, 6), levels.tobytes(), "raw", "I;16B", 0, 1).save(tmp_path / "big.tiff")
    with Image.open(tmp_path / "big.tiff") as image:
        assert image.mode == "I;16B"
    assert np.allclose(read_grey(tmp_path / "big.tiff", None), grey, atol=1e-5)

    keyed = levels.astype(np.uint16)
    keyed[0] = 40000  # the transparent level
    Image.fromarray(keyed).save(tmp_path / "keyed16.png", transparency=40000)
    expected = grey.copy()
    expected[0] = 0
    assert np.allclose(read_grey(tmp_path / "keyed16.png", None), expected, atol=1e-5)


def test_a_photos_exif_orientation_is_applied(tmp_path):
    """A phone's portrait photo is stored sideways with an EXIF orientation tag; it was read sideways."""
    from dcign_fast.data.folders import read_grey

    upright = np.random.default_rng(3).integers(0, 256, (6, 4), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": stored rotated counter-clockwise
    Image.fromarray(np.rot90(upright)).save(tmp_path / "phone.png", exif=exif)
    assert np.allclose(read_grey(tmp_path / "phone.png", None), upright / 255, atol=1e-6)


def test_odd_arguments_and_file_names(tmp_path, batches):
    """Unknown kinds raised a bare KeyError ('a' for kinds="azimuth"); .PNG files were skipped; an empty or
    non-square cache was written and then refused on reading."""
    export_sweeps(batches, tmp_path / "png")
    with pytest.raises(ValueError, match="kinds must name batch kinds"):
        SweepFolders(tmp_path / "png", size=16, kinds=["pose"])
    kind = batches[0][2]
    assert {k for _, _, k in SweepFolders(tmp_path / "png", size=16, kinds=kind)} == {kind}
    folder = SweepFolders(tmp_path / "png", size=16).folders[0][0]
    first = sorted(folder.glob("*.png"))[0]
    first.rename(first.with_suffix(".PNG"))
    (folder / FACTORS_CSV).unlink()  # it names the file 000.png
    assert len(SweepFolders(tmp_path / "png", size=16)[0][0]) == len(batches[0][0])
    with pytest.raises(ValueError, match="at least one batch"):
        write_cache([], tmp_path / "empty")
    images, factors, _ = batches[0]
    with pytest.raises(
        ValueError, match=r"a cache holds square grey images \[B, 1, S, S\], got shape \(3, 1, 16, 15\)"
    ):
        write_cache([(images[..., :-1], factors, kind)], tmp_path / "oblong")


@pytest.mark.parametrize(
    "damage, words",
    [
        (
            lambda i, f, k: (i * 255, f, k),
            r"batches\[1\]: images must lie in \[0, 1\] \(0..255 pixels: divide by 255\)",
        ),
        (lambda i, f, k: (i.masked_fill(i > 0.5, float("nan")), f, k), r"batches\[1\]: images .* free of NaN"),
        (lambda i, f, k: (i[:, 0], f, k), r"batches\[1\]: images must be floating-point \[B, 1, S, S\]"),
        (lambda i, f, k: ((i * 255).byte(), f, k), r"images must be floating-point \[B, 1, S, S\], got torch.uint8"),
        (lambda i, f, k: (i, f, "pose"), r"batches\[1\]: kind must be one of .* got 'pose'"),
        (lambda i, f, k: (i, {}, k), r"batches\[1\]: factors must map each of .* 'azimuth' is NoneType"),
        (lambda i, f, k: (i, {**f, "light": [0.0] * len(i)}, k), r"factors must map each of .* 'light' is list"),
    ],
)
def test_write_cache_refuses_a_batch_it_would_store_wrongly(damage, words, tmp_path, batches):
    """Pixels outside [0, 1] were clipped and NaN stored as 0 without a word; the others failed inside numpy."""
    bad = [batches[0], damage(*batches[1])]
    with pytest.raises(ValueError, match=words):
        write_cache(bad, tmp_path / "cache")
    with pytest.raises(ValueError, match="batches_per_shard must be >= 1"):
        write_cache(batches, tmp_path / "cache", batches_per_shard=0)


def test_write_cache_refuses_an_empty_batch(tmp_path, batches):
    """A batch of no images was written, and then refused by SweepCache ("offsets do not split its 0 images")."""
    images, factors, kind = batches[0]
    empty = (images[:0], {k: v[:0] for k, v in factors.items()}, kind)
    with pytest.raises(ValueError, match=r"batches\[1\]: images must be one or more images .* got \(0, 1, 16, 16\)"):
        write_cache([batches[0], empty], tmp_path / "cache")


@pytest.mark.parametrize(
    "device, error, words",
    [
        ("foo", ValueError, r"device must be 'auto', cpu, cuda or cuda:N, got 'foo'"),  # (torch's RuntimeError)
        (3, TypeError, r"device must be a device name .* or a torch.device, got 3"),
        pytest.param(
            "cuda",
            ValueError,
            "device='cuda' but CUDA is not available",  # (an AssertionError at the first item)
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available"),
        ),
    ],
)
def test_sweep_cache_resolves_its_device_by_name(device, error, words, tmp_path, batches):
    write_cache(batches[:1], tmp_path / "cache")
    with pytest.raises(error, match=words):
        SweepCache(tmp_path / "cache", device=device)
    cache = SweepCache(tmp_path / "cache", device=torch.device("cpu"))
    assert cache.device == torch.device("cpu") and cache[0][0].device.type == "cpu"


@pytest.mark.parametrize(
    "kinds, error, words",
    [
        (None, TypeError, r"kinds must be a batch kind or a list of them, .* got None"),  # ('NoneType' not iterable)
        ([["azimuth"]], ValueError, r"kinds must name batch kinds among .* got \(\['azimuth'\],\)"),  # (unhashable)
        ([], ValueError, r"kinds must name batch kinds among .* got \(\)"),  # (no batch folders, expected: nothing)
        (3, TypeError, "kinds must be a batch kind or a list of them"),
    ],
)
def test_sweep_folders_kinds_are_checked(kinds, error, words, tmp_path, batches):
    export_sweeps(batches, tmp_path)
    with pytest.raises(error, match=words):
        SweepFolders(tmp_path, size=16, kinds=kinds)


@pytest.mark.parametrize("store", ["cache", "folders"])
def test_a_batch_index_reads_as_a_lists(store, tmp_path, batches):
    """SweepCache[-1] was an IndexError and SweepCache[1.5] numpy's error from deep inside; SweepFolders took -1."""
    if store == "cache":
        write_cache(batches, tmp_path, batches_per_shard=2)
        dataset = SweepCache(tmp_path)
    else:
        export_sweeps(batches, tmp_path)
        dataset = SweepFolders(tmp_path, size=16)
    _assert_same_batches([dataset[-1], dataset[np.int64(1)]], [dataset[len(batches) - 1], dataset[1]])
    for index, error, words in (
        (1.5, TypeError, "a batch index must be an integer, got 1.5"),
        (5, IndexError, "batch index 5 is out of range for 5 batches"),
        (-6, IndexError, "batch index -6 is out of range for 5 batches"),
    ):
        with pytest.raises(error, match=re.escape(words)):
            dataset[index]


def test_a_cache_loaded_whole_reads_no_shard_again(tmp_path, batches):
    """The trainer loads a cache whole before forking its data workers, which then share it."""
    write_cache(batches, tmp_path, batches_per_shard=2)
    cache = SweepCache(tmp_path)
    cache.load_all()
    for shard in tmp_path.glob("shard_*.npz"):
        shard.unlink()
    _assert_same_batches(list(cache), batches)
