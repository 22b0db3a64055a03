"""Lazy loader of the compiled CUDA extension ``dcign_fast._C``, and its launches' streams.

``import dcign_fast`` never needs it; only ``backend="cuda"`` does, and then a missing extension
is a clear error that says how to build it. With ``DCIGN_FAST_CUDA_EMULATION=1`` the same kernels run
on CPU tensors through :mod:`dcign_fast.kernels.cuda_emulation` (tests without a GPU).
"""

from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType

import torch

from dcign_fast.ops.backends import cuda_emulating

# Storage dtype -> the code csrc/dtype.cuh dispatches on.
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

BUILD_HINT = (
    "reinstall from source with a CUDA compiler on PATH (or CUDA_HOME set) and DCIGN_FAST_CUDA=1 to build "
    "dcign_fast._C: `DCIGN_FAST_CUDA=1 pip install --no-binary dcign-fast dcign-fast` for a release, "
    "`DCIGN_FAST_CUDA=1 pip install -e .` in a checkout"
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


def load(device: torch.device | None = None) -> ModuleType:
    """The extension module for tensors on ``device``: the CPU emulation for CPU tensors when it is switched
    on, else the compiled extension; raises RuntimeError with build instructions when that is missing."""
    if cuda_emulating() and (device is None or device.type == "cpu"):
        from dcign_fast.kernels import cuda_emulation

        return cuda_emulation.load()
    module = _import()
    if isinstance(module, ImportError):
        raise RuntimeError(f"backend='cuda' needs the compiled extension dcign_fast._C ({module}); {BUILD_HINT}")
    return module


def stream(device: torch.device) -> int:
    """The handle of the current torch stream on ``device``, where launches go (0 on the CPU emulation)."""
    return 0 if device.type == "cpu" else torch.cuda.current_stream(device).cuda_stream


def multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``: how many blocks run at once (CPU cores on the emulation)."""
    if device.type == "cpu":
        return os.cpu_count() or 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def dtype_code(t: torch.Tensor) -> int:
    """The code of ``t``'s dtype that the kernels dispatch on; a TypeError for dtypes they do not take."""
    if t.dtype not in DTYPE_CODES:
        raise TypeError(f"backend='cuda' takes float32, bfloat16 or float16 tensors, got {t.dtype}")
    return DTYPE_CODES[t.dtype]
