"""What `pip install dcign-fast` gets: the source distribution builds the CUDA extension, and a wheel built from
it (without the extension) runs the library, bundled meshes included, from outside the source tree."""

from __future__ import annotations

import builtins
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

# One pytest-xdist worker runs this module (with --dist loadgroup, as the README's command does): its sdist is
# built once.
pytestmark = pytest.mark.xdist_group("packaging")

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
    needed |= {"benchmarks/RESULTS.md", "benchmarks/speedup.png"}  # the README links them
    assert not needed - names, f"missing from the sdist: {sorted(needed - names)}"
    assert not any("__pycache__" in name or name.endswith(".so") for name in names)


def test_wheel_from_the_sdist_runs_outside_the_source_tree(sdist, tmp_path):
    archive, tracked = sdist
    with tarfile.open(archive) as tar:
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python >= 3.11.4 / 3.10.12
        tar.extractall(tmp_path / "unpacked", **safe)
    (source,) = (tmp_path / "unpacked").iterdir()
    # An earlier build's extension, left where setuptools builds: a build without one used to pack it.
    stale = source / "build" / f"lib.{sysconfig.get_platform()}-{sys.implementation.cache_tag}" / "dcign_fast"
    stale.mkdir(parents=True)
    (stale / f"_C{sysconfig.get_config_var('EXT_SUFFIX')}").write_bytes(b"an old build")
    wheel = _build("build_wheel", source, tmp_path / "wheel")
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
        whl.extractall(tmp_path / "site")
    package = {name for name in tracked if name.startswith("dcign_fast/")}
    assert not package - names, f"missing from the wheel: {sorted(package - names)}"
    assert not [name for name in names if name.startswith("dcign_fast/_C")]
    assert wheel.name.endswith("-py3-none-any.whl"), f"a wheel without the extension is pure Python: {wheel.name}"
    (metadata,) = [name for name in names if name.endswith(".dist-info/METADATA")]
    assert "License-Expression: MIT AND BSD-3-Clause" in (tmp_path / "site" / metadata).read_text()

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


@pytest.mark.parametrize("archs, words", [("all", "all includes architectures older"), ("80;75", "75 is older")])
def test_cuda_architectures_older_than_sm_80_are_refused_at_once(archs, words, tmp_path):
    """DCIGN_FAST_CUDA_ARCHS=all configured, and the build failed minutes later on an old architecture."""
    if shutil.which("cmake") is None:
        pytest.skip("needs cmake")
    configure = ["cmake", "-S", str(ROOT), "-B", str(tmp_path), f"-DCMAKE_CUDA_ARCHITECTURES={archs}"]
    done = subprocess.run(configure, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and f"DCIGN_FAST_CUDA_ARCHS: {words}" in done.stderr, done.stderr


def test_a_star_import_hides_no_builtin():
    """`from dcign_fast import *` brought in the subpackage eval, which hid Python's eval."""
    names: dict = {}
    exec("from dcign_fast import *", names)
    assert not (set(names) - {"__builtins__"}) & set(dir(builtins))
