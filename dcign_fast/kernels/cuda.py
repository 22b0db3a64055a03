"""Lazy loader of the compiled CUDA extension ``dcign_fast._C``.

``import dcign_fast`` never needs it; only ``backend="cuda"`` does, and then a missing extension
is a clear error that says how to build it.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType

BUILD_HINT = (
    "reinstall with a CUDA compiler on PATH (or CUDA_HOME set) and DCIGN_FAST_CUDA=1, e.g. "
    "`DCIGN_FAST_CUDA=1 pip install -e .`, to build dcign_fast._C"
)


@functools.cache
def _import() -> ModuleType | ImportError:
    try:
        return importlib.import_module("dcign_fast._C")
    except ImportError as err:
        return err


def available() -> bool:
    """True when the extension was built and imports (a GPU is not needed for that)."""
    return not isinstance(_import(), ImportError)


def load() -> ModuleType:
    """The extension module; raises RuntimeError with build instructions when it is missing."""
    module = _import()
    if isinstance(module, ImportError):
        raise RuntimeError(f"backend='cuda' needs the compiled extension dcign_fast._C ({module}); {BUILD_HINT}")
    return module
