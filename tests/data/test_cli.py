"""``dcign-fast render``: dataset folders, cache and preview through the CLI entry point."""

from PIL import Image

from dcign_fast.cli import main
from dcign_fast.data.cache import SweepCache
from dcign_fast.data.folders import SweepFolders


def test_render_writes_png_folders_and_cache(tmp_path):
    common = ["--batches", "2", "--size", "16", "--batch-size", "4", "--seed", "5"]
    assert main(["render", "--out", str(tmp_path / "png"), *common]) == 0
    assert main(["render", "--out", str(tmp_path / "cache"), "--format", "cache", *common]) == 0
    folders, cache = SweepFolders(tmp_path / "png", size=16), SweepCache(tmp_path / "cache")
    assert len(folders) == len(cache) == 2
    assert sorted(k for _, _, k in folders) == sorted(k for _, _, k in cache)


def test_render_preview_grid(tmp_path):
    path = tmp_path / "sweeps.png"
    assert main(["render", "--preview", str(path), "--size", "16", "--batch-size", "3"]) == 0
    with Image.open(path) as image:
        assert image.height == 4 * 16 * 2  # four kinds, images enlarged twice
