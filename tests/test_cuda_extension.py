"""The compiled extension: it imports without a GPU, fails clearly without one, and works with one."""

from __future__ import annotations

import pytest
import torch

from dcign_fast.kernels import cuda

needs_extension = pytest.mark.skipif(not cuda.available(), reason="dcign_fast._C was not built (no nvcc)")


@needs_extension
def test_extension_imports_and_reports_runtime():
    assert cuda.load().runtime_version() >= 11000


@needs_extension
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error path")
def test_calling_without_a_gpu_raises_a_clear_error():
    with pytest.raises(RuntimeError, match="cudaGetDeviceCount"):
        cuda.load().device_count()


def test_missing_extension_error_says_how_to_build(monkeypatch):
    monkeypatch.setattr(cuda, "_import", lambda: ImportError("No module named 'dcign_fast._C'"))
    with pytest.raises(RuntimeError, match="DCIGN_FAST_CUDA=1"):
        cuda.load()


@pytest.mark.cuda
@needs_extension
def test_smoke_kernel_on_the_current_stream():
    x = torch.randn(1000, device="cuda")
    y = torch.full_like(x, float("nan"))
    cuda.load().axpb(x.data_ptr(), y.data_ptr(), x.numel(), 2.0, 1.0, torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    assert torch.equal(y, 2.0 * x + 1.0)
