"""CPU emulation of the CUDA C++ backend, for testing without a GPU.

The real kernel sources of csrc/ are compiled by the host C++ compiler against csrc/emulation/ (a fake
CUDA runtime in which every thread block runs as cooperative fibers) into a module with the same
interface as ``dcign_fast._C``. With ``DCIGN_FAST_CUDA_EMULATION=1`` (the counterpart of Triton's
``TRITON_INTERPRET=1``), ``backend="cuda"`` runs on CPU tensors through it: slow, and only for checking
the kernels' index arithmetic, barriers and numerics in CI. It needs a source checkout (csrc/ is not
installed with the package), g++ (C++20) and pybind11.
"""

from __future__ import annotations

import concurrent.futures
import fcntl
import functools
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from types import ModuleType

from dcign_fast.ops.backends import CUDA_EMULATION_ENV

CSRC = Path(__file__).resolve().parents[2] / "csrc"
FLAGS = ("-std=c++20", "-O2", "-fPIC", "-DDCIGN_CPU_EMULATION")


def _find_compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def unavailable_reason() -> str | None:
    """Why the emulation cannot be built here, or None: it compiles the csrc/ sources of a source checkout
    (an installed wheel has none) with a host C++ compiler."""
    if not (CSRC / "emulation" / "cuda_runtime.h").is_file():
        return f"needs the csrc/ sources of a source checkout next to the package; none at {CSRC}"
    if _find_compiler() is None:
        return "needs a C++20 compiler (g++ or $CXX) to build the emulation"
    return None


def _compiler() -> str:
    """The host compiler; a RuntimeError naming what is missing when the emulation cannot be built here."""
    reason, compiler = unavailable_reason(), _find_compiler()
    if reason or compiler is None:
        raise RuntimeError(f"{CUDA_EMULATION_ENV}=1 {reason}")
    return compiler


def _sources() -> list[Path]:
    return [CSRC / "bindings.cpp", *sorted(CSRC.glob("*.cu"))]


def include_flags() -> list[str]:
    """-I flags of an emulation build: the fake CUDA headers first, then csrc/, Python and pybind11."""
    try:
        import pybind11
    except ImportError as err:
        raise RuntimeError(f"{CUDA_EMULATION_ENV}=1 needs pybind11 (pip install pybind11)") from err
    # The fake CUDA headers come first, so <cuda_runtime.h> and friends resolve to them.
    return [
        f"-I{CSRC / 'emulation'}",
        f"-I{CSRC}",
        f"-I{sysconfig.get_paths()['include']}",
        f"-I{pybind11.get_include()}",
    ]


def _fingerprint(compiler: str, sources: list[Path]) -> str:
    digest = hashlib.sha256(" ".join((compiler, *FLAGS)).encode())
    for path in sorted([*sources, *CSRC.glob("*.h"), *CSRC.glob("*.cuh"), *(CSRC / "emulation").glob("*.h")]):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def build(cache_dir: Path | None = None) -> Path:
    """Compiles the emulation (cached by a hash of compiler, flags and sources) and returns the module's path."""
    compiler, sources = _compiler(), _sources()
    cache_dir = cache_dir or Path(tempfile.gettempdir()) / "dcign_fast_cuda_emulation"
    target = cache_dir / _fingerprint(compiler, sources) / f"_C{sysconfig.get_config_var('EXT_SUFFIX')}"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # One build at a time (pytest-xdist workers, parallel jobs): the others wait for it, then load its result.
    with open(target.parent / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.exists():
            _build(compiler, sources, target)
    return target


def _build(compiler: str, sources: list[Path], target: Path) -> None:
    # Minutes of g++ with nothing to show otherwise; said once, as the build is cached.
    print(f"dcign_fast: building the CPU emulation of dcign_fast._C into {target.parent} (once)", file=sys.stderr)
    work = Path(tempfile.mkdtemp(dir=target.parent))
    includes = include_flags()

    def compile_one(source: Path) -> Path:
        obj = work / f"{source.name}.o"
        language = ["-x", "c++", "-include", "cuda_runtime.h"] if source.suffix == ".cu" else []
        cmd = [compiler, *FLAGS, *includes, *language, "-c", str(source), "-o", str(obj)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(f"building the CUDA emulation failed on {source.name}:\n{result.stderr}")
        return obj

    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        objects = list(pool.map(compile_one, sources))
    library = work / target.name
    subprocess.run([compiler, "-shared", *map(str, objects), "-o", str(library)], check=True)
    os.replace(library, target)  # atomic: a concurrent build never sees half a file
    shutil.rmtree(work, ignore_errors=True)


@functools.cache
def load() -> ModuleType:
    """The emulated extension module (built on first use)."""
    spec = importlib.util.spec_from_file_location("_C", build())
    assert spec is not None and spec.loader is not None  # a path ending in .so always has a spec and a loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
