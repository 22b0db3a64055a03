"""What the two scale-2 unpool-conv kernel backends (triton, cuda) share on the host: which cases they run,
the layouts their GEMMs read, and their float32 precision. The Python counterpart of
``csrc/unpool_conv_common.cuh``."""

from __future__ import annotations

import torch

from dcign_fast.ops._checks import check_activation
from dcign_fast.ops.phases import output_size

# What both kernel backends run: scale 2, float32 (TF32 when cudnn.allow_tf32) and 16-bit floats, kernels up
# to 9 x 9.
KERNEL_SCALE = 2
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
KERNEL_MAX_SIZE = 9

# The Triton kernels index pixel positions (batch x rows x cols) and elements within one image in int32; only
# the batch's offsets are 64-bit. Past this (less a margin for rounding up to whole blocks) a product would wrap.
TRITON_INDEX_LIMIT = 2**31 - 2**16

# At most this many output channels (a decoder's image layer has 1 to 3), the grad-weight GEMMs pair every input
# pixel with the grad_out pixel of each (tap, output channel) instead of running tap by tap: a per-tap GEMM would
# be mostly padding and read x once per tap.
FEW_OUTPUTS = 16


def kernel_unsupported_reason(backend: str, x: torch.Tensor, weight: torch.Tensor, scale_factor: int) -> str:
    """Why ``backend`` (triton or cuda) cannot run these arguments, or "" when it can."""
    if x.dtype not in KERNEL_DTYPES:
        return f"backend={backend!r} supports float32, float16 and bfloat16, got {x.dtype}"
    return kernel_shape_reason(backend, scale_factor, (weight.shape[2], weight.shape[3]))


def kernel_shape_reason(backend: str, scale_factor: int, kernel_size: tuple[int, int]) -> str:
    """Why ``backend`` (triton or cuda) cannot run a layer of this scale factor and kernel size whatever its
    tensors, or "" when it can (what :func:`dcign_fast.patch` can tell before any call)."""
    if scale_factor != KERNEL_SCALE:
        return f"backend={backend!r} supports scale_factor={KERNEL_SCALE} only, got {scale_factor}"
    if max(kernel_size) > KERNEL_MAX_SIZE:
        return f"backend={backend!r} supports kernel sizes up to {KERNEL_MAX_SIZE}, got {tuple(kernel_size)}"
    return ""


def image_span(t: torch.Tensor) -> int:
    """The largest element offset within one image of t [N, C, H, W]: what the Triton kernels add in int32."""
    return sum((size - 1) * stride for size, stride in zip(t.shape[1:], t.stride()[1:]) if size)


def triton_index_reason(x: torch.Tensor, weight: torch.Tensor, padding: tuple[int, int]) -> str:
    """Why the Triton kernels' int32 indices cannot address these tensors, or "" when they can (auto then
    runs torch; the cuda backend indexes in 64-bit)."""
    n, c_in, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    ho, wo = output_size(h, kh, padding[0], KERNEL_SCALE), output_size(w, kw, padding[1], KERNEL_SCALE)
    counts = {
        "input positions N x H x W": n * h * w,
        "output positions per phase": n * ((ho + 1) // 2) * ((wo + 1) // 2),
        "elements of one input image": c_in * h * w,
        "elements of one output image": c_out * ho * wo,
    }
    for name, count in counts.items():
        if count > TRITON_INDEX_LIMIT:
            return f"backend='triton' indexes in int32 and takes at most {TRITON_INDEX_LIMIT} {name}, got {count}"
    return ""


def check_kernel_args(
    backend: str, x: torch.Tensor, weight: torch.Tensor, scale_factor: int, activation: str | None
) -> None:
    """A ValueError naming what ``backend`` (triton or cuda) cannot run, if anything; a TypeError when the
    weight's dtype is not x's (the kernels read both, and the packed weight, in x's dtype)."""
    reason = kernel_unsupported_reason(backend, x, weight, scale_factor)
    if reason:
        raise ValueError(reason)
    if weight.dtype != x.dtype:
        raise TypeError(f"backend={backend!r}: weight must have x's dtype ({x.dtype}), got {weight.dtype}")
    check_activation(activation)


def cudnn_allows_tf32() -> bool:
    """Whether float32 convolutions may run in TF32, as cuDNN's do: ``torch.backends.cudnn.allow_tf32``, or
    the per-operator setting ``torch.backends.cudnn.conv.fp32_precision`` when that was used (reading
    allow_tf32 then raises)."""
    try:
        return bool(torch.backends.cudnn.allow_tf32)
    except RuntimeError:
        return torch.backends.cudnn.conv.fp32_precision == "tf32"  # type: ignore[attr-defined]  # not in torch's stubs


def uses_tf32(dtype: torch.dtype) -> bool:
    """Whether the kernels multiply ``dtype`` tensors in TF32: float32 when cuDNN's convolutions (the
    reference's) may; 16-bit storage always uses tensor cores as stored."""
    return dtype == torch.float32 and cudnn_allows_tf32()


def nhwc(t: torch.Tensor) -> torch.Tensor:
    """t itself when its channels are contiguous in memory, else a channels_last copy: the layout the kernel
    backends' GEMMs reduce over channels in. (Also a copy when a view's strides spread one image wider than
    the Triton kernels' int32 offsets reach; its channels_last copy spans only its own elements.)"""
    if t.stride(1) == 1 and image_span(t) <= TRITON_INDEX_LIMIT:
        return t
    return t.contiguous(memory_format=torch.channels_last)


def relu_backward(grad: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """``grad`` back through a fused ReLU whose output was ``out`` (None: no ReLU): torch's own ReLU backward,
    zero where out <= 0, so that a NaN output passes its gradient on as it does after F.relu."""
    return grad if out is None else torch.ops.aten.threshold_backward(grad, out, 0)


def backward_grad_and_bias(
    grad_out: torch.Tensor, out: torch.Tensor | None, activation: str | None, has_bias: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(grad_out back through the fused activation, NHWC: what both kernel backends' backward GEMMs read;
    grad bias in grad_out's dtype, summed in float32, or None without a bias). ``out`` is the forward's output
    (read only for ``activation="relu"``).

    The ReLU's mask is applied in this one pass rather than in the GEMMs, which would load each grad_out tile
    once per tap together with the output tile, and could not copy it straight into shared memory."""
    g = nhwc(relu_backward(grad_out, out if activation == "relu" else None))
    return g, (g.sum((0, 2, 3), dtype=torch.float32).to(g.dtype) if has_bias else None)
