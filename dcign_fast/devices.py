"""Which device a name given by a user (an option, a config value, an argument) means on this machine."""

from __future__ import annotations

import torch


def check_device(name: str, option: str = "device") -> str:
    """``name`` if it is "auto" or a CPU or CUDA device torch can parse (not necessarily present here); else
    a ValueError naming ``option`` (torch's own is a RuntimeError, which the command line treats as an
    internal error). Other device types (mps, xpu, meta) are refused here: untested, they failed deep in torch."""
    if name == "auto":
        return name
    try:
        device_type = torch.device(name).type
    except RuntimeError:
        device_type = None
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"{option} must be 'auto', cpu, cuda or cuda:N, got {name!r}")
    return name


def resolve_device(name: str, option: str = "device") -> torch.device:
    """The device ``name`` ("auto": a GPU when there is one) means here; a ValueError naming ``option`` when it
    is malformed or absent."""
    if check_device(name, option) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{option}={name!r} but CUDA is not available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"{option}={name!r} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device
