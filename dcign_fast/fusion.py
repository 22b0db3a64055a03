"""When an (upsample, conv) pair may become one :class:`dcign_fast.nn.UnpoolConv2d`: the rules that
``UnpoolConv2d.from_modules`` and :func:`dcign_fast.patch` share."""

from __future__ import annotations

import math

from torch import nn
from torch.nn.utils import parametrize

from dcign_fast.ops._checks import check_pair

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


def fusion_unsupported_reason(upsample: nn.Module, conv: nn.Module, backend: str = "auto") -> str:
    """Why (upsample, conv) cannot become an UnpoolConv2d of ``backend``, or "" if it can. ("auto" runs the
    torch backend where a kernel backend cannot; "triton" and "cuda" would refuse every call.)"""
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
    if len(scale) != 2 or len(set(scale)) != 1 or not _positive_integer(scale[0]):
        return f"scale_factor must be one positive integer, got {upsample.scale_factor}"
    if not isinstance(conv, nn.Conv2d):
        return f"the next module is {type(conv).__name__}, not an nn.Conv2d"
    if any(getattr(type(conv), method) is not getattr(nn.Conv2d, method) for method in ("forward", "_conv_forward")):
        # e.g. weight standardisation overrides _conv_forward only
        return f"the next module, a {type(conv).__name__}, is an nn.Conv2d subclass that overrides its forward"
    if conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.groups != 1:
        return "the convolution must have stride 1, dilation 1 and groups 1"
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        return "the convolution's padding must be explicit zero padding"
    if backend in ("triton", "cuda"):
        # Imported here: imported first, the kernels' module would load dcign_fast.ops midway, whose modules
        # import it back.
        from dcign_fast.kernels.unpool_conv_common import kernel_shape_reason

        reason = kernel_shape_reason(backend, int(scale[0]), (conv.kernel_size[0], conv.kernel_size[1]))
        if reason:
            return reason
    return fusion_bypassed_reason(upsample, conv)


def _positive_integer(value: float) -> bool:
    return math.isfinite(value) and value == int(value) and value >= 1


def explicit_padding(conv: nn.Conv2d) -> tuple[int, int]:
    """A fusable conv's padding as (rows, cols): an int or a pair (set after construction, it may be an int;
    fusion_unsupported_reason refused padding given by name)."""
    return check_pair("padding", conv.padding, 0)


def fusion_bypassed_reason(upsample: nn.Module, conv: nn.Module) -> str:
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
        # As a subclass's override would (a wrapper's hook may be attached so: module.forward = ...).
        replaced = [method for method in ("forward", "_conv_forward") if method in vars(module)]
        if replaced:
            return f"the {role}'s {replaced[0]} is replaced on the instance, which the fused layer would not call"
        own = {"weight", "bias"} if module is conv else set()
        extra = sorted({*module._parameters, *module._buffers, *module._modules} - own)
        if extra:
            return f"the {role} holds {extra} besides its weights, which the fused layer would drop"
    return ""
