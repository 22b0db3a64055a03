"""``dcign-fast render``: dataset folders, cache and preview through the CLI entry point."""

import pytest
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


@pytest.mark.parametrize("format", ["png", "cache"])
def test_render_refuses_a_folder_that_holds_something(format, tmp_path, capsys):
    """Rendering into a used folder would overwrite some of its batches and leave the rest: two datasets in one."""
    (tmp_path / "old.txt").write_text("x")
    assert main(["render", "--out", str(tmp_path), "--batches", "1", "--size", "16", "--format", format]) == 2
    assert "is not empty" in capsys.readouterr().err and sorted(p.name for p in tmp_path.iterdir()) == ["old.txt"]
    # A file where the folder would go: refused before rendering, not at the first batch written.
    assert main(["render", "--out", str(tmp_path / "old.txt"), "--batches", "1", "--format", format]) == 2
    assert "old.txt is a file" in capsys.readouterr().err
    # A folder that cannot be made (under a file): named as the option, before rendering.
    assert main(["render", "--out", str(tmp_path / "old.txt" / "run"), "--batches", "1", "--format", format]) == 2
    assert "--out " in (err := capsys.readouterr().err) and "old.txt/run cannot be created: Not a directory" in err


def test_render_preview_grid(tmp_path):
    path = tmp_path / "sweeps.png"
    assert main(["render", "--preview", str(path), "--size", "48", "--batch-size", "3"]) == 0
    with Image.open(path) as image:
        assert image.height == 4 * 48 * 2  # four kinds, images enlarged twice
    # At 16 px a doubled row (32 px) is shorter than its six-line label: rows grow until labels fit.
    assert main(["render", "--preview", str(path), "--size", "16", "--batch-size", "3"]) == 0
    with Image.open(path) as image:
        assert image.height % (4 * 16) == 0 and image.height // 4 >= 6 * 10


def test_render_refuses_options_it_would_ignore_or_an_empty_folder(tmp_path, capsys, monkeypatch):
    """A preview silently ignored --batches and --format; --out '' wrote the dataset into the current folder."""
    for option, value in (("--batches", "3"), ("--format", "cache")):
        assert main(["render", "--preview", str(tmp_path / "p.png"), option, value]) == 2
        assert f"{option} is for --out: a --preview grid shows one batch of each kind" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    for out in ("", "  "):
        with pytest.raises(SystemExit) as exit_info:
            main(["render", "--out", out, "--batches", "1", "--size", "8"])
        assert exit_info.value.code == 2 and "must name a folder" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "option, value, words",
    [
        ("--shape-bias", "-1", "shape_bias must be in [0, 3.4028234663852886e+38) and finite, got -1.0"),
        ("--shape-bias", "nan", "shape_bias must be in [0, 3.4028234663852886e+38) and finite, got nan"),
        ("--seed", "-1", "seed must be >= 0, got -1"),
    ],
)
def test_render_refuses_bad_sampler_options_in_one_line(option, value, words, tmp_path, capsys):
    """Negative odds would reach torch.multinomial, a negative seed numpy's SeedSequence: tracebacks that
    name neither option. The sampler checks them, and the CLI prints its error in one line."""
    assert main(["render", "--preview", str(tmp_path / "p.png"), option, value]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and not (tmp_path / "p.png").exists()


@pytest.mark.parametrize(
    "command", [["render", "--preview"], ["rerender", "--checkpoint", "c", "--image", "i", "--out"]]
)
def test_a_picture_path_without_an_image_extension_is_refused_up_front(command, tmp_path, capsys):
    """PIL named neither the option nor the path ("unknown file extension: "), after the work was done."""
    for path, words in ((tmp_path / "grid", "must end in an image extension"), (tmp_path, "must be a file to write")):
        with pytest.raises(SystemExit) as exit_info:
            main([*command, str(path)])
        assert exit_info.value.code == 2 and words in capsys.readouterr().err
