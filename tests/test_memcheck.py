"""The kernel backends never touch memory outside their tensors (tests/memcheck.py): the CUDA C++ kernels on
the CPU emulation, the Triton kernels in Triton's interpreter."""

from __future__ import annotations

import shutil
import signal

import pytest

from dcign_fast.ops.backends import CUDA_EMULATION_ENV
from tests.memcheck import run_python

MODES = {"cuda": {CUDA_EMULATION_ENV: "1"}, "triton": {"TRITON_INTERPRET": "1"}}
HAS_COMPILER = shutil.which("g++") is not None or shutil.which("c++") is not None


@pytest.mark.parametrize("guard_before", [False, True], ids=["past-the-end", "before-the-start"])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_kernels_stay_inside_their_tensors(backend, guard_before):
    if backend == "cuda" and not HAS_COMPILER:
        pytest.skip("no C++ compiler to build the CUDA emulation")
    code = f"from tests.memcheck import run_ops_on_guarded_tensors as run; run({backend!r}, {guard_before})"
    result = run_python(code, **MODES[backend])
    touched = " (SIGSEGV: a kernel touched memory outside a tensor)" if result.returncode == -signal.SIGSEGV else ""
    assert result.returncode == 0, f"exit {result.returncode}{touched}\n{result.stderr[-3000:]}"


@pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler to build the CUDA emulation")
def test_guard_pages_catch_an_overrun():
    # The emulated smoke kernel told to read one element more than the guarded tensor holds.
    code = (
        "import torch; from dcign_fast.kernels import cuda; from tests.memcheck import guarded_copy\n"
        "x = guarded_copy(torch.randn(1024)); y = torch.empty(1025)\n"
        "cuda.load().axpb(x.data_ptr(), y.data_ptr(), 1024, 1.0, 0.0, 0); print('in bounds ok', flush=True)\n"
        "cuda.load().axpb(x.data_ptr(), y.data_ptr(), 1025, 1.0, 0.0, 0)\n"
    )
    result = run_python(code, **MODES["cuda"])
    assert "in bounds ok" in result.stdout, result.stderr[-3000:]
    assert result.returncode == -signal.SIGSEGV
