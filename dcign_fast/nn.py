"""Drop-in modules built on the fused ops."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from dcign_fast.bounds import Bounds
from dcign_fast.ops._checks import check_activation, check_pair, check_scale_factor
from dcign_fast.ops.backends import check_backend_name
from dcign_fast.ops.latent_sampler import check_sample_latents_args, sample_latents
from dcign_fast.ops.unpool_conv import unpool_conv2d


class UnpoolConv2d(nn.Module):
    """``nn.Sequential(nn.Upsample(scale_factor=s, mode="nearest"), nn.Conv2d(...))`` as one fused op.

    Parameters are named and shaped like ``nn.Conv2d``'s (``weight`` [O, C, KH, KW], ``bias`` [O]),
    so a Conv2d state_dict loads into it. The backend is not part of the state.

    ``activation="relu"`` appends a ReLU (fused into the triton and cuda backends' kernels): the decoder's
    ``UnpoolConv2d, nn.ReLU`` pairs become one module.

    Shapes: [N, C, H, W] -> [N, O, s*H + 2*ph - KH + 1, s*W + 2*pw - KW + 1].
    """

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
        Bounds(1).check("in_channels", in_channels, integer=True)
        Bounds(1).check("out_channels", out_channels, integer=True)
        self.activation = activation
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.kernel_size = check_pair("kernel_size", kernel_size, 1)
        self.padding = check_pair("padding", padding, 0)
        self.scale_factor = check_scale_factor(scale_factor)
        self.backend = backend
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *self.kernel_size, **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Conv2d's initialisation, so a converted model starts where the original would.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight[0].numel()
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
        theirs: a parametrized weight, a weight or bias that is not a plain Parameter, hooks.
        """
        reason = _unsupported_reason(upsample, conv)
        if reason:
            raise ValueError(f"cannot fuse {upsample} + {conv}: {reason}")
        scale = upsample.scale_factor  # a number or an (equal) pair: _unsupported_reason checked
        fused = cls(
            conv.in_channels, conv.out_channels, tuple(conv.kernel_size), tuple(conv.padding), conv.bias is not None,
            backend, scale_factor=int(scale[0] if isinstance(scale, tuple) else scale), device="meta",
        )  # fmt: skip
        fused.weight, fused.bias = conv.weight, conv.bias  # (the meta placeholders go)
        return fused.train(conv.training)


# The hooks nn.Module.__call__ and state_dict run; a fused layer bypasses the replaced modules', so
# modules with any of them are not fused.
_HOOKS = (
    "_forward_pre_hooks",
    "_forward_hooks",
    "_backward_pre_hooks",
    "_backward_hooks",
    "_state_dict_pre_hooks",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def _unsupported_reason(upsample: nn.Module, conv: nn.Module) -> str:
    """Why (upsample, conv) cannot become an UnpoolConv2d, or "" if it can."""
    if not isinstance(upsample, nn.Upsample) or upsample.mode != "nearest":
        return "the first module is not nn.Upsample(mode='nearest')"
    if type(upsample).forward is not nn.Upsample.forward:  # a subclass may upsample some other way
        return "the first module overrides nn.Upsample's forward"
    scale = upsample.scale_factor
    if upsample.size is not None or scale is None:
        return "upsampling must be given by scale_factor, not size"
    if upsample.align_corners is not None:  # nn.Upsample raises for it (True or False) with mode="nearest"
        return "align_corners is set, which nearest upsampling refuses"
    scale = scale if isinstance(scale, tuple) else (scale, scale)
    if len(scale) != 2 or len(set(scale)) != 1 or float(scale[0]) != int(scale[0]) or int(scale[0]) < 1:
        return f"scale_factor must be one positive integer, got {upsample.scale_factor}"
    if not isinstance(conv, nn.Conv2d) or any(
        getattr(type(conv), method) is not getattr(nn.Conv2d, method) for method in ("forward", "_conv_forward")
    ):  # e.g. weight standardisation overrides _conv_forward only
        return "the second module is not a plain nn.Conv2d (a subclass overrides its forward)"
    if conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.groups != 1:
        return "the convolution must have stride 1, dilation 1 and groups 1"
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        return "the convolution's padding must be explicit zero padding"
    return _bypassed_reason(upsample, conv)


def _bypassed_reason(upsample: nn.Module, conv: nn.Module) -> str:
    """Why calling the fused op with ``conv``'s weight and bias would skip work the modules' own calls do,
    or "". Fusing anyway would freeze a computed weight, take the parameters it is computed from out of
    the model, and silence hooks."""
    if parametrize.is_parametrized(conv):
        return "the convolution is parametrized (e.g. parametrizations.weight_norm / spectral_norm)"
    for name in ("weight", "bias"):
        value = conv._parameters.get(name)
        if type(value) is not nn.Parameter and not (name == "bias" and value is None):
            return f"the convolution's {name} is not a plain nn.Parameter (e.g. old-style weight_norm)"
    for role, module in (("upsample", upsample), ("convolution", conv)):
        if any(getattr(module, hooks) for hooks in _HOOKS):
            return f"the {role} has hooks, which the fused layer would not run"
        own = {"weight", "bias"} if module is conv else set()
        extra = sorted({*module._parameters, *module._buffers, *module._modules} - own)
        if extra:
            return f"the {role} holds {extra} besides its weights, which the fused layer would drop"
    return ""


def upsample_conv_pairs(module: nn.Module) -> list[tuple[str, nn.Sequential, str, str, str]]:
    """Every nn.Upsample followed by another module inside an nn.Sequential of ``module``:
    (the container's qualified name, the container, the upsample's key, the next module's key, why the
    pair cannot become an UnpoolConv2d or "" if it can)."""
    pairs = []
    for name, container in module.named_modules():
        if isinstance(container, nn.Sequential):
            # Only Sequential's own forward runs the children in key order: a subclass may skip or reorder them.
            overridden = type(container).forward is not nn.Sequential.forward
            keys = list(container._modules)
            for first, second in zip(keys, keys[1:]):
                up, conv = container._modules[first], container._modules[second]
                if isinstance(up, nn.Upsample):
                    reason = "the container overrides nn.Sequential's forward" if overridden else ""
                    pairs.append((name, container, first, second, reason or _unsupported_reason(up, conv)))
    return pairs


def fuse_pair(container: nn.Sequential, first: str, second: str, backend: str = "auto") -> None:
    """Replaces a fusable (upsample, conv) pair in place: the conv's slot gets an UnpoolConv2d sharing its
    parameters and the upsample's slot an nn.Identity, so state_dict keys are unchanged."""
    up, conv = container._modules[first], container._modules[second]
    container._modules[second] = UnpoolConv2d.from_modules(up, conv, backend)
    container._modules[first] = nn.Identity().train(up.training)


def convert_upsample_conv(module: nn.Module, backend: str = "auto") -> int:
    """Fuses every (nn.Upsample(nearest), nn.Conv2d) pair inside nn.Sequential containers, in place
    (see :func:`fuse_pair`). Pairs that cannot be fused are left as they are. Returns the number fused."""
    fusable = [(c, first, second) for _, c, first, second, reason in upsample_conv_pairs(module) if not reason]
    for container, first, second in fusable:
        fuse_pair(container, first, second, backend)
    return len(fusable)


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
        return sample_latents(
            mu, logvar, active, clamp=self.clamp, invariance=self.invariance, seed=seed, backend=self.backend
        )

    def extra_repr(self) -> str:
        return f"clamp={self.clamp!r}, invariance={self.invariance}, backend={self.backend!r}"
