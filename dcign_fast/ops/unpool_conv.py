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

import functools
import itertools
from collections.abc import Iterator
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
from dcign_fast.ops.phases import AxisGroup, axis_groups, output_size
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


PhaseGroup = tuple[AxisGroup, AxisGroup, int, int]


@functools.lru_cache(maxsize=1024)
def _phase_groups(h: int, w: int, kh: int, kw: int, padding: Padding, scale_factor: int) -> tuple[PhaseGroup, ...]:
    """The phases grouped by the low-resolution window they read: (row group, column group, and the padding of
    their shared convolution). A group's phases are every (row phase, column phase) pair of the two, row-major;
    one ``F.conv2d`` per group, forward and backward."""
    return tuple(
        (rows, cols, max(r.conv_padding(h) for r in rows.phases), max(c.conv_padding(w) for c in cols.phases))
        for rows in axis_groups(h, kh, padding[0], scale_factor)
        for cols in axis_groups(w, kw, padding[1], scale_factor)
    )


def _group_kernel(weight: torch.Tensor, rows: AxisGroup, cols: AxisGroup) -> torch.Tensor:
    """[O, C, KH, KW] -> the group's collapsed kernels stacked along the output channels, phase (r, c) in the
    r-major block r * len(cols.phases) + c of O channels: [phases x O, C, rows.taps, cols.taps]. Summed in at
    least float32, stored in the weight's dtype."""
    o, c = weight.shape[:2]
    acc = torch.promote_types(weight.dtype, torch.float32)
    both = cols.collapse(rows.collapse(weight.to(acc), 2), 3)  # [O, C, phase rows x taps, phase cols x taps]
    blocks = both.view(o, c, len(rows.phases), rows.taps, len(cols.phases), cols.taps).permute(2, 4, 0, 1, 3, 5)
    return weight.new_empty(blocks.shape).copy_(blocks).flatten(0, 2)


def _group_kernel_grad(grad: torch.Tensor, rows: AxisGroup, cols: AxisGroup, acc: torch.dtype) -> torch.Tensor:
    """The transpose of :func:`_group_kernel`: the stacked kernels' gradient [phases x O, C, rows.taps,
    cols.taps] -> [O, C, KH, KW] in ``acc``."""
    c = grad.shape[1]
    blocks = grad.view(len(rows.phases), len(cols.phases), -1, c, rows.taps, cols.taps).permute(2, 3, 0, 4, 1, 5)
    both = grad.new_empty(blocks.shape, dtype=acc).copy_(blocks).flatten(4, 5).flatten(2, 3)
    return cols.expand(rows.expand(both, 2), 3)


def _phase_views(
    full: torch.Tensor, conv: torch.Tensor, rows: AxisGroup, cols: AxisGroup, pad_r: int, pad_c: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor, tuple[slice, slice, slice]]]:
    """(view of ``full`` [N, O, ...], view of the group's convolution output ``conv`` [N, phases x O, ...] of the
    same shape, the conv view's (channels, rows, cols)) for the group's phases: one pair per phase ([N, O, rows,
    cols]), or one for the whole group when its phases tile ``full`` (every phase of both axes, with equal
    counts): [N, s, s, O, rows, cols], the view of ``full`` interleaving."""
    s = rows.phases[0].scale
    o = full.shape[1]
    r0, c0 = rows.phases[0].first_offset + pad_r, cols.phases[0].first_offset + pad_c
    row_counts, col_counts = {r.count for r in rows.phases}, {c.count for c in cols.phases}
    if len(rows.phases) == len(cols.phases) == s and len(row_counts) == len(col_counts) == 1:
        (cr,), (cc,) = row_counts, col_counts
        region = (slice(None), slice(r0, r0 + cr), slice(c0, c0 + cc))
        interleaved = full.unflatten(2, (cr, s)).unflatten(4, (cc, s)).permute(0, 3, 5, 1, 2, 4)
        yield interleaved, conv[(slice(None), *region)].unflatten(1, (s, s, o)), region
        return
    for k, (r, c) in enumerate(itertools.product(rows.phases, cols.phases)):
        region = (slice(k * o, (k + 1) * o), slice(r0, r0 + r.count), slice(c0, c0 + c.count))
        yield full[:, :, r.phase :: s, c.phase :: s], conv[(slice(None), *region)], region


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
    low-resolution window, their collapsed kernels stacked along the output channels; the results are written
    interleaved into the output (one copy where the group's phases tile it), so the upsampled input never
    exists.

    Shapes: x [N, C, H, W], weight [O, C, KH, KW], bias [O] or None -> [N, O, s*H + 2*ph - KH + 1,
    s*W + 2*pw - KW + 1] in x's memory format.
    """
    _, _, h, w = x.shape
    _, _, kh, kw = weight.shape
    out = empty_output(x, weight, padding, scale_factor)
    for rows, cols, pad_r, pad_c in _phase_groups(h, w, kh, kw, padding, scale_factor):
        group_bias = None if bias is None else torch.cat([bias] * (len(rows.phases) * len(cols.phases)))
        y = F.conv2d(x, _group_kernel(weight, rows, cols), group_bias, padding=(pad_r, pad_c))
        for full, conv, _ in _phase_views(out, y, rows, cols, pad_r, pad_c):
            full.copy_(conv)
    return out if activation is None else out.relu_()  # out is ours: no second output-sized tensor


def _zero_around(t: torch.Tensor, rows: slice, cols: slice) -> None:
    """Zeros t [N, C, H, W] outside the window t[:, :, rows, cols] (slices with explicit start and stop)."""
    height, width = t.shape[2:]
    if rows.start > 0:  # (an empty slice would still cost an op)
        t[:, :, : rows.start].zero_()
    if rows.stop < height:
        t[:, :, rows.stop :].zero_()
    if cols.start > 0:
        t[:, :, rows, : cols.start].zero_()
    if cols.stop < width:
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
    where ``out`` <= 0) when one was fused; then per phase group, grad_out's phases gathered into the group's
    convolution output, one ``convolution_backward`` on the low-resolution x, and the collapsed kernels'
    gradients folded back onto the full kernel (the transpose of ``_group_kernel``)."""
    if activation == "relu":
        grad_out = relu_backward(grad_out, out)
    _, _, h, w = x.shape
    o, _, kh, kw = weight.shape
    grad_x = None
    acc = torch.promote_types(weight.dtype, torch.float32)
    grad_weight = None
    grad_bias = torch.zeros(o, dtype=acc, device=weight.device) if has_bias else None
    for rows, cols, pad_r, pad_c in _phase_groups(h, w, kh, kw, padding, scale_factor):
        stacked = _group_kernel(weight, rows, cols)
        conv_shape = (
            x.shape[0],
            stacked.shape[0],
            h + 2 * pad_r - stacked.shape[2] + 1,
            w + 2 * pad_c - stacked.shape[3] + 1,
        )
        grad_y = grad_out.new_empty(conv_shape)
        for full, conv, (channels, conv_rows, conv_cols) in _phase_views(grad_out, grad_y, rows, cols, pad_r, pad_c):
            conv.copy_(full)
            _zero_around(grad_y[:, channels], conv_rows, conv_cols)
        gx, gs, gb = torch.ops.aten.convolution_backward(
            grad_y, x, stacked, [stacked.shape[0]] if has_bias else None,
            [1, 1], [pad_r, pad_c], [1, 1], False, [0, 0], 1, [True, True, has_bias],
        )  # fmt: skip
        grad_x = gx if grad_x is None else grad_x.add_(gx)
        folded = _group_kernel_grad(gs, rows, cols, acc)
        grad_weight = folded if grad_weight is None else grad_weight.add_(folded)
        if has_bias:
            grad_bias += gb.view(-1, o).sum(0)
    if grad_x is None or grad_weight is None:  # no phase group: an empty output
        grad_x, grad_weight = torch.zeros_like(x), torch.zeros(weight.shape, dtype=acc, device=weight.device)
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

# The largest output height or width: far beyond any image, and well inside the int64 sizes torch computes.
MAX_OUTPUT_SIDE = 2**31 - 1
# The most elements of the output or of the reference's unfolded input (C x KH x KW rows of OH x OW per image):
# far beyond any memory, and torch's byte counts of them still fit an int64 (past it: "Storage size calculation
# overflowed", or oneDNN's "could not construct a memory descriptor").
MAX_ELEMENTS = 2**59


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
    sides = []
    for axis, size, k, p in (
        ("height", x.shape[2], weight.shape[2], pad[0]),
        ("width", x.shape[3], weight.shape[3], pad[1]),
    ):
        out = output_size(size, k, p, scale)
        if out < 1:
            raise ValueError(
                f"output {axis} would be {out}: input {axis} {size} x "
                f"scale_factor {scale} + 2 x padding {p} is smaller than the kernel ({k})"
            )
        if out > MAX_OUTPUT_SIDE:  # torch would overflow computing the output's size
            raise ValueError(
                f"output {axis} would be {out}: input {axis} {size} x scale_factor {scale} + 2 x padding {p} "
                f"is too large (at most {MAX_OUTPUT_SIDE})"
            )
        sides.append(out)
    n, c, o = x.shape[0], x.shape[1], weight.shape[0]
    rows = max(o, c * weight.shape[2] * weight.shape[3])
    elements = n * rows * sides[0] * sides[1]
    # (Not of a symbolic batch, as torch.export traces one: comparing it would constrain the batch's range.)
    if not isinstance(elements, torch.SymInt) and elements > MAX_ELEMENTS:
        raise ValueError(
            f"the output [{n}, {o}, {sides[0]}, {sides[1]}] (padding {pad}) is too large: it or the unfolded input "
            f"[{n}, {c * weight.shape[2] * weight.shape[3]}, {sides[0]} x {sides[1]}] would hold more than 2**59 "
            "elements"
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
        x: [N, C, H, W], NCHW or channels_last, float16/bfloat16/float32/float64 (float64: the reference
            and torch backends only).
        weight: [O, C, KH, KW], same dtype and device as x; the triton and cuda backends take KH, KW <= 9.
        bias: [O] or None.
        padding: zero padding of the upsampled image, an int or (rows, cols), each >= 0.
        scale_factor: integer upsampling factor (the triton and cuda backends take 2 only).
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
