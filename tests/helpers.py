"""Helpers shared by the tests: poisoned allocations and error measures."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

# Norm-relative error a correct implementation stays under, per dtype (vs a float64 oracle).
REL_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64; NaN anywhere gives inf."""
    a, e = actual.double(), expected.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - e).norm() / e.norm().clamp_min(1e-30)).item()


@contextlib.contextmanager
def poisoned_allocations() -> Iterator[None]:
    """Makes torch.empty / new_empty / empty_like return NaN-filled floating tensors, so any element an
    implementation forgets to write shows up as NaN."""
    originals = {"empty": torch.empty, "empty_like": torch.empty_like}
    original_new_empty = torch.Tensor.new_empty

    def poison(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(float("nan")) if t.is_floating_point() else t

    torch.empty = lambda *a, **k: poison(originals["empty"](*a, **k))
    torch.empty_like = lambda *a, **k: poison(originals["empty_like"](*a, **k))
    torch.Tensor.new_empty = lambda self, *a, **k: poison(original_new_empty(self, *a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = originals["empty"], originals["empty_like"]
        torch.Tensor.new_empty = original_new_empty


def paper150_decoder_layers() -> list[tuple[int, int, int, int, int]]:
    """(c_in, c_out, input size, kernel, padding) of each unpool-conv layer of the original decoder (square)."""
    from dcign_fast.models import DCIGN
    from dcign_fast.nn import UnpoolConv2d

    model = DCIGN.from_preset("paper150")
    layers = [m for m in model.decoder if isinstance(m, UnpoolConv2d)]
    return [
        (m.in_channels, m.out_channels, size, m.kernel_size[0], m.padding[0])
        for m, size in zip(layers, model.config.decoder_sizes())
    ]
