"""Builds the optional CUDA extension ``dcign_fast._C`` with CMake + ninja.

``DCIGN_FAST_CUDA`` selects what happens:
  auto (default)  build when a CUDA compiler is found, otherwise skip it with one line;
  1               build, and fail the install if that is impossible;
  0               never build (pure-Python install: reference, torch and Triton backends).
``DCIGN_FAST_CUDA_ARCHS`` overrides the CUDA architectures (CMake syntax, default "80;90a").
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.bdist_wheel import bdist_wheel
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def find_nvcc() -> str | None:
    """$CUDA_HOME or $CUDA_PATH, then PATH, then the toolkit's default home (often not on PATH)."""
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    default = Path("/usr/local/cuda/bin/nvcc")
    return shutil.which("nvcc") or (str(default) if default.exists() else None)


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def run(self) -> None:
        mode = os.environ.get("DCIGN_FAST_CUDA", "auto").lower()
        if mode not in ("0", "1", "auto"):
            raise RuntimeError(f"DCIGN_FAST_CUDA must be 0, 1 or auto, got {mode!r}")
        self.nvcc = find_nvcc()
        self.required = mode == "1"
        if mode == "0" or (mode == "auto" and self.nvcc is None):
            why = "DCIGN_FAST_CUDA=0" if mode == "0" else "no CUDA compiler (nvcc) found"
            self._skip(why)
        elif self.nvcc is None:
            raise RuntimeError("DCIGN_FAST_CUDA=1 but no CUDA compiler (nvcc) was found; set CUDA_HOME")
        super().run()

    def _skip(self, why: str) -> None:
        # Out of the extension list, not merely unbuilt: an editable install copies every listed extension. An
        # earlier build's module goes too: the wheel packs whatever the build folder holds, and it may be
        # built for other architectures.
        print(f"dcign-fast: skipping the CUDA extension ({why}); backend='cuda' will be unavailable")
        for ext in self.extensions:
            Path(self.get_ext_fullpath(ext.name)).unlink(missing_ok=True)
        self.extensions = self.distribution.ext_modules = []  # the latter makes the wheel pure (Wheel)

    def build_extensions(self) -> None:
        for ext in list(self.extensions):
            try:
                self._cmake_build(ext, self.nvcc)
            except (OSError, ImportError, subprocess.CalledProcessError) as err:  # ImportError: no pybind11
                if self.required:
                    raise
                self._skip(f"build failed: {err}")

    def _cmake_build(self, ext: Extension, nvcc: str) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        # CMakeLists.txt holds the default architectures, which an empty value asks for; the variable overrides
        # them. Always passed: CMake's cache would otherwise keep an earlier build's choice.
        archs = os.environ.get("DCIGN_FAST_CUDA_ARCHS", "")
        configure = [
            "cmake",
            str(ROOT),
            "-G",
            "Ninja",
            f"-DCMAKE_CUDA_COMPILER={nvcc}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_CUDA_ARCHITECTURES={archs}",
        ]
        subprocess.run(configure, cwd=build_dir, check=True)
        subprocess.run(["cmake", "--build", ".", "--parallel"], cwd=build_dir, check=True)


class Wheel(bdist_wheel):
    """Tags the wheel by what the build produced: without the extension it is pure Python (py3-none-any).

    bdist_wheel decides purity from the extension list before building; CMakeBuild may empty that list while
    building, so the decision is made again once the build has run and before anything is installed. (An
    editable install's wheel keeps the platform tag: it is tagged before anything is built, and only ever
    installed where it was built.)
    """

    def run_command(self, command: str) -> None:
        super().run_command(command)
        if command == "build":
            self.root_is_pure = not (self.distribution.has_ext_modules() or self.distribution.has_c_libraries())


setup(ext_modules=[CMakeExtension("dcign_fast._C")], cmdclass={"build_ext": CMakeBuild, "bdist_wheel": Wheel})
