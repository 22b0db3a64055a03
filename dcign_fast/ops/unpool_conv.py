"""``unpool_conv2d``: nearest-neighbour upsampling followed by a convolution, without the upsampling.

Backends:
  reference  ``F.conv2d(F.interpolate(x, scale_factor=s, mode="nearest"), ...)``, the oracle.
  torch      the phase decomposition (:mod:`dcign_fast.ops.phases`) through ``F.conv2d``: phases that
             read the same low-resolution window share one convolution with their collapsed kernels
             stacked along the output channels; the results are written interleaved into the output.
             The upsampled tensor is never allocated, forward or backward. Any integer scale factor.
  triton     fused Triton kernels, forward and backward (:mod:`dcign_fast.kernels.triton.unpool_conv`):
             scale_factor 2, float32 (TF32 when cudnn.allow_tf32) / bfloat16 / float16, kernels up to 9.
  cuda       CUDA C++ kernels of the compiled extension (:mod:`dcign_fast.kernels.cuda_unpool_conv`, csrc/):
             scale_factor 2, float32 (TF32 when cudnn.allow_tf32) / bfloat16 / float16, kernels up to 9; never
             chosen by auto.
  auto       CUDA: triton where it is installed and supports the case, else torch; CPU: torch.

The torch, triton and cuda backends run inside the custom op ``dcign_fast::unpool_conv2d``
(:mod:`dcign_fast.ops.unpool_conv_op`), whose backward is each backend's explicit gradient kernels
(:data:`KERNELS`) on the saved inputs (and output, when a ReLU is fused), never a re-run of the forward.

``activation="relu"`` applies a ReLU to the result: fused into the triton and cuda kernels' epilogue (and
their backward, which masks grad_out as it loads it); the torch backend applies it in place on its output,
the reference as a separate op.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable

import torch
import torch.nn.functional as F

from dcign_fast.kernels.unpool_conv_common import kernel_unsupported_reason, relu_backward, triton_index_reason
from dcign_fast.ops import unpool_conv_op
from dcign_fast.ops._checks import (
    check_activation,
    check_like,
    check_no_forward_ad,
    check_pair,
    check_scale_factor,
    check_tensor,
)
from dcign_fast.ops.backends import Kernels, check_backend_runs_on, imported_kernels, triton_available
from dcign_fast.ops.phases import AxisPhase, axis_phases, output_size
from dcign_fast.ops.reference import unpool_conv2d_reference

Padding = tuple[int, int]
Grads = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]  # grad x, grad weight, grad bias


def _activate(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    return y if activation is None else F.relu(y)


def _output_memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def empty_output(x: torch.Tensor, weight: torch.Tensor, padding: Padding, scale_factor: int) -> torch.Tensor:
    """The uninitialised output [N, O, s*H + 2*ph - KH + 1, s*W + 2*pw - KW + 1], in x's memory format."""
    n, _, h, w = x.shape
    o, _, kh, kw = weight.shape
    shape = (n, o, output_size(h, kh, padding[0], scale_factor), output_size(w, kw, padding[1], scale_factor))
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=_output_memory_format(x))


def _collapse(weight: torch.Tensor, row: AxisPhase, col: AxisPhase) -> torch.Tensor:
    """[O, C, KH, KW] -> [O, C, row.taps, col.taps]; summed in at least float32."""
    acc = torch.promote_types(weight.dtype, torch.float32)
    return col.collapse(row.collapse(weight.to(acc), 2), 3).to(weight.dtype)


PhaseGroup = tuple[list[tuple[AxisPhase, AxisPhase]], int, int]


def _phase_groups(h: int, w: int, kh: int, kw: int, padding: Padding, scale_factor: int) -> list[PhaseGroup]:
    """The phases (row, col) grouped by the low-resolution window they read, each group with the
    padding of its shared convolution: one ``F.conv2d`` per group, forward and backward."""
    windows: dict[tuple[int, int, int, int], list[tuple[AxisPhase, AxisPhase]]] = defaultdict(list)
    for r in axis_phases(h, kh, padding[0], scale_factor):
        for c in axis_phases(w, kw, padding[1], scale_factor):
            windows[(r.first_offset, r.taps, c.first_offset, c.taps)].append((r, c))
    return [
        (group, max(r.conv_padding(h) for r, _ in group), max(c.conv_padding(w) for _, c in group))
        for group in windows.values()
    ]


def _phase_slices(
    r: AxisPhase, c: AxisPhase, pad_r: int, pad_c: int, k: int, o: int, scale_factor: int
) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """(where phase (r, c) sits in its group's convolution output, where it goes in the full output)."""
    r0, c0 = r.first_offset + pad_r, c.first_offset + pad_c
    conv = (slice(None), slice(k * o, (k + 1) * o), slice(r0, r0 + r.count), slice(c0, c0 + c.count))
    full = (slice(None), slice(None), slice(r.phase, None, scale_factor), slice(c.phase, None, scale_factor))
    return conv, full


def unpool_conv2d_torch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    padding: Padding,
    scale_factor: int,
    activation: str | None = None,
) -> torch.Tensor:
    """The phase decomposition through ``F.conv2d``, any integer scale factor and dtype; arguments as
    :func:`unpool_conv2d`'s (padding a pair). One convolution per group of phases that read the same
    low-resolution window, their collapsed kernels stacked along the output channels; each phase's result is
    written strided into the output, so the upsampled input never exists.

    Shapes: x [N, C, H, W], weight [O, C, KH, KW], bias [O] or None -> [N, O, s*H + 2*ph - KH + 1,
    s*W + 2*pw - KW + 1] in x's memory format.
    """
    _, _, h, w = x.shape
    o, _, kh, kw = weight.shape
    out = empty_output(x, weight, padding, scale_factor)
    for group, pad_r, pad_c in _phase_groups(h, w, kh, kw, padding, scale_factor):
        stacked = torch.cat([_collapse(weight, r, c) for r, c in group])
        group_bias = None if bias is None else bias.repeat(len(group))
        y = F.conv2d(x, stacked, group_bias, padding=(pad_r, pad_c))
        for k, (r, c) in enumerate(group):
            conv, full = _phase_slices(r, c, pad_r, pad_c, k, o, scale_factor)
            out[full] = y[conv]
    return out if activation is None else out.relu_()  # out is ours: no second output-sized tensor


def _zero_around(t: torch.Tensor, rows: slice, cols: slice) -> None:
    """Zeros t [N, C, H, W] outside the window t[:, :, rows, cols] (slices with explicit start and stop)."""
    t[:, :, : rows.start].zero_()
    t[:, :, rows.stop :].zero_()
    t[:, :, rows, : cols.start].zero_()
    t[:, :, rows, cols.stop :].zero_()


def unpool_conv2d_torch_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    out: torch.Tensor | None,
    has_bias: bool,
    padding: Padding,
    scale_factor: int,
    activation: str | None,
) -> Grads:
    """The torch formulation's gradients without autograd: grad_out masked by the ReLU's derivative (zero
    where ``out`` <= 0) when one was fused; then per phase group, grad_out's phases scattered into the group's
    convolution output, one ``convolution_backward`` on the low-resolution x, and the collapsed kernels'
    gradients folded back onto the full kernel (the transpose of ``_collapse``)."""
    if activation == "relu":
        grad_out = relu_backward(grad_out, out)
    _, _, h, w = x.shape
    o, _, kh, kw = weight.shape
    grad_x = None
    acc = torch.promote_types(weight.dtype, torch.float32)
    grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device)
    grad_bias = torch.zeros(o, dtype=acc, device=weight.device) if has_bias else None
    for group, pad_r, pad_c in _phase_groups(h, w, kh, kw, padding, scale_factor):
        stacked = torch.cat([_collapse(weight, r, c) for r, c in group])
        conv_shape = (
            x.shape[0],
            stacked.shape[0],
            h + 2 * pad_r - stacked.shape[2] + 1,
            w + 2 * pad_c - stacked.shape[3] + 1,
        )
        grad_y = grad_out.new_empty(conv_shape)
        for k, (r, c) in enumerate(group):
            conv, full = _phase_slices(r, c, pad_r, pad_c, k, o, scale_factor)
            grad_y[conv] = grad_out[full]
            _zero_around(grad_y[:, conv[1]], conv[2], conv[3])
        gx, gs, gb = torch.ops.aten.convolution_backward(
            grad_y, x, stacked, [stacked.shape[0]] if has_bias else None,
            [1, 1], [pad_r, pad_c], [1, 1], False, [0, 0], 1, [True, True, has_bias],
        )  # fmt: skip
        grad_x = gx if grad_x is None else grad_x.add_(gx)
        for k, (r, c) in enumerate(group):
            grad_weight += c.expand(r.expand(gs[k * o : (k + 1) * o].to(acc), 2), 3)
        if has_bias:
            grad_bias += gb.view(len(group), o).sum(0)
    grad_x = torch.zeros_like(x) if grad_x is None else grad_x  # no phase group: an empty output
    return grad_x, grad_weight.to(weight.dtype), None if grad_bias is None else grad_bias.to(weight.dtype)


def _reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    padding: Padding,
    scale_factor: int,
    activation: str | None = None,
) -> torch.Tensor:
    return _activate(unpool_conv2d_reference(x, weight, bias, padding, scale_factor), activation)


TORCH_KERNELS = Kernels(unpool_conv2d_torch, unpool_conv2d_torch_backward)

# Backend name -> its forward and backward halves, which run inside the custom op dcign_fast::unpool_conv2d
# (dcign_fast.ops.unpool_conv_op); the reference is plain torch that autograd differentiates.
#   forward(x, weight, bias, padding, scale_factor, activation) -> out;
#   backward(grad_out, x, weight, out, has_bias, padding, scale_factor, activation)
#       -> (grad x, grad weight, grad bias or None).
# ``out`` is the forward's output when a ReLU was fused (None otherwise) and grad_out is not yet masked by it:
# each backward applies the mask itself (the triton and cuda kernels as they load grad_out).
KERNELS: dict[str, Callable[[], Kernels]] = {
    "torch": lambda: TORCH_KERNELS,
    "triton": imported_kernels(
        "dcign_fast.kernels.triton.unpool_conv", "unpool_conv2d_triton", "unpool_conv2d_triton_backward"
    ),
    "cuda": imported_kernels(
        "dcign_fast.kernels.cuda_unpool_conv", "unpool_conv2d_cuda", "unpool_conv2d_cuda_backward"
    ),
}
IMPLEMENTATIONS = ("reference", *KERNELS)


def choose_backend(x: torch.Tensor, weight: torch.Tensor, scale_factor: int, padding: Padding) -> str:
    """The backend ``"auto"`` picks for these tensors: triton on CUDA when it is available (>= 3.4) and supports
    the case (its int32 indices included), else torch."""
    if (
        x.device.type != "cuda"
        or not triton_available()
        or kernel_unsupported_reason("triton", x, weight, scale_factor)
    ):
        return "torch"
    return "torch" if triton_index_reason(x, weight, padding) else "triton"


def check_unpool_conv_args(x: object, weight: object, bias: object, padding: object, scale_factor: object) -> Padding:
    """Validates every argument; returns padding as (rows, cols)."""
    x = check_tensor("x", x, 4, "[N, C, H, W]")
    weight = check_tensor("weight", weight, 4, "[out_channels, in_channels, KH, KW]")
    check_like("weight", weight, "x", x)
    if weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"weight.shape[1] (in_channels) must equal x.shape[1] = {x.shape[1]}, got weight shape "
            f"{tuple(weight.shape)}"
        )
    if bias is not None:
        bias = check_tensor("bias", bias, 1, "[out_channels]")
        check_like("bias", bias, "x", x)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have shape [{weight.shape[0]}] (out_channels), got {tuple(bias.shape)}")
    if min(weight.shape[:2]) < 1:
        raise ValueError(
            f"weight must have at least one output and one input channel, got weight shape {tuple(weight.shape)}"
        )
    if min(weight.shape[2:]) < 1:
        raise ValueError(f"weight's kernel (KH, KW) must be at least 1 x 1, got weight shape {tuple(weight.shape)}")
    if min(x.shape[2:]) < 1:  # padding alone would make an output of bias only, which F.conv2d refuses
        raise ValueError(f"x must have height and width >= 1, got shape {tuple(x.shape)}")
    pad = check_pair("padding", padding, 0)
    scale = check_scale_factor(scale_factor)
    for axis, size, k, p in (
        ("height", x.shape[2], weight.shape[2], pad[0]),
        ("width", x.shape[3], weight.shape[3], pad[1]),
    ):
        if output_size(size, k, p, scale) < 1:
            raise ValueError(
                f"output {axis} would be {output_size(size, k, p, scale)}: input {axis} {size} x "
                f"scale_factor {scale} + 2 x padding {p} is smaller than the kernel ({k})"
            )
    return pad


def _autocast_inputs(x: Any, weight: Any, bias: Any) -> tuple[Any, Any, Any]:
    """The inputs cast to the autocast dtype when autocast is on for x's device, as autocast casts
    F.conv2d's: floating tensors other than float64. Any: the inputs are not checked yet."""
    # meta tensors (shape inference) have no autocast state to ask about
    if not isinstance(x, torch.Tensor) or x.device.type == "meta" or not torch.is_autocast_enabled(x.device.type):
        return x, weight, bias
    dtype = torch.get_autocast_dtype(x.device.type)

    def cast(t: Any) -> Any:
        eligible = isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
        return t.to(dtype) if eligible else t

    return cast(x), cast(weight), cast(bias)


def unpool_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    padding: int | tuple[int, int] = 0,
    scale_factor: int = 2,
    backend: str = "auto",
    activation: str | None = None,
) -> torch.Tensor:
    """Nearest-neighbour upsampling by ``scale_factor``, then a stride-1 convolution (then ``activation``).

    Equal to ``F.conv2d(F.interpolate(x, scale_factor=s, mode="nearest"), weight, bias, padding=padding)``.

    Args:
        x: [N, C, H, W], NCHW or channels_last, float16/bfloat16/float32/float64.
        weight: [O, C, KH, KW], same dtype and device as x.
        bias: [O] or None.
        padding: zero padding of the upsampled image, an int or (rows, cols).
        scale_factor: integer upsampling factor.
        backend: "auto", "reference", "torch", "triton" or "cuda" (see :mod:`dcign_fast.ops.backends`).
        activation: None or "relu", applied to the result (fused by the triton and cuda backends).

    Returns:
        [N, O, s*H + 2*ph - KH + 1, s*W + 2*pw - KW + 1], in x's memory format.

    Under ``torch.autocast`` it runs in the autocast dtype, as ``F.conv2d`` does (the custom op is
    invisible to autocast, so the inputs are cast here).
    """
    x, weight, bias = _autocast_inputs(x, weight, bias)
    pad = check_unpool_conv_args(x, weight, bias, padding, scale_factor)
    check_activation(activation)
    check_backend_runs_on(backend, x.device, IMPLEMENTATIONS)
    name = choose_backend(x, weight, scale_factor, pad) if backend == "auto" else backend
    if name == "reference":
        return _reference(x, weight, bias, pad, scale_factor, activation)
    check_no_forward_ad("unpool_conv2d", name, x, weight, bias, alternative=", or backend='reference'")
    # The registered custom op: one opaque node for torch.compile, forward and backward.
    return unpool_conv_op.unpool_forward(x, weight, bias, *pad, scale_factor, activation, name)
