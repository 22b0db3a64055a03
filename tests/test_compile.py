"""The ops as custom ops: torch.compile(fullgraph=True) traces a DC-IGN training step without graph breaks,
forward and backward, and agrees with eager; on a GPU a training step is captured in a CUDA graph."""

from __future__ import annotations

import warnings
from dataclasses import replace

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import dcign_fast as dc
from dcign_fast.kernels import cuda
from dcign_fast.models import DCIGN, preset
from tests.helpers import layout_mismatches, rel_error

LATENTS = 32  # demo64's latent_dim
NO_EXT = "dcign_fast._C was not built"


def _training_loss(model: DCIGN, seed: int | None):
    """(x, active) -> the DC-IGN loss of one clamped batch: encoder, sample_latents, unpool-conv decoder."""

    def loss(x: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        recon, mu, logvar, _, kl = model(x, active, invariance=0.1, seed=seed, return_kl=True)
        return model.loss(x, recon, mu, logvar, kl)["total"]

    return loss


def _inputs(device: str = "cpu", size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.rand(2, 1, size, size, device=device)
    active = torch.rand(LATENTS, device=device) < 0.3
    return x, active


def _grads(model: DCIGN, loss: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize(("backend", "seed"), [("torch", 3), ("reference", None), ("triton", 3)])
def test_training_step_has_no_graph_breaks(backend, seed):
    """seed=None on the reference backend too: its draw of (seed, offset) once broke the graph. The triton
    backend's check that Triton is installed, traced, reached importlib's find_spec: a graph break on torch
    2.11 (the H200's), and a warning about tracing through functools.cache on later torch (a UserWarning)."""
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"  # else Triton's interpreter
    model = DCIGN.from_preset("demo64", backend=backend).to(device)
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        explained = torch._dynamo.explain(_training_loss(model, seed=seed))(*_inputs(device))
    assert explained.graph_break_count == 0 and not explained.break_reasons, explained.break_reasons
    assert explained.graph_count == 1


def test_graph_break_counter_sees_a_host_read():
    """The check above can fail: a step that reads its loss on the host (.item(), as logging does) breaks."""
    loss = _training_loss(DCIGN.from_preset("demo64", backend="torch"), seed=3)
    explained = torch._dynamo.explain(lambda x, active: loss(x, active).item())(*_inputs())
    assert explained.break_reasons and "item" in str(explained.break_reasons[0].reason)


def test_compiled_training_step_matches_eager():
    """fullgraph=True compiles forward and backward (AOTAutograd traces both through the fake kernels)."""
    torch._dynamo.reset()
    model = DCIGN.from_preset("demo64", backend="torch")
    loss = _training_loss(model, seed=11)
    x, active = _inputs()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got, want = compiled(x, active), loss(x, active)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    for g, w in zip(_grads(model, got), _grads(model, want)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_compiled_seed_none_draws_at_run_time(backend):
    """With seed None the draw happens in the compiled code at every call, not once at trace time."""
    torch._dynamo.reset()
    mu, logvar = torch.randn(4, 9), torch.randn(4, 9)
    sample = torch.compile(lambda m, lv: dc.sample_latents(m, lv, backend=backend)[0], fullgraph=True)
    assert not torch.equal(sample(mu, logvar), sample(mu, logvar))
    torch.manual_seed(5)
    first = sample(mu, logvar)
    torch.manual_seed(5)
    assert torch.equal(sample(mu, logvar), first)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_compiled_sampler_takes_a_new_seed_and_invariance_at_every_call(backend):
    """Dynamo makes a seed and an invariance that change between calls symbolic: the invariance check once
    broke fullgraph, and Inductor generated invalid C++ for the reference's noise from a symbolic seed."""
    torch._dynamo.reset()
    mu, logvar = torch.randn(6, 5), torch.randn(6, 5)
    active = torch.tensor([True, False, True, False, False])

    def sample(m, lv, seed, invariance):
        z, kl = dc.sample_latents(m, lv, active, seed=seed, invariance=invariance, backend=backend)
        return z.sum() + kl.sum()

    compiled = torch.compile(sample, fullgraph=True)
    for seed, invariance in ((1, 0.1), (2, 0.2), (-3, 0.0), (2**62, 0.3)):
        grads = []
        for run in (compiled, sample):
            m, lv = mu.clone().requires_grad_(), logvar.clone().requires_grad_()
            grads.append((run(m, lv, seed, invariance), *torch.autograd.grad(run(m, lv, seed, invariance), (m, lv))))
        for got, want in zip(*grads):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_exported_decoder_round_trips(tmp_path):
    """torch.export keeps the fused op as one node (recording the model's backend), with a dynamic batch; the
    saved program, loaded again, renders what the eager model does at another batch size."""

    class Decoder(torch.nn.Module):
        def __init__(self, model: DCIGN) -> None:
            super().__init__()
            self.model = model

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return self.model.decode(z)

    model = DCIGN.from_preset("demo64", backend="torch").eval()
    batch = torch.export.Dim("batch")
    program = torch.export.export(Decoder(model), (torch.randn(2, LATENTS),), dynamic_shapes=({0: batch},))
    ops = [node.target for node in program.graph.nodes if node.op == "call_function"]
    assert ops.count(torch.ops.dcign_fast.unpool_conv2d.default) == len(model.config.decoder_channels) + 1
    torch.export.save(program, tmp_path / "decoder.pt2")
    z = torch.randn(5, LATENTS)
    with torch.no_grad():
        torch.testing.assert_close(torch.export.load(tmp_path / "decoder.pt2").module()(z), model.decode(z))


def test_custom_ops_pass_opcheck():
    """Schemas, fake kernels and autograd registrations are consistent with the real kernels."""
    x, w, b = torch.randn(2, 3, 5, 6), torch.randn(4, 3, 3, 3), torch.randn(4)
    for activation in (None, "relu"):
        x.requires_grad_(), w.requires_grad_(), b.requires_grad_()
        torch.library.opcheck(torch.ops.dcign_fast.unpool_conv2d, (x, w, b, 1, 0, 2, activation, "torch"))
    mu, logvar = torch.randn(5, 7, requires_grad=True), torch.randn(5, 7, requires_grad=True)
    active = torch.rand(7) < 0.5
    torch.library.opcheck(torch.ops.dcign_fast.sample_latents, (mu, logvar, active, False, 0.5, -3, "torch"))
    # The backward op, with a given seed and with a drawn one. opcheck's compiled-autograd check is left out:
    # it fails on the op's double backward (it did before the seed became an argument too).
    for seed in (-3, None):
        _, _, rng = torch.ops.dcign_fast.sample_latents(mu, logvar, active, False, 0.5, seed, "torch")
        args = (mu, logvar, active, 0.5, seed, rng, torch.randn(5, 7), torch.randn(5), "torch")
        checks = ("test_schema", "test_autograd_registration", "test_faketensor")
        torch.library.opcheck(torch.ops.dcign_fast.sample_latents_backward, args, test_utils=checks)


def test_functionalize_traces_each_op_as_one_node():
    """torch.func.functionalize (which export-style tracers use) takes the ops themselves: it has no rule for
    the autograd.Function that torch.func's grad transforms run them through."""
    x, w = torch.randn(2, 3, 5, 4), torch.randn(4, 3, 3, 3)
    mu, logvar = torch.randn(3, 6), torch.randn(3, 6)

    def both(x, w, mu, logvar):
        return dc.unpool_conv2d(x, w, padding=1, backend="torch"), dc.sample_latents(mu, logvar, seed=5)[0]

    graph = make_fx(torch.func.functionalize(both))(x, w, mu, logvar)
    targets = [node.target for node in graph.graph.nodes if node.op == "call_function"]
    assert torch.ops.dcign_fast.unpool_conv2d.default in targets
    assert torch.ops.dcign_fast.sample_latents.default in targets
    for got, want in zip(graph(x, w, mu, logvar), both(x, w, mu, logvar)):
        assert torch.equal(got, want)


def test_direct_op_calls_check_the_backend(monkeypatch):
    """The registered ops check the backend themselves: a program exported on a GPU and loaded on a CPU calls
    them directly, and would otherwise fail in the driver."""
    from dcign_fast.ops.backends import CUDA_EMULATION_ENV, triton_available

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv(CUDA_EMULATION_ENV, raising=False)
    # Without triton, backend="triton" is refused for that before its device is looked at: only "cuda"'s check runs.
    backends = ("triton", "cuda") if triton_available() else ("cuda",)
    x, w, b = torch.randn(2, 3, 5, 4), torch.randn(4, 3, 3, 3), torch.randn(4)
    g = torch.randn(2, 4, 10, 8)
    mu = torch.randn(3, 4)
    calls = [
        lambda backend: torch.ops.dcign_fast.unpool_conv2d(x, w, b, 1, 1, 2, None, backend),
        lambda backend: torch.ops.dcign_fast.unpool_conv2d_backward(g, x, w, None, True, 1, 1, 2, None, backend),
        lambda backend: torch.ops.dcign_fast.sample_latents(mu, mu, None, False, 0.0, 1, backend),
        lambda backend: torch.ops.dcign_fast.sample_latents_backward(
            mu, mu, None, 0.0, 1, torch.empty(0, dtype=torch.int64), mu, mu[:, 0], backend
        ),
    ]
    for call in calls:
        for backend in backends:
            with pytest.raises(ValueError, match=f"backend='{backend}' needs CUDA tensors"):
                call(backend)
        with pytest.raises(ValueError, match="explicit backend"):
            call("auto")


@pytest.mark.parametrize("backend", ["triton", "cuda"], ids=["triton_backend", "cuda_backend"])  # (-m cuda: GPU)
def test_a_direct_backward_op_call_checks_what_the_kernels_support(backend, monkeypatch):
    """The kernels upsample by 2 only. The forward refuses another scale factor; a direct call of the backward
    op, which no forward checked, is refused too rather than answered with scale-2 gradients."""
    from dcign_fast.ops.backends import CUDA_EMULATION_ENV

    monkeypatch.setenv(CUDA_EMULATION_ENV, "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # CPU tensors on a GPU machine too: refused before any launch
    x, w, g = torch.randn(2, 3, 5, 4), torch.randn(4, 3, 3, 3), torch.randn(2, 4, 15, 12)  # g: scale 3's output
    with pytest.raises(ValueError, match=f"backend='{backend}' supports scale_factor=2 only, got 3"):
        torch.ops.dcign_fast.unpool_conv2d_backward(g, x, w, None, True, 1, 1, 3, None, backend)
    with pytest.raises(ValueError, match="backend='reference' is not implemented for this op"):
        torch.ops.dcign_fast.unpool_conv2d(x, w, None, 1, 1, 2, None, "reference")


def test_the_sampler_op_keeps_its_rng_on_mus_device():
    """Inductor gives up CUDA graphs (mode="reduce-overhead") for a graph holding a CPU tensor: the op's rng
    output, empty with a given seed and the drawn (seed, offset) with seed=None, lies on mu's device. The
    meta device stands in for a GPU: there the fake kernel answers."""
    for device in ("cpu", "meta"):
        mu = torch.randn(4, 9, device=device)
        for seed, size in ((5, 0), (None, 2)):
            _, _, rng = torch.ops.dcign_fast.sample_latents(mu, mu, None, False, 0.0, seed, "torch")
            assert rng.device == mu.device and rng.shape == (size,) and rng.dtype == torch.int64


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_outputs_are_laid_out_as_the_fake_kernels_promise(backend):
    assert layout_mismatches(backend, "cpu") == []


@pytest.mark.cuda
@pytest.mark.parametrize(
    "backend", ["torch", "triton", pytest.param("cuda", marks=pytest.mark.skipif(not cuda.available(), reason=NO_EXT))]
)
def test_outputs_are_laid_out_as_the_fake_kernels_promise_on_gpu(backend):
    assert layout_mismatches(backend, "cuda") == []


def test_compiled_channels_last_layer_trains():
    """Inductor asserts the fake kernels' strides at run time: a channels_last weight's gradient once broke it."""
    torch._dynamo.reset()
    layer = dc.nn.UnpoolConv2d(16, 8, 5, padding=2, activation="relu", backend="torch")
    layer = layer.to(memory_format=torch.channels_last)
    x = torch.rand(2, 16, 6, 6).contiguous(memory_format=torch.channels_last)
    torch.compile(layer)(x).sum().backward()
    expected = torch.func.grad(
        lambda w: dc.unpool_conv2d(x, w, layer.bias, padding=2, activation="relu", backend="reference").sum()
    )(layer.weight.detach())
    torch.testing.assert_close(layer.weight.grad, expected)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_training_step_makes_no_tensors_from_python_values_after_warm_up(backend, monkeypatch):
    """What makes a step capturable in a CUDA graph, checked on the CPU: after a warm-up step nothing builds a
    tensor from Python values on a device (on a GPU, a host-to-device copy that syncs, and an error while
    capturing), and every constant table comes from the cache. Host tensors (device unspecified) stay allowed."""
    from dcign_fast.ops.constants import constant

    # demo64's layers at a quarter of its pixels and fewer channels: the same ops, in Triton's interpreter
    # in seconds rather than a minute
    model = DCIGN(
        replace(preset("demo64"), image_size=32, encoder_channels=(4, 8, 8), decoder_channels=(8, 4)), backend
    )
    loss = _training_loss(model, seed=21)
    _grads(model, loss(*_inputs(size=32)))

    def host_only(make):
        def checked(*args, **kwargs):
            assert kwargs.get("device") is None, f"{make.__name__}(..., device={kwargs['device']}) in a warm step"
            return make(*args, **kwargs)

        return checked

    monkeypatch.setattr(torch, "tensor", host_only(torch.tensor))
    monkeypatch.setattr(torch, "as_tensor", host_only(torch.as_tensor))
    misses = constant.cache_info().misses
    _grads(model, loss(*_inputs(size=32)))
    assert constant.cache_info().misses == misses


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_cuda_graph_captures_a_training_step(backend):
    """Forward + backward captured once, replayed on new data: the grads equal an eager step's. The seed
    is explicit, so the eager step can draw the same noise (tests/test_latent_sampler.py captures seed=None)."""
    model = DCIGN.from_preset("demo64", backend=backend).cuda()
    loss = _training_loss(model, seed=21)
    static_x, static_active = _inputs("cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (Triton autotuning, allocator) outside the capture
        for _ in range(3):
            _grads(model, loss(static_x, static_active))
    torch.cuda.current_stream().wait_stream(side)
    model.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = loss(static_x, static_active)
        static_loss.backward()
    x, active = _inputs("cuda")
    static_x.copy_(x)
    static_active.copy_(active)
    graph.replay()
    captured = [p.grad.clone() for p in model.parameters()]
    want_loss = loss(x, active)
    torch.testing.assert_close(static_loss, want_loss, rtol=1e-4, atol=1e-3)
    for g, w in zip(captured, _grads(model, want_loss)):
        torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-4)


def test_the_sampler_ops_are_kept_out_of_inductors_cuda_graphs():
    """A graph holding them would be recorded anew for every int seed: both sampler ops carry the tag that
    makes Inductor run them between its CUDA graphs."""
    for op in (torch.ops.dcign_fast.sample_latents, torch.ops.dcign_fast.sample_latents_backward):
        assert torch.Tag.cudagraph_unsafe in op.default.tags


@pytest.mark.cuda
def test_reduce_overhead_replays_a_step_whose_sampler_draws_anew(monkeypatch):
    """torch.compile(mode="reduce-overhead") with seed=None: the sampler's ops run between the CUDA graphs, so
    once recorded a step replays them (no new capture) and still draws fresh noise; after the same
    torch.manual_seed its gradients equal an eager step's."""
    from torch._dynamo.utils import counters

    calls = {"capture_begin": 0, "replay": 0}
    for name in calls:
        original = getattr(torch.cuda.CUDAGraph, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.cuda.CUDAGraph, name, counted)
    monkeypatch.setattr(torch._inductor.config, "graph_partition", True)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    torch._dynamo.reset()
    counters.clear()
    model = DCIGN.from_preset("demo64").cuda()
    loss = _training_loss(model, seed=None)
    x, active = _inputs("cuda")
    want = {}
    for step in range(3):
        torch.manual_seed(step)
        want[step] = _grads(model, loss(x, active))
    compiled = torch.compile(loss, mode="reduce-overhead")
    for _ in range(3):  # warm-up, recording
        _grads(model, compiled(x, active))
    recorded = dict(calls)
    losses = []
    for step in range(3):
        torch.manual_seed(step)
        out = compiled(x, active)
        losses.append(out.item())
        for g, w in zip(_grads(model, out), want[step]):
            assert rel_error(g, w) < 1e-4
    assert recorded["capture_begin"] > 0 and calls["capture_begin"] == recorded["capture_begin"]
    assert calls["replay"] > recorded["replay"] and counters["inductor"]["cudagraph_skips"] == 0
    assert len(set(losses)) == 3  # each step's own noise


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_reduce_overhead_first_made_index_tables_stay_valid_across_recordings(backend, monkeypatch):
    """The ops cache small index tables (ops/constants.py) at their first call. Made first inside Inductor's
    warm-up under mode="reduce-overhead", they may come from the CUDA graphs' private memory pool, which a later
    recording (another batch size) may hand out again while the cache still points into it (a static review's
    suspicion, for a GPU to settle). Each step's gradients must match upsample + conv's, which use no tables.
    (One layer, 32 -> 64 channels: the triton grad weight's tap table is for more than FEW_OUTPUTS outputs.)"""
    from dcign_fast.ops.constants import constant

    # TF32 off (the triton backend follows cudnn.allow_tf32): float32 throughout (triton has no float64).
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    torch._dynamo.reset()
    constant.cache_clear()  # (earlier tests made the tables eagerly, outside any pool)
    layer = dc.nn.UnpoolConv2d(32, 64, 5, padding=2, backend=backend).cuda()

    def loss(x: torch.Tensor) -> torch.Tensor:
        return layer(x).square().sum()

    compiled = torch.compile(loss, mode="reduce-overhead")
    for batch in (2, 2, 2, 3, 3, 3, 2, 5, 5, 2):  # warm-ups and recordings, replays among new recordings
        x = torch.randn(batch, 32, 9, 9, device="cuda", requires_grad=True)
        got = torch.autograd.grad(compiled(x), (x, layer.weight, layer.bias))
        upsampled = torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")
        want_loss = torch.nn.functional.conv2d(upsampled, layer.weight, layer.bias, padding=2).square().sum()
        for g, w in zip(got, torch.autograd.grad(want_loss, (x, layer.weight, layer.bias))):
            assert rel_error(g, w) < 1e-4, batch


@pytest.mark.cuda
def test_inductor_compiles_the_triton_model(monkeypatch):
    # TF32 off: compiled and eager code may pick different cuDNN algorithms, whose TF32 roundings differ.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    torch._dynamo.reset()
    model = DCIGN.from_preset("demo64", backend="triton").cuda()
    loss = _training_loss(model, seed=4)
    x, active = _inputs("cuda")
    got = torch.compile(loss, fullgraph=True)(x, active)
    want = loss(x, active)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)
    for g, w in zip(_grads(model, got), _grads(model, want)):
        torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-4)
