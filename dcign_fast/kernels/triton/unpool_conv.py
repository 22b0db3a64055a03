"""Fused nearest-upsample-by-2 + convolution as Triton implicit GEMMs, forward and backward.

The math is the phase decomposition (dcign_fast/ops/phases.py): output pixel (2i + a, 2j + b) is a small
convolution of the LOW-resolution input with the phase's collapsed kernel. Per axis the two phases read
windows of low-resolution offsets that overlap; their union ("union taps", ``TR`` rows x ``TC`` cols)
starts at ``ROW0``/``COL0`` and phase a occupies union taps [RS_a, RS_a + RT_a). All four phase kernels are
packed into one tensor in union coordinates (zero outside a phase's window), with the channels each GEMM
reduces over contiguous and zero-padded to a multiple of 16: ``wp[a, b, ty, tx, c_out, c_in16]`` for the
forward, ``wp[a, b, ty, tx, c_in, c_out16]`` for grad input. TF32 tensor cores take only such K-major
operands, and 16-byte rows let Triton copy them 16 bytes at a time (tests/test_triton_aot.py checks the
compiled kernels for it).

Layouts: tensors are read and written through their strides; the launchers hand the kernels
channels_last (NHWC) tensors so that the GEMM reduction over channels reads contiguous memory.

This module holds the backend's two entry points; the union taps and compile-time constants are in
unpool_conv_layout.py, the tile loads and autotune configs the kernels share in unpool_conv_tiles.py, and
each kernel with its launcher in a file of its own (unpool_conv_forward.py, unpool_conv_grad_input.py,
unpool_conv_grad_weight.py, and the weight packing and grad-weight folding in unpool_conv_weights.py), as
csrc/ splits the CUDA C++ backend.

Kernels (each an implicit GEMM, fp32 accumulation; fp32 operands use TF32 when
``torch.backends.cudnn.allow_tf32`` is set, as cuDNN does for the reference convolution). The backward
kernels read grad_out with the fused ReLU's mask already applied (one torch pass, threshold_backward), and
grad bias is a torch sum of it:
  _forward_kernel   M = N x phase-0 rows x phase-0 cols, N = C_out, K = (union taps, C_in). Where every phase
                    reads the whole union window (K=5 same, K=7 valid) each input tile is loaded once and
                    feeds four dots, one per phase; otherwise the phases run one after another over their
                    own taps. The four phases are written interleaved, with bias and ReLU in the epilogue.
  _grad_input_kernel M = N x H x W, N = C_in, K = (phases, phase taps, C_out): the transposed phase
                    convolutions summed. With at most FEW_OUTPUTS output channels, (tap, C_out) pairs are
                    flattened into K so that the dots do not multiply padding.
  _grad_weight_kernel one program per (phase tap, C_in tile, C_out tile, split of batch x pixels); split
                    partial sums go to a workspace that _finalize_grad_weight_kernel reduces in a fixed order
                    (folding the phase taps back onto the K x K taps), so grad weight is deterministic (no
                    atomics; the sums round by the autotuned BLOCK_P, which
                    torch.use_deterministic_algorithms(True) pins).
  _grad_weight_few_outputs_kernel the same sums for at most FEW_OUTPUTS output channels, one program per
                    (phase, C_in tile, tile of (tap, C_out) pairs, split of the input pixels): x is read once
                    per phase, not once per tap.
  _pack_weight_kernel every phase's collapsed kernel, packed for the forward or grad input GEMMs.
"""

from __future__ import annotations

import torch

from dcign_fast.kernels import device_guard
from dcign_fast.kernels.triton.unpool_conv_forward import launch_forward
from dcign_fast.kernels.triton.unpool_conv_grad_input import launch_grad_input
from dcign_fast.kernels.triton.unpool_conv_grad_weight import launch_grad_weight
from dcign_fast.kernels.triton.unpool_conv_layout import unions
from dcign_fast.kernels.triton.unpool_conv_weights import pack_weight
from dcign_fast.kernels.unpool_conv_common import (
    TRITON_INDEX_LIMIT,
    backward_grad_and_bias,
    check_kernel_args,
    image_span,
    nhwc,
    triton_index_reason,
)
from dcign_fast.ops.unpool_conv import empty_output


def unpool_conv2d_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    padding: tuple[int, int],
    scale_factor: int,
    activation: str | None = None,
) -> torch.Tensor:
    """Fused upsample-by-2 + convolution (+ ReLU): [N, C, H, W] -> [N, O, 2H + 2ph - KH + 1, 2W + 2pw - KW + 1].

    Output in x's memory format. float32 runs its dots in TF32 when ``torch.backends.cudnn.allow_tf32`` is
    set. Not differentiable by itself: :func:`unpool_conv2d_triton_backward` gives its gradients (the custom
    op ``dcign_fast::unpool_conv2d`` pairs the two).
    """
    check_kernel_args("triton", x, weight, scale_factor, activation)
    reason = triton_index_reason(x, weight, padding)
    if reason:
        raise ValueError(reason + "; use backend='cuda' or 'torch'")
    rows, cols = unions(*weight.shape[2:], *padding)
    with device_guard(x.device):
        out = empty_output(x, weight, padding, scale_factor)
        if out.numel():
            launch_forward(nhwc(x), pack_weight(weight, rows, cols, "in"), bias, out, rows, cols, activation)
    return out


def unpool_conv2d_triton_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    out: torch.Tensor | None,
    has_bias: bool,
    padding: tuple[int, int],
    scale_factor: int,
    activation: str | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(grad x, grad weight, grad bias or None) of :func:`unpool_conv2d_triton`, from its inputs and, with
    ``activation="relu"``, its output ``out``.

    Grad x is laid out like x (``torch.empty_like``; channels_last where x's strides spread an image past int32
    offsets); grad weight and grad bias are deterministic.
    """
    check_kernel_args("triton", x, weight, scale_factor, activation)  # (a direct op call skips the forward's)
    rows, cols = unions(*weight.shape[2:], *padding)
    g, grad_bias = backward_grad_and_bias(grad_out, out, activation, has_bias)
    with device_guard(x.device):
        # Like x, unless x's strides spread an image past int32 offsets (nhwc copies such an x, too).
        wide = image_span(x) > TRITON_INDEX_LIMIT
        grad_x = torch.empty_like(x, memory_format=torch.channels_last) if wide else torch.empty_like(x)
        if grad_x.numel():
            launch_grad_input(g, pack_weight(weight, rows, cols, "out"), grad_x, rows, cols)
        grad_weight = launch_grad_weight(nhwc(x), g, weight, rows, cols)
    return grad_x, grad_weight, grad_bias
