"""unpool_conv2d: every backend against the float64 reference, gradients, memory and errors."""

from __future__ import annotations

import itertools
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

import dcign_fast as dc
from dcign_fast.kernels.unpool_conv_common import TRITON_INDEX_LIMIT, cudnn_allows_tf32, triton_index_reason
from dcign_fast.ops import unpool_conv
from dcign_fast.ops.reference import unpool_conv2d_reference
from tests.helpers import NEEDS_TRITON, REL_TOL, poisoned_allocations, rel_error, relu_nan_mismatches

CPU_BACKENDS = ["reference", "torch"]


def random_case(rng: random.Random, kernel: int | None = None) -> dict:
    """A fresh random problem: rectangular image, any kernel size and padding that give a non-empty output."""
    k = kernel or rng.randint(1, 9)
    kw = rng.choice([k, rng.randint(1, 9)])
    p = (rng.randint(0, k - 1), rng.randint(0, kw - 1))
    h, w = rng.randint(max(1, (k + 1) // 2), 9), rng.randint(max(1, (kw + 1) // 2), 9)
    return {"n": rng.randint(1, 3), "c": rng.randint(1, 5), "o": rng.randint(1, 6), "k": (k, kw), "p": p, "hw": (h, w)}


def make_tensors(case: dict, dtype: torch.dtype, channels_last: bool, bias: bool = True):
    x = torch.randn(case["n"], case["c"], *case["hw"], dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w = torch.randn(case["o"], case["c"], *case["k"], dtype=dtype)
    b = torch.randn(case["o"], dtype=dtype) if bias else None
    return x, w, b


def oracle(x, w, b, padding, scale=2):
    """The float64 result by a route of its own, not the reference's F.interpolate (the reference backend is
    compared with it too): every pixel repeated scale x scale times by index, then F.conv2d."""
    upsampled = x.double().repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    return F.conv2d(upsampled, w.double(), None if b is None else b.double(), padding=padding)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_matches_reference_on_random_shapes(backend, dtype, channels_last):
    rng = random.Random(f"{backend}{dtype}{channels_last}")
    for kernel in range(1, 10):
        case = random_case(rng, kernel)
        x, w, b = make_tensors(case, dtype, channels_last, bias=rng.random() < 0.7)
        with poisoned_allocations():
            y = dc.unpool_conv2d(x, w, b, padding=case["p"], backend=backend)
        expected = oracle(x, w, b, case["p"])
        assert y.shape == expected.shape and y.dtype == dtype
        assert rel_error(y, expected) < REL_TOL[dtype], case


def test_axis_group_collapse_is_the_0_1_matrix_product_and_expand_its_transpose():
    """Every scale 1-4, kernel 1-9, padding 0..K-1 and input size up to K: a group's collapse gives each of its
    phases' collapsed taps, phase after phase, each summing exactly the original taps that land on it (the 0/1
    matrix R of the phase's tap_offsets, applied without a matmul), and expand is the transpose of the whole
    (the sum over the phases of R^T). Integer values: every sum is exact in any order, so bit for bit."""
    from dcign_fast.ops.phases import axis_groups

    t = torch.randint(-1000, 1000, (3, 9 * 4, 2)).double()
    for scale, k in itertools.product(range(1, 5), range(1, 10)):
        for p, size in itertools.product(range(k), range(1, k + 1)):
            groups = axis_groups(size, k, p, scale) if scale * size + 2 * p >= k else ()
            for group in groups:
                matrices = []
                for phase in group.phases:
                    r = torch.zeros(phase.taps, k, dtype=torch.float64)
                    r[list(phase.tap_offsets), list(range(k))] = 1
                    matrices.append(r)
                stacked = torch.cat(matrices)  # [phases x taps, K]
                taps = t[:, :k]
                assert torch.equal(group.collapse(taps, 1), torch.einsum("mu,aub->amb", stacked, taps)), (scale, k, p)
                collapsed = t[:, : stacked.shape[0]]
                assert torch.equal(group.expand(collapsed, -2), torch.einsum("mu,amb->aub", stacked, collapsed))


@pytest.mark.parametrize("size, kernel, padding, pairs", [(6, 7, 0, [1]), (5, 6, 0, [1] * 4), (5, 3, 1, [1] * 4)])
def test_torch_backend_interleaves_a_tiling_group_in_one_copy(size, kernel, padding, pairs):
    """A group whose phases tile the output (every phase of both axes: K=7 valid) is written through one
    interleaving view; where the phases read different windows (K=6 valid, K=3 same), each is a group of its
    own."""
    from dcign_fast.ops.unpool_conv import _phase_groups, _phase_views, empty_output

    x, w = torch.randn(1, 2, size, size), torch.randn(3, 2, kernel, kernel)
    out = empty_output(x, w, (padding, padding), 2).fill_(float("nan"))
    counted = []
    for rows, cols, pad_r, pad_c in _phase_groups(size, size, kernel, kernel, (padding, padding), 2):
        phases = len(rows.phases) * len(cols.phases)
        conv = torch.randn(1, 3 * phases, size + 2 * pad_r - rows.taps + 1, size + 2 * pad_c - cols.taps + 1)
        views = list(_phase_views(out, conv, rows, cols, pad_r, pad_c))
        for full, phase_conv, _ in views:
            full.copy_(phase_conv)
        counted.append(len(views))
    assert counted == pairs and not out.isnan().any()  # every output pixel written


@pytest.mark.parametrize("channels_last", [False, True])
def test_torch_backend_keeps_memory_format(channels_last):
    x, w, b = make_tensors(
        {"n": 2, "c": 3, "o": 4, "k": (3, 3), "p": (1, 1), "hw": (5, 6)}, torch.float32, channels_last
    )
    y = dc.unpool_conv2d(x, w, b, padding=1, backend="torch")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("scale", [1, 3, 4])
def test_other_integer_scale_factors(scale):
    x, w, b = make_tensors({"n": 2, "c": 3, "o": 2, "k": (5, 4), "p": (2, 1), "hw": (4, 5)}, torch.float64, False)
    y = dc.unpool_conv2d(x, w, b, padding=(2, 1), scale_factor=scale, backend="torch")
    assert rel_error(y, oracle(x, w, b, (2, 1), scale)) < 1e-12


def test_torch_backend_relu_keeps_a_nan_as_f_relu_does():
    assert relu_nan_mismatches("torch", "cpu") == []


def test_non_contiguous_input():
    x = torch.randn(2, 6, 7, 5, dtype=torch.float64)[:, ::2].transpose(2, 3)
    w, b = torch.randn(3, 3, 7, 7, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    assert not x.is_contiguous()
    assert rel_error(dc.unpool_conv2d(x, w, b, backend="torch"), oracle(x, w, b, (0, 0))) < 1e-12


# (scale, kernel, padding, input [N, C, H, W], activation): square kernels and even padding; then rectangular
# kernels, uneven padding and other scales, which the backward once took on trust (a backward grouping phases
# as if the scale were 2, or padding rows and columns alike, passed every other test). Small inputs: gradcheck
# runs one backward per output element.
GRADCHECK_CASES = [
    (2, (k, k), (p, p), (2, 3, 4, 5), None) for k, p in [(7, 0), (3, 1), (5, 2), (4, 1), (2, 0), (1, 0), (6, 5)]
]
GRADCHECK_CASES += [
    (2, (5, 2), (3, 0), (1, 2, 3, 3), "relu"),
    (3, (4, 5), (2, 1), (1, 2, 3, 3), None),
    (1, (3, 1), (0, 0), (1, 2, 3, 3), "relu"),
    (4, (7, 3), (1, 2), (1, 2, 2, 3), None),
]


@pytest.mark.parametrize("scale,k,p,shape,activation", GRADCHECK_CASES)
def test_torch_backend_gradcheck(scale, k, p, shape, activation):
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, shape[1], *k, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    fn = lambda *t: dc.unpool_conv2d(  # noqa: E731
        *t, padding=p, scale_factor=scale, backend="torch", activation=activation
    )
    with poisoned_allocations():  # an element the backward forgets to write is NaN
        assert torch.autograd.gradcheck(fn, (x, w, b))


def test_torch_backend_gradcheck_with_relu():
    """The fused ReLU's mask, applied by the torch backward from the saved output."""
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    y = dc.unpool_conv2d(x, w, b, padding=1, backend="torch", activation="relu")
    assert (y == 0).any() and (y > 0).any()  # the mask matters
    fn = lambda *t: dc.unpool_conv2d(*t, padding=1, backend="torch", activation="relu")  # noqa: E731
    with poisoned_allocations():
        assert torch.autograd.gradcheck(fn, (x, w, b))


@pytest.mark.skipif(not hasattr(torch.backends.cudnn, "conv"), reason="torch without per-operator precision")
def test_tf32_setting_is_read_through_either_torch_api():
    """Setting TF32 per operator makes torch refuse to read allow_tf32; the kernel backends still follow it."""
    saved = torch.backends.cudnn.conv.fp32_precision
    try:
        for precision, tf32 in (("ieee", False), ("tf32", True)):
            torch.backends.cudnn.conv.fp32_precision = precision
            assert cudnn_allows_tf32() is tf32
    finally:
        torch.backends.cudnn.conv.fp32_precision = saved
    assert torch.backends.cudnn.allow_tf32  # readable again


def test_gradients_match_reference_float32():
    x, w, b = make_tensors({"n": 3, "c": 8, "o": 6, "k": (7, 7), "p": (0, 0), "hw": (9, 11)}, torch.float32, False)
    grads = {}
    for backend in CPU_BACKENDS:
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        y = dc.unpool_conv2d(*leaves, backend=backend)
        # Not randn_like: it takes a generator from torch 2.10 on.
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)))
        grads[backend] = [t.grad for t in leaves]
    for got, want in zip(grads["torch"], grads["reference"]):
        assert rel_error(got, want) < 1e-5


def test_torch_backend_never_saves_the_upsampled_tensor():
    """Autograd keeps only low-resolution tensors: nothing saved is as large as the upsampled input."""
    x = torch.randn(2, 16, 12, 12, requires_grad=True)
    w = torch.randn(4, 16, 7, 7, requires_grad=True)
    upsampled_numel = 2 * 16 * 24 * 24
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = dc.unpool_conv2d(x, w, backend="torch")
    y.sum().backward()
    assert saved and max(saved) < upsampled_numel
    # The reference does save it: the check above can fail.
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        dc.unpool_conv2d(x, w, backend="reference")
    assert max(saved) >= upsampled_numel


def test_torch_backend_never_allocates_the_upsampled_tensor():
    """The profiler's memory events, forward and backward: no allocation reaches the upsampled size."""
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(4, 32, 16, 16, requires_grad=True)
    w = torch.randn(1, 32, 3, 3, requires_grad=True)
    upsampled_bytes = 4 * 32 * 32 * 32 * 4

    def largest_allocation(backend: str) -> int:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            dc.unpool_conv2d(x, w, padding=1, backend=backend).sum().backward()
        return max(e.cpu_memory_usage for e in prof.events())

    assert largest_allocation("torch") < upsampled_bytes
    assert largest_allocation("reference") >= upsampled_bytes


def test_auto_uses_torch_on_cpu():
    from dcign_fast.ops.unpool_conv import choose_backend

    assert choose_backend(torch.randn(1, 1, 2, 2), torch.randn(1, 1, 3, 3), 2, (1, 1)) == "torch"


def _valid():
    return torch.randn(2, 3, 5, 5), torch.randn(4, 3, 3, 3), torch.randn(4)


@pytest.mark.parametrize(
    "change, error, words",
    [
        (lambda a: {**a, "backend": "fast"}, ValueError, "backend must be one of"),
        (lambda a: {**a, "x": a["x"][0]}, ValueError, "x must be 4-D"),
        (lambda a: {**a, "x": [1.0]}, TypeError, "x must be a torch.Tensor"),
        (lambda a: {**a, "x": a["x"].long()}, TypeError, "x must be float16"),
        (lambda a: {**a, "weight": torch.randn(4, 2, 3, 3)}, ValueError, "weight.shape[1] (in_channels)"),
        (lambda a: {**a, "weight": torch.randn(4, 3, 3)}, ValueError, "weight must be 4-D"),
        (lambda a: {**a, "weight": a["weight"].double()}, TypeError, "weight must have the dtype of x"),
        (lambda a: {**a, "bias": torch.randn(5)}, ValueError, "bias must have shape [4]"),
        (lambda a: {**a, "bias": a["bias"].half()}, TypeError, "bias must have the dtype of x"),
        (lambda a: {**a, "bias": torch.randn(4, 1)}, ValueError, "bias must be 1-D"),
        (lambda a: {**a, "padding": -1}, ValueError, "padding must be an int >= 0"),
        (lambda a: {**a, "padding": (1, 2, 3)}, ValueError, "padding must be an int >= 0"),
        (lambda a: {**a, "scale_factor": 1.5}, ValueError, "scale_factor must be an int >= 1"),
        (lambda a: {**a, "scale_factor": True}, ValueError, "scale_factor must be an int >= 1"),
        (lambda a: {**a, "weight": torch.randn(4, 3, 12, 3)}, ValueError, "output height would be -1"),
        (lambda a: {**a, "weight": torch.randn(4, 3, 11, 3)}, ValueError, "output height would be 0"),
        # far too large: torch's own size arithmetic would overflow (an error from its C++ internals)
        (lambda a: {**a, "padding": 2**62}, ValueError, "is too large (at most 2147483647)"),
        (lambda a: {**a, "scale_factor": 2**70}, ValueError, "is too large (at most 2147483647)"),
        # each side fits, the whole does not: "Storage size calculation overflowed", a oneDNN "memory descriptor"
        (lambda a: {**a, "padding": 10**9}, ValueError, "would hold more than 2**59 elements"),
        (lambda a: {**a, "weight": torch.randn(0, 3, 3, 3), "bias": None}, ValueError, "at least one output"),
        (lambda a: {**a, "x": a["x"][:, :0], "weight": torch.randn(4, 0, 3, 3)}, ValueError, "one input channel"),
        (lambda a: {**a, "weight": torch.randn(4, 3, 0, 3)}, ValueError, "kernel (KH, KW) must be at least 1 x 1"),
        # padding alone would give an output of bias only: the triton backend's bias gradient was 0 there
        (lambda a: {**a, "x": a["x"][:, :, :0], "padding": 2}, ValueError, "x must have height and width >= 1"),
        (lambda a: {**a, "backend": "cuda"}, ValueError, "backend='cuda' needs CUDA tensors"),
        (lambda a: {**a, "padding": True}, ValueError, "padding must be an int >= 0"),
        (lambda a: {**a, "padding": (1, False)}, ValueError, "padding must be an int >= 0"),
        (lambda a: {**a, "scale_factor": 0}, ValueError, "scale_factor must be an int >= 1"),
        # (the torch backend and the reference apply a ReLU for any activation given)
        (lambda a: {**a, "activation": "gelu", "backend": "torch"}, ValueError, "activation must be one of"),
        (lambda a: {**a, "activation": "gelu", "backend": "reference"}, ValueError, "activation must be one of"),
    ],
)
def test_bad_input_names_the_argument(change, error, words):
    x, w, b = _valid()
    args = change({"x": x, "weight": w, "bias": b, "padding": 0, "scale_factor": 2, "backend": "auto"})
    with pytest.raises(error) as info:
        dc.unpool_conv2d(args.pop("x"), args.pop("weight"), args.pop("bias"), **args)
    assert words in str(info.value)


def test_numpy_integers_are_integers():
    x, w, b = _valid()
    expected = dc.unpool_conv2d(x, w, b, padding=(1, 2), scale_factor=3, backend="torch")
    got = dc.unpool_conv2d(x, w, b, padding=(np.int64(1), np.int32(2)), scale_factor=np.int64(3), backend="torch")
    assert torch.equal(got, expected)
    layer = dc.nn.UnpoolConv2d(np.int64(3), np.int64(2), np.int64(3), padding=np.int16(1))
    assert layer.kernel_size == (3, 3) and layer.padding == (1, 1) and type(layer.padding[0]) is int
    with pytest.raises(ValueError, match="padding must be an int >= 0"):
        dc.unpool_conv2d(x, w, b, padding=np.float64(1.0), backend="torch")
    with pytest.raises(ValueError, match="scale_factor must be an int >= 1"):
        dc.unpool_conv2d(x, w, b, scale_factor=np.bool_(True), backend="torch")


@pytest.mark.parametrize(
    "activation,scale,k,p", [(None, 2, (3, 3), (1, 1)), ("relu", 2, (3, 3), (1, 1)), ("relu", 3, (4, 3), (2, 0))]
)
def test_torch_backend_gradgradcheck(activation, scale, k, p):
    """Double backward (gradient penalties): the backward op's own backward, built from the same ops."""
    x = torch.randn(2, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, *k, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    fn = lambda *t: dc.unpool_conv2d(  # noqa: E731
        *t, padding=p, scale_factor=scale, backend="torch", activation=activation
    )
    with poisoned_allocations():
        assert torch.autograd.gradgradcheck(fn, (x, w, b))


def test_forward_mode_ad_is_refused_not_zero():
    """PyTorch gives a custom op without a forward-mode formula zero tangents; the reference has real ones."""
    x, w, b = _valid()
    fn = lambda backend: lambda w: dc.unpool_conv2d(x, w, b, padding=1, backend=backend)  # noqa: E731
    with pytest.raises(NotImplementedError, match=r"no forward-mode AD .* or backend='reference'"):
        torch.func.jvp(fn("torch"), (w,), (torch.randn_like(w),))
    with pytest.raises(NotImplementedError, match="no forward-mode AD"):  # jacfwd of jacrev
        torch.func.hessian(lambda w: fn("torch")(w).sum())(w)
    with torch.autograd.forward_ad.dual_level(), pytest.raises(NotImplementedError, match="no forward-mode AD"):
        dc.unpool_conv2d(torch.autograd.forward_ad.make_dual(x, torch.randn_like(x)), w, b, backend="torch")
    _, tangent = torch.func.jvp(fn("reference"), (w,), (torch.randn_like(w),))
    assert tangent.abs().max() > 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_autocast_casts_as_it_casts_conv2d(backend):
    """Autocast casts float32 and float16 inputs to its dtype and leaves float64 alone, as for F.conv2d: the same
    output dtype, values and gradients (each in its input's dtype) as autocast's F.conv2d after upsampling."""
    for dtype in (torch.float32, torch.float16, torch.float64):
        inputs = [torch.randn(shape, dtype=dtype, requires_grad=True) for shape in ((2, 3, 5, 4), (4, 3, 3, 3), (4,))]
        results = []
        for fn in (
            lambda x, w, b: F.conv2d(F.interpolate(x, scale_factor=2), w, b, padding=1),
            lambda x, w, b: dc.unpool_conv2d(x, w, b, padding=1, backend=backend),
        ):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = fn(*inputs)
            grads = torch.autograd.grad(out, inputs, torch.randn(out.shape, generator=torch.Generator().manual_seed(0)))
            results.append((out, grads))
        (expected, expected_grads), (out, grads) = results
        assert out.dtype == expected.dtype == (torch.float64 if dtype == torch.float64 else torch.bfloat16), dtype
        assert rel_error(out, expected) < REL_TOL[out.dtype], dtype
        for grad, expected_grad, t in zip(grads, expected_grads, inputs):
            assert grad.dtype == t.dtype and rel_error(grad, expected_grad) < 2 * REL_TOL[out.dtype], dtype


@pytest.mark.filterwarnings("ignore:.*batching rule")
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_vmap_matches_a_loop(backend):
    x, w, b = torch.randn(3, 2, 4, 5, 6), torch.randn(3, 4, 3, 3), torch.randn(3)

    def layer(x: torch.Tensor) -> torch.Tensor:
        return dc.unpool_conv2d(x, w, b, padding=1, activation="relu", backend=backend)

    torch.testing.assert_close(torch.func.vmap(layer)(x), torch.stack([layer(xi) for xi in x]), rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:.*batching rule")
@pytest.mark.parametrize("activation", [None, "relu"])
def test_torch_func_transforms_match_the_reference(activation):
    """grad, jacrev, jacrev of jacrev (double backward) and per-sample gradients (vmap of grad), which PyTorch
    refuses for a custom op's own autograd, run through the ops' autograd.Functions."""
    x, w, b = (
        torch.randn(3, 2, 4, 5, dtype=torch.float64),
        torch.randn(4, 2, 3, 3, dtype=torch.float64),
        torch.randn(4, dtype=torch.float64),
    )

    def loss(backend: str):
        def fn(x, w, b):
            return dc.unpool_conv2d(x, w, b, padding=1, activation=activation, backend=backend).sin().sum()

        return fn

    def layer(backend: str):
        return lambda w: dc.unpool_conv2d(x, w, b, padding=1, activation=activation, backend=backend)

    def results(backend: str) -> list[torch.Tensor]:
        per_sample = torch.func.vmap(torch.func.grad(loss(backend), argnums=(1, 2)), in_dims=(0, None, None))
        return [
            *torch.func.grad(loss(backend), argnums=(0, 1, 2))(x, w, b),
            torch.func.jacrev(layer(backend))(w),
            torch.func.jacrev(torch.func.jacrev(lambda b: loss(backend)(x, w, b)))(b),
            *per_sample(x[:, None], w, b),
        ]

    got, want = results("torch"), results("reference")
    assert len(got) == len(want) == 7
    for g, r in zip(got, want):
        assert g.abs().max() > 0
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape", [(2, 8, 1, 1), (2, 1, 5, 5)])
def test_input_contiguous_in_both_layouts_gives_a_contiguous_output(shape):
    """[N, C, 1, 1] and one-channel inputs are both NCHW- and channels_last-contiguous: F.conv2d returns
    NCHW then, and so must every backend (a caller's .view() depends on it)."""
    x, w = torch.randn(shape), torch.randn(4, shape[1], 3, 3)
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert dc.unpool_conv2d(x, w, padding=1, backend="torch").is_contiguous()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_torch_backend_in_half_precision_matches_the_oracle(dtype):
    """The collapsed kernels are summed in float32 and rounded once; forward and gradients in 16-bit."""
    from dcign_fast.ops.phases import axis_groups
    from dcign_fast.ops.unpool_conv import _group_kernel

    w = torch.randn(8, 8, 9, 9).to(dtype)
    for rows in axis_groups(9, 9, 4, 2):
        for cols in axis_groups(9, 9, 4, 2):
            assert torch.equal(_group_kernel(w, rows, cols), _group_kernel(w.double(), rows, cols).to(dtype))
    x, w, b = torch.randn(2, 16, 6, 6), torch.randn(8, 16, 7, 7) / 28, torch.randn(8)
    leaves = [t.to(dtype).requires_grad_() for t in (x, w, b)]
    with poisoned_allocations():
        y = dc.unpool_conv2d(*leaves, backend="torch")
        grad = torch.randn_like(y)
        got = [y, *torch.autograd.grad(y, leaves, grad)]
    exact = [t.detach().double().requires_grad_() for t in leaves]
    ref = unpool_conv2d_reference(*exact, (0, 0))
    for g, e in zip(got, [ref, *torch.autograd.grad(ref, exact, grad.double())]):
        assert g.dtype == dtype and rel_error(g, e) < REL_TOL[dtype]


def test_meta_tensors_give_shapes():
    x, w = torch.empty(2, 3, 5, 5, device="meta"), torch.empty(4, 3, 3, 3, device="meta")
    assert dc.unpool_conv2d(x, w, padding=1).shape == (2, 4, 10, 10)


def test_device_mismatch_is_an_error():
    x, w, b = _valid()
    with pytest.raises(ValueError, match="weight must be on the device of x"):
        dc.unpool_conv2d(x, w.to("meta"), b)


@NEEDS_TRITON  # (without triton, backend="triton" is refused for that first)
def test_triton_backend_on_cpu_without_interpreter_is_an_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, w, b = _valid()
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        dc.unpool_conv2d(x, w, b, backend="triton")


def test_a_triton_older_than_the_kernels_support_is_refused_by_name(monkeypatch):
    """Triton before 3.4 draws other noise past offset 2**31: auto must not pick it, and naming it is an error."""
    from dcign_fast.ops import backends

    monkeypatch.setattr(backends, "_TRITON_REASON", backends.triton_version_reason("3.0.0"))
    x, w, b = _valid()
    with pytest.raises(ValueError, match=r"backend='triton' needs triton>=3.4, found 3.0.0"):
        dc.unpool_conv2d(x, w, b, backend="triton")
    assert not backends.triton_available()  # what auto asks before it picks triton for CUDA tensors


@pytest.mark.parametrize(
    "version, usable",
    [("3.4.0", True), ("3.10.1", True), ("3.5.0+git9f3e0b1", True), ("3.3.1", False), ("2.3.0", False), (None, False)],
)
def test_triton_versions_are_read_as_numbers(version, usable):
    from dcign_fast.ops.backends import triton_version_reason

    assert (triton_version_reason(version) == "") == usable


@NEEDS_TRITON  # (not importorskip: that skips a missing triton, not one whose import fails)
def test_the_triton_version_is_that_of_the_package_import_would_load_read_without_importing_it(tmp_path):
    """Importing triton (or torch._dynamo) at import made `import dcign_fast` seconds slower; the version comes
    from the package on the path, which need not be the one an installed distribution describes."""
    probe = (
        "import sys, dcign_fast; from dcign_fast.ops.backends import triton_unavailable_reason as r; "
        "print(sorted({'triton', 'torch._dynamo'} & set(sys.modules)), repr(r()))"
    )

    def run(path: list[str]) -> str:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([*path, *sys.path])}
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    assert run([]) == "[] ''"
    (tmp_path / "triton").mkdir()
    (tmp_path / "triton" / "__init__.py").write_text('__version__ = "3.0.0"\n')
    assert run([str(tmp_path)]) == "[] \"needs triton>=3.4, found 3.0.0 (pip install 'triton>=3.4')\""
    (tmp_path / "triton" / "__init__.py").write_text("raise ImportError('broken')\n")  # no version line: imported
    assert "needs a working 'triton' package: importing it failed (ImportError: broken)" in run([str(tmp_path)])


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_cuda_matches_reference(backend):
    """paper150's first decoder layer on the GPU (auto: triton where it is installed), ReLU fused: the output
    and all three gradients against the float64 oracle, computed into poisoned allocations, TF32 off."""
    from tests.cuda_checks import check_unpool_conv

    check_unpool_conv(4, 24, 48, (15, 15), (7, 7), (0, 0), torch.float32, "cuda", activation="relu", backend=backend)


def test_a_view_spreading_one_image_past_int32_offsets_is_copied_for_the_kernels():
    from dcign_fast.kernels.unpool_conv_common import TRITON_INDEX_LIMIT, image_span, nhwc

    wide = torch.empty(0, device="meta").as_strided((2, 4, 3, 3), (4, 1, 2**30, 8))  # channels contiguous
    assert image_span(wide) > TRITON_INDEX_LIMIT
    copied = nhwc(wide)
    assert copied.stride(1) == 1 and image_span(copied) == 4 * 3 * 3 - 1
    narrow = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    assert nhwc(narrow) is narrow


def test_padding_is_checked_axis_by_axis():
    """An asymmetric padding: the output height depends on the row padding alone."""
    x, w = torch.randn(1, 1, 5, 5), torch.randn(1, 1, 12, 3)
    assert dc.unpool_conv2d(x, w, padding=(1, 0), backend="torch").shape == (1, 1, 1, 8)
    with pytest.raises(ValueError, match="output height would be -1"):
        dc.unpool_conv2d(x, w, padding=(0, 1), backend="torch")


def _fake_cuda(*shapes: tuple[int, ...]) -> tuple[FakeTensorMode, list[torch.Tensor]]:
    """CUDA tensors without a GPU (shapes, dtypes and devices only): all that choose_backend reads."""
    mode = FakeTensorMode()
    with mode:
        return mode, [torch.empty(s, device="cuda") for s in shapes]


def test_auto_runs_torch_on_devices_other_than_cuda(monkeypatch):
    monkeypatch.setattr(unpool_conv, "triton_available", lambda: True)
    x, w = torch.empty(1, 1, 2, 2, device="meta"), torch.empty(1, 1, 3, 3, device="meta")
    assert unpool_conv.choose_backend(x, w, 2, (1, 1)) == "torch"


def test_auto_on_cuda_picks_triton_where_it_is_installed_and_supports_the_case(monkeypatch):
    shapes = (1, 4, 5, 5), (4, 4, 7, 7), (2**17, 1, 128, 128), (2**10, 1, 128, 128), (1, 1, 3, 3)
    mode, (x, w, huge, large, w1) = _fake_cuda(*shapes)
    monkeypatch.setattr(unpool_conv, "triton_available", lambda: True)
    with mode:
        assert unpool_conv.choose_backend(x, w, 2, (0, 0)) == "triton"
        assert unpool_conv.choose_backend(x, w, 3, (0, 0)) == "torch"  # the kernels upsample by 2 only
        assert unpool_conv.choose_backend(huge, w1, 2, (1, 1)) == "torch"  # past the kernels' int32 indices
        assert unpool_conv.choose_backend(large, w1, 2, (1, 1)) == "triton"
    monkeypatch.setattr(unpool_conv, "triton_available", lambda: False)
    with mode:
        assert unpool_conv.choose_backend(x, w, 2, (0, 0)) == "torch"


def test_the_triton_index_limit_counts_every_int32_product():
    """Shapes only (meta tensors): each product the Triton kernels form in int32 is bounded, at most the limit."""

    def reason(x_shape, w_shape, padding):
        return triton_index_reason(torch.empty(x_shape, device="meta"), torch.empty(w_shape, device="meta"), padding)

    assert reason((TRITON_INDEX_LIMIT, 1, 1, 1), (1, 1, 2, 2), (0, 0)) == ""  # every count exactly at the limit
    # an odd output height (3): phase 0 has 2 rows, not 3 // 2
    assert "output positions per phase" in reason((TRITON_INDEX_LIMIT, 1, 1, 1), (1, 1, 2, 2), (1, 1))
    assert "elements of one input image" in reason((1, 2**16, 2**8, 2**8), (1, 2**16, 1, 1), (0, 0))
    assert "elements of one output image" in reason((1, 1, 2**14, 2**14), (2, 1, 1, 1), (0, 0))
    # padded rows only: the output height is 2H + 2 * padding[0]
    assert "elements of one output image" in reason((1, 1, 2**13, 2**13), (7, 1, 1, 1), (2**12, 0))
