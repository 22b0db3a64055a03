"""The unpool-conv cases the ops and kernels suites (and pytest-benchmark's front door) time, and how they run
one: the modules and input shapes, channels_last inputs and gradients, each backend's copy of a module, and a
timed step."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from benchmarks.harness import Step
from dcign_fast.kernels import cuda as cuda_extension
from dcign_fast.models import DCIGN
from dcign_fast.nn import UnpoolConv2d


@dataclass
class Case:
    name: str
    module: nn.Module
    shape: tuple[int, int, int, int]
    layers: list[tuple[UnpoolConv2d, int]]  # (layer, input size) for the floor


def backends_for(device: str) -> list[str]:
    """Explicit backends worth timing on this device (reference first)."""
    names = ["reference", "torch"]
    if device == "cuda":
        names += ["triton", "cuda"] if cuda_extension.available() else ["triton"]
    return names


def paper150_cases(batch: int) -> list[Case]:
    """Each decoder layer of the original network (with its fused ReLU), then the whole decoder."""
    model = DCIGN.from_preset("paper150")
    decoder = model.decoder
    sizes = model.config.decoder_sizes()
    layers = [m for m in decoder if isinstance(m, UnpoolConv2d)]
    cases = [
        Case(f"paper150 L{i + 1} {m.in_channels}->{m.out_channels} {s}px", m, (batch, m.in_channels, s, s), [(m, s)])
        for i, (m, s) in enumerate(zip(layers, sizes))
    ]
    first = layers[0]
    cases.append(
        Case("paper150 decoder", decoder, (batch, first.in_channels, sizes[0], sizes[0]), list(zip(layers, sizes)))
    )
    return cases


def same3_cases(batch: int) -> list[Case]:
    """K=3 "same" unpool-convs from 64 to 128 px (a typical modern decoder stage), ReLU fused."""
    cases = []
    for channels in (128, 256):
        m = UnpoolConv2d(channels, channels, 3, padding=1, activation="relu")
        cases.append(Case(f"K3 same {channels}->{channels} 64px", m, (batch, channels, 64, 64), [(m, 64)]))
    return cases


def runner(module: nn.Module, x: torch.Tensor, grad: torch.Tensor | None) -> Step:
    """``module(x)``, without autograd when ``grad`` is None, else with its backward of ``grad``."""

    def clear() -> None:
        x.grad = None
        for p in module.parameters():
            p.grad = None

    def run() -> None:
        if grad is None:
            with torch.no_grad():
                module(x)
            return
        clear()
        module(x).backward(grad)

    return Step(run, clear)


def with_backend(module: nn.Module, backend: str) -> nn.Module:
    """``module`` routed through ``backend`` (a copy sharing the parameters)."""
    routed = copy.copy(module)
    routed._modules = {k: None if v is None else with_backend(v, backend) for k, v in module._modules.items()}
    if isinstance(routed, UnpoolConv2d):
        routed.backend = backend
    return routed


def case_inputs(case: Case, device: str, dtype: torch.dtype) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """(module, x [case.shape], grad of the output), channels_last on ``device`` in ``dtype``."""
    module = case.module.to(device=device, dtype=dtype, memory_format=torch.channels_last)  # type: ignore[call-overload]
    x = torch.rand(case.shape, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out_shape = module(x).shape
    grad = torch.randn(out_shape, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    return module, x.requires_grad_(), grad


def row_fields(case: Case, batch: int, dtype: torch.dtype, pass_name: str) -> dict:
    """The fields that name a row of ``case`` (the ops and kernels suites' tensors are channels_last)."""
    dtype_name = str(dtype).removeprefix("torch.")
    return {"case": f"{case.name} b{batch}", "pass": pass_name, "dtype": dtype_name, "layout": "channels_last"}
