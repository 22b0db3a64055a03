"""Drop-in modules built on the fused ops."""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import nn

from dcign_fast.bounds import Bounds
from dcign_fast.fusion import explicit_padding, fusion_unsupported_reason
from dcign_fast.ops._checks import check_activation, check_pair, check_scale_factor
from dcign_fast.ops.backends import check_backend_name
from dcign_fast.ops.latent_sampler import check_sample_latents_args, sample_latents
from dcign_fast.ops.unpool_conv import unpool_conv2d

__all__ = ["LatentSampler", "UnpoolConv2d"]


class UnpoolConv2d(nn.Module):
    """``nn.Sequential(nn.Upsample(scale_factor=s, mode="nearest"), nn.Conv2d(...))`` as one fused op.

    Parameters are named and shaped like ``nn.Conv2d``'s (``weight`` [O, C, KH, KW], ``bias`` [O]),
    so a Conv2d state_dict loads into it. The backend is not part of the state.

    ``activation="relu"`` appends a ReLU (fused into the triton and cuda backends' kernels): the decoder's
    ``UnpoolConv2d, nn.ReLU`` pairs become one module.

    The positional arguments are (in_channels, out_channels, kernel_size, padding, bias, backend): with no
    stride, the fourth is the padding, where nn.Conv2d's is its stride.

    Shapes: [N, C, H, W] -> [N, O, s*H + 2*ph - KH + 1, s*W + 2*pw - KW + 1].
    """

    # Tensors, as nn.Conv2d declares them: from_modules shares a conv's parameters.
    weight: torch.Tensor
    bias: torch.Tensor | None
    # Set by dcign_fast.patch on the layers it fuses: (the upsample's name, the upsample, the conv) to put back.
    _unpatch: tuple[str, nn.Module, nn.Conv2d]

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        padding: int | tuple[int, int] = 0,
        bias: bool = True,
        backend: str = "auto",
        *,
        scale_factor: int = 2,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        activation: str | None = None,
    ) -> None:
        super().__init__()
        check_backend_name(backend)
        check_activation(activation)
        if not isinstance(bias, bool):  # UnpoolConv2d(c, o, k, 1, 2) read as nn.Conv2d's (stride, padding) lands here
            raise TypeError(f"bias must be True or False, got {bias!r}")
        Bounds(1).check("in_channels", in_channels, integer=True)
        Bounds(1).check("out_channels", out_channels, integer=True)
        self.activation = activation
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.kernel_size = check_pair("kernel_size", kernel_size, 1)
        self.padding = check_pair("padding", padding, 0)
        self.scale_factor = check_scale_factor(scale_factor)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating-point torch.dtype or None, got {dtype!r}")
        self.backend = backend
        self.weight = nn.Parameter(
            torch.empty(out_channels, in_channels, *self.kernel_size, device=device, dtype=dtype)
        )
        self.bias = nn.Parameter(torch.empty(out_channels, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draws weight and bias afresh as nn.Conv2d does (so a converted model starts where the original would)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight[0].numel()
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, H, W] -> [B, O, s*H + 2*padding - KH + 1, s*W + 2*padding - KW + 1] (s: scale_factor)."""
        return unpool_conv2d(
            x,
            self.weight,
            self.bias,
            padding=self.padding,
            scale_factor=self.scale_factor,
            backend=self.backend,
            activation=self.activation,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, padding={self.padding}, "
            f"scale_factor={self.scale_factor}, bias={self.bias is not None}, backend={self.backend!r}"
            + (f", activation={self.activation!r}" if self.activation else "")
        )

    @classmethod
    def from_modules(cls, upsample: nn.Upsample, conv: nn.Conv2d, backend: str = "auto") -> UnpoolConv2d:
        """An UnpoolConv2d that shares ``conv``'s parameters (no copy).

        Raises ValueError when the pair is not nearest upsampling by an integer followed by a
        stride-1, dilation-1, groups-1, zero-padded Conv2d, or when calling the fused op would skip work of
        theirs: a parametrized weight, a weight or bias that is not a plain Parameter, hooks; or when
        ``backend`` ("triton" or "cuda") cannot run the pair's scale factor or kernel size.
        """
        reason = fusion_unsupported_reason(upsample, conv, backend)
        if reason:
            raise ValueError(f"cannot fuse {upsample} + {conv}: {reason}")
        # a number or an (equal) pair of them: fusion_unsupported_reason checked
        scale = cast("float | tuple[float, ...]", upsample.scale_factor)
        fused = cls(
            conv.in_channels, conv.out_channels, (conv.kernel_size[0], conv.kernel_size[1]), explicit_padding(conv),
            conv.bias is not None, backend, scale_factor=int(scale[0] if isinstance(scale, tuple) else scale),
            device="meta",
        )  # fmt: skip
        fused.weight, fused.bias = conv.weight, conv.bias  # (the meta placeholders go)
        return fused.train(conv.training)


class LatentSampler(nn.Module):
    """DC-IGN's latent sampling as a module: ``sample_latents`` with fixed clamp, invariance and backend.

    No parameters. Shapes: mu, logvar [B, D], active bool [D] or None -> (z [B, D], kl [B]).
    """

    def __init__(self, clamp: str = "mean", invariance: float = 0.0, backend: str = "auto") -> None:
        super().__init__()
        check_backend_name(backend)
        # Validate clamp and invariance now rather than at the first forward.
        check_sample_latents_args(torch.zeros(1, 1), torch.zeros(1, 1), None, clamp, invariance, None)
        self.clamp = clamp
        self.invariance = float(invariance)
        self.backend = backend

    def forward(
        self, mu: torch.Tensor, logvar: torch.Tensor, active: torch.Tensor | None = None, seed: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """mu, logvar [B, D], active bool [D] or None -> (z [B, D], kl [B]); ``seed`` as sample_latents'."""
        return sample_latents(
            mu, logvar, active, clamp=self.clamp, invariance=self.invariance, seed=seed, backend=self.backend
        )

    def extra_repr(self) -> str:
        return f"clamp={self.clamp!r}, invariance={self.invariance}, backend={self.backend!r}"
