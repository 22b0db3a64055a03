"""``dcign_fast::unpool_conv2d`` and its backward as PyTorch custom ops (see custom_op.py).

The forward saves x, weight (and the output when a ReLU is fused): low-resolution tensors and the output,
never the upsampled input. The backward op runs the backend's gradient kernels (:data:`unpool_conv.KERNELS`);
its own backward (gradient penalties) runs the same two ops. :func:`unpool_forward` and
:func:`unpool_backward` are what :func:`dcign_fast.unpool_conv2d` calls. (unpool_conv.py imports this module
and calls these at run time; this module imports it.)
"""

from typing import Optional

import torch

from dcign_fast.kernels.unpool_conv_common import relu_backward
from dcign_fast.ops import unpool_conv
from dcign_fast.ops.custom_op import check_op_backend, op_entry

Tensor = torch.Tensor
# What the ops' ``backend`` argument may name: the public function resolves "auto" before calling them.
UNPOOL_BACKENDS = tuple(unpool_conv.KERNELS)


def _unpool_conv2d_body(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    pad_rows: int,
    pad_cols: int,
    scale_factor: int,
    activation: Optional[str],
    backend: str,
) -> Tensor:
    """[N, C, H, W] -> [N, O, s*H + 2*pad_rows - KH + 1, s*W + 2*pad_cols - KW + 1] with ``backend``."""
    check_op_backend(backend, x.device, UNPOOL_BACKENDS)
    # The op owns autograd (its backward is unpool_conv2d_backward): the backend records no graph of its own.
    with torch.no_grad():
        kernels = unpool_conv.KERNELS[backend]()
        return kernels.forward(x, weight, bias, (pad_rows, pad_cols), scale_factor, activation)


unpool_conv2d_op = torch.library.custom_op("dcign_fast::unpool_conv2d", mutates_args=())(_unpool_conv2d_body)


@unpool_conv2d_op.register_fake
def _(x, weight, bias, pad_rows, pad_cols, scale_factor, activation, backend):
    return unpool_conv.empty_output(x, weight, (pad_rows, pad_cols), scale_factor)


def _unpool_conv2d_backward_body(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    out: Optional[Tensor],
    has_bias: bool,
    pad_rows: int,
    pad_cols: int,
    scale_factor: int,
    activation: Optional[str],
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_x [N, C, H, W], grad_weight [O, C, KH, KW], grad_bias [O], zeros when not has_bias).

    ``out`` is the forward's output when a ReLU was fused (its sign masks grad_out), else None. grad_out
    arrives unmasked: the backend applies the mask (the triton and cuda kernels as they load grad_out tiles).
    """
    check_op_backend(backend, x.device, UNPOOL_BACKENDS)
    with torch.no_grad():
        grad_x, grad_weight, grad_bias = unpool_conv.KERNELS[backend]().backward(
            grad_out, x, weight, out, has_bias, (pad_rows, pad_cols), scale_factor, activation
        )
    grad_bias = weight.new_zeros(weight.shape[0]) if grad_bias is None else grad_bias
    return _laid_out_like(grad_x, x), _laid_out_like(grad_weight, weight), grad_bias


unpool_conv2d_backward_op = torch.library.custom_op("dcign_fast::unpool_conv2d_backward", mutates_args=())(
    _unpool_conv2d_backward_body
)


@unpool_conv2d_backward_op.register_fake
def _(grad_out, x, weight, out, has_bias, pad_rows, pad_cols, scale_factor, activation, backend):
    return torch.empty_like(x), torch.empty_like(weight), weight.new_empty(weight.shape[0])


def _laid_out_like(grad: Tensor, like: Tensor) -> Tensor:
    """``grad`` with the strides of ``torch.empty_like(like)``, which the fake kernel promises: compiled code
    asserts them (a channels_last weight's gradient comes back contiguous from the backends)."""
    if grad.stride() == torch.empty_like(like, device="meta").stride():
        return grad
    return torch.empty_like(like).copy_(grad)


def _unpool_setup_context(ctx, inputs, output) -> None:
    x, weight, bias, pad_rows, pad_cols, scale_factor, activation, backend = inputs
    ctx.save_for_backward(x, weight, output if activation is not None else None)
    ctx.args = (bias is not None, pad_rows, pad_cols, scale_factor, activation, backend)


def _unpool_backward(ctx, grad_out):
    x, weight, out = ctx.saved_tensors
    has_bias = ctx.args[0]
    grad_x, grad_weight, grad_bias = unpool_backward(grad_out, x, weight, out, *ctx.args)
    return grad_x, grad_weight, grad_bias if has_bias else None, None, None, None, None, None


unpool_conv2d_op.register_autograd(_unpool_backward, setup_context=_unpool_setup_context)


def _unpool_backward_setup_context(ctx, inputs, output) -> None:
    grad_out, x, weight, out, _, pad_rows, pad_cols, scale_factor, _, backend = inputs
    ctx.save_for_backward(grad_out, x, weight, out)
    ctx.args = (pad_rows, pad_cols, scale_factor, None, backend)


def _unpool_double_backward(ctx, gg_x, gg_weight, gg_bias):
    """Double backward (gradient penalties), with the same ops. With y = L(x, w) + b bilinear and the ReLU
    mask m of the saved output (piecewise constant: no gradient of its own), the backward computes
    grad_x = L_x^T(m g; w), grad_w = L_w^T(m g; x), grad_b = sum(m g). Given gradients (gg_x, gg_w, gg_b)
    of those: d/dg = m (L(gg_x, w) + L(x, gg_w) + gg_b), d/dx = L_x^T(m g; gg_w), d/dw = L_w^T(m g; gg_x),
    the last two one backward call with (x, w) = (gg_x, gg_w)."""
    grad_out, x, weight, out = ctx.saved_tensors
    gg_x = torch.zeros_like(x) if gg_x is None else gg_x
    gg_weight = torch.zeros_like(weight) if gg_weight is None else gg_weight
    masked = relu_backward(grad_out, out)
    linear = unpool_forward(gg_x, weight, gg_bias, *ctx.args) + unpool_forward(x, gg_weight, None, *ctx.args)
    grad_grad_out = relu_backward(linear, out)
    grad_x, grad_weight, _ = unpool_backward(masked, gg_x, gg_weight, None, False, *ctx.args)
    return grad_grad_out, grad_x, grad_weight, None, None, None, None, None, None, None


unpool_conv2d_backward_op.register_autograd(_unpool_double_backward, setup_context=_unpool_backward_setup_context)
unpool_forward = op_entry(
    "unpool_conv2d", unpool_conv2d_op, _unpool_conv2d_body, _unpool_setup_context, _unpool_backward
)
unpool_backward = op_entry(
    "unpool_conv2d_backward",
    unpool_conv2d_backward_op,
    _unpool_conv2d_backward_body,
    _unpool_backward_setup_context,
    _unpool_double_backward,
)
