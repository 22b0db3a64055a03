"""Plain PyTorch oracles: what the tests compare every backend with and what the benchmarks beat.

These are written for clarity, not speed; they define each op's semantics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dcign_fast.ops import philox


def unpool_conv2d_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    padding: tuple[int, int] = (0, 0),
    scale_factor: int = 2,
) -> torch.Tensor:
    """Nearest-neighbour upsampling by ``scale_factor`` followed by a stride-1 convolution.

    Shapes: x [N, C, H, W], weight [O, C, KH, KW], bias [O] -> [N, O, s*H + 2*ph - KH + 1, s*W + 2*pw - KW + 1].
    """
    upsampled = F.interpolate(x, scale_factor=scale_factor, mode="nearest")
    return F.conv2d(upsampled, weight, bias, padding=padding)


def invariance_pull(x: torch.Tensor, invariance: float) -> torch.Tensor:
    """[B, D] -> [B, D]: ``invariance * (x - batch mean of x)``, the gradient inactive columns get; exactly 0 when
    ``invariance`` is 0, even where a column holds NaN or inf (0 * NaN would be NaN), as the kernels give."""
    return invariance * (x - x.mean(0, keepdim=True)) if invariance else torch.zeros_like(x)


class _InvariancePull(torch.autograd.Function):
    """Zeros in the forward; in the backward, whatever the output gradients, the invariance pull.

    Its zero outputs are added to z and kl so that this backward runs whenever either gets a gradient.
    Written with a separate setup_context, so torch.func.vmap can batch it.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(mu, logvar, inactive, invariance):
        return mu.new_zeros(mu.shape), mu.new_zeros(mu.shape[:1])

    @staticmethod
    def setup_context(ctx, inputs, output):
        mu, logvar, inactive, invariance = inputs
        ctx.save_for_backward(mu, logvar, inactive)
        ctx.invariance = invariance

    @staticmethod
    def backward(ctx, grad_z, grad_kl):
        mu, logvar, inactive = ctx.saved_tensors

        def pull(t: torch.Tensor) -> torch.Tensor:
            return torch.where(inactive, invariance_pull(t, ctx.invariance), 0.0)

        return pull(mu), pull(logvar), None, None


def sample_latents_reference(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    active: torch.Tensor | None = None,
    clamp: str = "mean",
    invariance: float = 0.0,
    seed: philox.Value = 0,
    offset: philox.Value = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The DC-IGN latent sampler with clamping, KL and the invariance pull (see ``sample_latents``).

    Shapes: mu, logvar [B, D]; active bool [D] or None (all active) -> z [B, D], kl [B], in mu's dtype,
    computed in at least float32. eps comes from :func:`dcign_fast.ops.philox.normal` (seed, offset).
    Gradients: active columns get autograd's true gradients; inactive columns get none from z or kl
    (their clamped value is a detached batch statistic) and instead invariance * (x - batch mean of x).
    """
    compute = torch.promote_types(mu.dtype, torch.float32)
    m, lv = mu.to(compute), logvar.to(compute)
    if active is None:
        active = torch.ones(mu.shape[1], dtype=torch.bool, device=mu.device)
    inactive = ~active
    if clamp == "mean":
        m_stat, lv_stat = m.mean(0, keepdim=True), lv.mean(0, keepdim=True)
    else:
        m_stat, lv_stat = m[:1], lv[:1]
    m_c = torch.where(inactive, m_stat.detach(), m)
    lv_c = torch.where(inactive, lv_stat.detach(), lv)
    eps = philox.normal(seed, offset, tuple(mu.shape), mu.device).to(compute)
    z = m_c + torch.exp(0.5 * lv_c) * eps
    kl = -0.5 * torch.sum(1 + lv_c - m_c**2 - torch.exp(lv_c), dim=1)
    pull_z, pull_kl = _InvariancePull.apply(m, lv, inactive, invariance)
    return (z + pull_z).to(mu.dtype), (kl + pull_kl).to(mu.dtype)
