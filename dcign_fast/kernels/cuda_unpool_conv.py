"""The unpool-conv's CUDA C++ backend (``backend="cuda"``, scale factor 2): argument plumbing for the forward and
backward kernels of ``dcign_fast._C`` (csrc/unpool_conv_*.cu), which the custom op of
:mod:`dcign_fast.ops.unpool_conv_op` pairs up for autograd. Tensors travel as raw pointers with their strides; every
launch runs on the current torch stream of the tensors' device, so CUDA-graph capture works.

Importing this module does not need the extension; calling any function does (a clear error otherwise).
"""

from __future__ import annotations

import torch

from dcign_fast.kernels import cuda, device_guard
from dcign_fast.kernels.unpool_conv_common import (
    FEW_OUTPUTS,
    backward_grad_and_bias,
    check_kernel_args,
    nhwc,
    uses_tf32,
)
from dcign_fast.ops.unpool_conv import empty_output

_SPLIT_GRANULE = 256  # output positions per grad-weight split, at least
_MAX_CHUNK = 2**30  # ... and at most (kMaxChunk, csrc/unpool_conv.h)
_MAX_SPLITS = 65535  # grid.z


def _view(t: torch.Tensor) -> tuple[int, ...]:
    """(pointer, strides n, c, h, w); a dimension of extent 1 gets stride 0 (never stepped along, and then it
    cannot keep the kernels from loading 16-byte vectors)."""
    return (t.data_ptr(), *(0 if size == 1 else stride for size, stride in zip(t.shape, t.stride())))


def _grad_weight_splits(positions: int, blocks: int, device: torch.device) -> tuple[int, int]:
    """(splits, chunk) of a grad-weight reduction over ``positions``, whose launch has ``blocks`` blocks per split:
    enough blocks to fill the GPU a few times over, chunks of >= 256 positions and at most the kernels' 2^30
    (their 32-bit walk over a split's positions)."""
    wanted = -(-4 * cuda.multiprocessors(device) // blocks)
    splits = max(1, min(wanted, -(-positions // _SPLIT_GRANULE), _MAX_SPLITS), -(-positions // _MAX_CHUNK))
    if splits > _MAX_SPLITS:
        raise ValueError(
            f"unpool_conv2d(backend='cuda'): {positions} positions per phase are more than the grad-weight kernels "
            f"reduce ({_MAX_SPLITS} splits of {_MAX_CHUNK}); use backend='torch' for this input"
        )
    return splits, -(-positions // splits)


def _pack_weight(weight: torch.Tensor, padding: tuple[int, int]) -> torch.Tensor:
    """[O, C, KH, KW] -> wp [2, 2, TR, TC, C, OP] in the weight's dtype: every phase's collapsed kernel in union
    taps, summed in float32; OP >= O is O rounded up to whole 16-byte vectors (zeros past O)."""
    c_out, c_in, kh, kw = weight.shape
    ph, pw = padding
    lib, weight = cuda.load(weight.device), weight.contiguous()
    wp = torch.empty(
        (2, 2, lib.union_taps(kh, ph), lib.union_taps(kw, pw), c_in, lib.packed_channels(c_out)),
        dtype=weight.dtype,
        device=weight.device,
    )
    lib.unpool_conv_pack_weight(
        weight.data_ptr(), wp.data_ptr(), c_out, c_in, kh, kw, ph, pw, cuda.dtype_code(weight),
        cuda.stream(weight.device),
    )  # fmt: skip
    return wp


def unpool_conv2d_cuda(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    padding: tuple[int, int],
    scale_factor: int,
    activation: str | None = None,
) -> torch.Tensor:
    """Fused upsample-by-2 + convolution (+ ReLU) with the CUDA C++ kernels.

    Shapes: x [N, C, H, W], weight [O, C, KH, KW], bias [O] or None ->
    [N, O, 2H + 2ph - KH + 1, 2W + 2pw - KW + 1] in x's memory format. float32 accumulation for every dtype;
    the multiplies run on tensor cores (wmma): bfloat16 / float16 as stored, with the collapsed phase kernels
    rounded to the input dtype, and float32 in TF32 when ``torch.backends.cudnn.allow_tf32`` is set (as cuDNN
    does for the reference), else exactly on SIMT cores. Not differentiable by itself:
    :func:`unpool_conv2d_cuda_backward` gives its gradients (the custom op ``dcign_fast::unpool_conv2d`` pairs
    the two).
    """
    check_kernel_args("cuda", x, weight, scale_factor, activation)
    n, c_in, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    ph, pw = padding
    with device_guard(x.device):
        out = empty_output(x, weight, padding, scale_factor)
        if out.numel():
            # Every tensor a launch points into stays bound to a name until the launch returns: a temporary
            # would be freed while the kernel reads it (at once on the CPU emulation).
            x_nhwc, wp = nhwc(x), _pack_weight(weight, padding)
            bias = None if bias is None else bias.contiguous()
            cuda.load(x.device).unpool_conv_forward(
                _view(x_nhwc), wp.data_ptr(), 0 if bias is None else bias.data_ptr(), _view(out),
                n, c_in, h, w, c_out, kh, kw, ph, pw, int(activation == "relu"), cuda.dtype_code(x),
                int(uses_tf32(x.dtype)), cuda.stream(x.device),
            )  # fmt: skip
    return out


def unpool_conv2d_cuda_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    out: torch.Tensor | None,
    has_bias: bool,
    padding: tuple[int, int],
    scale_factor: int,
    activation: str | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(grad x, grad weight, grad bias or None) of :func:`unpool_conv2d_cuda`, from its inputs and, with
    ``activation="relu"``, its output ``out`` (grad_out counts as zero where ``out <= 0``).

    Grad x is laid out like x (``torch.empty_like``); grad weight and grad bias are deterministic.
    """
    check_kernel_args("cuda", x, weight, scale_factor, activation)  # (a direct op call skips the forward's)
    n, c_in, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    ho, wo = grad_out.shape[2:]
    ph, pw = padding
    lib, code, tf32, stream = cuda.load(x.device), cuda.dtype_code(x), int(uses_tf32(x.dtype)), cuda.stream(x.device)
    g, grad_bias = backward_grad_and_bias(grad_out, out, activation, has_bias)
    shape = (n, c_in, h, w, c_out, kh, kw, ph, pw)
    with device_guard(x.device):
        wp = _pack_weight(weight, padding)
        grad_x = torch.empty_like(x)
        if grad_x.numel() and g.numel():
            lib.unpool_conv_grad_input(_view(g), wp.data_ptr(), _view(grad_x), *shape, code, tf32, stream)
        elif grad_x.numel():
            grad_x.zero_()
        if c_out <= FEW_OUTPUTS:  # per phase, over input positions, (tap, C_out) pairs side by side
            launch, blocks = lib.unpool_conv_grad_weight_few_outputs, lib.unpool_conv_grad_weight_few_outputs_blocks
            positions = n * h * w
        else:  # per (phase, tap), over the phase's output positions
            launch, blocks = lib.unpool_conv_grad_weight, lib.unpool_conv_grad_weight_blocks
            positions = n * ((ho + 1) // 2) * ((wo + 1) // 2)
        splits, chunk = _grad_weight_splits(positions, blocks(*shape), x.device)
        ws = torch.empty((splits, *wp.shape), dtype=torch.float32, device=x.device)
        x_nhwc = nhwc(x)  # (held: the kernel reads it through a raw pointer)
        launch(_view(x_nhwc), _view(g), ws.data_ptr(), *shape, splits, max(1, chunk), code, tf32, stream)
        grad_weight = torch.empty((c_out, c_in, kh, kw), dtype=x.dtype, device=x.device)
        lib.unpool_conv_finalize_grad_weight(
            ws.data_ptr(), grad_weight.data_ptr(), c_out, c_in, kh, kw, ph, pw, splits, code, stream
        )
    return grad_x, grad_weight, grad_bias
