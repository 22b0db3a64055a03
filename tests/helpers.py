"""Helpers shared by the tests: poisoned allocations and error measures."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator

import pytest
import torch

from dcign_fast.ops.backends import triton_available, triton_unavailable_reason

# Tests that need triton, an optional dependency (tests/conftest.py skips cases parametrised with it alone).
NEEDS_TRITON = pytest.mark.skipif(not triton_available(), reason=triton_unavailable_reason())

# Norm-relative error a correct implementation stays under, per dtype (vs a float64 oracle).
REL_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


# Philox words at the ends of the uint32 range: a uniform of 0 (log(0) = -inf unless clamped) and closest to 1.
EXTREME_WORDS = (0, 1, 2**31 - 1, 2**31, 2**32 - 2, 2**32 - 1)


def assert_trained_alike(weights: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Both are demo64 state dicts trained from seed 0's initial weights: every tensor of ``expected`` moved,
    and ``weights`` lie within 1e-3 of that move of it (the same training, up to rounding)."""
    from dcign_fast.models import DCIGN

    torch.manual_seed(0)
    initial = DCIGN.from_preset("demo64").state_dict()
    assert weights.keys() == expected.keys()
    for name in expected:
        moved = (expected[name] - initial[name]).norm()
        assert moved > 0, name
        assert (weights[name] - expected[name]).norm() < 1e-3 * moved, name


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64; NaN anywhere gives inf."""
    a, e = actual.double(), expected.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - e).norm() / e.norm().clamp_min(1e-30)).item()


def off_the_relu_kink(grad: torch.Tensor, pre_activation: torch.Tensor, rel_tol: float) -> torch.Tensor:
    """``grad`` with zeros where the exact ``pre_activation`` lies within ``rel_tol`` x its largest magnitude of 0.

    A kernel's rounding (TF32, 16-bit) may put such an output on the other side of the ReLU than the float64
    oracle does, which flips that element's whole gradient: on a small output one flip outweighs the tolerance
    (a 2 x 2 TF32 layer's gradients once differed by 15% through a single element). Everywhere else the
    kernel's own mask is still compared with the oracle's. A NaN element is never near."""
    near = pre_activation.abs() <= rel_tol * pre_activation.abs().nan_to_num().max()
    return grad.masked_fill(near.to(grad.device), 0)


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


def unpool_conv_against_oracle(
    backend: str, leaves: list[torch.Tensor], padding: tuple[int, int], activation: str | None, rel_tol: float,
    contiguous_grad: bool = False,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:  # fmt: skip
    """([output, *gradients of ``leaves``] of ``backend`` computed into poisoned allocations, the same from the
    float64 reference) for one random grad_out, laid out like the output or, with ``contiguous_grad``, NCHW
    (a channels_last output's backward then re-lays it). ``leaves``: x, weight and, optionally, bias, requiring
    grad. With the ReLU, grad_out is zero where the exact pre-activation lies within ``rel_tol`` of the kink."""
    import torch.nn.functional as F

    import dcign_fast as dc
    from dcign_fast.ops.reference import unpool_conv2d_reference

    exact = [t.detach().double().requires_grad_() for t in leaves]
    x, weight, *bias = exact
    pre_activation = unpool_conv2d_reference(x, weight, bias[0] if bias else None, padding)
    with poisoned_allocations():
        y = dc.unpool_conv2d(*leaves, padding=padding, backend=backend, activation=activation)
        grad = torch.randn(y.shape, dtype=y.dtype, device=y.device) if contiguous_grad else torch.randn_like(y)
        if activation == "relu":
            grad = off_the_relu_kink(grad, pre_activation.detach(), rel_tol)
        got = [y, *torch.autograd.grad(y, leaves, grad)]
    expected = F.relu(pre_activation) if activation == "relu" else pre_activation
    return got, [expected, *torch.autograd.grad(expected, exact, grad.double())]


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


@contextlib.contextmanager
def cudnn_tf32(enabled: bool) -> Iterator[None]:
    """torch.backends.cudnn.allow_tf32 (which the triton and cuda backends follow, like cuDNN) set for the block
    only."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = saved


def gradient_penalty_error(backend: str, device: str) -> float:
    """Largest relative error, against the float64 reference, of the parameter gradients of a gradient penalty
    taken through unpool_conv2d with a fused ReLU: what its double backward computes. With TF32 off: a TF32
    rounding that moved one output across the ReLU's kink would flip that element's whole gradient."""
    import dcign_fast as dc
    from dcign_fast.ops.reference import unpool_conv2d_reference

    def penalty_gradients(fn, leaves: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        y = fn(*leaves)
        # grad_out (cos y) depends on the leaves too: the double backward's grad_out term is exercised as well.
        (grad_x,) = torch.autograd.grad((y * y.cos()).sum(), leaves[0], create_graph=True)
        return torch.autograd.grad(grad_x.square().sum(), leaves)

    leaves = [torch.randn(shape, device=device, requires_grad=True) for shape in ((2, 5, 4, 3), (6, 5, 5, 5), (6,))]
    with cudnn_tf32(False):
        got = penalty_gradients(lambda *t: dc.unpool_conv2d(*t, padding=2, backend=backend, activation="relu"), leaves)
    exact = [t.detach().double().requires_grad_() for t in leaves]
    want = penalty_gradients(lambda *t: unpool_conv2d_reference(*t, (2, 2)).relu(), exact)
    return max(rel_error(g, w) for g, w in zip(got, want))


def check_empty_batch(backend: str, device: str) -> None:
    """A batch of 0 images through a kernel backend: an empty output, and zero weight and bias gradients from
    both grad-weight kernels (many and few output channels)."""
    import dcign_fast as dc

    for c_out in (2, 20):
        leaves = [
            torch.randn(0, 3, 4, 4, device=device, requires_grad=True),
            torch.randn(c_out, 3, 3, 3, device=device, requires_grad=True),
            torch.randn(c_out, device=device, requires_grad=True),
        ]
        y = dc.unpool_conv2d(*leaves, padding=1, backend=backend)
        grads = torch.autograd.grad(y, leaves, torch.randn_like(y))
        assert y.shape == (0, c_out, 8, 8) and all(g.shape == t.shape and (g == 0).all() for g, t in zip(grads, leaves))


def relu_nan_mismatches(backend: str, device: str) -> list[str]:
    """How a NaN in x reaches the outputs of ``backend``'s fused ReLU otherwise than through F.relu after the
    float64 reference: in the forward (torch.relu keeps a NaN, where max(v, 0) would drop it) and in each
    gradient (the ReLU's backward zeroes grad_out where the output is <= 0, so a NaN output passes its own on).
    Empty when they agree: NaN in the same places, and the other values close."""
    import dcign_fast as dc
    from dcign_fast.kernels.unpool_conv_common import uses_tf32
    from dcign_fast.ops.reference import unpool_conv2d_reference

    x, weight, bias = (torch.randn(shape, device=device) for shape in ((2, 3, 5, 4), (4, 3, 3, 3), (4,)))
    x[1, 2, 3, 1] = float("nan")
    exact = [t.double().requires_grad_() for t in (x, weight, bias)]
    pre_activation = unpool_conv2d_reference(*exact, (1, 1))
    grad_out = off_the_relu_kink(torch.randn(pre_activation.shape, device=device), pre_activation.detach(), 1e-2)
    expected = pre_activation.relu()
    want = [expected, *torch.autograd.grad(expected, exact, grad_out.double())]
    leaves = [t.requires_grad_() for t in (x, weight, bias)]
    y = dc.unpool_conv2d(*leaves, padding=1, activation="relu", backend=backend)
    got = [y, *torch.autograd.grad(y, leaves, grad_out)]
    # The kernel backends multiply float32 in TF32 where cuDNN may (the CUDA emulation too), on GPUs the torch
    # backend through cuDNN: TF32 keeps float16's mantissa.
    tf32 = (device == "cuda" or backend == "cuda") and uses_tf32(torch.float32)
    tolerance = 2 * REL_TOL[torch.float16 if tf32 else torch.float32]
    mismatches = []
    for name, g, w in zip(("output", "grad x", "grad weight", "grad bias"), got, want):
        error = rel_error(g.nan_to_num(), w.nan_to_num())
        if not torch.equal(g.isnan(), w.isnan()):
            mismatches.append(f"{name}: {g.isnan().sum()} NaN, the reference {w.isnan().sum()}")
        elif error > tolerance:
            mismatches.append(f"{name}: relative error {error:.2g}")
    return mismatches


def layout_mismatches(backend: str, device: str) -> list[str]:
    """Where the custom ops' real outputs have other strides or dtypes than their fake kernels promise
    torch.compile (which asserts the strides; a dtype that differs would reach the optimizer): unpool-conv
    over every combination of NCHW and channels_last x and weight, and in bfloat16 with many and with few
    output channels (the two grad-weight kernels), the latent sampler over row-major, column-major and sliced
    mu and logvar in float32 and bfloat16; empty when they all agree."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    def compare(ops_of: Callable[..., tuple], inputs: tuple, names: tuple[str, ...], layout: str) -> None:
        real = ops_of(*inputs)
        with FakeTensorMode() as mode:
            fake = ops_of(*(mode.from_tensor(t) for t in inputs))
        for name, r, f in zip(names, real, fake):
            if r.stride() != f.stride():
                found.append(f"{layout}: {name} strides {r.stride()}, promised {f.stride()}")
            if r.dtype != f.dtype:
                found.append(f"{layout}: {name} dtype {r.dtype}, promised {f.dtype}")

    ops = torch.ops.dcign_fast
    found: list[str] = []
    formats = (torch.contiguous_format, torch.channels_last)
    unpool_cases = [(*pair, torch.float32, 8) for pair in itertools.product(formats, repeat=2)]
    unpool_cases += [(torch.channels_last, torch.contiguous_format, torch.bfloat16, c_out) for c_out in (8, 2)]
    for x_format, w_format, dtype, c_out in unpool_cases:
        x = torch.randn(2, 16, 5, 6, device=device, dtype=dtype).contiguous(memory_format=x_format)
        w = torch.randn(c_out, 16, 3, 3, device=device, dtype=dtype).contiguous(memory_format=w_format)
        b = torch.randn(c_out, device=device, dtype=dtype)

        def forward_and_backward(x, w, b):
            y = ops.unpool_conv2d(x, w, b, 1, 1, 2, "relu", backend)
            return (y, *ops.unpool_conv2d_backward(torch.ones_like(y), x, w, y, True, 1, 1, 2, "relu", backend))

        names = ("out", "grad_x", "grad_weight", "grad_bias")
        compare(forward_and_backward, (x, w, b), names, f"{dtype} x {x_format}, weight {w_format}, {c_out} outputs")

    def sample_and_backward(mu, logvar, active):
        z, kl, rng = ops.sample_latents(mu, logvar, active, False, 0.5, 3, backend)
        return z, kl, *ops.sample_latents_backward(mu, logvar, active, 0.5, 3, rng, z, kl, backend)

    active = torch.rand(7, device=device) < 0.5
    for dtype in (torch.float32, torch.bfloat16):
        row_major = torch.randn(6, 14, device=device, dtype=dtype)
        column_major = torch.randn(14, 6, device=device, dtype=dtype).t()
        for layout, mu, logvar in (
            ("row-major", row_major[:, :7].contiguous(), row_major[:, 7:].contiguous()),
            ("slices of one row-major tensor", row_major[:, :7], row_major[:, 7:]),
            ("column-major", column_major[:, :7], column_major[:, 7:]),
            ("column-major mu, row-major logvar", column_major[:, :7], row_major[:, 7:]),
        ):
            names = ("z", "kl", "grad_mu", "grad_logvar")
            compare(sample_and_backward, (mu, logvar, active), names, f"{dtype} {layout}")
    return found


def seed_offset_mismatches(backend: str, device: str) -> list[str]:
    """Outputs of a backend's sampler kernels at a nonzero offset (seed=None draws one; explicit seeds use 0)
    that differ from the reference's at the same (seed, offset), or, bit for bit, between (seed, offset) given
    as ints and as 0-d int64 tensors holding them (what a CUDA graph captured with seed=None passes): empty
    when none. The seed has its top bit set and the counters cross a multiple of 2**32."""
    from dcign_fast.ops.latent_sampler import KERNELS, as_int64
    from dcign_fast.ops.reference import sample_latents_reference

    kernels = KERNELS[backend]()
    seed, offset = 2**64 - 12345, 2**32 - 100
    rng = torch.tensor([as_int64(seed), offset], device=device)
    mu, logvar = torch.randn(37, 21, device=device), 0.5 * torch.randn(37, 21, device=device)
    active = torch.rand(21, device=device) < 0.5
    grad_z, grad_kl = torch.randn_like(mu), torch.randn(37, device=device)
    results = []
    for stream in ((seed, offset), (rng[0], rng[1])):  # by value the kernels take the uint64
        with poisoned_allocations():
            z, kl = kernels.forward(mu, logvar, active, False, *stream)
            grads = kernels.backward(mu, logvar, active, 0.3, *stream, grad_z, grad_kl)
        results.append((z, kl, *grads))
    leaves = [t.clone().requires_grad_() for t in (mu, logvar)]
    reference = sample_latents_reference(*leaves, active, "mean", 0.3, seed, offset)
    reference = (*reference, *torch.autograd.grad(reference, leaves, (grad_z, grad_kl)))
    names = ("z", "kl", "grad_mu", "grad_logvar")
    found = [f"{name}: by value != in memory" for name, a, b in zip(names, *results) if not torch.equal(a, b)]
    found += [
        f"{name}: != reference"
        for name, got, want in zip(names, results[0], reference)
        if not torch.allclose(got, want.detach(), rtol=1e-5, atol=1e-4)
    ]
    return found


def seed_none_backward_error(backend: str, device: str) -> float:
    """How far a seed=None sample's gradient d sum(z) / d logvar lies from (z - mu) / 2 computed with the
    forward's own z: 0 (to rounding) when the backward regenerates the noise at the drawn (seed, offset)."""
    from dcign_fast.ops.latent_sampler import sample_latents

    mu, logvar = torch.randn(13, 9, device=device), 0.5 * torch.randn(13, 9, device=device)
    leaf = logvar.clone().requires_grad_()
    z, _ = sample_latents(mu, leaf, backend=backend)
    (grad_logvar,) = torch.autograd.grad(z.sum(), leaf)
    return float((grad_logvar - 0.5 * (z.detach() - mu)).abs().max())
