"""More promises of the kernel backends' host code that the other kernel tests leave open (found by mutation
testing dcign_fast/kernels/): what the shared backward reads of the forward's output, the cuda backend's
launch arguments, and which module serves backend="cuda" and what it says when it cannot."""

from __future__ import annotations

import pytest
import torch


def test_the_backward_reads_the_output_only_behind_a_relu():
    """backward_grad_and_bias: ``out`` is read only for activation="relu"; without it grad_out passes whole."""
    from dcign_fast.kernels.unpool_conv_common import backward_grad_and_bias

    grad_out, out = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    g, grad_bias = backward_grad_and_bias(grad_out, out, None, True)
    assert torch.equal(g, grad_out) and torch.allclose(grad_bias, grad_out.sum((0, 2, 3)))
    g, _ = backward_grad_and_bias(grad_out, out, "relu", False)
    assert torch.equal(g, grad_out.masked_fill(out <= 0, 0))


def test_the_cuda_launch_views_give_extent_1_dimensions_stride_0():
    """_view: a dimension of extent 1 gets stride 0 (else its stride may keep the kernels from 16-byte
    vectors); the others keep theirs."""
    from dcign_fast.kernels.cuda_unpool_conv import _view

    t = torch.randn(3, 5, 4, 1).permute(3, 0, 1, 2)  # [1, 3, 5, 4] with strides (1, 20, 4, 1)
    assert _view(t) == (t.data_ptr(), 0, 20, 4, 1)


def test_the_emulation_serves_cpu_tensors_only(monkeypatch: pytest.MonkeyPatch):
    """With the emulation on, tensors on a GPU still go to the compiled extension (README: CPU tensors only under
    DCIGN_FAST_CUDA_EMULATION=1); here it is missing, which load reports with how to build it."""
    from dcign_fast.kernels import cuda
    from dcign_fast.ops.backends import CUDA_EMULATION_ENV

    monkeypatch.setenv(CUDA_EMULATION_ENV, "1")
    monkeypatch.setattr(cuda, "_import", lambda: ImportError("no extension here"))
    with pytest.raises(RuntimeError, match="no extension here"):
        cuda.load(torch.device("cuda", 0))


def test_the_emulation_names_what_it_lacks(monkeypatch: pytest.MonkeyPatch, tmp_path):
    """unavailable_reason: without csrc/ sources (an installed wheel), then without a C++ compiler."""
    from dcign_fast.kernels import cuda_emulation

    with monkeypatch.context() as patch:
        patch.setattr(cuda_emulation, "CSRC", tmp_path)
        assert "needs the csrc/ sources" in (cuda_emulation.unavailable_reason() or "")
    monkeypatch.setattr(cuda_emulation, "_find_compiler", lambda: None)
    assert "needs a C++20 compiler" in (cuda_emulation.unavailable_reason() or "")
