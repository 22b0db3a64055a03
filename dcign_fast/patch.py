"""Drop-in acceleration of other models: ``patch(model)`` fuses their nearest-upsample + convolution layers.

Two shapes of layer are understood; everything else is left untouched:

* ``nn.Sequential(..., nn.Upsample(mode="nearest", integer scale), nn.Conv2d(stride 1, groups 1), ...)``:
  the pair becomes ``nn.Identity(), UnpoolConv2d`` sharing the Conv2d's parameters
  (:func:`_fuse`), so state_dict keys and parameter objects are unchanged. Sequential
  subclasses with their own forward are skipped; code that calls a Sequential's children itself (``seq[0]``)
  must not be patched, as nothing tells it that the pair no longer upsamples in its first module.
* diffusers' ``Upsample2D`` (``F.interpolate(x, scale_factor=2.0, mode="nearest")`` then its conv) when it
  is configured as exactly that: ``use_conv``, ``interpolate``, no transposed conv, no norm, and a plain
  stride-1 groups-1 zero-padded Conv2d. The instance's ``forward`` becomes a :class:`_FusedUpsample2DForward`
  that calls :func:`dcign_fast.unpool_conv2d` with the conv's own parameters (read at every call) for the
  plain call, and the class's forward whenever the call is not plain (``output_size`` given, extra args) or
  the layer no longer qualifies (its conv since replaced, or given hooks or another padding mode).

In both, a conv whose call does more than convolve with its ``weight`` Parameter (a parametrized or
old-style weight_norm / spectral_norm weight, hooks) is skipped: the fused op would bypass that; so is one
holding parameters, buffers or modules besides its weight and bias, which the fused layer would drop.

Everything ``unpatch(model)`` needs is kept inside the patched layers themselves, so it also undoes the
patches in a deep copy or an unpickled copy, and restores the parameters the fused layers hold at that
time. The fused output equals the original up to float rounding (the convolution sums the same products in
another order); its memory format follows the input's.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TypeVar, cast

import torch
from torch import nn

from dcign_fast.fusion import explicit_padding, fusion_bypassed_reason, fusion_unsupported_reason
from dcign_fast.nn import UnpoolConv2d
from dcign_fast.ops.backends import check_backend_name
from dcign_fast.ops.unpool_conv import unpool_conv2d


@dataclass
class PatchReport:
    """What :func:`patch` did: qualified module names replaced, and those skipped with the reason."""

    replaced: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"replaced {len(self.replaced)}, skipped {len(self.skipped)}"]
        if not self.replaced and not self.skipped:
            lines[0] += (
                " (found no nn.Upsample inside an nn.Sequential and no diffusers Upsample2D; layers that a"
                " forward calls one after the other must be fused by hand: dcign_fast.nn.UnpoolConv2d.from_modules)"
            )
        lines += [f"  replaced {name}" for name in self.replaced]
        lines += [f"  skipped  {name}: {reason}" for name, reason in self.skipped]
        return "\n".join(lines)


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _upsample_conv_pairs(module: nn.Module, backend: str) -> list[tuple[str, nn.Sequential, str, str, str]]:
    """Every nn.Upsample followed by another module inside an nn.Sequential of ``module``:
    (the container's qualified name, the container, the upsample's key, the next module's key, why the
    pair cannot become an UnpoolConv2d of ``backend`` or "" if it can)."""
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
                    pairs.append(
                        (name, container, first, second, reason or fusion_unsupported_reason(up, conv, backend))
                    )
    return pairs


def _scripted(module: nn.Module) -> list[str]:
    """The qualified names of the outermost TorchScript modules inside ``module`` that hold an upsample."""
    outermost: dict[str, nn.Module] = {}
    for name, sub in module.named_modules():
        if isinstance(sub, torch.jit.ScriptModule) and not any(name.startswith(f"{o}.") for o in outermost):
            outermost[name] = sub
    # A scripted module keeps its class's name, which is all that can tell.
    upsamples = ("Upsample", "Upsample2D")
    return [
        name
        for name, sub in outermost.items()
        if any(getattr(m, "original_name", "") in upsamples for m in sub.modules())
    ]


ModuleT = TypeVar("ModuleT", bound=nn.Module)


def _without_parameters(module: ModuleT) -> ModuleT:
    """A deep copy of ``module`` whose own parameters are None: kept to rebuild it at unpatch, without
    holding (or saving) weights that the fused layer owns, and may replace, from now on."""
    return copy.deepcopy(module, memo={id(p): None for p in module.parameters(recurse=False)})


def _fuse(container: nn.Sequential, first: str, second: str, backend: str) -> None:
    """Replaces a fusable (upsample, conv) pair in place: the conv's slot gets an UnpoolConv2d sharing its
    parameters and the upsample's slot an nn.Identity, so state_dict keys are unchanged. The replaced modules
    are kept in the fused layer's ``_unpatch`` (not registered as submodules, so state_dict and modules() are
    unchanged) for :func:`_unfuse`."""
    # patch() matched the pair
    up, conv = cast(nn.Upsample, container._modules[first]), cast(nn.Conv2d, container._modules[second])
    fused = UnpoolConv2d.from_modules(up, conv, backend)
    fused._unpatch = (first, up, _without_parameters(conv))
    container._modules[second] = fused
    container._modules[first] = nn.Identity().train(up.training)


def _unfuse(container: nn.Module, second: str, fused: UnpoolConv2d) -> None:
    """Puts back the pair :func:`_fuse` replaced, the conv with the fused layer's current parameters."""
    first, up, conv = fused._unpatch
    conv.weight, conv.bias = fused.weight, fused.bias
    # train() / eval() since patch reached only the fused layer.
    container._modules[first], container._modules[second] = up.train(fused.training), conv.train(fused.training)


def _is_diffusers_upsample2d(module: nn.Module) -> bool:
    # By name, so diffusers is never imported here; subclasses may change forward and are not matched.
    cls = type(module)
    return cls.__name__ == "Upsample2D" and cls.__module__.startswith("diffusers.")


def _upsample2d_conv(module: nn.Module) -> nn.Module | None:
    # Upsample2D keeps its conv as .conv, or as .Conv2d_0 when constructed with name != "conv".
    return getattr(module, "conv" if module.name == "conv" else "Conv2d_0", None)


class _FusedUpsample2DForward:
    """A patched Upsample2D's ``forward``. A module-level class holding its layer rather than a closure, so
    that deepcopy remaps it to the copy's layer (whose parameters it then uses), pickle can save it, and
    :func:`unpatch` recognises it in any copy."""

    def __init__(self, layer: nn.Module, backend: str) -> None:
        self.layer = layer
        self.backend = backend

    def __call__(self, hidden_states: torch.Tensor, output_size=None, *args, **kwargs) -> torch.Tensor:
        # The class's forward for a call that is not plain (upsampling to a given size, the deprecated scale
        # argument), and for a layer changed since patch() (its conv replaced, given hooks or reflect padding):
        # the conv stays a visible submodule, and the fused op would bypass the change.
        if output_size is not None or args or kwargs or _upsample2d_config_reason(self.layer, self.backend):
            return type(self.layer).forward(self.layer, hidden_states, output_size, *args, **kwargs)
        conv = cast(nn.Conv2d, _upsample2d_conv(self.layer))  # _upsample2d_config_reason found it fusable
        return unpool_conv2d(
            hidden_states, conv.weight, conv.bias, padding=explicit_padding(conv), backend=self.backend
        )


_NEAREST_X2 = nn.Upsample(scale_factor=2.0, mode="nearest")  # what Upsample2D's plain call upsamples by


def _upsample2d_reason(module: nn.Module, backend: str) -> str:
    """Why this Upsample2D cannot be patched for ``backend``, or ""."""
    forward = vars(module).get("forward")
    if isinstance(forward, _FusedUpsample2DForward):
        return "already patched"
    if forward is not None:
        return "its forward is overridden on the instance"
    return _upsample2d_config_reason(module, backend)


def _upsample2d_config_reason(module: nn.Module, backend: str) -> str:
    """Why this Upsample2D's plain call is not exactly nearest-x2 + a conv fusable for ``backend``, or ""."""
    if module.use_conv_transpose:
        return "use_conv_transpose: a transposed convolution, no upsampling to fuse"
    if not module.use_conv:
        return "use_conv=False: no convolution to fuse"
    if not module.interpolate:
        return "interpolate=False: no upsampling to fuse"
    if module.norm is not None:
        return "a norm runs before the upsampling"
    return fusion_unsupported_reason(_NEAREST_X2, _upsample2d_conv(module), backend)


def patch(module: nn.Module, backend: str = "auto") -> PatchReport:
    """Fuses the nearest-upsample + conv layers of ``module`` in place (see the module docstring).

    Args:
        module: any nn.Module; modules this does not understand are left as they are.
        backend: the unpool_conv2d backend of the fused layers ("auto": triton on CUDA where it runs).

    Returns:
        A PatchReport naming what was replaced and what was skipped, and why. ``module`` itself, when it
        is an Upsample2D, is named "(root)".
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    if isinstance(module, torch.jit.ScriptModule):  # its modules run compiled code, which patching cannot reach
        raise TypeError(
            "module is a TorchScript module (torch.jit.script or trace): patch the eager model before scripting it"
        )
    check_backend_name(backend)
    report = PatchReport()
    report.skipped += [(name, "a TorchScript module: patch it before scripting") for name in _scripted(module)]
    for prefix, container, first, second, reason in _upsample_conv_pairs(module, backend):
        if reason:
            report.skipped.append((_join(prefix, first), reason))
            continue
        _fuse(container, first, second, backend)
        report.replaced.append(f"{_join(prefix, first)} + {_join(prefix, second)}")
    for name, sub in module.named_modules():
        if _is_diffusers_upsample2d(sub):
            reason = _upsample2d_reason(sub, backend)
            if reason:
                report.skipped.append((name or "(root)", reason))
            else:
                sub.forward = _FusedUpsample2DForward(sub, backend)
                report.replaced.append(name or "(root)")
    return report


def unpatch(module: nn.Module) -> int:
    """Restores every layer :func:`patch` replaced inside ``module`` (or inside the copy of a patched
    model), with the parameters the patched layers hold now. Returns how many were restored.

    A fused pair comes back as its upsample module and a copy of its conv (not the original object) that
    holds the fused layer's parameters. A ValueError, before anything is restored, when a fused layer was
    given hooks or a parametrization since patch(): the conv put back would drop them.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    fused = [
        (name, sub, key, child)
        for name, sub in module.named_modules()
        for key, child in sub._modules.items()
        if isinstance(child, UnpoolConv2d) and hasattr(child, "_unpatch")
    ]
    for name, sub, key, child in fused:
        # The upsample's slot: the nn.Identity patch() left, which the upsample put back would replace.
        placeholder = sub._modules[child._unpatch[0]]
        if type(placeholder) is not nn.Identity:
            raise ValueError(
                f"cannot unpatch {_join(name, key)}: the upsample's slot {_join(name, child._unpatch[0])} holds a "
                f"{type(placeholder).__name__} now, not the nn.Identity patch() left there; put one back first"
            )
        reason = fusion_bypassed_reason(placeholder, child)
        if reason:
            raise ValueError(f"cannot unpatch {_join(name, key)}: {reason} (added since patch); remove it first")
    restored = 0
    for sub in list(module.modules()):
        if isinstance(vars(sub).get("forward"), _FusedUpsample2DForward):
            del vars(sub)["forward"]
            restored += 1
    for _, sub, key, child in fused:
        _unfuse(sub, key, child)
        restored += 1
    return restored
