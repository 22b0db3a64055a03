"""``dcign_fast::sample_latents`` and its backward as PyTorch custom ops (see custom_op.py).

The forward returns, beside z and kl, ``rng``. With seed None: int64 [2] on mu's device holding the (seed,
offset) drawn inside the op (so the draw is part of the compiled graph's runtime, not a trace-time constant;
``latent_sampler.draw_rng``). With a seed: an empty int64 tensor on mu's device, the seed reaching the
backward as an int. The backward regenerates the noise from them: the noise is never saved. Both ops run
outside Inductor's CUDA graphs (OUTSIDE_CUDA_GRAPHS). The backward op's own backward (gradient penalties) is
a torch formula that regenerates it again. :func:`sampler_forward` and :func:`sampler_backward` are what
:func:`dcign_fast.sample_latents` calls. (latent_sampler.py imports this module and calls these at run time;
this module imports it.)
"""

from typing import Optional

import torch

from dcign_fast.ops import latent_sampler
from dcign_fast.ops.custom_op import check_op_backend, op_entry
from dcign_fast.ops.latent_sampler import seed_offset

Tensor = torch.Tensor
# What the ops' ``backend`` argument may name: the public function resolves "auto" before calling them.
SAMPLER_BACKENDS = tuple(latent_sampler.KERNELS)
# Inductor runs ops tagged so between the CUDA graphs of torch.compile(mode="reduce-overhead") (with its graph
# partitioning, else without CUDA graphs): a graph holding them would be recorded anew for every int seed.
OUTSIDE_CUDA_GRAPHS = (torch.Tag.cudagraph_unsafe,) if hasattr(torch.Tag, "cudagraph_unsafe") else ()


def _sample_latents_body(
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


sample_latents_op = torch.library.custom_op("dcign_fast::sample_latents", mutates_args=(), tags=OUTSIDE_CUDA_GRAPHS)(
    _sample_latents_body
)


def _no_rng(mu: Tensor) -> Tensor:
    """The rng output of a given seed: empty, and on mu's device, so compiled graphs stay on one device."""
    return torch.empty(0, dtype=torch.int64, device=mu.device)


@sample_latents_op.register_fake
def _(mu, logvar, active, clamp_first, invariance, seed, backend):
    rng = torch.empty(2, dtype=torch.int64, device=mu.device) if seed is None else _no_rng(mu)
    return mu.new_empty(mu.shape), mu.new_empty(mu.shape[:1]), rng


def _sample_latents_backward_body(
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


sample_latents_backward_op = torch.library.custom_op(
    "dcign_fast::sample_latents_backward", mutates_args=(), tags=OUTSIDE_CUDA_GRAPHS
)(_sample_latents_backward_body)


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
sampler_forward = op_entry(
    "sample_latents", sample_latents_op, _sample_latents_body, _sampler_setup_context, _sampler_backward
)
sampler_backward = op_entry(
    "sample_latents_backward",
    sample_latents_backward_op,
    _sample_latents_backward_body,
    _sampler_backward_setup_context,
    _sampler_double_backward,
)
