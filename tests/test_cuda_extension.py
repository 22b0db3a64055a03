"""The compiled extension: it imports without a GPU, fails clearly without one, and works with one."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from dcign_fast.kernels import cuda
from dcign_fast.ops.backends import CUDA_EMULATION_ENV
from tests.aot import cuobjdump_unavailable_reason, issue_per_mma_cycle, kernel_sass, kernels_resource_usage

needs_extension = pytest.mark.skipif(not cuda.available(), reason="dcign_fast._C was not built")
# The extension's SASS and resource usage are read by the cuobjdump that triton (optional) bundles.
needs_cuobjdump = pytest.mark.skipif(bool(cuobjdump_unavailable_reason()), reason=cuobjdump_unavailable_reason())


@needs_extension
def test_extension_imports_and_reports_runtime():
    assert cuda.load().runtime_version() >= 11000


@needs_extension
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error path")
def test_calling_without_a_gpu_raises_a_clear_error():
    with pytest.raises(RuntimeError, match="cudaGetDeviceCount"):
        cuda.load().device_count()


def test_extension_is_built_where_nvcc_is():
    """setup.py skips an extension build that fails unless DCIGN_FAST_CUDA=1, so that a user's install still
    works without backend="cuda". Then every test that needs the extension would skip: here a failed build
    fails, wherever nvcc is on the PATH (as on CI) and the build was not switched off."""
    nvcc = shutil.which("nvcc")
    if nvcc is None or os.environ.get("DCIGN_FAST_CUDA", "auto").lower() == "0":
        pytest.skip("no nvcc on the PATH, or DCIGN_FAST_CUDA=0")
    assert cuda.available(), (
        f"nvcc is at {nvcc} but dcign_fast._C does not import ({cuda._import()}): the build failed; reinstall with "
        "DCIGN_FAST_CUDA=1 to see why"
    )


def test_missing_extension_error_says_how_to_build(monkeypatch):
    monkeypatch.delenv(CUDA_EMULATION_ENV, raising=False)
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


UNPOOL_CONV_SOURCES = [
    "unpool_conv_forward.cu",
    "unpool_conv_grad_input.cu",
    "unpool_conv_grad_weight.cu",
    "unpool_conv_grad_weight_few_outputs.cu",
]


@needs_extension
@needs_cuobjdump
@pytest.mark.parametrize("source", UNPOOL_CONV_SOURCES)
def test_unpool_conv_kernels_use_no_local_memory(source):
    """The built extension, for every architecture it holds (sm_90a at least), read by cuobjdump: every
    instantiation of ``source``'s kernels (4 multiplies: float32 exact and TF32, bf16, fp16; x 2 or 3 tiles; x 2
    activation load widths: 16-byte vectors or single elements) keeps its accumulators and the geometry in
    registers: no stack frame, so no spills, and no local memory (a run-time index into a kernel parameter
    would put it there). ptxas also refused more than 48 KiB of static shared memory when it built them."""
    binary = Path(cuda._import().__file__)
    csrc = Path(__file__).resolve().parents[1] / "csrc"
    changed = [p.name for p in csrc.iterdir() if p.is_file() and p.stat().st_mtime > binary.stat().st_mtime]
    assert not changed, f"{', '.join(changed)} in csrc/ changed since {binary.name} was built: `pip install -e .`"
    stem = source.removesuffix(".cu")
    tag = f"_{len(stem) + 3}_{stem}_cu_"  # the file's anonymous namespace in every mangled kernel name
    kernels = [(arch, usage) for arch, name, usage in kernels_resource_usage(binary) if tag in name]
    archs = sorted({arch for arch, _ in kernels})
    assert "sm_90a" in archs, archs
    # the forward and grad input add their few-outputs paths, grad weight its tiles for up to 64 input channels
    per_arch = 16 if source == "unpool_conv_grad_weight_few_outputs.cu" else 24
    assert len(kernels) == per_arch * len(archs), (archs, len(kernels))
    assert all(usage["stack"] == 0 and usage["local"] == 0 for _, usage in kernels), kernels


# The instantiations a GPU runs for the paper150 decoder's widest layer (96 -> 96, K=7 valid, bf16, channels_last:
# 16-byte loads): the forward's 64 x 64 tiles, the grad kernels' 128 x 64 (template arguments as mangled).
PAPER150_L3_KERNELS = {
    "unpool_conv_forward_kernelI13__nv_bfloat16Lb0ELi64ELi64ELi32ELi8ELb0EE": 2.05,
    "unpool_conv_grad_input_kernelI13__nv_bfloat16Lb0ELi128ELi64ELi32ELi8ELb0EE": 3.05,
    "unpool_conv_grad_weight_kernelI13__nv_bfloat16Lb0ELi128ELi64ELi32ELi8EE": 2.55,
}


@needs_extension
@needs_cuobjdump
@pytest.mark.parametrize("kernel, bound", PAPER150_L3_KERNELS.items(), ids=lambda v: str(v).split("_kernel")[0])
def test_unpool_conv_hot_loops_can_feed_the_tensor_cores(kernel, bound):
    """A static speed check without a GPU (tests.aot.issue_per_mma_cycle, as the Triton kernels have): in the
    sm_90a build, the issue clocks of each hot loop's trip over its multiplies' tensor-core clocks. These were
    5-32 before the loops lost their run-time divisions, masked loads and wmma fragment loads, and 2.0, 3.0 and 2.5
    since the loads' offsets are prepared once per thread (docs/cuda-backend.md); the bounds keep them from creeping
    back."""
    binary = Path(cuda._import().__file__)
    names = [name for arch, name, _ in kernels_resource_usage(binary) if arch == "sm_90a" and kernel in name]
    assert len(names) == 1, names
    ratio = issue_per_mma_cycle(kernel_sass(binary, "sm_90a", names[0]))
    assert ratio is not None and ratio <= bound, (kernel, ratio)
