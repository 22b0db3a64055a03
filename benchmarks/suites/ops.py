"""Unpool-conv: every paper150 decoder layer and the whole decoder, each backend against the reference.

Rows: forward and forward+backward median times; ``speedup`` is the reference's time over the row's,
measured side by side in the same run.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from benchmarks.harness import peak_memory_mb, time_side_by_side
from dcign_fast.models import DCIGN
from dcign_fast.nn import UnpoolConv2d
from dcign_fast.ops.unpool_conv import IMPLEMENTATIONS


def backends_for(device: str) -> list[str]:
    """Explicit backends worth timing on this device (reference first)."""
    names = ["reference", "torch"]
    if device == "cuda":
        names += [b for b in ("triton", "cuda") if b in IMPLEMENTATIONS]
    return names


def paper150_cases(batch: int) -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    """(name, module, input shape): each decoder layer of the original network, then the whole decoder."""
    decoder = DCIGN.from_preset("paper150").decoder
    sizes = DCIGN.from_preset("paper150").config.decoder_sizes()
    layers = [m for m in decoder if isinstance(m, UnpoolConv2d)]
    cases = [
        (f"paper150 L{i + 1} {m.in_channels}->{m.out_channels} {s}px", m, (batch, m.in_channels, s, s))
        for i, (m, s) in enumerate(zip(layers, sizes))
    ]
    cases.append(("paper150 decoder", decoder, (batch, layers[0].in_channels, sizes[0], sizes[0])))
    return cases


def _set_backend(module: nn.Module, backend: str) -> None:
    for m in module.modules():
        if isinstance(m, UnpoolConv2d):
            m.backend = backend


def _runner(module: nn.Module, backend: str, x: torch.Tensor, grad: torch.Tensor | None) -> Callable[[], None]:
    def run() -> None:
        _set_backend(module, backend)
        if grad is None:
            with torch.no_grad():
                module(x)
            return
        module.zero_grad(set_to_none=True)
        x.grad = None
        module(x).backward(grad)

    return run


def run(device: str, quick: bool) -> list[dict]:
    batches = [4] if quick else ([20] if device == "cpu" else [20, 128])
    dtypes = [torch.float32] if device == "cpu" else [torch.float32, torch.bfloat16]
    repeats, warmup = (2, 1) if quick else (7, 2)
    rows = []
    for batch in batches:
        for dtype in dtypes:
            cases = paper150_cases(batch)
            if quick:
                cases = cases[-1:]
            for name, module, shape in cases:
                module = module.to(device=device, dtype=dtype)
                x = torch.rand(shape, device=device, dtype=dtype, requires_grad=True)
                with torch.no_grad():
                    out_shape = module(x).shape
                grad = torch.randn(out_shape, device=device, dtype=dtype)
                for pass_name, g in (("forward", None), ("forward+backward", grad)):
                    variants = {b: _runner(module, b, x, g) for b in backends_for(device)}
                    times = time_side_by_side(variants, device, warmup=warmup, repeats=repeats)
                    for backend, ms in times.items():
                        rows.append(
                            {
                                "case": f"{name} b{batch}",
                                "pass": pass_name,
                                "dtype": str(dtype).removeprefix("torch."),
                                "backend": backend,
                                "median_ms": ms,
                                "speedup": times["reference"] / ms,
                                "peak_mb": peak_memory_mb(variants[backend], device),
                            }
                        )
    return rows
