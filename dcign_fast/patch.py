"""Drop-in acceleration of other models: ``patch(model)`` fuses their nearest-upsample + convolution layers.

Two shapes of layer are understood; everything else is left untouched:

* ``nn.Sequential(..., nn.Upsample(mode="nearest", integer scale), nn.Conv2d(stride 1, groups 1), ...)``:
  the pair becomes ``nn.Identity(), UnpoolConv2d`` sharing the Conv2d's parameters
  (:func:`dcign_fast.nn.fuse_pair`), so state_dict keys and parameter objects are unchanged.
* diffusers' ``Upsample2D`` (``F.interpolate(x, scale_factor=2.0, mode="nearest")`` then its conv) when it
  is configured as exactly that: ``use_conv``, ``interpolate``, no transposed conv, no norm, and a plain
  stride-1 groups-1 zero-padded Conv2d. The instance gets a replacement ``forward`` that calls
  :func:`dcign_fast.unpool_conv2d` with the conv's own parameters (read at every call) for the plain
  call, and the original forward whenever the call is not plain (``output_size`` given, extra args).

``unpatch(model)`` undoes both. The fused output equals the original up to float rounding (the
convolution sums the same products in another order); its memory format follows the input's.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from dcign_fast.nn import _unsupported_reason, fuse_pair, upsample_conv_pairs
from dcign_fast.ops.backends import check_backend_name
from dcign_fast.ops.unpool_conv import unpool_conv2d

# Patched module -> how to undo it: the fused UnpoolConv2d of a Sequential pair, or the patched Upsample2D.
_UNDO: weakref.WeakKeyDictionary[nn.Module, Callable[[], None]] = weakref.WeakKeyDictionary()


@dataclass
class PatchReport:
    """What :func:`patch` did: qualified module names replaced, and those skipped with the reason."""

    replaced: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"replaced {len(self.replaced)}, skipped {len(self.skipped)}"]
        lines += [f"  replaced {name}" for name in self.replaced]
        lines += [f"  skipped  {name}: {reason}" for name, reason in self.skipped]
        return "\n".join(lines)


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _is_diffusers_upsample2d(module: nn.Module) -> bool:
    # By name, so diffusers is never imported here; subclasses may change forward and are not matched.
    cls = type(module)
    return cls.__name__ == "Upsample2D" and cls.__module__.startswith("diffusers.")


def _upsample2d_conv(module: nn.Module) -> nn.Module | None:
    # Upsample2D keeps its conv as .conv, or as .Conv2d_0 when constructed with name != "conv".
    return getattr(module, "conv" if module.name == "conv" else "Conv2d_0", None)


def _upsample2d_reason(module: nn.Module) -> str:
    """Why this Upsample2D's plain call is not exactly nearest-x2 + a fusable conv, or ""."""
    if "forward" in vars(module):
        return "already patched (or its forward is overridden)"
    if module.use_conv_transpose:
        return "use_conv_transpose: a transposed convolution, no upsampling to fuse"
    if not module.use_conv:
        return "use_conv=False: no convolution to fuse"
    if not module.interpolate:
        return "interpolate=False: no upsampling to fuse"
    if module.norm is not None:
        return "a norm runs before the upsampling"
    return _unsupported_reason(nn.Upsample(scale_factor=2.0, mode="nearest"), _upsample2d_conv(module))


def _patch_upsample2d(module: nn.Module, backend: str) -> None:
    original = module.forward

    def forward(hidden_states: torch.Tensor, output_size=None, *args, **kwargs) -> torch.Tensor:
        if output_size is not None or args or kwargs:  # upsampling to a given size, deprecated scale argument
            return original(hidden_states, output_size, *args, **kwargs)
        conv = _upsample2d_conv(module)
        return unpool_conv2d(hidden_states, conv.weight, conv.bias, padding=conv.padding, backend=backend)

    module.forward = forward
    ref = weakref.ref(module)  # a strong reference in the value would keep the weak key alive
    _UNDO[module] = lambda: vars(ref()).pop("forward")


def _restore_pair(container: nn.Sequential, first: str, second: str, up: nn.Module, conv: nn.Module):
    ref = weakref.ref(container)  # a strong reference in the value would keep the weak key (its child) alive

    def restore() -> None:
        ref()._modules[first], ref()._modules[second] = up, conv

    return restore


def patch(module: nn.Module, backend: str = "auto") -> PatchReport:
    """Fuses the nearest-upsample + conv layers of ``module`` in place (see the module docstring).

    Args:
        module: any nn.Module; modules this does not understand are left as they are.
        backend: the unpool_conv2d backend of the fused layers ("auto": triton on CUDA where it runs).

    Returns:
        A PatchReport naming what was replaced and what was skipped, and why.
    """
    check_backend_name(backend)
    report = PatchReport()
    for prefix, container, first, second, reason in upsample_conv_pairs(module):
        if reason:
            report.skipped.append((_join(prefix, first), reason))
            continue
        up, conv = container._modules[first], container._modules[second]
        fuse_pair(container, first, second, backend)

        _UNDO[container._modules[second]] = _restore_pair(container, first, second, up, conv)
        report.replaced.append(f"{_join(prefix, first)} + {_join(prefix, second)}")
    for name, sub in module.named_modules():
        if _is_diffusers_upsample2d(sub):
            reason = _upsample2d_reason(sub)
            if reason:
                report.skipped.append((name, reason))
            else:
                _patch_upsample2d(sub, backend)
                report.replaced.append(name)
    return report


def unpatch(module: nn.Module) -> int:
    """Restores every layer :func:`patch` replaced inside ``module``. Returns how many were restored."""
    patched = [sub for sub in module.modules() if sub in _UNDO]
    for sub in patched:
        _UNDO.pop(sub)()
    return len(patched)
