"""The compiled extension: it imports without a GPU, fails clearly without one, and works with one."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from dcign_fast.kernels import cuda
from dcign_fast.ops.backends import CUDA_EMULATION_ENV

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


@pytest.fixture(scope="module")
def ptxas_reports(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[subprocess.Popen, Path]]]:
    """nvcc -Xptxas -v on every unpool-conv source for sm_90a, all started at once (each takes tens of seconds
    of ptxas, and CI has two cores): source -> (the running nvcc, the file its report goes to)."""
    csrc = Path(__file__).resolve().parents[1] / "csrc"
    out = tmp_path_factory.mktemp("ptxas")
    cmd = ["nvcc", "-std=c++17", "-O3", "-cubin", "-arch=sm_90a", f"-I{csrc}", "-Xptxas", "-v"]
    reports = {}
    for source in UNPOOL_CONV_SOURCES:
        report = out / f"{source}.txt"
        with report.open("w") as stderr:
            nvcc = subprocess.Popen([*cmd, str(csrc / source), "-o", str(out / f"{source}.cubin")], stderr=stderr)
        reports[source] = nvcc, report
    yield reports
    for nvcc, _ in reports.values():
        nvcc.kill()
        nvcc.wait()


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (compile only, no GPU)")
@pytest.mark.parametrize("source", UNPOOL_CONV_SOURCES)
def test_unpool_conv_kernels_use_no_local_memory_on_sm90a(source, ptxas_reports):
    """ptxas for sm_90a: every instantiation (4 multiplies: float32 exact and TF32, bf16, fp16; x 2 tiles; x 2
    activation load widths: 16-byte vectors or single elements) keeps its accumulators and the geometry in
    registers: no stack frame, no spills (a run-time index into a kernel parameter would put it in local
    memory). ptxas also refuses more than 48 KiB of static shared memory."""
    nvcc, report = ptxas_reports[source]
    returncode = nvcc.wait(timeout=600)
    stderr = report.read_text()
    assert returncode == 0, stderr
    frames = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", stderr)
    # float32 exact and TF32, bf16, fp16 x 2 tiles x 2 load widths; the forward and grad input add their
    # few-outputs paths
    few_outputs_paths = source in ("unpool_conv_forward.cu", "unpool_conv_grad_input.cu")
    assert len(frames) == (24 if few_outputs_paths else 16), stderr
    assert all(frame == ("0", "0", "0") for frame in frames), stderr
