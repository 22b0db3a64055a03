"""What `pip install dcign-fast` gets: the source distribution builds the CUDA extension, and a wheel built from
it (without the extension) runs the library, bundled meshes included, from outside the source tree."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tracked_files() -> list[str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout (the tracked files are what a release is built from)")
    listing = subprocess.run(["git", "ls-files"], cwd=ROOT, check=True, capture_output=True, text=True)
    return [name for name in listing.stdout.splitlines() if (ROOT / name).is_file()]


def _build(hook: str, source: Path, out: Path) -> Path:
    """Run one PEP 517 hook of setuptools (what pip and `python -m build` call) in `source`."""
    out.mkdir()
    code = f"from setuptools import build_meta; print(build_meta.{hook}({str(out)!r}))"
    env = {**os.environ, "DCIGN_FAST_CUDA": "0"}  # the wheel test needs no CUDA build; sdist ignores it
    done = subprocess.run([sys.executable, "-c", code], cwd=source, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return out / done.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> tuple[Path, list[str]]:
    """A source distribution built from a copy of the tracked files (building writes egg-info beside them)."""
    tracked = _tracked_files()
    checkout = tmp_path_factory.mktemp("checkout")
    for name in tracked:
        (checkout / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, checkout / name)
    return _build("build_sdist", checkout, tmp_path_factory.mktemp("sdist") / "dist"), tracked


def test_sdist_holds_everything_a_build_needs(sdist):
    archive, tracked = sdist
    with tarfile.open(archive) as tar:
        top = tar.getnames()[0].split("/")[0]
        names = {name.removeprefix(f"{top}/") for name in tar.getnames()}
    needed = {"setup.py", "pyproject.toml", "CMakeLists.txt", "README.md", "LICENSE"}
    needed |= {name for name in tracked if name.startswith(("csrc/", "dcign_fast/", "tests/", "docs/"))}
    needed |= {name for name in tracked if name.startswith("benchmarks/") and name.endswith((".py", ".sh"))}
    assert not needed - names, f"missing from the sdist: {sorted(needed - names)}"
    assert not any("__pycache__" in name or name.endswith(".so") for name in names)


def test_wheel_from_the_sdist_runs_outside_the_source_tree(sdist, tmp_path):
    archive, tracked = sdist
    with tarfile.open(archive) as tar:
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python >= 3.11.4 / 3.10.12
        tar.extractall(tmp_path / "unpacked", **safe)
    (source,) = (tmp_path / "unpacked").iterdir()
    wheel = _build("build_wheel", source, tmp_path / "wheel")
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
        whl.extractall(tmp_path / "site")
    package = {name for name in tracked if name.startswith("dcign_fast/")}
    assert not package - names, f"missing from the wheel: {sorted(package - names)}"

    script = (
        "import torch, dcign_fast as dc\n"
        "from dcign_fast.data import SweepSampler\n"
        "images, factors, kind = next(iter(SweepSampler(size=64, batch_size=4, seed=0)))\n"
        "model = dc.models.DCIGN.from_preset('demo64')\n"
        "recon, mu, logvar, z = model(images)\n"
        "assert recon.shape == images.shape and torch.isfinite(recon).all()\n"
        "print(dc.__file__)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert Path(done.stdout.strip()).is_relative_to(tmp_path / "site")
