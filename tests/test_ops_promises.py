"""Promises of the model, the modules, patch and the ops that a mutation audit found no test holding to.

Each test names the promise it pins; each failed on a plausible mutant of the shipped code that every other
test passed (a KL not averaged, a decoder ReLU too many or too few, forward ignoring clamp or invariance, ...).
"""

from __future__ import annotations

import dataclasses
import importlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dcign_fast as dc
from dcign_fast.models import DCIGN, preset
from dcign_fast.nn import LatentSampler, UnpoolConv2d
from tests.helpers import rel_error


def _demo64(dtype: torch.dtype = torch.float64) -> DCIGN:
    torch.manual_seed(0)
    return DCIGN.from_preset("demo64").to(dtype)


def _in_range_batch(batch: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, recon, mu, logvar): random images in [0, 1], reconstructions inside (0, 1), random latents."""
    x, recon = torch.rand(batch, 1, 4, 4), torch.rand(batch, 1, 4, 4).clamp(0.01, 0.99)
    return x, recon, torch.randn(batch, 5), torch.randn(batch, 5)


# ------------------------------------------------------------------------------------------------ DCIGN.loss


def test_a_given_kl_is_averaged_over_the_batch_as_the_analytic_one_is() -> None:
    """The sampler's per-image kl [B] enters the loss as its batch mean, the scale of the analytic KL that it
    replaces (a sum would weigh the KL B times more in clamped batches than in plain ones)."""
    x, recon, mu, logvar = _in_range_batch()
    kl = torch.rand(3) + 0.1
    losses = DCIGN.loss(x, recon, mu, logvar, kl=kl)
    assert torch.allclose(losses["kl"], kl.mean(), rtol=1e-6)
    assert torch.allclose(losses["total"], losses["recon"] + kl.mean(), rtol=1e-6)
    # With nothing clamped, the sampler's kl is the analytic one: both routes give the same loss.
    _, sampled_kl = dc.sample_latents(mu, logvar, seed=4)
    assert torch.allclose(DCIGN.loss(x, recon, mu, logvar, kl=sampled_kl)["kl"], DCIGN.loss(x, recon, mu, logvar)["kl"])


def test_the_divide_by_255_hint_is_for_pixel_like_targets_only() -> None:
    """The hint names a likely cause (0..255 pixels); images slightly past 1 (a bad normalisation) must not be
    told to divide by 255."""
    _, recon, mu, logvar = _in_range_batch()
    slightly_over = torch.rand(3, 1, 4, 4)
    slightly_over[0, 0, 0, 0] = 1.5
    with pytest.raises(ValueError, match=r"x must hold images in \[0, 1\]") as info:
        DCIGN.loss(slightly_over, recon, mu, logvar)
    assert "255" not in str(info.value)
    with pytest.raises(ValueError, match="divide by 255"):
        DCIGN.loss(torch.rand(3, 1, 4, 4) * 255, recon, mu, logvar)


# ------------------------------------------------------------------------------------------------ DCIGN


def test_the_network_is_conv_pool_relu_down_and_unpool_conv_with_relus_between_up() -> None:
    """The documented architecture, layer by layer, against plain torch ops in float64: encoder blocks conv ->
    max-pool 2 -> ReLU, linear heads; decoder Linear -> ReLU -> unflatten, unpool-conv blocks with a ReLU
    between them and none after the last, whose logits the sigmoid of decode turns into images."""
    model = _demo64()
    x = torch.rand(2, 1, 64, 64, dtype=torch.float64)
    h = x
    for conv in (m for m in model.encoder if isinstance(m, nn.Conv2d)):
        h = F.relu(F.max_pool2d(F.conv2d(h, conv.weight, conv.bias, padding=conv.padding), 2))
    mu, logvar = model.encode(x)
    assert rel_error(mu, F.linear(h.flatten(1), model.to_mu.weight, model.to_mu.bias)) < 1e-12
    assert rel_error(logvar, F.linear(h.flatten(1), model.to_logvar.weight, model.to_logvar.bias)) < 1e-12

    z = torch.randn(2, model.config.latent_dim, dtype=torch.float64)
    linear = model.from_latent[0]
    h = F.relu(F.linear(z, linear.weight, linear.bias)).unflatten(1, (32, 8, 8))
    for i, layer in enumerate(model.decoder):
        h = F.conv2d(F.interpolate(h, scale_factor=2, mode="nearest"), layer.weight, layer.bias, padding=layer.padding)
        if i < len(model.decoder) - 1:
            h = F.relu(h)
    assert (h < 0).any()  # the last block's logits are not rectified
    assert rel_error(model.decode_logits(z), h) < 1e-12
    assert rel_error(model.decode(z), torch.sigmoid(h)) < 1e-12


def test_the_latent_heads_start_as_the_originals() -> None:
    """The original's N(0, 0.01) head weights (documented in DCIGN.__init__), biases at zero: larger ones start
    training with large KL terms and noisy codes."""
    torch.manual_seed(0)
    model = DCIGN.from_preset("demo64")
    for head in (model.to_mu, model.to_logvar):
        assert head.weight.std().item() == pytest.approx(0.01, rel=0.05)  # 65536 draws: within 1%
        assert abs(head.weight.mean().item()) < 1e-3
        assert (head.bias == 0).all()


@pytest.mark.parametrize("clamp", ["mean", "first"])
def test_forward_samples_with_its_arguments_and_decodes_that_sample(clamp: str) -> None:
    """forward's z and kl are sample_latents' with the clamp, invariance and seed it was given, recon is that z
    decoded, and the invariance pull reaches the encoder's mu (DC-IGN's training signal)."""
    model = _demo64()
    x = torch.rand(3, 1, 64, 64, dtype=torch.float64)
    active = model.active_mask("light")
    recon, mu, logvar, z, kl = model(x, active, clamp=clamp, invariance=0.3, seed=11, return_kl=True)
    want_z, want_kl = dc.sample_latents(
        mu.detach(), logvar.detach(), active, clamp=clamp, invariance=0.3, seed=11, backend="reference"
    )
    assert rel_error(z, want_z) < 1e-12 and rel_error(kl, want_kl) < 1e-12
    assert rel_error(recon, model.decode(z)) < 1e-12
    assert torch.equal(model(x, active, clamp=clamp, invariance=0.3, seed=11)[3], z)  # the 4-tuple's z too
    (grad_mu,) = torch.autograd.grad(z.sum() + kl.sum(), mu)
    inactive = ~active
    pull = 0.3 * (mu - mu.mean(0, keepdim=True))
    assert rel_error(grad_mu[:, inactive], pull[:, inactive]) < 1e-12


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # torch.func's own
def test_set_backend_routes_every_fused_layer() -> None:
    """set_backend reaches the decoder's layers, not just the model's attribute: after set_backend("reference")
    the decoder runs the reference, which (unlike the custom op) has forward-mode AD."""
    model = _demo64()
    z, tangent = torch.randn(2, 32, dtype=torch.float64), torch.randn(2, 32, dtype=torch.float64)
    with pytest.raises(NotImplementedError, match="forward-mode AD"):
        torch.func.jvp(model.decode, (z,), (tangent,))
    assert model.set_backend("reference") is model
    assert model.backend == "reference" and {layer.backend for layer in model.decoder} == {"reference"}
    _, jvp = torch.func.jvp(model.decode, (z,), (tangent,))
    assert torch.isfinite(jvp).all() and jvp.abs().sum() > 0


def test_adjacent_latent_groups_do_not_overlap() -> None:
    """(start, stop) spans are half-open: groups that meet at a boundary share no latent, so no overlap warning
    (the trainer's callers run with warnings as errors); one shared latent does warn."""
    config = preset("demo64")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dataclasses.replace(config, latent_groups={"pose": (0, 3), "rest": (3, 32)})
    with pytest.warns(UserWarning, match="overlap"):
        dataclasses.replace(config, latent_groups={"pose": (0, 4), "rest": (3, 32)})


# ------------------------------------------------------------------------------------------------ dcign_fast.nn


@pytest.mark.parametrize("scale", [3, 3.0, (3.0, 3.0)])
def test_a_fused_pair_upsamples_by_its_upsamples_factor(scale: float | tuple[float, float]) -> None:
    """from_modules keeps any integer scale factor (the torch backend runs them all), given as a number or a pair;
    the fused layer computes what the pair did."""
    torch.manual_seed(0)
    pair = nn.Sequential(nn.Upsample(scale_factor=scale), nn.Conv2d(3, 4, 3, padding=1)).double()
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    fused = UnpoolConv2d.from_modules(pair[0], pair[1])
    assert fused.scale_factor == 3
    assert rel_error(fused(x), pair(x)) < 1e-12


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_an_unpool_conv_layer_applies_its_activation(backend: str) -> None:
    """activation="relu" is part of the layer (the decoder's ReLUs live there), forward and backward."""
    torch.manual_seed(0)
    layer = UnpoolConv2d(3, 4, 3, 1, backend=backend, activation="relu").double()
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    upsampled = F.interpolate(x, scale_factor=2, mode="nearest")
    want = F.relu(F.conv2d(upsampled, layer.weight, layer.bias, padding=1))
    got = layer(x)
    assert (want == 0).any() and rel_error(got, want) < 1e-12
    grad = torch.randn_like(want)
    assert rel_error(torch.autograd.grad(got, x, grad)[0], torch.autograd.grad(want, x, grad)[0]) < 1e-12


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_the_latent_sampler_module_samples_with_its_clamp_and_invariance(backend: str) -> None:
    """LatentSampler is sample_latents with its fixed clamp and invariance: same z, kl and gradients (inactive
    columns' pull included)."""
    torch.manual_seed(0)
    mu, logvar = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64) * 0.5
    active = torch.tensor([True, False, True, False, False, True])
    grad_z, grad_kl = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    results = []
    for run in (
        lambda m, lv: LatentSampler(clamp="first", invariance=0.5, backend=backend)(m, lv, active, seed=5),
        lambda m, lv: dc.sample_latents(m, lv, active, clamp="first", invariance=0.5, seed=5, backend=backend),
    ):
        leaves = [mu.clone().requires_grad_(), logvar.clone().requires_grad_()]
        z, kl = run(*leaves)
        results.append([z, kl, *torch.autograd.grad((z * grad_z).sum() + (kl * grad_kl).sum(), leaves)])
    for got, want in zip(*results):
        assert torch.equal(got, want)
    assert not torch.equal(results[0][0], dc.sample_latents(mu, logvar, active, seed=5, backend=backend)[0])


def test_the_latent_sampler_module_checks_its_arguments_when_built() -> None:
    """A bad clamp or invariance is refused by the constructor, naming it, not at the first forward."""
    with pytest.raises(ValueError, match="clamp must be one of"):
        LatentSampler(clamp="last")
    with pytest.raises(ValueError, match="invariance"):
        LatentSampler(invariance=-1.0)


# ------------------------------------------------------------------------------------------------ dcign_fast.patch


def test_a_patched_upsample2d_runs_the_backend_it_was_patched_with(monkeypatch: pytest.MonkeyPatch) -> None:
    """patch(..., backend=b) routes a diffusers Upsample2D through b, as it does a Sequential's pair."""
    patch_module = importlib.import_module("dcign_fast.patch")  # (dcign_fast.patch, the attribute, is the function)

    layer = pytest.importorskip("diffusers.models.upsampling").Upsample2D(4, use_conv=True)
    assert dc.patch(layer, backend="reference").replaced == ["(root)"]
    seen = []
    real = patch_module.unpool_conv2d

    def spy(*args, **kwargs):
        seen.append(kwargs["backend"])
        return real(*args, **kwargs)

    monkeypatch.setattr(patch_module, "unpool_conv2d", spy)
    layer(torch.randn(1, 4, 3, 5))
    assert seen == ["reference"]


# ------------------------------------------------------------------------------------------------ unpool_conv2d


def test_every_small_scale_kernel_and_padding_matches_the_oracle_forward_and_backward() -> None:
    """The phase decomposition for every (scale, kernel, padding) of small images, not a sample: with scale
    3 or 4, phases that read the same low-resolution window may differ in count and so in the padding their
    shared convolution needs (the largest serves them all), which random cases rarely reach."""
    torch.manual_seed(0)
    for scale, height, kernel, padding in (
        (s, h, k, p) for s in (3, 4) for h in (1, 2, 3) for k in range(1, 8) for p in range(5)
    ):
        if scale * height + 2 * padding - kernel + 1 < 1:
            continue
        x = torch.randn(1, 2, height, 2, dtype=torch.float64, requires_grad=True)
        w = torch.randn(2, 2, kernel, 2, dtype=torch.float64, requires_grad=True)
        b = torch.randn(2, dtype=torch.float64, requires_grad=True)
        pad = (padding, 1)
        got = dc.unpool_conv2d(x, w, b, padding=pad, scale_factor=scale, backend="torch")
        upsampled = x.repeat_interleave(scale, 2).repeat_interleave(scale, 3)  # not F.interpolate: a route of its own
        want = F.conv2d(upsampled, w, b, padding=pad)
        case = (scale, height, kernel, padding)
        assert got.shape == want.shape and rel_error(got, want) < 1e-12, case
        grad = torch.randn_like(want)
        for g, e in zip(torch.autograd.grad(got, (x, w, b), grad), torch.autograd.grad(want, (x, w, b), grad)):
            assert rel_error(g, e) < 1e-12, case


def test_a_problem_whose_unfolded_input_is_too_large_is_refused_even_with_a_small_output() -> None:
    """The 2**59-element bound covers the reference's unfolded input (C x KH x KW rows per output pixel), which
    outgrows the output when the input channels do: one output channel, 2**28 input channels (meta tensors)."""
    x = torch.empty(1, 2**28, 2**15, 2**15, device="meta")
    w = torch.empty(1, 2**28, 1, 1, device="meta")
    with pytest.raises(ValueError, match=r"would hold more than 2\*\*59 elements"):
        dc.unpool_conv2d(x, w, backend="reference")


def test_multiply_adds_counts_the_taps_each_output_pixel_reads() -> None:
    """phases.multiply_adds (the benchmarks' MAC count) is, per axis, the sum over output positions of the number
    of distinct low-resolution positions (padding included) its kernel taps land on, rows times columns."""
    from dcign_fast.ops.phases import multiply_adds, output_size

    def axis_taps(size: int, kernel: int, padding: int, scale: int) -> int:
        return sum(
            len({(o + u - padding) // scale for u in range(kernel)})
            for o in range(output_size(size, kernel, padding, scale))
        )

    for size, kernel, padding, scale in [
        ((5, 7), (3, 4), (1, 2), 2),
        ((4, 3), (7, 2), (3, 0), 3),
        ((6, 6), (5, 5), (2, 2), 2),
    ]:
        want = axis_taps(size[0], kernel[0], padding[0], scale) * axis_taps(size[1], kernel[1], padding[1], scale)
        assert multiply_adds(size, kernel, padding, scale) == want


# ------------------------------------------------------------------------------------------------ sample_latents


@pytest.mark.parametrize("seed,same_bits", [(2**63, -(2**63)), (2**64 - 1, -1)])
def test_seeds_past_int64_take_the_op_path_as_their_uint64_bits(seed: int, same_bits: int) -> None:
    """Seeds in [2**63, 2**64) are documented: the custom op's seed argument is an int64, so they reach it as the
    int64 with the same bits, and draw what the negative seed with those bits draws, by either path."""
    mu, logvar = torch.randn(3, 4), torch.randn(3, 4)
    eager = dc.sample_latents(mu, logvar, seed=seed, backend="torch")
    with torch.device("cpu"):  # a torch-function mode: the call goes through the custom op itself
        through_the_op = dc.sample_latents(mu, logvar, seed=seed, backend="torch")
    same = dc.sample_latents(mu, logvar, seed=same_bits, backend="torch")
    reference = dc.sample_latents(mu, logvar, seed=seed, backend="reference")
    for got in (through_the_op, same):
        assert all(torch.equal(g, e) for g, e in zip(got, eager))
    assert all(torch.allclose(r, e, rtol=1e-6, atol=1e-6) for r, e in zip(reference, eager))


def test_a_seed_none_gradient_penalty_regenerates_the_forwards_noise() -> None:
    """With seed=None the forward draws (seed, offset); the double backward (a gradient penalty) must regenerate
    eps there too, not at offset 0, which an explicit seed (offset 0) cannot tell apart. The reference draws the
    same pair from the same generator state, so both backends' second-order gradients agree."""
    mu, logvar = torch.randn(5, 7, dtype=torch.float64), 0.5 * torch.randn(5, 7, dtype=torch.float64)
    active, weights = torch.arange(7) % 2 == 0, torch.randn(5, 7, dtype=torch.float64)
    generator_seed = int(torch.randint(2**31, ()))
    results = []
    for backend in ("torch", "reference"):
        torch.manual_seed(generator_seed)
        leaves = [mu.clone().requires_grad_(), logvar.clone().requires_grad_()]
        z, kl = dc.sample_latents(*leaves, active, invariance=0.2, backend=backend)
        grads = torch.autograd.grad((z * weights).sum() + kl.sum(), leaves, create_graph=True)
        results.append(torch.autograd.grad(sum(g.square().sum() for g in grads), leaves))
    for got, want in zip(*results):
        assert rel_error(got, want) < 1e-10


def test_normal_fast_takes_a_tensor_seed_with_an_int_offset() -> None:
    """philox's seed and offset are each an int or a 0-d tensor, and normal_fast is normal bit for bit. With a
    tensor seed and an int offset, its first round xored the int high word with the tensor key into a 0-d tensor,
    which the next in-place xor could not broadcast to the counters' shape (RuntimeError)."""
    from dcign_fast.ops import philox

    seed = torch.tensor(torch.randint(2**62, ()).item())
    assert torch.equal(philox.normal_fast(seed, 7, (4, 5)), philox.normal(seed, 7, (4, 5)))


# ------------------------------------------------------------------------------------------------ backends, op entry


def test_an_empty_or_zero_interpreter_variable_means_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """TRITON_INTERPRET and the CUDA emulation variable are off when unset, empty or "0" (an exported empty
    variable must not route the triton backend to the slow interpreter, or the cuda backend to the emulation)."""
    from dcign_fast.ops.backends import CUDA_EMULATION_ENV, cuda_emulating, triton_interpreting

    for value, on in (("", False), ("0", False), ("1", True)):
        monkeypatch.setenv("TRITON_INTERPRET", value)
        monkeypatch.setenv(CUDA_EMULATION_ENV, value)
        assert triton_interpreting() is on and cuda_emulating() is on


def test_the_cuda_emulation_runs_cpu_tensors_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """The emulation stands in for CUDA on CPU tensors; backend="cuda" on another device (meta) is still refused
    by name."""
    from dcign_fast.ops.backends import CUDA_EMULATION_ENV, check_backend_runs_on

    monkeypatch.setenv(CUDA_EMULATION_ENV, "1")
    check_backend_runs_on("cuda", torch.device("cpu"), ("cuda",))
    with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors"):
        check_backend_runs_on("cuda", torch.device("meta"), ("cuda",))


def test_a_layers_parameters_take_the_plain_eager_path() -> None:
    """The common case, a module whose weights are nn.Parameters, runs the ops' eager autograd.Function, not the
    dispatcher's round trips (a fifth to a half of a small layer's host time)."""
    layer = UnpoolConv2d(3, 4, 3, 1, backend="torch")
    y = layer(torch.randn(2, 3, 5, 4))
    assert "eager" in type(y.grad_fn).__name__
    mu, logvar = nn.Parameter(torch.randn(3, 4)), nn.Parameter(torch.randn(3, 4))
    z, _ = dc.sample_latents(mu, logvar, seed=1, backend="torch")
    assert "eager" in type(z.grad_fn).__name__
