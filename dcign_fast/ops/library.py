"""The fused ops as PyTorch custom ops (``torch.ops.dcign_fast.*``), so torch.compile traces them whole.

Each op's kernel backends (torch, triton, cuda) run behind one ``torch.library.custom_op`` whose
``backend`` argument is a string; Python ints (padding, scale factor, seed) are op arguments too.
A fake implementation gives the output shapes to the compiler, and ``register_autograd`` routes the
backward through a second custom op, so the backward graph is as opaque and traceable as the forward:

  unpool_conv2d           saves x, weight (and the output when a ReLU is fused): low-resolution tensors
                          and the output, never the upsampled input.
  sample_latents          returns, beside z and kl, ``rng``. With seed None: int64 [2] on mu's device
                          holding the (seed, offset) drawn inside the op (so the draw is part of the
                          compiled graph's runtime, not a trace-time constant; ``latent_sampler.draw_rng``).
                          With a seed: an empty int64 tensor on mu's device, the seed reaching the
                          backward as an int. The backward regenerates the noise from them: the noise is
                          never saved. Both ops run outside Inductor's CUDA graphs (OUTSIDE_CUDA_GRAPHS).
                          The backward op's own backward (gradient penalties) is a torch formula that
                          regenerates it again.

The "reference" backends stay plain PyTorch outside these ops: they are the oracles, differentiated by
autograd itself, and dynamo traces them like any torch code.

torch.func's grad transforms (grad, vjp, jacrev) refuse a custom op's own autograd, so the ops are called
through ``transformable`` wrappers (unpool_forward, unpool_backward, sampler_forward, sampler_backward) that
run them as autograd.Functions with the same setup_context and backward while such a transform is active.
(unpool_conv.py and latent_sampler.py import this module and call these at run time; it imports them.)
"""

from typing import Callable, Optional

import torch

from dcign_fast.ops import latent_sampler, unpool_conv
from dcign_fast.ops.backends import check_backend_runs_on
from dcign_fast.ops.latent_sampler import seed_offset

Tensor = torch.Tensor
# What each op's ``backend`` argument may name: the public functions resolve "auto" before calling them.
UNPOOL_BACKENDS = tuple(unpool_conv.IMPLEMENTATIONS)
UNPOOL_BACKWARD_BACKENDS = tuple(unpool_conv.BACKWARDS)
SAMPLER_BACKENDS = tuple(latent_sampler.KERNELS)


def check_op_backend(backend: str, device: torch.device, implemented: tuple[str, ...]) -> None:
    """The public functions' backend check, repeated in the ops: a direct call (an exported program loaded on
    another machine, say) would otherwise fail in a driver, or on "auto" with a KeyError."""
    if backend == "auto":
        raise ValueError(f"the dcign_fast ops take an explicit backend, one of {implemented}, not 'auto'")
    check_backend_runs_on(backend, device, implemented)


try:  # torch internals: should a release move them, the ops go back to refusing torch.func.grad
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    def _differentiating() -> bool:
        """Whether a torch.func grad or jvp transform (grad, vjp, jacrev, jacfwd) is active. Not vmap alone
        nor functionalize: they take the custom op itself, and functionalize has no rule for an
        autograd.Function."""
        differentiating = (TransformType.Grad, TransformType.Jvp)
        return any(interpreter.key() in differentiating for interpreter in retrieve_all_functorch_interpreters())

except ImportError:

    def _differentiating() -> bool:
        return False


def transformable(name: str, op, setup_context, backward) -> Callable:
    """``op`` as a function that also runs under torch.func's grad transforms. PyTorch refuses them for a
    custom op's own autograd (an autograd.Function without setup_context), so while one is active the op runs
    through an autograd.Function with ``op``'s setup_context and backward (vmap over it runs the op through
    PyTorch's per-sample fallback, like vmap of the op itself). Otherwise, eager autograd and torch.compile
    (which cannot trace torch.func over it) get ``op`` itself."""

    def refuse_forward_mode(ctx, *tangents):
        raise NotImplementedError(
            f"{name} has no forward-mode AD (torch.func.jvp, jacfwd, hessian): use reverse mode "
            "(torch.autograd.grad, torch.func.jacrev)"
        )

    function = type(
        f"{name}_function",
        (torch.autograd.Function,),
        {
            "generate_vmap_rule": True,
            "forward": staticmethod(lambda *args: op(*args)),
            "setup_context": staticmethod(setup_context),
            "backward": staticmethod(backward),
            "jvp": staticmethod(refuse_forward_mode),
        },
    )

    def run(*args):
        transformed = not torch.compiler.is_compiling() and _differentiating()
        return function.apply(*args) if transformed else op(*args)

    return run


# ----------------------------------------------------------------------------------------------- unpool_conv2d
@torch.library.custom_op("dcign_fast::unpool_conv2d", mutates_args=())
def unpool_conv2d_op(
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
        return unpool_conv.IMPLEMENTATIONS[backend](x, weight, bias, (pad_rows, pad_cols), scale_factor, activation)


@unpool_conv2d_op.register_fake
def _(x, weight, bias, pad_rows, pad_cols, scale_factor, activation, backend):
    return unpool_conv.empty_output(x, weight, (pad_rows, pad_cols), scale_factor)


@torch.library.custom_op("dcign_fast::unpool_conv2d_backward", mutates_args=())
def unpool_conv2d_backward_op(
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
    check_op_backend(backend, x.device, UNPOOL_BACKWARD_BACKENDS)
    with torch.no_grad():
        grad_x, grad_weight, grad_bias = unpool_conv.BACKWARDS[backend](
            grad_out, x, weight, out, has_bias, (pad_rows, pad_cols), scale_factor, activation
        )
    grad_bias = weight.new_zeros(weight.shape[0]) if grad_bias is None else grad_bias
    return _laid_out_like(grad_x, x), _laid_out_like(grad_weight, weight), grad_bias


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
    masked = grad_out if out is None else torch.where(out > 0, grad_out, 0)
    linear = unpool_forward(gg_x, weight, gg_bias, *ctx.args) + unpool_forward(x, gg_weight, None, *ctx.args)
    grad_grad_out = linear if out is None else torch.where(out > 0, linear, 0)
    grad_x, grad_weight, _ = unpool_backward(masked, gg_x, gg_weight, None, False, *ctx.args)
    return grad_grad_out, grad_x, grad_weight, None, None, None, None, None, None, None


unpool_conv2d_backward_op.register_autograd(_unpool_double_backward, setup_context=_unpool_backward_setup_context)
unpool_forward = transformable("unpool_conv2d", unpool_conv2d_op, _unpool_setup_context, _unpool_backward)
unpool_backward = transformable(
    "unpool_conv2d_backward", unpool_conv2d_backward_op, _unpool_backward_setup_context, _unpool_double_backward
)


# ---------------------------------------------------------------------------------------------- sample_latents
# Inductor runs ops tagged so between the CUDA graphs of torch.compile(mode="reduce-overhead") (with its graph
# partitioning, else without CUDA graphs): a graph holding them would be recorded anew for every int seed.
OUTSIDE_CUDA_GRAPHS = (torch.Tag.cudagraph_unsafe,) if hasattr(torch.Tag, "cudagraph_unsafe") else ()


@torch.library.custom_op("dcign_fast::sample_latents", mutates_args=(), tags=OUTSIDE_CUDA_GRAPHS)
def sample_latents_op(
    mu: Tensor,
    logvar: Tensor,
    active: Optional[Tensor],
    clamp_first: bool,
    invariance: float,
    seed: Optional[int],
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """(z [B, D], kl [B], rng): rng is int64 on mu's device, [2] = the (seed, offset) drawn with when
    ``seed`` is None, else [0] (the backward takes ``seed`` itself).

    ``seed`` None draws from torch's generator for mu's device (advancing it); an int is used with
    offset 0. ``invariance`` is only read by the backward (it is an input so autograd can see it).
    """
    check_op_backend(backend, mu.device, SAMPLER_BACKENDS)
    rng = latent_sampler.draw_rng(mu.device) if seed is None else _no_rng(mu)
    z, kl = latent_sampler.KERNELS[backend]().forward(mu, logvar, active, clamp_first, *seed_offset(seed, rng))
    # Contiguous whatever mu's layout, as the fake promises (compiled code asserts it).
    return z.contiguous(), kl.contiguous(), rng


def _no_rng(mu: Tensor) -> Tensor:
    """The rng output of a given seed: empty, and on mu's device, so compiled graphs stay on one device."""
    return torch.empty(0, dtype=torch.int64, device=mu.device)


@sample_latents_op.register_fake
def _(mu, logvar, active, clamp_first, invariance, seed, backend):
    rng = torch.empty(2, dtype=torch.int64, device=mu.device) if seed is None else _no_rng(mu)
    return mu.new_empty(mu.shape), mu.new_empty(mu.shape[:1]), rng


@torch.library.custom_op("dcign_fast::sample_latents_backward", mutates_args=(), tags=OUTSIDE_CUDA_GRAPHS)
def sample_latents_backward_op(
    mu: Tensor,
    logvar: Tensor,
    active: Optional[Tensor],
    invariance: float,
    seed: Optional[int],
    rng: Tensor,
    grad_z: Tensor,
    grad_kl: Tensor,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """(grad_mu, grad_logvar), both [B, D]: the noise is regenerated from the forward's ``seed`` and ``rng``."""
    check_op_backend(backend, mu.device, SAMPLER_BACKENDS)
    grad_mu, grad_logvar = latent_sampler.KERNELS[backend]().backward(
        mu, logvar, active, invariance, *seed_offset(seed, rng), grad_z, grad_kl
    )
    return grad_mu.contiguous(), grad_logvar.contiguous()


@sample_latents_backward_op.register_fake
def _(mu, logvar, active, invariance, seed, rng, grad_z, grad_kl, backend):
    return mu.new_empty(mu.shape), logvar.new_empty(logvar.shape)


def _sampler_setup_context(ctx, inputs, output) -> None:
    mu, logvar, active, _, invariance, seed, backend = inputs
    ctx.save_for_backward(mu, logvar, active, output[2])
    ctx.invariance, ctx.seed, ctx.backend = invariance, seed, backend


def _sampler_backward(ctx, grad_z, grad_kl, _grad_rng):
    mu, logvar, active, rng = ctx.saved_tensors
    # An unused output's gradient may arrive as None: it contributes nothing.
    grad_z = torch.zeros_like(mu) if grad_z is None else grad_z
    grad_kl = mu.new_zeros(mu.shape[:1]) if grad_kl is None else grad_kl
    grad_mu, grad_logvar = sampler_backward(
        mu, logvar, active, ctx.invariance, ctx.seed, rng, grad_z, grad_kl, ctx.backend
    )
    return grad_mu, grad_logvar, None, None, None, None, None


sample_latents_op.register_autograd(_sampler_backward, setup_context=_sampler_setup_context)


def _sampler_backward_setup_context(ctx, inputs, output) -> None:
    mu, logvar, active, invariance, seed, rng, grad_z, grad_kl, _ = inputs
    ctx.save_for_backward(mu, logvar, active, rng, grad_z, grad_kl)
    ctx.invariance, ctx.seed = invariance, seed


def _sampler_double_backward(ctx, grad_grad_mu, grad_grad_logvar):
    mu, logvar, active, rng, grad_z, grad_kl = ctx.saved_tensors
    grad_grad_mu = torch.zeros_like(mu) if grad_grad_mu is None else grad_grad_mu
    grad_grad_logvar = torch.zeros_like(logvar) if grad_grad_logvar is None else grad_grad_logvar
    seed, offset = seed_offset(ctx.seed, rng)
    d_mu, d_logvar, d_grad_z, d_grad_kl = latent_sampler.sample_latents_double_backward(
        mu, logvar, active, ctx.invariance, seed, offset, grad_z, grad_kl, grad_grad_mu, grad_grad_logvar
    )
    return d_mu, d_logvar, None, None, None, None, d_grad_z, d_grad_kl, None


sample_latents_backward_op.register_autograd(_sampler_double_backward, setup_context=_sampler_backward_setup_context)
sampler_forward = transformable("sample_latents", sample_latents_op, _sampler_setup_context, _sampler_backward)
sampler_backward = transformable(
    "sample_latents_backward", sample_latents_backward_op, _sampler_backward_setup_context, _sampler_double_backward
)
