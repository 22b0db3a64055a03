"""The latent sampler's CUDA C++ backend (``backend="cuda"``): argument plumbing for the forward and backward
kernels of ``dcign_fast._C`` (csrc/latent_sampler.cu), which :mod:`dcign_fast.ops.latent_sampler` pairs up for
autograd. Tensors travel as raw pointers with their strides; every launch runs on the current torch stream of
the tensors' device, so CUDA-graph capture works.

Importing this module does not need the extension; calling any function does (a clear error otherwise).
"""

from __future__ import annotations

import torch

from dcign_fast.kernels import cuda, device_guard
from dcign_fast.ops import philox

CLAMP_NONE, CLAMP_MEAN, CLAMP_FIRST = 0, 1, 2


def _active_ptr(active: torch.Tensor | None) -> tuple[int, torch.Tensor | None]:
    """(pointer, the tensor it points into) of the mask as uint8 [D]; pointer 0 when every column is active.

    The caller holds the tensor until the launch is queued (the caching allocator orders reuse on the stream).
    """
    if active is None:
        return 0, None
    mask = active.contiguous().view(torch.uint8)
    return mask.data_ptr(), mask


def _column_means(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """float32 [2, D]: batch means of mu's and logvar's columns."""
    B, D = mu.shape
    means = torch.empty((2, D), dtype=torch.float32, device=mu.device)
    cuda.load(mu.device).sampler_column_means(
        mu.data_ptr(), logvar.data_ptr(), B, D, *mu.stride(), *logvar.stride(), means.data_ptr(),
        cuda.dtype_code(mu), cuda.stream(mu.device),
    )  # fmt: skip
    return means


def _philox_args(seed: philox.Value, offset: philox.Value) -> tuple[int, int, int, int]:
    """(seed, offset, seed pointer, offset pointer) of a launch: the values, or 0-d device tensors holding them
    (read by the kernels)."""
    if isinstance(seed, torch.Tensor) and isinstance(offset, torch.Tensor):
        return 0, 0, seed.data_ptr(), offset.data_ptr()
    if isinstance(seed, int) and isinstance(offset, int):
        return seed, offset, 0, 0
    raise TypeError(f"seed and offset must both be ints or both tensors, got {type(seed)} and {type(offset)}")


def sampler_forward(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    active: torch.Tensor | None,
    clamp_first: bool,
    seed: philox.Value,
    offset: philox.Value,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(z [B, D], kl [B]) in mu's dtype: the cuda backend's forward in :data:`dcign_fast.ops.latent_sampler.KERNELS`."""
    B, D = mu.shape
    code = cuda.dtype_code(mu)
    with device_guard(mu.device):
        active_ptr, mask = _active_ptr(active)
        clamp, means = CLAMP_NONE, None
        if active is not None:
            clamp = CLAMP_FIRST if clamp_first else CLAMP_MEAN
            means = None if clamp_first else _column_means(mu, logvar)
        z = torch.empty((B, D), dtype=mu.dtype, device=mu.device)
        kl = torch.empty((B,), dtype=mu.dtype, device=mu.device)
        cuda.load(mu.device).sampler_forward(
            mu.data_ptr(), logvar.data_ptr(), active_ptr, 0 if means is None else means.data_ptr(),
            z.data_ptr(), kl.data_ptr(), B, D, *mu.stride(), *logvar.stride(), clamp, *_philox_args(seed, offset),
            code, cuda.stream(mu.device),
        )  # fmt: skip
    return z, kl


def sampler_backward(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    active: torch.Tensor | None,
    invariance: float,
    seed: philox.Value,
    offset: philox.Value,
    grad_z: torch.Tensor,
    grad_kl: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_mu, grad_logvar), each [B, D] in mu's dtype: the cuda backend's backward in ``KERNELS``."""
    B, D = mu.shape
    code = cuda.dtype_code(mu)
    grad_z, grad_kl = grad_z.to(mu.dtype), grad_kl.to(mu.dtype)
    with device_guard(mu.device):
        active_ptr, mask = _active_ptr(active)
        means = _column_means(mu, logvar) if active is not None and invariance > 0 else None
        grad_mu = torch.empty((B, D), dtype=mu.dtype, device=mu.device)
        grad_logvar = torch.empty((B, D), dtype=mu.dtype, device=mu.device)
        cuda.load(mu.device).sampler_backward(
            mu.data_ptr(), logvar.data_ptr(), active_ptr, 0 if means is None else means.data_ptr(),
            grad_z.data_ptr(), grad_kl.data_ptr(), grad_mu.data_ptr(), grad_logvar.data_ptr(), B, D,
            *mu.stride(), *logvar.stride(), *grad_z.stride(), grad_kl.stride(0), invariance,
            *_philox_args(seed, offset), code, cuda.stream(mu.device),
        )  # fmt: skip
    return grad_mu, grad_logvar
