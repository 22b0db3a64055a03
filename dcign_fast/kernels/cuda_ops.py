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


# ---------------------------------------------------------------------------------------------------------------
# unpool_conv2d, scale factor 2

_SCALE = 2
_MAX_KERNEL = 9
_GRAD_WEIGHT_TILE = 64  # channel tile of the grad-weight kernel (csrc/unpool_conv_grad_weight.cu)
_SPLIT_GRANULE = 256  # output positions per grad-weight split, at least


def cuda_unsupported_reason(x: torch.Tensor, weight: torch.Tensor, scale_factor: int) -> str:
    """Why backend="cuda" cannot run these arguments, or "" when it can."""
    if scale_factor != _SCALE:
        return f"backend='cuda' supports scale_factor=2 only, got {scale_factor}"
    if x.dtype not in DTYPE_CODES:
        return f"backend='cuda' supports float32, float16 and bfloat16, got {x.dtype}"
    if max(weight.shape[2:]) > _MAX_KERNEL:
        return f"backend='cuda' supports kernel sizes up to {_MAX_KERNEL}, got {tuple(weight.shape[2:])}"
    return ""


def _nhwc(t: torch.Tensor) -> torch.Tensor:
    """t itself when its channels are contiguous in memory, else a channels_last copy."""
    return t if t.stride(1) == 1 else t.contiguous(memory_format=torch.channels_last)


def _view(t: torch.Tensor) -> tuple[int, int, int, int, int]:
    return (t.data_ptr(), *t.stride())


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _grad_weight_splits(positions: int, c_in: int, c_out: int, taps: int, device: torch.device) -> tuple[int, int]:
    """(splits, chunk): enough grad-weight blocks to fill the GPU a few times over, chunks of >= 256 positions."""
    tiles = -(-c_in // _GRAD_WEIGHT_TILE) * -(-c_out // _GRAD_WEIGHT_TILE) * taps
    target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    splits = max(1, min(-(-target // tiles), -(-positions // _SPLIT_GRANULE), 65535))
    return splits, -(-positions // splits)


class _UnpoolConv2dCuda(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding, activation):
        n, c_in, h, w = x.shape
        c_out, _, kh, kw = weight.shape
        ph, pw = padding
        lib, code, stream = cuda.load(), _dtype_code(x), _stream(x.device)
        xn, weight = _nhwc(x), weight.contiguous()
        tr, tc = lib.union_taps(kh, ph), lib.union_taps(kw, pw)
        wp = torch.empty((2, 2, tr, tc, c_in, c_out), dtype=torch.float32, device=x.device)
        lib.unpool_conv_pack_weight(weight.data_ptr(), wp.data_ptr(), c_out, c_in, kh, kw, ph, pw, code, stream)
        shape = (n, c_out, _SCALE * h + 2 * ph - kh + 1, _SCALE * w + 2 * pw - kw + 1)
        out = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=_memory_format(x))
        if out.numel():
            lib.unpool_conv_forward(
                _view(xn), wp.data_ptr(), 0 if bias is None else bias.contiguous().data_ptr(), _view(out),
                n, c_in, h, w, c_out, kh, kw, ph, pw, int(activation == "relu"), code, stream,
            )  # fmt: skip
        ctx.save_for_backward(xn, wp, out if activation == "relu" else None)
        ctx.plan = (kh, kw, ph, pw, bias is not None, x.shape, _memory_format(x))
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        xn, wp, y = ctx.saved_tensors
        kh, kw, ph, pw, has_bias, x_shape, x_format = ctx.plan
        n, c_in, h, w = x_shape
        c_out, ho, wo = grad_out.shape[1:]
        lib, code, stream = cuda.load(), _dtype_code(xn), _stream(xn.device)
        if y is not None:  # ReLU: gradient only where the output was positive
            grad_out = torch.where(y > 0, grad_out, 0)
        g = _nhwc(grad_out)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = torch.empty(x_shape, dtype=xn.dtype, device=xn.device, memory_format=x_format)
            if dx.numel() and g.numel():
                lib.unpool_conv_grad_input(
                    _view(g), wp.data_ptr(), _view(dx), n, c_in, h, w, c_out, kh, kw, ph, pw, code, stream
                )
            elif dx.numel():
                dx.zero_()
        if ctx.needs_input_grad[1] or (has_bias and ctx.needs_input_grad[2]):
            taps = wp.shape[2] * wp.shape[3]  # an upper bound of the taps of any phase (for the split heuristic)
            splits, chunk = _grad_weight_splits(n * ((ho + 1) // 2) * ((wo + 1) // 2), c_in, c_out, taps, xn.device)
            ws = torch.empty((splits, *wp.shape), dtype=torch.float32, device=xn.device)
            bias_ws = torch.empty((splits, 4, c_out), dtype=torch.float32, device=xn.device) if has_bias else None
            lib.unpool_conv_grad_weight(
                _view(xn), _view(g), ws.data_ptr(), 0 if bias_ws is None else bias_ws.data_ptr(),
                n, c_in, h, w, c_out, kh, kw, ph, pw, splits, max(1, chunk), code, stream,
            )  # fmt: skip
            dw = torch.empty((c_out, c_in, kh, kw), dtype=xn.dtype, device=xn.device)
            db = torch.empty((c_out,), dtype=xn.dtype, device=xn.device) if has_bias else None
            lib.unpool_conv_finalize_grad_weight(
                ws.data_ptr(), 0 if bias_ws is None else bias_ws.data_ptr(), dw.data_ptr(),
                0 if db is None else db.data_ptr(), c_out, c_in, kh, kw, ph, pw, splits, code, stream,
            )  # fmt: skip
        return dx, dw, db, None, None


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
    [N, O, 2H + 2ph - KH + 1, 2W + 2pw - KW + 1] in x's memory format. Differentiable in x, weight and
    bias; grad weight and grad bias are deterministic. float32 accumulation for every dtype (no TF32).
    """
    reason = cuda_unsupported_reason(x, weight, scale_factor)
    if reason:
        raise ValueError(reason)
    if activation not in (None, "relu"):
        raise ValueError(f"activation must be None or 'relu', got {activation!r}")
    with torch.cuda.device(x.device):
        return _UnpoolConv2dCuda.apply(x, weight, bias, padding, activation)
