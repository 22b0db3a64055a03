"""Argument checks shared by the ops: each error names the argument and what was expected."""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD

from dcign_fast.bounds import is_integer

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
ACTIVATIONS = (None, "relu")


def check_tensor(name: str, t: object, ndim: int, shape_doc: str) -> torch.Tensor:
    """``t`` itself when it is an ``ndim``-D floating tensor (``shape_doc`` names its dimensions)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {shape_doc}, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    return t


def check_like(name: str, t: torch.Tensor, like_name: str, like: torch.Tensor) -> None:
    """``t`` must share ``like``'s dtype and device."""
    if t.dtype != like.dtype:
        raise TypeError(f"{name} must have the dtype of {like_name} ({like.dtype}), got {t.dtype}")
    check_on_device(name, t, like.device, f"the device of {like_name}")


def check_on_device(name: str, t: object, device: torch.device, where: str) -> None:
    """A ValueError naming ``name`` when tensor ``t`` is not on ``device`` (``where``: whose device it is, for the
    message); anything but a tensor passes (its own checks name it). torch's "Expected all tensors to be on the
    same device" names no argument."""
    if isinstance(t, torch.Tensor) and t.device != device:
        raise ValueError(f"{name} must be on {where} ({device}), got {t.device}")


def check_pair(name: str, value: object, minimum: int) -> tuple[int, int]:
    """An int or a pair of ints, each >= minimum, as a pair of Python ints."""
    pair = (value, value) if is_integer(value) else value
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(is_integer(v) and v >= minimum for v in pair)):
        raise ValueError(f"{name} must be an int >= {minimum} or a pair of them, got {value!r}")
    return int(pair[0]), int(pair[1])


def check_scale_factor(scale_factor: object) -> int:
    """An integer upsampling factor >= 1, as a Python int."""
    if not is_integer(scale_factor) or scale_factor < 1:
        raise ValueError(f"scale_factor must be an int >= 1, got {scale_factor!r}")
    return int(scale_factor)


def check_activation(activation: object) -> None:
    """One of :data:`ACTIVATIONS`, the epilogues the unpool-conv backends fuse."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def check_no_forward_ad(op: str, backend: str, *tensors: torch.Tensor | None, alternative: str = "") -> None:
    """The custom ops have no forward-mode derivative, and PyTorch would give their outputs zero tangents
    without a word (torch.func.jvp, forward_ad dual tensors): refuse such inputs instead. ``alternative``: a
    way that does have one, for the message."""
    if torch.compiler.is_compiling():
        return
    if any(t is not None and fwAD.unpack_dual(t).tangent is not None for t in tensors):
        raise NotImplementedError(
            f"{op}(backend={backend!r}) has no forward-mode AD (torch.func.jvp, forward_ad dual tensors): "
            f"use reverse mode (torch.autograd.grad){alternative}"
        )


def check_while_compiling(condition: object, message: str) -> None:
    """A check inside torch.compile: a condition known while tracing raises RuntimeError(message) there, a
    symbolic one becomes torch._check. (torch 2.8's dynamo cannot trace torch._check's message callable, so
    torch._check is kept for the conditions that need it.)"""
    if isinstance(condition, bool):
        if not condition:
            raise RuntimeError(message)
    else:
        torch._check(condition, lambda: message)
