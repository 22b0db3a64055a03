"""The tree stays ruff-clean, and the package and benchmarks mypy-clean (the package ships py.typed: its hints
are part of its API). Both tools come pinned with the ``test`` extra; their settings are pyproject.toml's."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_tool(module: str, *args: str) -> None:
    """Runs ``python -m module args`` in the tree; skipped unless the pinned version is installed (another
    version's verdicts may differ)."""
    pytest.importorskip(module, reason=f"{module} comes with the test extra (mypy on Python >= 3.10 only)")
    pinned = re.search(rf'"{module}==([^";]+)', (ROOT / "pyproject.toml").read_text())
    assert pinned, f"pyproject.toml's test extra pins no {module} version"
    if version(module) != pinned[1]:
        pytest.skip(f"{module} {version(module)} is installed; the checks hold for the pinned {pinned[1]}")
    done = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-2000:]


@pytest.mark.parametrize("args", [("check", "."), ("format", "--check", ".")], ids=["check", "format"])
def test_ruff(args):
    run_tool("ruff", *args)


@pytest.mark.slow
def test_mypy():
    run_tool("mypy")
