"""Which backends exist on this machine, and how ``backend="auto"`` chooses.

Every op accepts ``backend=`` one of :data:`BACKENDS`. A backend that cannot run the given tensors is
an error, never a silent switch: only ``"auto"`` chooses, and it chooses among backends that can.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

BACKENDS = ("auto", "reference", "torch", "triton", "cuda")
EXPLICIT_BACKENDS = tuple(name for name in BACKENDS if name != "auto")  # each names one implementation
# Runs backend="cuda" on CPU tensors through a CPU emulation of the CUDA C++ kernels (tests only).
CUDA_EMULATION_ENV = "DCIGN_FAST_CUDA_EMULATION"


@dataclass(frozen=True)
class Kernels:
    """One kernel backend's halves of an op, which its custom op runs: the forward, and the explicit backward
    from the saved inputs (their signatures: the op's ``KERNELS``)."""

    forward: Callable[..., Any]
    backward: Callable[..., Any]


def imported_kernels(module: str, forward: str, backward: str) -> Callable[[], Kernels]:
    """The Kernels of ``module``'s functions ``forward`` and ``backward``, imported when first asked for
    (importing dcign_fast needs neither triton nor the compiled extension) and kept: every op call asks."""

    @functools.cache
    def load() -> Kernels:
        kernels = importlib.import_module(module)
        return Kernels(getattr(kernels, forward), getattr(kernels, backward))

    return load


def triton_interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def cuda_emulating() -> bool:
    """True when ``backend="cuda"`` runs on the CPU emulation (:mod:`dcign_fast.kernels.cuda_emulation`)."""
    return os.environ.get(CUDA_EMULATION_ENV, "0") not in ("", "0")


# Older Triton draws other noise from tl.randn at offsets >= 2**31 (its Philox took int64 offsets whole), and
# its interpreter reads the kernels' postponed "tl.constexpr" annotations as plain arguments.
TRITON_MIN_VERSION = (3, 4)


def installed_triton_reason() -> str:
    """:func:`triton_version_reason` of the triton package ``import triton`` would load. Its version is read from
    the ``__version__ = "..."`` line of its ``__init__.py`` (milliseconds; a distribution's metadata may describe
    another copy), and triton is imported (half a second) only where that line is missing."""
    spec = importlib.util.find_spec("triton")
    if spec is None:
        return triton_version_reason(None)
    with contextlib.suppress(OSError):  # (unreadable: imported below)
        source = Path(spec.origin).read_text() if spec.origin else ""  # (no origin: a namespace package)
        if match := re.search(r"""^__version__\s*=\s*['"]([^'"]+)['"]""", source, re.M):
            return triton_version_reason(match.group(1))
    try:
        import triton
    except Exception as err:  # a broken install must not break `import dcign_fast`, only this backend
        return f"needs a working 'triton' package: importing it failed ({type(err).__name__}: {err})"
    return triton_version_reason(triton.__version__)


def triton_version_reason(version: str | None) -> str:
    """Why a Triton of ``version`` (None: none installed) cannot run the triton backend, or "" when it can."""
    if version is None:
        return "needs the 'triton' package (pip install triton)"
    if tuple(int(part) for part in re.findall(r"\d+", version)[:2]) < TRITON_MIN_VERSION:
        wanted = ".".join(map(str, TRITON_MIN_VERSION))
        return f"needs triton>={wanted}, found {version} (pip install 'triton>={wanted}')"
    return ""


# Read once, at import, so that torch.compile sees a constant: traced, the lookup reached importlib's find_spec,
# a graph break that torch 2.11 refuses under fullgraph. (torch.compiler.assume_constant_result would import
# torch._dynamo, which made `import dcign_fast` take twice as long as `import torch`.)
_TRITON_REASON = installed_triton_reason()


def triton_unavailable_reason() -> str:
    """Why the triton backend cannot run here: "" when the ``triton`` package is installed and recent enough."""
    return _TRITON_REASON


def triton_available() -> bool:
    """Whether the triton backend can run here (see :func:`triton_unavailable_reason`)."""
    return not triton_unavailable_reason()


def check_backend_name(backend: str) -> None:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def check_backend_runs_on(backend: str, device: torch.device, supported: tuple[str, ...]) -> None:
    """Raises a ValueError naming the backend when it cannot run an op on tensors on ``device``.

    ``supported`` lists the explicit backends the op implements.
    """
    check_backend_name(backend)
    if backend == "auto":
        return
    if backend == "triton":
        if reason := triton_unavailable_reason():
            raise ValueError(f"backend='triton' {reason}")
        if device.type != "cuda" and not triton_interpreting():
            raise ValueError(
                f"backend='triton' needs CUDA tensors (got device {device}); "
                "set TRITON_INTERPRET=1 to run Triton kernels on the CPU for testing"
            )
    if backend == "cuda" and device.type != "cuda" and not (device.type == "cpu" and cuda_emulating()):
        raise ValueError(
            f"backend='cuda' needs CUDA tensors (got device {device}); "
            f"in a source checkout, set {CUDA_EMULATION_ENV}=1 to run the CUDA C++ kernels in a CPU emulation for "
            "testing"
        )
    if backend not in supported:
        raise ValueError(f"backend={backend!r} is not implemented for this op; use one of {supported}")
