"""Python side of the CUDA C++ backend (``backend="cuda"``): argument plumbing and autograd for the
kernels of ``dcign_fast._C`` (csrc/). Tensors travel as raw pointers with their strides; every launch
runs on the current torch stream of the tensors' device, so CUDA-graph capture works.

Importing this module does not need the extension; calling any function does (a clear error otherwise).
"""

from __future__ import annotations

import torch

from dcign_fast.kernels import cuda

# Storage dtype -> the code csrc/dtype.cuh dispatches on.
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
CLAMP_NONE, CLAMP_MEAN, CLAMP_FIRST = 0, 1, 2


def _dtype_code(t: torch.Tensor) -> int:
    if t.dtype not in DTYPE_CODES:
        raise TypeError(f"backend='cuda' takes float32, bfloat16 or float16 tensors, got {t.dtype}")
    return DTYPE_CODES[t.dtype]


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


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
    cuda.load().sampler_column_means(
        mu.data_ptr(), logvar.data_ptr(), B, D, *mu.stride(), *logvar.stride(), means.data_ptr(),
        _dtype_code(mu), _stream(mu.device),
    )  # fmt: skip
    return means


def sampler_forward(
    mu: torch.Tensor, logvar: torch.Tensor, active: torch.Tensor | None, clamp_first: bool, seed: int, offset: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(z [B, D], kl [B]) in mu's dtype; the forward half of :class:`dcign_fast.ops.latent_sampler.Kernels`."""
    B, D = mu.shape
    code = _dtype_code(mu)
    with torch.cuda.device(mu.device):
        active_ptr, mask = _active_ptr(active)
        clamp, means = CLAMP_NONE, None
        if active is not None:
            clamp = CLAMP_FIRST if clamp_first else CLAMP_MEAN
            means = None if clamp_first else _column_means(mu, logvar)
        z = torch.empty((B, D), dtype=mu.dtype, device=mu.device)
        kl = torch.empty((B,), dtype=mu.dtype, device=mu.device)
        cuda.load().sampler_forward(
            mu.data_ptr(), logvar.data_ptr(), active_ptr, 0 if means is None else means.data_ptr(),
            z.data_ptr(), kl.data_ptr(), B, D, *mu.stride(), *logvar.stride(), clamp, seed, offset, code,
            _stream(mu.device),
        )  # fmt: skip
    return z, kl


def sampler_backward(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    active: torch.Tensor | None,
    invariance: float,
    seed: int,
    offset: int,
    grad_z: torch.Tensor,
    grad_kl: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_mu, grad_logvar), each [B, D] in mu's dtype; the backward half of ``Kernels``."""
    B, D = mu.shape
    code = _dtype_code(mu)
    grad_z, grad_kl = grad_z.to(mu.dtype), grad_kl.to(mu.dtype)
    with torch.cuda.device(mu.device):
        active_ptr, mask = _active_ptr(active)
        means = _column_means(mu, logvar) if active is not None and invariance > 0 else None
        grad_mu = torch.empty((B, D), dtype=mu.dtype, device=mu.device)
        grad_logvar = torch.empty((B, D), dtype=mu.dtype, device=mu.device)
        cuda.load().sampler_backward(
            mu.data_ptr(), logvar.data_ptr(), active_ptr, 0 if means is None else means.data_ptr(),
            grad_z.data_ptr(), grad_kl.data_ptr(), grad_mu.data_ptr(), grad_logvar.data_ptr(), B, D,
            *mu.stride(), *logvar.stride(), *grad_z.stride(), grad_kl.stride(0), invariance, seed, offset, code,
            _stream(mu.device),
        )  # fmt: skip
    return grad_mu, grad_logvar
