"""backend="triton" for unpool_conv2d: forward and all gradients against the float64 reference.

Without a GPU these run in Triton's interpreter (conftest.py sets TRITON_INTERPRET=1), so shapes are small.
Every result is computed into poisoned (NaN-filled) allocations, so an element a kernel forgets is NaN.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dcign_fast as dc
from dcign_fast.nn import UnpoolConv2d
from dcign_fast.ops.backends import triton_available
from dcign_fast.ops.reference import unpool_conv2d_reference
from tests.helpers import (
    NEEDS_TRITON,
    REL_TOL,
    check_empty_batch,
    gradient_penalty_error,
    paper150_decoder_layers,
    poisoned_allocations,
    rel_error,
    relu_nan_mismatches,
    unpool_conv_against_oracle,
)

pytestmark = NEEDS_TRITON
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# On a GPU float32 dots run in TF32, like cuDNN's convolutions by default.
TOL = {**REL_TOL, torch.float32: 1e-5 if DEVICE == "cpu" else 2e-3}


def run_both(case: dict, dtype: torch.dtype, channels_last: bool = False, bias: bool = True, activation=None):
    """Triton forward + backward (into poisoned allocations) and the float64 oracle's; returns pairs."""
    n, c, o, (h, w), (kh, kw), padding = case["n"], case["c"], case["o"], case["hw"], case["k"], case["p"]
    x = torch.randn(n, c, h, w, device=DEVICE, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    weight = torch.randn(o, c, kh, kw, device=DEVICE, dtype=dtype) / (c * kh * kw) ** 0.5
    params = (x, weight, torch.randn(o, device=DEVICE, dtype=dtype)) if bias else (x, weight)
    leaves = [t.detach().clone().requires_grad_() for t in params]
    return unpool_conv_against_oracle("triton", leaves, padding, activation, TOL[dtype])


def assert_close(got: list[torch.Tensor], want: list[torch.Tensor], tol: float, what: object) -> None:
    names = ["output", "grad x", "grad weight", "grad bias"]
    for name, g, w in zip(names, got, want):
        assert g.shape == w.shape, (name, what)
        err = rel_error(g, w)
        assert err < tol, f"{name}: relative error {err:.3g} >= {tol} for {what}"


CASES = [
    # (kernel, padding, input size, batch): the DC-IGN decoder's K=7 valid, K=3/K=5 same, even and 1x1
    # kernels, paddings up to K - 1, odd and rectangular sizes, batch 1.
    ((7, 7), (0, 0), (5, 6), 2),
    ((3, 3), (1, 1), (5, 7), 1),
    ((5, 5), (2, 2), (4, 5), 2),
    ((4, 2), (3, 0), (3, 4), 1),
    ((1, 1), (0, 0), (3, 5), 2),
    ((9, 3), (4, 2), (6, 3), 1),
    ((2, 6), (1, 5), (2, 3), 3),
]


@pytest.mark.parametrize("kernel, padding, hw, n", CASES)
def test_forward_and_gradients_match_reference(kernel, padding, hw, n):
    rng = random.Random(f"{kernel}{padding}{hw}")
    case = {"n": n, "c": rng.randint(3, 20), "o": rng.randint(1, 20), "hw": hw, "k": kernel, "p": padding}
    got, want = run_both(case, torch.float32, channels_last=rng.random() < 0.5, bias=rng.random() < 0.7)
    assert_close(got, want, TOL[torch.float32], case)


@pytest.mark.parametrize("o", [1, 3, 4, 5, 16, 17])
@pytest.mark.parametrize("kernel, padding", [((7, 7), (0, 0)), ((3, 3), (1, 1))])
def test_few_output_channels_on_both_sides_of_the_switches(kernel, padding, o):
    """An image layer's few output channels switch the kernels' GEMM shapes: up to 4 (with a window shared
    by the phases, as K=7 valid has and K=3 same has not) the forward puts the four phases side by side in
    one dot; up to FEW_OUTPUTS the backward flattens (tap, channel) pairs into one GEMM dimension."""
    from dcign_fast.kernels.unpool_conv_common import FEW_OUTPUTS

    assert FEW_OUTPUTS == 16  # the cases straddle the switches
    case = {"n": 2, "c": 6, "o": o, "hw": (5, 4), "k": kernel, "p": padding}
    got, want = run_both(case, torch.float32, channels_last=o % 2 == 1, activation="relu")
    assert_close(got, want, TOL[torch.float32], case)


def _kernel_options() -> list[tuple[object, tuple[str, ...], list[tuple[int, ...]]]]:
    """(kernel, its block names, its autotune options) of each unpool-conv GEMM kernel."""
    from dcign_fast.kernels.triton import unpool_conv_forward, unpool_conv_grad_input, unpool_conv_grad_weight
    from dcign_fast.kernels.triton.unpool_conv_tiles import GEMM_BLOCKS

    grad_weight = (unpool_conv_grad_weight.GRAD_WEIGHT_BLOCKS, unpool_conv_grad_weight.GRAD_WEIGHT_OPTIONS)
    return [
        (unpool_conv_forward._forward_kernel, GEMM_BLOCKS, unpool_conv_forward.FORWARD_OPTIONS),
        (unpool_conv_grad_input._grad_input_kernel, GEMM_BLOCKS, unpool_conv_grad_input.GRAD_INPUT_OPTIONS),
        (unpool_conv_grad_weight._grad_weight_kernel, *grad_weight),
        (unpool_conv_grad_weight._grad_weight_few_outputs_kernel, *grad_weight),
    ]


# Counting the options imports the kernels, which import triton: without it one case stands in (pytestmark skips it).
MOST_OPTIONS = max(len(options) for _, _, options in _kernel_options()) if triton_available() else 1


@pytest.mark.parametrize("option", range(MOST_OPTIONS))
def test_every_gpu_config_matches_reference(option, monkeypatch):
    """The interpreter runs one config per kernel, a GPU autotunes over all of them: each config's block sizes
    are forced here in turn (the interpreter ignores warps and stages), on both sides of the few-outputs
    switches, with several channel and pixel blocks."""
    from dcign_fast.kernels.triton.unpool_conv_tiles import config

    # Option ``option`` of each kernel, wrapping around its list.
    forcing = [(kernel, config(blocks, opts[option % len(opts)])) for kernel, blocks, opts in _kernel_options()]
    for kernel, forced in forcing:
        monkeypatch.setattr(kernel, "configs", [forced])
        monkeypatch.setattr(kernel, "cache", {})
        monkeypatch.setattr(kernel, "best_config", None, raising=False)
    for case in (
        {"n": 3, "c": 40, "o": 3, "hw": (7, 8), "k": (7, 7), "p": (0, 0)},
        {"n": 2, "c": 6, "o": 37, "hw": (9, 5), "k": (3, 3), "p": (1, 1)},
    ):
        got, want = run_both(case, torch.float32, channels_last=case["o"] > 16, activation="relu")
        assert_close(got, want, TOL[torch.float32], (case, [forced.kwargs for _, forced in forcing]))
    assert all(kernel.best_config.kwargs == forced.kwargs for kernel, forced in forcing)  # each kernel ran so


@pytest.mark.parametrize("channels_last", [False, True])
def test_relu_epilogue_and_its_backward(channels_last):
    case = {"n": 2, "c": 9, "o": 17, "hw": (4, 5), "k": (5, 5), "p": (2, 2)}
    got, want = run_both(case, torch.float32, channels_last, activation="relu")
    assert (got[0] == 0).any() and (got[0] > 0).any()  # the mask matters in this case
    assert_close(got, want, TOL[torch.float32], case)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    case = {"n": 2, "c": 24, "o": 16, "hw": (4, 4), "k": (7, 7), "p": (0, 0)}
    got, want = run_both(case, dtype, channels_last=True, activation="relu")
    assert all(t.dtype == dtype for t in got)
    assert_close(got, want, TOL[dtype], case)


def test_layout_follows_the_input():
    x = torch.randn(2, 5, 4, 3, device=DEVICE)
    w = torch.randn(6, 5, 3, 3, device=DEVICE)
    for fmt in (torch.contiguous_format, torch.channels_last):
        xf = x.contiguous(memory_format=fmt).requires_grad_()
        y = dc.unpool_conv2d(xf, w, padding=1, backend="triton")
        (grad_x,) = torch.autograd.grad(y, xf, torch.randn_like(y))
        assert y.is_contiguous(memory_format=fmt) and grad_x.is_contiguous(memory_format=fmt)


def test_non_contiguous_input_weight_and_grad():
    x = torch.randn(2, 10, 6, 5, device=DEVICE)[:, ::2].transpose(2, 3).requires_grad_()
    w = torch.randn(4, 5, 5, 5, device=DEVICE).transpose(2, 3).requires_grad_()
    assert not x.is_contiguous() and not w.is_contiguous()
    with poisoned_allocations():
        y = dc.unpool_conv2d(x, w, padding=2, backend="triton")
        grad = torch.randn(y.shape[::-1], device=DEVICE).permute(3, 2, 1, 0)  # non-contiguous grad_out
        got = [y, *torch.autograd.grad(y, (x, w), grad)]
    xd, wd = (t.detach().double().requires_grad_() for t in (x, w))
    y_ref = unpool_conv2d_reference(xd, wd, None, (2, 2))
    assert_close(got, [y_ref, *torch.autograd.grad(y_ref, (xd, wd), grad.double())], TOL[torch.float32], "strided")


def test_relu_backward_reads_a_grad_laid_out_unlike_the_output():
    """The fused ReLU backward reads grad_out and the saved output with one set of strides: a grad_out whose
    H and W strides are swapped against y's (channels innermost in both) must be re-laid, not misread."""
    x = torch.randn(2, 6, 4, 5, device=DEVICE).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = (torch.randn(5, 6, 3, 3, device=DEVICE) / 7).requires_grad_()
    with poisoned_allocations():
        y = dc.unpool_conv2d(x, w, padding=1, backend="triton", activation="relu")
        grad = torch.randn(2, 10, 8, 5, device=DEVICE).permute(0, 3, 2, 1)  # [2, 5, 8, 10], W outer to H
        assert grad.stride(1) == 1 and grad.stride() != y.stride()
        got = [y, *torch.autograd.grad(y, (x, w), grad)]
    xd, wd = (t.detach().double().requires_grad_() for t in (x, w))
    y_ref = F.relu(unpool_conv2d_reference(xd, wd, None, (1, 1)))
    assert_close(got, [y_ref, *torch.autograd.grad(y_ref, (xd, wd), grad.double())], TOL[torch.float32], "strides")


@pytest.mark.parametrize("shape", [(2, 8, 1, 1), (2, 1, 5, 5)])
def test_input_contiguous_in_both_layouts_gives_a_contiguous_output(shape):
    """As F.conv2d: an input both NCHW- and channels_last-contiguous gives an NCHW output."""
    x, w = torch.randn(shape, device=DEVICE), torch.randn(4, shape[1], 3, 3, device=DEVICE)
    assert dc.unpool_conv2d(x, w, padding=1, backend="triton").is_contiguous()


def test_float32_precision_follows_the_cudnn_flag(monkeypatch):
    """float32 dots run in TF32 exactly when cuDNN's convolutions may (the interpreter computes in full
    precision either way, so the constexpr is checked); 16-bit inputs always take the exact path."""
    from dcign_fast.kernels.triton.unpool_conv_layout import numeric_constexprs

    for allowed, precision in ((False, "ieee"), (True, "tf32")):
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", allowed)
        assert numeric_constexprs(torch.float32)["PRECISION"] == precision
        assert numeric_constexprs(torch.bfloat16)["PRECISION"] == "ieee"


def test_double_backward_matches_reference():
    """A gradient penalty through the fused op: its double backward runs the triton kernels too."""
    assert gradient_penalty_error("triton", DEVICE) < TOL[torch.float32]


@pytest.mark.parametrize("o, kernel, padding", [(3, (7, 7), (0, 0)), (17, (5, 2), (4, 1))])
def test_grad_weight_sums_several_splits(o, kernel, padding, monkeypatch):
    """Enough pixels for several split-K partial sums (64 pixels per split under the interpreter), on both
    sides of FEW_OUTPUTS."""
    from dcign_fast.kernels.triton import unpool_conv_grad_weight as kernels

    splits, split_chunk = [], kernels.split_chunk

    def recording(positions: int, programs: int) -> int:
        chunk = split_chunk(positions, programs)
        splits.append(-(-positions // chunk))
        return chunk

    monkeypatch.setattr(kernels, "split_chunk", recording)
    case = {"n": 3, "c": 6, "o": o, "hw": (7, 8), "k": kernel, "p": padding}
    got, want = run_both(case, torch.float32, channels_last=True, activation="relu")
    assert splits and min(splits) > 1
    assert_close(got, want, TOL[torch.float32], case)


def test_non_contiguous_bias_and_empty_batches():
    """A strided bias (every other element of a longer one): output and bias gradient, into poisoned
    allocations."""
    x, w = torch.randn(2, 3, 4, 4, device=DEVICE), torch.randn(5, 3, 3, 3, device=DEVICE)
    bias = torch.randn(10, device=DEVICE)[::2].requires_grad_()
    with poisoned_allocations():
        y = dc.unpool_conv2d(x, w, bias, padding=1, backend="triton")
        grad = torch.randn(y.shape, device=DEVICE)
        (grad_bias,) = torch.autograd.grad(y, bias, grad)
    exact = bias.detach().double().requires_grad_()
    expected = unpool_conv2d_reference(x.double(), w.double(), exact, (1, 1))
    assert rel_error(y, expected) < TOL[torch.float32]
    assert rel_error(grad_bias, torch.autograd.grad(expected, exact, grad.double())[0]) < TOL[torch.float32]
    check_empty_batch("triton", DEVICE)


def test_relu_keeps_a_nan_as_f_relu_does():
    """A NaN (a diverged step) stays visible through the fused ReLU, and its gradients are F.relu's."""
    assert relu_nan_mismatches("triton", DEVICE) == []


def test_grad_weight_is_deterministic_across_splits():
    """Enough pixels for several split-K partial sums; two backward passes agree bit for bit. Into poisoned
    allocations: a workspace element read before it is written is NaN, which torch.equal never matches."""
    x = torch.randn(3, 6, 7, 7, device=DEVICE, requires_grad=True)
    w = torch.randn(5, 6, 3, 3, device=DEVICE, requires_grad=True)
    b = torch.randn(5, device=DEVICE, requires_grad=True)
    with poisoned_allocations():
        y = dc.unpool_conv2d(x, w, b, padding=1, backend="triton")
        grad = torch.randn_like(y)
        first = torch.autograd.grad(y, (w, b), grad, retain_graph=True)
        second = torch.autograd.grad(y, (w, b), grad)
    assert all(torch.equal(p, q) for p, q in zip(first, second))


def test_deterministic_algorithms_pin_the_grad_weight_configs(monkeypatch):
    """The autotuner picks BLOCK_P by timing, so another process may pick another, and grad bias's tl.sum over
    BLOCK_P pixels rounds differently with it: under torch.use_deterministic_algorithms(True) both grad-weight
    kernels skip the autotuner and run their first config."""
    from dcign_fast.kernels.triton import unpool_conv_grad_weight

    def autotuned(*args, **kwargs):
        raise AssertionError("autotuned under torch.use_deterministic_algorithms(True)")

    for name in ("_grad_weight_kernel", "_grad_weight_few_outputs_kernel"):
        monkeypatch.setattr(getattr(unpool_conv_grad_weight, name), "run", autotuned)
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for o in (3, 37):  # both sides of the few-outputs switch
            case = {"n": 2, "c": 6, "o": o, "hw": (5, 6), "k": (3, 3), "p": (1, 1)}
            got, want = run_both(case, torch.float32, activation="relu")
            assert_close(got, want, TOL[torch.float32], case)
    finally:
        torch.use_deterministic_algorithms(deterministic)


def test_backward_does_not_rerun_the_forward(monkeypatch):
    """The custom op's backward calls the gradient kernels on the saved tensors: one forward kernel launch
    for a forward + backward, ReLU included (its mask comes from the saved output)."""
    from dcign_fast.kernels.triton import unpool_conv as kernels

    launches = []
    forward = kernels.launch_forward
    monkeypatch.setattr(kernels, "launch_forward", lambda *args: launches.append(args) or forward(*args))
    leaves = [torch.randn(shape, device=DEVICE, requires_grad=True) for shape in ((2, 5, 4, 3), (6, 5, 3, 3), (6,))]
    y = dc.unpool_conv2d(*leaves, padding=1, backend="triton", activation="relu")
    grads = torch.autograd.grad(y, leaves, torch.randn_like(y))
    assert len(launches) == 1 and all(g.shape == t.shape for g, t in zip(grads, leaves))


def test_module_with_activation_matches_upsample_conv_relu():
    fused = UnpoolConv2d(6, 8, 5, padding=2, backend="triton", activation="relu").to(DEVICE)
    conv = nn.Conv2d(6, 8, 5, padding=2).to(DEVICE)
    conv.load_state_dict(fused.state_dict())
    plain = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), conv, nn.ReLU())
    x = torch.randn(2, 6, 4, 4, device=DEVICE)
    assert "activation='relu'" in repr(fused)
    assert rel_error(fused(x), plain(x)) < TOL[torch.float32]


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"scale_factor": 3}, "scale_factor=2 only"),
        ({"activation": "gelu"}, "activation must be one of"),
    ],
)
def test_unsupported_arguments_are_clear_errors(kwargs, words):
    x, w = torch.randn(1, 2, 3, 3, device=DEVICE), torch.randn(2, 2, 3, 3, device=DEVICE)
    with pytest.raises(ValueError, match=words):
        dc.unpool_conv2d(x, w, padding=1, backend="triton", **kwargs)


def test_kernels_larger_than_9_are_refused():
    x, w = torch.randn(1, 2, 6, 6, device=DEVICE), torch.randn(2, 2, 10, 3, device=DEVICE)
    with pytest.raises(ValueError, match="kernel sizes up to 9"):
        dc.unpool_conv2d(x, w, backend="triton")


def test_float64_is_refused():
    x, w = torch.randn(1, 2, 3, 3, dtype=torch.float64), torch.randn(2, 2, 3, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="float32, float16 and bfloat16"):
        dc.unpool_conv2d(x.to(DEVICE), w.to(DEVICE), backend="triton")


@pytest.mark.cuda
def test_auto_picks_triton_on_cuda():
    from dcign_fast.ops.unpool_conv import choose_backend

    x, w = torch.randn(1, 4, 5, 5, device="cuda"), torch.randn(4, 4, 7, 7, device="cuda")
    assert choose_backend(x, w, 2, (0, 0)) == "triton"
    assert choose_backend(x, w, 3, (0, 0)) == "torch"
    assert choose_backend(x.double(), w.double(), 2, (0, 0)) == "torch"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("c, o, size, k, p", [*paper150_decoder_layers(), (64, 64, 32, 3, 1), (32, 32, 16, 5, 2)])
def test_real_sizes_on_gpu(dtype, c, o, size, k, p):
    case = {"n": 8, "c": c, "o": o, "hw": (size, size), "k": (k, k), "p": (p, p)}
    got, want = run_both(case, dtype, channels_last=True, activation="relu" if o > 1 else None)
    assert_close(got, want, TOL[dtype], case)


def test_sizes_past_the_kernels_int32_indices_are_refused_and_auto_runs_torch():
    """Shapes only (meta tensors): 2**31 input positions would wrap the kernels' int32 position products."""
    from dcign_fast.kernels.triton.unpool_conv import unpool_conv2d_triton
    from dcign_fast.kernels.unpool_conv_common import triton_index_reason

    x, w = torch.empty(2**17, 1, 128, 128, device="meta"), torch.empty(1, 1, 3, 3, device="meta")
    with pytest.raises(ValueError, match="int32 and takes at most .* input positions N x H x W"):
        unpool_conv2d_triton(x, w, None, (1, 1), 2)
    assert triton_index_reason(x[:1024], w, (1, 1)) == ""


@pytest.mark.cuda
def test_grad_weight_sums_the_last_split_at_the_int32_limit():
    """At TRITON_INDEX_LIMIT input positions (accepted) the last split of the weight gradient's reduction ends
    past 2**31 - 1: its end, once start + chunk in int32, wrapped negative and it summed nothing. An image layer
    (one output channel) in bfloat16, about 40 GB, against a float64 sum; the last 512 images (on an H100/H200
    the last split, 508 of them) are scaled up to carry a fifth of the sum, so that losing them shows."""
    from dcign_fast.kernels.unpool_conv_common import TRITON_INDEX_LIMIT

    n = TRITON_INDEX_LIMIT // (128 * 128)
    x = torch.rand(n, 1, 128, 128, device="cuda", dtype=torch.bfloat16)
    x[-512:] *= 64
    w = torch.randn(1, 1, 1, 1, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.rand(n, 1, 256, 256, device="cuda", dtype=torch.bfloat16)
    (got,) = torch.autograd.grad(dc.unpool_conv2d(x, w, backend="triton"), w, g)
    # A 1 x 1 kernel's gradient: each input pixel times the sum of grad_out over the 2 x 2 block it became.
    blocks = (
        g[i : i + 4096].double().unflatten(2, (128, 2)).unflatten(4, (128, 2)).sum((3, 5)) for i in range(0, n, 4096)
    )
    want = sum(float((x[i : i + 4096].double() * block).sum()) for i, block in zip(range(0, n, 4096), blocks))
    assert float(got) == pytest.approx(want, rel=5e-2)
