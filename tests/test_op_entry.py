"""How the public functions call the custom ops (dcign_fast/ops/custom_op.py's ``op_entry``): plain eager
autograd runs the op's body in an autograd.Function, without the op's dispatch; everything that must see the
op (tracing, dispatch modes, meta tensors) gets the op itself; and both ways compute the same bits."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dcign_fast as dc


def unpool(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor]:
    return (dc.unpool_conv2d(x, w, b, padding=2, backend="torch", activation="relu"),)


def sample(mu: torch.Tensor, logvar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    active = torch.arange(mu.shape[1]) % 2 == 0
    return dc.sample_latents(mu, logvar, active, invariance=0.3, seed=11, backend="torch")


def loss(outputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """A scalar that weighs every output element differently."""
    return sum((t * torch.arange(t.numel()).view_as(t).sin()).sum() for t in outputs)


def unpool_plain(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor]:
    return (dc.unpool_conv2d(x, w, padding=(1, 0), backend="torch"),)


CASES = {
    "unpool_conv2d": (unpool, ((2, 3, 4, 5), (4, 3, 5, 5), (4,))),
    "sample_latents": (sample, ((6, 5), (6, 5))),
}
# The same ops by other paths through their setup_context and backward (no bias, no activation).
VARIANTS = {**CASES, "unpool_conv2d without bias or ReLU": (unpool_plain, ((2, 3, 4, 5), (4, 3, 3, 2)))}


def leaves(shapes: tuple[tuple[int, ...], ...]) -> list[torch.Tensor]:
    return [torch.randn(shape, dtype=torch.float64, requires_grad=True) for shape in shapes]


class Recording(TorchDispatchMode):
    """Names every op dispatched under it."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", CASES)
def test_plain_eager_runs_the_body_and_a_torch_device_context_the_op(name):
    fn, shapes = CASES[name]
    inputs = leaves(shapes)
    assert "eager" in type(fn(*inputs)[0].grad_fn).__name__
    with torch.device("cpu"):  # a torch-function mode: the op, whose autograd node the op's registration made
        assert f"dcign_fast_{name}" in type(fn(*inputs)[0].grad_fn).__name__


@pytest.mark.parametrize("name", VARIANTS)
def test_both_ways_give_the_same_bits_through_second_derivatives(name):
    """Output, gradients and a gradient penalty's gradients (the backward op's own backward)."""
    fn, shapes = VARIANTS[name]
    inputs = leaves(shapes)

    def derivatives() -> list[torch.Tensor]:
        outputs = fn(*inputs)
        grads = torch.autograd.grad(loss(outputs), inputs, create_graph=True)
        penalty = sum((g**2).sum() for g in grads)
        return [*outputs, *grads, *torch.autograd.grad(penalty, inputs, allow_unused=True, materialize_grads=True)]

    eager = derivatives()
    with torch.device("cpu"):
        through_the_op = derivatives()
    assert all(torch.equal(e, o) for e, o in zip(eager, through_the_op))


@pytest.mark.parametrize("name", CASES)
def test_a_dispatch_mode_sees_the_op(name):
    fn, shapes = CASES[name]
    inputs = leaves(shapes)
    with Recording() as mode:
        torch.autograd.grad(loss(fn(*inputs)), inputs)
    assert any(seen.startswith(f"dcign_fast.{name}.") for seen in mode.seen)
    assert any(seen.startswith(f"dcign_fast.{name}_backward.") for seen in mode.seen)


def test_meta_tensors_take_the_ops_fake():
    x, w = torch.empty(2, 3, 4, 5, device="meta"), torch.empty(4, 3, 5, 5, device="meta")
    assert dc.unpool_conv2d(x, w, padding=2, backend="torch").shape == (2, 4, 8, 10)


def test_the_profiler_names_an_eager_call_as_the_op():
    inputs = leaves(CASES["unpool_conv2d"][1])
    with torch.profiler.profile() as prof:
        unpool(*inputs)
    assert "dcign_fast::unpool_conv2d" in {event.key for event in prof.key_averages()}


def test_torch_jit_trace_records_the_op():
    inputs = [t.detach() for t in leaves(CASES["unpool_conv2d"][1])]
    traced = torch.jit.trace(unpool, inputs, check_trace=False)
    assert "dcign_fast::unpool_conv2d" in str(traced.graph)
    assert torch.equal(traced(*inputs)[0], unpool(*inputs)[0])


def test_batched_gradients_of_pytorchs_older_vmap_take_the_op():
    """grad(is_grads_batched=True) and gradcheck's batched-gradient check run the backward over batched tensors
    that look plain: the op's per-sample fallback takes them, where the body would meet a tensor it cannot."""
    inputs = leaves(((1, 2, 3, 3), (2, 2, 3, 3), (2,)))
    (y,) = unpool(*inputs)
    grads = torch.randn(3, *y.shape, dtype=torch.float64)
    batched = torch.autograd.grad(y, inputs, grads, retain_graph=True, is_grads_batched=True)
    looped = [torch.autograd.grad(y, inputs, g, retain_graph=True) for g in grads]
    for i, got in enumerate(batched):
        torch.testing.assert_close(got, torch.stack([each[i] for each in looped]))
    assert torch.autograd.gradcheck(lambda *t: unpool(*t)[0], inputs, check_batched_grad=True)


def test_forward_mode_through_the_backward_is_refused():
    """A dual grad_out (forward-over-reverse) meets the backward's refusal, not a silently missing tangent."""
    import torch.autograd.forward_ad as fwAD

    inputs = leaves(CASES["unpool_conv2d"][1])
    (y,) = unpool(*inputs)
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match="no forward-mode AD"):
        torch.autograd.grad(y, inputs, fwAD.make_dual(torch.randn_like(y), torch.randn_like(y)))
