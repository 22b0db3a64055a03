"""DCIGN: presets, shapes, loss and backend independence of the state."""

from __future__ import annotations

import copy
import dataclasses
import io

import numpy as np
import pytest
import torch

from dcign_fast.models import DCIGN, PRESETS, DCIGNConfig, preset
from tests.helpers import rel_error

PAPER_DECODER_SIZES = [15, 24, 42, 78, 150]  # from the original's config.lua


def test_paper150_is_the_original_network():
    config = preset("paper150")
    assert config.encoder_sizes() == [150, 73, 34, 15]
    assert config.decoder_sizes() == PAPER_DECODER_SIZES
    model = DCIGN(config)
    assert model.to_mu.in_features == 5400 and model.to_mu.out_features == 200
    convs = [m for m in model.decoder if hasattr(m, "kernel_size")]
    assert [(m.in_channels, m.out_channels, m.kernel_size) for m in convs] == [
        (24, 48, (7, 7)),
        (48, 96, (7, 7)),
        (96, 96, (7, 7)),
        (96, 1, (7, 7)),
    ]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_shapes_and_groups(name):
    model = DCIGN.from_preset(name)
    c = model.config
    assert c.latent_groups["azimuth"] == (0, 1)
    assert c.latent_groups["elevation"] == (1, 2)
    assert c.latent_groups["light"] == (2, 3)
    assert c.latent_groups["intrinsic"] == (3, c.latent_dim)
    x = torch.rand(2, c.in_channels, c.image_size, c.image_size)
    recon, mu, logvar, z = model(x)
    assert recon.shape == x.shape and recon.min() >= 0 and recon.max() <= 1
    assert mu.shape == logvar.shape == z.shape == (2, c.latent_dim)
    losses = model.loss(x, recon, mu, logvar)
    assert set(losses) >= {"total", "recon", "kl"} and torch.isfinite(losses["total"])


def test_loss_is_bce_sum_per_image_plus_kl():
    x, recon = torch.rand(3, 1, 4, 4), torch.rand(3, 1, 4, 4).clamp(0.01, 0.99)
    mu, logvar = torch.randn(3, 5), torch.randn(3, 5)
    losses = DCIGN.loss(x, recon, mu, logvar)
    bce = -(x * recon.log() + (1 - x) * (1 - recon).log()).sum() / 3
    kl = 0.5 * (mu**2 + logvar.exp() - 1 - logvar).sum() / 3
    assert torch.allclose(losses["recon"], bce, rtol=1e-5) and torch.allclose(losses["kl"], kl, rtol=1e-5)
    assert torch.allclose(losses["total"], bce + kl, rtol=1e-5)


def test_state_dict_round_trip_across_backends():
    saved = DCIGN.from_preset("demo64", backend="reference").double().state_dict()
    loaded = DCIGN.from_preset("demo64", backend="torch").double()
    loaded.load_state_dict(saved)
    original = DCIGN.from_preset("demo64", backend="reference").double()
    original.load_state_dict(saved)
    z = torch.randn(3, original.config.latent_dim, dtype=torch.float64)
    assert rel_error(loaded.decode(z), original.decode(z)) < 1e-12
    assert loaded.set_backend("reference").backend == "reference"


def test_bad_config_is_a_clear_error():
    """(Latents in no group are allowed, with a warning: weights saved so must still load.)"""
    with pytest.raises(ValueError, match="the decoder produces"):
        DCIGNConfig(image_size=64)
    with pytest.raises(ValueError, match=r"latent_groups\['light'\]"):
        DCIGNConfig(latent_groups={"light": (2, 300)})
    with pytest.raises(ValueError, match="preset must be one of"):
        DCIGN.from_preset("paper")
    with pytest.raises(ValueError, match=r"preset must be one of .*got \['demo64'\]"):  # (unhashable: a TypeError)
        DCIGN.from_preset(["demo64"])
    with pytest.raises(TypeError, match="encoder_channels must be a tuple .*of channel counts, got 96"):
        DCIGNConfig(encoder_channels=96)
    with pytest.warns(UserWarning, match=r"latent_groups 'a' \(0, 10\) and 'b' \(5, 200\) overlap"):
        DCIGNConfig(latent_dim=200, latent_groups={"a": (0, 10), "b": (5, 200)})
    with pytest.warns(UserWarning, match=r"29 latents, from z\[3\] to z\[31\], belong to no group"):
        DCIGNConfig(latent_dim=32, latent_groups={"azimuth": (0, 1), "elevation": (1, 2), "light": (2, 3)})
    with pytest.raises(TypeError, match="decoder_kernel must be an integer"):
        DCIGNConfig(decoder_kernel=7.0)
    with pytest.raises(ValueError, match=r"encoder_channels\[1\] must be >= 1"):
        DCIGNConfig(encoder_channels=(96, 0, 24))
    for groups, words in [
        ({"azimuth": 0}, r"latent_groups\['azimuth'\] must be a \(start, stop\) pair of ints, got 0"),
        ({"azimuth": (0.5, 1.5)}, r"latent_groups\['azimuth'\] must be a \(start, stop\) pair"),
        ({"azimuth": (0, 1, 2)}, r"latent_groups\['azimuth'\] must be a \(start, stop\) pair"),
        ([("azimuth", (0, 1))], "latent_groups must be a dict"),
    ]:
        with pytest.raises(TypeError, match=words):
            DCIGNConfig(latent_groups=groups)
    with pytest.raises(ValueError, match="latent_dim must be >= 4 for the paper's latent_groups"):
        DCIGNConfig(latent_dim=3)
    with pytest.raises(TypeError, match="config must be a DCIGNConfig .*got str"):
        DCIGN("demo64")


def test_a_model_keeps_its_own_config():
    """Editing the config a model was built from, e.g. for the next model of a sweep, left the first model
    describing itself with the new values: its encode and decode then refused their own latents."""
    config = preset("demo64")
    small = DCIGN(config)
    config.latent_dim = 48
    big = DCIGN(config)
    assert small.config.latent_dim == 32 and big.config.latent_dim == 48
    assert small.decode(torch.randn(2, 32)).shape == (2, 1, 64, 64)


def test_edits_to_a_preset_are_checked_and_the_paper_grouping_follows_latent_dim():
    """The intrinsic group of an edited preset kept ending at the old latent_dim: the new latents were in no
    group, so clamped in every batch. Edits made after the config was built reached DCIGN unchecked."""
    assert dataclasses.replace(preset("demo64"), latent_dim=64).latent_groups["intrinsic"] == (3, 64)
    config = preset("demo64")
    config.latent_dim = 48
    model = DCIGN(config)
    assert model.config.latent_groups["intrinsic"] == (3, 48) and model.to_mu.out_features == 48
    config = preset("paper150")
    config.image_size = 64
    with pytest.raises(ValueError, match="the decoder produces"):
        DCIGN(config)
    custom = {"azimuth": (0, 2), "elevation": (2, 3), "light": (3, 4), "intrinsic": (4, 32)}
    assert DCIGNConfig(**{**preset("demo64").to_dict(), "latent_groups": custom}).latent_groups == custom  # kept
    # Also a dict of the paper's names and kinds of spans, given by hand: it was rewritten to reach latent_dim.
    paper_names = {"azimuth": (0, 1), "elevation": (1, 2), "light": (2, 3), "intrinsic": (3, 20)}
    with pytest.warns(UserWarning, match=r"12 latents, from z\[20\] to z\[31\], belong to no group"):
        assert DCIGNConfig(**{**preset("demo64").to_dict(), "latent_groups": paper_names}).latent_groups == paper_names
    with pytest.raises(ValueError, match=r"latent_groups\['intrinsic'\] = \(3, 300\) must satisfy"):
        DCIGNConfig(**{**preset("demo64").to_dict(), "latent_groups": {**paper_names, "intrinsic": (3, 300)}})
    # Nor when they are a preset's, edited in place (the edit was undone, as the paper's for latent_dim 20).
    config = preset("demo64")
    config.latent_groups["intrinsic"] = (3, 20)
    with pytest.warns(UserWarning, match="12 latents"):
        assert DCIGN(config).config.latent_groups["intrinsic"] == (3, 20)
    # to_dict holds plain types, which torch.load's weights_only (its default) reads back.
    saved = io.BytesIO()
    torch.save(preset("demo64").to_dict(), saved)
    assert DCIGNConfig(**torch.load(io.BytesIO(saved.getvalue()))) == preset("demo64")


@pytest.mark.parametrize(
    "field, value",
    [
        ("image_size", np.int64(64)),
        ("in_channels", np.int32(1)),
        ("latent_dim", np.int64(16)),
        ("encoder_channels", (np.int64(16), 32, np.uint8(32))),
        ("decoder_channels", [np.int16(32), 16]),
        ("encoder_kernel", np.int64(5)),
        ("decoder_kernel", np.int64(5)),
        ("encoder_padding", np.int64(2)),
        ("decoder_padding", np.uint8(2)),
    ],
)
def test_numpy_integers_in_a_config_are_stored_as_ints(field, value, tmp_path):
    """They passed the checks but stayed numpy's: nn.Unflatten refused an image_size or kernel of them, and
    save() a latent_dim (JSON), after the model had been built and trained."""
    for config in (dataclasses.replace(preset("demo64"), **{field: value}), preset("demo64")):
        setattr(config, field, value)  # (the second: an edit after the config was made, checked by DCIGN)
        model = DCIGN(config)
        stored = getattr(model.config, field)
        assert all(type(v) is int for v in (stored if isinstance(stored, tuple) else (stored,)))
        assert model(torch.rand(1, 1, 64, 64))[0].shape == (1, 1, 64, 64)
        assert DCIGN.from_checkpoint(model.save(tmp_path / "m.safetensors")).config == model.config


@pytest.mark.parametrize("field", ["image_size", "latent_dim", "encoder_kernel", "decoder_padding"])
def test_a_bool_is_not_an_integer_field(field):
    with pytest.raises(TypeError, match=f"{field} must be an integer, got True"):
        dataclasses.replace(preset("demo64"), **{field: True})
    with pytest.raises(TypeError, match=r"decoder_channels\[1\] must be an integer, got False"):
        dataclasses.replace(preset("demo64"), decoder_channels=(32, False))


def test_wrong_input_shapes_are_clear_errors():
    model = DCIGN.from_preset("demo64")
    with pytest.raises(ValueError, match=r"x must be \[B, 1, 64, 64\] images for this model, got \(2, 1, 32, 32\)"):
        model(torch.rand(2, 1, 32, 32))
    with pytest.raises(ValueError, match=r"z must be \[B, 32\] codes"):
        model.decode(torch.randn(2, 31))


def test_wrong_input_dtypes_and_an_empty_batch_are_clear_errors():
    model = DCIGN.from_preset("demo64")
    with pytest.raises(TypeError, match=r"x must be floating-point images in \[0, 1\] .*divide by 255.*uint8"):
        model(torch.randint(0, 256, (2, 1, 64, 64), dtype=torch.uint8))
    for autocast in (False, True):  # autocast leaves float64 alone
        with (
            torch.autocast("cpu", enabled=autocast),
            pytest.raises(TypeError, match=r"x must have the model's dtype \(torch.float32\), got torch.float64"),
        ):
            model(torch.rand(2, 1, 64, 64, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"z must be floating-point codes, got torch.int64"):
        model.decode(torch.zeros(2, 32, dtype=torch.long))
    with pytest.raises(ValueError, match=r"x must hold at least one image, got shape \(0, 1, 64, 64\)"):
        model(torch.rand(0, 1, 64, 64))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # which casts 16- and 32-bit floats
        recon, mu = model(torch.rand(2, 1, 64, 64, dtype=torch.float16))[:2]
    assert mu.dtype == torch.bfloat16 and recon.dtype == torch.float32  # (the sigmoid runs in float32)


def test_a_model_under_accelerate_cpu_offload_runs_as_before():
    """Offloaded, the weights wait on the meta device until accelerate's hook loads them in each layer's
    pre-forward: the device check, made before, refused every input ("x must be on the model's device (meta)")."""
    from accelerate import cpu_offload

    model = DCIGN(dataclasses.replace(preset("demo64"), encoder_channels=(8, 8, 8)))
    x, z = torch.rand(2, 1, 64, 64), torch.randn(2, 32)
    before = [model(x, seed=1)[0], model.decode(z)]
    cpu_offload(model, execution_device=torch.device("cpu"))
    assert model.encoder[0].weight.device.type == "meta"
    for got, want in zip([model(x, seed=1)[0], model.decode(z)], before):
        assert torch.equal(got, want)


def test_inputs_on_another_device_than_the_model_are_clear_errors():
    """torch's "Tensor on device meta is not on the expected device cpu!" named neither the argument nor the fix
    (a GPU's "Expected all tensors to be on the same device" likewise); loss's inputs gave "unsupported
    scalarType". (A meta tensor stands in for a GPU's.)"""
    model = DCIGN.from_preset("demo64")
    elsewhere = {"x": torch.rand(2, 1, 64, 64, device="meta"), "z": torch.randn(2, 32, device="meta")}
    with pytest.raises(
        ValueError, match=r"x must be on the model's device \(cpu\), got meta: move it with .to\('cpu'\)"
    ):
        model(elsewhere["x"])
    with pytest.raises(ValueError, match=r"z must be on the model's device \(cpu\), got meta"):
        model.decode(elsewhere["z"])
    x = torch.rand(2, 1, 64, 64)
    recon, mu, logvar, _, kl = model(x, return_kl=True)
    for name, t in {"recon": recon, "mu": mu, "logvar": logvar, "kl": kl}.items():
        arguments = {"x": x, "recon": recon, "mu": mu, "logvar": logvar, "kl": kl, name: t.to("meta")}
        with pytest.raises(ValueError, match=rf"{name} must be on x's device \(cpu\), got meta"):
            model.loss(**arguments)


def test_active_mask_is_exactly_the_group_on_the_models_device():
    config = dataclasses.replace(preset("demo64"), latent_groups={"a": (0, 3), "b": (3, 5), "c": (5, 32)})
    model = DCIGN(config).to("meta")
    mask = model.active_mask("b")
    assert mask.device.type == "meta" and mask.dtype == torch.bool and mask.shape == (32,)
    assert model(torch.empty(2, 1, 64, 64, device="meta"), mask)[0].shape == (2, 1, 64, 64)  # shapes on meta
    assert DCIGN(config).active_mask("b").tolist() == [False] * 3 + [True] * 2 + [False] * 27
    with pytest.raises(ValueError, match=r"group must be one of the model's latent groups \['a', 'b', 'c'\], got 'z'"):
        model.active_mask("z")
    with pytest.raises(ValueError, match=r"group must be one of .*got \['b'\]"):  # (unhashable: a TypeError)
        model.active_mask(["b"])


@pytest.mark.parametrize("name", ["weights.safetensors", "run"])
def test_save_writes_what_from_checkpoint_reads(tmp_path, name):
    model = DCIGN(dataclasses.replace(preset("demo64"), encoder_channels=(8, 8, 8)))
    path = model.save(tmp_path / name)
    assert path == (tmp_path / name if name.endswith(".safetensors") else tmp_path / name / "model.safetensors")
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind
    loaded = DCIGN.from_checkpoint(tmp_path / name, backend="reference")
    assert loaded.config == model.config and loaded.backend == "reference"
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    model.to_mu.bias.data += torch.randn_like(model.to_mu.bias)  # saved again, over the first file
    model.save(tmp_path / name)
    assert torch.equal(DCIGN.from_checkpoint(path).to_mu.bias, model.to_mu.bias)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_from_checkpoint_gives_the_model_back_in_the_dtype_it_was_saved_in(tmp_path, dtype):
    """A float64 (or bfloat16) model came back float32: its weights rounded, without a word."""
    model = DCIGN(dataclasses.replace(preset("demo64"), encoder_channels=(8, 8, 8))).to(dtype)
    loaded = DCIGN.from_checkpoint(model.save(tmp_path / "model.safetensors"))
    for key, value in model.state_dict().items():
        assert loaded.state_dict()[key].dtype == dtype and torch.equal(loaded.state_dict()[key], value), key


def test_saves_from_two_threads_to_one_path_never_collide(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    model = DCIGN(dataclasses.replace(preset("demo64"), encoder_channels=(4, 4, 4)))
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda _: model.save(tmp_path / "m.safetensors"), range(16)))
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]
    assert torch.equal(DCIGN.from_checkpoint(tmp_path / "m.safetensors").to_mu.weight, model.to_mu.weight)


def test_loss_gradient_stays_finite_where_the_sigmoid_saturates():
    x = torch.rand(2, 1, 4, 4)
    recon = torch.rand(2, 1, 4, 4)
    recon[0, 0, 0, 0], recon[1, 0, 0, 0] = 0.0, 1.0
    recon.requires_grad_()
    losses = DCIGN.loss(x, recon, torch.randn(2, 3), torch.randn(2, 3))
    losses["total"].backward()
    assert torch.isfinite(losses["total"]) and torch.isfinite(recon.grad).all()
    recon = recon.detach().clone()
    recon[1, 0, 2, 2] = float("nan")
    assert torch.isnan(DCIGN.loss(x, recon, torch.randn(2, 3), torch.randn(2, 3))["total"])


@pytest.mark.parametrize(
    "mu, kl, words",
    [
        ((3, 5), None, r"mu must be \[B, D\] with x's batch size B=2, got shape \(3, 5\)"),
        ((2, 5, 1), None, r"mu must be \[B, D\]"),
        ((2, 5), (5,), r"kl must be \[B\] with x's batch size B=2, got shape \(5,\)"),
        ((2, 5), (2, 1), r"kl must be \[B\]"),
    ],
)
def test_loss_refuses_latents_or_kl_of_another_batch(mu, kl, words):
    x = torch.rand(2, 1, 4, 4)
    with pytest.raises(ValueError, match=words):
        DCIGN.loss(x, x.clone(), torch.randn(mu), torch.randn(mu), None if kl is None else torch.rand(kl))


@pytest.mark.parametrize(
    "change, error, words",
    [
        ({"logvar": torch.randn(2, 1)}, ValueError, r"logvar must have mu's shape \(2, 5\), got \(2, 1\)"),
        (
            {"recon": torch.rand(2, 1, 4, 3)},
            ValueError,
            r"recon must have x's shape \(2, 1, 4, 4\), got \(2, 1, 4, 3\)",
        ),
        ({"mu": torch.ones(2, 5, dtype=torch.bool)}, TypeError, r"mu must be a floating-point tensor, got torch.bool"),
        ({"x": None}, TypeError, r"x must be a floating-point tensor, got NoneType"),
        ({"kl": [0.0, 0.0]}, TypeError, r"kl must be a floating-point tensor, got list"),
        # Targets outside [0, 1] (a device-side assert in CUDA's BCE): 0..255 pixels, NaN, negative values.
        ({"x": torch.rand(2, 1, 4, 4) * 255}, ValueError, r"x must hold images in \[0, 1\].*divide by 255"),
        ({"x": torch.full((2, 1, 4, 4), float("nan"))}, ValueError, r"x must hold images in \[0, 1\].*nan"),
        ({"x": -torch.rand(2, 1, 4, 4)}, ValueError, r"x must hold images in \[0, 1\].*, got \[-0"),
        # recon outside [0, 1]: torch's error named neither recon nor the likely cause (decode_logits' logits).
        ({"recon": torch.randn(2, 1, 4, 4)}, ValueError, r"recon must be in \[0, 1\] .*decode, not decode_logits"),
        ({"recon": 1 + torch.rand(2, 1, 4, 4)}, ValueError, r"recon must be in \[0, 1\] .*got \[1\."),
        ({"recon": -torch.rand(2, 1, 4, 4)}, ValueError, r"recon must be in \[0, 1\] .*got \[-0\."),
        (  # a NaN (allowed: the loss is NaN) does not hide a value outside
            {"recon": torch.tensor([float("nan"), 2.0]).repeat(16).view(2, 1, 4, 4)},
            ValueError,
            r"recon must be in \[0, 1\] .*got \[0\.5, 2\.0\]",
        ),
        # An empty batch gave a NaN loss (forward refuses it); x without its batch dimension was blamed on mu, or
        # (0-d) gave an IndexError.
        (
            {"x": torch.rand(0, 1, 4, 4), "recon": torch.rand(0, 1, 4, 4)},
            ValueError,
            r"x must hold at least one image, got shape \(0, 1, 4, 4\)",
        ),
        (
            {"x": torch.rand(1, 4, 4), "recon": torch.rand(1, 4, 4)},
            ValueError,
            r"x must be \[B, C, S, S\] .*\(1, 4, 4\)",
        ),
        (
            {"x": torch.tensor(0.5), "recon": torch.tensor(0.5)},
            ValueError,
            r"x must be \[B, C, S, S\] .*got shape \(\)",
        ),
    ],
)
def test_loss_names_a_mismatched_or_wrongly_typed_argument(change, error, words):
    """A logvar that broadcasts against mu would give a finite loss on the wrong scale."""
    x = torch.rand(2, 1, 4, 4)
    args = {"x": x, "recon": x.clone(), "mu": torch.randn(2, 5), "logvar": torch.randn(2, 5), "kl": None, **change}
    with pytest.raises(error, match=words):
        DCIGN.loss(**args)


@pytest.mark.filterwarnings("ignore:.*batching rule")
def test_loss_under_vmap_matches_a_loop():
    """The loss's target check reads x's values, which vmap's batched wrappers do not hold: it stands aside."""
    x = torch.rand(3, 2, 1, 4, 4)
    args = [torch.rand(3, 2, 1, 4, 4), torch.randn(3, 2, 5), torch.randn(3, 2, 5)]
    batched = torch.func.vmap(lambda *t: DCIGN.loss(*t)["total"])(x, *args)
    assert torch.allclose(batched, torch.stack([DCIGN.loss(*t)["total"] for t in zip(x, *args)]))


@pytest.mark.cuda
def test_loss_checks_targets_on_a_gpu_at_its_first_call_per_device(monkeypatch):
    """Every call would sync the host with the GPU; the first catches a pipeline that yields 0..255."""
    from dcign_fast.models import dcign

    monkeypatch.setattr(dcign, "_RANGES_CHECKED_ON", set())
    x = torch.rand(2, 1, 4, 4, device="cuda")
    args = {"recon": x.clone(), "mu": torch.randn(2, 5, device="cuda"), "logvar": torch.randn(2, 5, device="cuda")}
    with pytest.raises(ValueError, match="divide by 255"):
        DCIGN.loss(x * 255, **args)
    with pytest.raises(ValueError, match="recon must be in"):
        DCIGN.loss(x, **{**args, "recon": x - 1})
    assert not dcign._RANGES_CHECKED_ON
    DCIGN.loss(x, **args)
    assert {x.device} == dcign._RANGES_CHECKED_ON


def test_gradient_penalty_through_the_whole_model_matches_reference():
    """An input-gradient penalty differentiates the backward of both fused ops (create_graph=True)."""
    x = torch.rand(2, 1, 64, 64, dtype=torch.float64)
    active = torch.arange(32) < 1

    def penalised_grads(backend: str) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = DCIGN.from_preset("demo64", backend=backend).double()
        image = x.clone().requires_grad_()
        recon, mu, logvar, _, kl = model(image, active, invariance=0.01, seed=3, return_kl=True)
        loss = model.loss(x, recon, mu, logvar, kl=kl)["total"]
        (grad_image,) = torch.autograd.grad(loss, image, create_graph=True)
        grad_image.square().sum().backward()
        return [p.grad for p in model.parameters()]

    for got, want in zip(penalised_grads("torch"), penalised_grads("reference")):
        assert rel_error(got, want) < 1e-9


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_trains_under_bf16_autocast(backend):
    """Autocast (the trainer's default on GPUs) casts the fused ops' inputs as it does F.conv2d's."""
    model = DCIGN.from_preset("demo64", backend=backend)
    x = torch.rand(2, 1, 64, 64)
    active = torch.arange(model.config.latent_dim) < 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        recon, mu, logvar, _, kl = model(x, active, invariance=0.01, seed=3, return_kl=True)
        loss = model.loss(x, recon, mu, logvar, kl=kl)["total"]
    loss.backward()
    assert recon.dtype == torch.float32 and torch.isfinite(loss)  # the sigmoid's, in float32 (see below)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("sixteen_bits", ["autocast", "model cast"])
def test_bright_pixels_in_bf16_keep_their_loss_and_gradient(sixteen_bits):
    """The sigmoid ran in bfloat16, which rounds it to exactly 1 from logit ~6 on: a target of 0.9 there cost
    log(0) (clamped to -100: a recon loss 12x float32's) and its gradient was 0. (A helper's audit, custom loop;
    a model cast with .bfloat16() kept its 16-bit sigmoid a while longer.)"""
    torch.manual_seed(0)
    model = DCIGN.from_preset("demo64")
    with torch.no_grad():
        model.decoder[-1].bias.fill_(8.0)  # confident bright pixels, as a trained model gives
    x = torch.full((2, 1, 64, 64), 0.9)
    results = []
    for half in (False, True):
        run = copy.deepcopy(model).bfloat16() if half and sixteen_bits == "model cast" else model
        run.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=half and sixteen_bits == "autocast"):
            recon, mu, logvar, _ = run(x.to(run.decoder[-1].bias.dtype), seed=1)
            loss = run.loss(x, recon, mu, logvar)["recon"]
        loss.backward()
        results.append((recon, loss.item(), run.decoder[-1].bias.grad.item()))
    (plain, plain_loss, plain_grad), (mixed, mixed_loss, mixed_grad) = results
    assert (mixed < 1).all() and mixed.dtype == torch.float32
    assert mixed_loss == pytest.approx(plain_loss, rel=0.02) and mixed_grad == pytest.approx(plain_grad, rel=0.05)


def test_a_float64_model_has_a_float64_loss_for_gradcheck():
    """loss cast everything to float32: a float64 model's loss lost its precision, and gradcheck failed on it."""
    x = torch.rand(2, 1, 4, 4, dtype=torch.float64)
    recon = torch.rand(2, 1, 4, 4, dtype=torch.float64).clamp(0.05, 0.95).requires_grad_()
    mu, logvar = (torch.randn(2, 5, dtype=torch.float64, requires_grad=True) for _ in range(2))
    kl = torch.rand(2, dtype=torch.float64, requires_grad=True)
    assert {t.dtype for t in DCIGN.loss(x, recon, mu, logvar).values()} == {torch.float64}
    assert torch.autograd.gradcheck(lambda r, m, lv: DCIGN.loss(x, r, m, lv)["total"], (recon, mu, logvar))
    assert torch.autograd.gradcheck(lambda r, k: DCIGN.loss(x, r, mu, logvar, kl=k)["total"], (recon, kl))
    half = DCIGN.loss(x.bfloat16(), recon.bfloat16(), mu.bfloat16(), logvar.bfloat16())
    assert {t.dtype for t in half.values()} == {torch.float32}  # float32 at least, as before


def test_loss_calls_bce_outside_autocast(monkeypatch):
    """CUDA autocast raises on F.binary_cross_entropy; the loss must call it with autocast off."""
    import torch.nn.functional as F

    real = F.binary_cross_entropy

    def strict(*args, **kwargs):
        assert not torch.is_autocast_enabled("cpu"), "binary_cross_entropy called under autocast"
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "binary_cross_entropy", strict)
    x, recon = torch.rand(2, 1, 4, 4), torch.rand(2, 1, 4, 4).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = DCIGN.loss(x, recon, torch.randn(2, 3), torch.randn(2, 3))
    assert torch.isfinite(losses["total"]) and losses["total"].dtype == torch.float32


@pytest.mark.parametrize("kernel", [5, 1])  # a 1x1 weight is contiguous in both formats
@pytest.mark.parametrize("channels_last", [False, True])
def test_decoder_runs_in_the_weights_memory_format(channels_last, kernel):
    """A channels_last model (the trainer's default) decodes in channels_last from the first layer on, so the
    fused kernels, whose natural layout it is, never copy between layouts; an NCHW model stays NCHW."""
    config = preset("demo64")
    config.decoder_kernel, config.decoder_padding = kernel, kernel // 2
    model = DCIGN(config)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    seen = []
    for layer in model.decoder:
        layer.register_forward_hook(lambda m, args, out: seen.extend([args[0], out]))
    z = torch.randn(2, model.config.latent_dim)
    recon = model.decode(z)
    wide = [t for t in seen if t.shape[1] > 1]  # a 1-channel tensor is both layouts at once
    assert len(wide) == 2 * len(model.decoder) - 1
    assert all(t.is_contiguous(memory_format=torch.channels_last) != t.is_contiguous() for t in wide)
    assert all(t.is_contiguous(memory_format=torch.channels_last) == channels_last for t in wide)
    reference = DCIGN(config)
    reference.load_state_dict(model.state_dict())
    assert rel_error(recon, reference.decode(z)) < 1e-5
