"""Evaluation metrics on cases with known answers, and the eval / rerender / train-from-folders paths."""

from __future__ import annotations

import importlib
import json
import math

import numpy as np
import pytest
import torch

from dcign_fast.cli import main
from dcign_fast.data.sweeps import SweepRanges
from dcign_fast.eval.metrics import encode_sweeps, group_correlation, mig, pearson, zscore
from dcign_fast.eval.recognition import (
    cross_pose_retrieval,
    distinct_identity_sweeps,
    relit_probes,
    top1_retrieval,
)
from dcign_fast.train import TrainConfig, Trainer


def test_pearson_and_per_sweep_correlation():
    a = torch.randn(500)
    assert abs(pearson(a, 3 * a + 1) - 1) < 1e-9 and abs(pearson(a, -a) + 1) < 1e-9
    assert abs(pearson(a, torch.randn(500))) < 0.2
    # Per-sweep z-scoring removes each sweep's offset and scale: a latent that tracks the factor up to a
    # per-sweep affine map still scores 1, and one that flips sign between sweeps scores ~0.
    sweeps, flipped = [], []
    for i in range(10):
        factor = torch.linspace(-1, 1, 20)
        mu = torch.zeros(20, 4)
        mu[:, 0] = (i + 1) * factor + i
        sweeps.append((None, mu, {"azimuth": factor}))
        flipped.append((None, mu * (-1) ** i, {"azimuth": factor}))
    assert group_correlation(sweeps, (0, 1), "azimuth")[0] > 0.999
    assert group_correlation(flipped, (0, 1), "azimuth")[0] < 0.05
    # A group of two latents is scored by their mean: here a latent that tracks the factor and one that undoes it.
    for _, mu, _ in sweeps:
        mu[:, 1] = -0.5 * mu[:, 0]
    assert group_correlation(sweeps, (0, 2), "azimuth")[0] > 0.999
    for _, mu, _ in sweeps:
        mu[:, 1] = -mu[:, 0] + torch.randn(20)
    assert group_correlation(sweeps, (0, 2), "azimuth")[0] < 0.5


def test_flat_and_one_image_sweeps_score_zero_not_noise():
    # In float32 a constant sweep's mean is off by a rounding residue, which a clamped std turned into
    # z-scores near 1 (0.97 for a latent stuck at 0.3).
    for value in (0.3, 0.1, 1.7, -123.456):
        assert torch.equal(zscore(torch.full((20,), value)), torch.zeros(20, dtype=torch.float64))
    assert torch.equal(zscore(torch.tensor([0.5])), torch.zeros(1, dtype=torch.float64))  # was NaN (n - 1 = 0)
    factor = torch.linspace(-1, 1, 20)
    tracking = [(None, factor.view(20, 1), {"azimuth": factor})] * 20
    stuck = [(None, torch.full((20, 1), 0.3), {"azimuth": factor})] * 20
    assert abs(group_correlation(tracking + stuck, (0, 1), "azimuth")[0] - 0.5**0.5) < 1e-12


def test_a_sweep_that_does_not_vary_its_factor_is_refused():
    # Its factor's z-scores are zeros: it scored r = 0 (every sweep flat) or pulled r down, without a word.
    factor = torch.linspace(-1, 1, 20)
    good = (None, factor.view(20, 1), {"azimuth": factor})
    flat = (None, factor.view(20, 1), {"azimuth": torch.full((20,), 0.25)})
    with pytest.raises(ValueError, match=r"batch: its azimuth sweep 1 does not vary azimuth \(all 0.25\)"):
        group_correlation([good, flat, good], (0, 1), "azimuth")


def test_mig_rewards_one_latent_per_factor():
    factors = {"a": torch.rand(2000), "b": torch.rand(2000)}
    disentangled = torch.stack([factors["a"], factors["b"], torch.rand(2000)], dim=1)
    entangled = torch.stack([factors["a"] + factors["b"], factors["a"] - factors["b"], torch.rand(2000)], dim=1)
    assert mig(disentangled, factors) > 0.8
    assert mig(entangled, factors) < 0.3
    # Refused, not averaged over fewer factors or binned into one bin unnoticed.
    with pytest.raises(ValueError, match=r"factors\['c'\] is constant"):
        mig(disentangled, {**factors, "c": torch.full((2000,), 0.5)})
    for bad in (float("nan"), float("inf")):  # (NaN was called constant; inf gave a meaningless 0.06)
        with pytest.raises(ValueError, match=r"factors\['b'\]: mig needs finite values"):
            mig(disentangled, {**factors, "b": torch.cat([factors["b"][:-1], torch.tensor([bad])])})
    with pytest.raises(ValueError, match=r"factors\['b'\] must be \[N\] with latents' N = 2000, got shape \(1999,\)"):
        mig(disentangled, {**factors, "b": factors["b"][1:]})
    with pytest.raises(ValueError, match="factors must name at least one factor"):
        mig(disentangled, {})
    with pytest.raises(ValueError, match=r"latents must be \[N, D\] with D >= 1, got shape \(2000, 0\)"):
        mig(disentangled[:, :0], factors)
    disentangled[3, 0] = float("nan")
    with pytest.raises(ValueError, match="latents: mig needs finite values"):
        mig(disentangled, factors)


def test_mig_is_normalised_by_the_factors_entropy_over_20_bins():
    # A factor of three values with odds 1/2, 1/4, 1/4; one latent tells only its first value from the others:
    # MI log 2 of H = 1.5 log 2, a gap of 2/3 (normalised by log 20 instead, 0.23).
    labels = torch.tensor([0] * 1000 + [1] * 500 + [2] * 500)
    halves = torch.stack([(labels > 0).float(), torch.zeros(2000)], dim=1)
    assert mig(halves, {"a": labels}) == pytest.approx(2 / 3, abs=1e-12)
    # A latent spread evenly over its range and a factor of its 20 equal-width bins: 20 bins tell every value
    # apart (a gap of 1; 10 bins would give log 10 / log 20 = 0.77).
    even = torch.arange(2000.0) / 1999
    assert mig(torch.stack([even, torch.zeros(2000)], dim=1), {"a": (even * 20).long().clamp(max=19)}) == 1.0


class CodeOfIdentity(torch.nn.Module):
    """A stand-in encoder whose latent means are the batch's first pixels (the test's batches put the
    identity there), or NaN when ``diverged``."""

    def __init__(self, diverged: bool = False) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        self.diverged = diverged

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu = images.flatten(1)[:, :4] * (float("nan") if self.diverged else 1.0)
        return mu, torch.zeros_like(mu)


def identity_sweeps(identities: int, factor_value: float = 0.0):
    """batch(kind, generator): 8-image azimuth sweeps of a random one of ``identities`` identities, whose
    one-hot code is the images' first pixels."""

    def batch(kind: str, generator: torch.Generator):
        identity = int(torch.randint(0, identities, (), generator=generator))
        images = torch.zeros(8, 1, 4, 4)
        images.view(8, -1)[:, identity] = 1.0
        factors = {
            "azimuth": torch.linspace(-1, 1, 8) + factor_value,
            "elevation": torch.zeros(8),
            "light": torch.zeros(8),
            "identity": torch.full((8,), identity),
        }
        return images, factors

    return batch


def test_retrieval_sweeps_show_distinct_identities():
    # Four draws from four identities mostly repeat one (the odds of none: 4!/4**4 = 0.09); these do.
    plain = encode_sweeps(CodeOfIdentity(), identity_sweeps(4), "azimuth", 4, seed=0)
    assert len({int(f["identity"][0]) for _, _, f in plain}) < 4
    sweeps = distinct_identity_sweeps(CodeOfIdentity(), identity_sweeps(4), 4, seed=0)
    assert sorted(int(f["identity"][0]) for _, _, f in sweeps) == [0, 1, 2, 3]
    # A perfect code scores 1; with a repeated identity, a probe matched to its twin counted as a miss.
    assert cross_pose_retrieval(sweeps, (0, 4)) == {
        "intrinsic_latents": 1.0,
        "raw_pixels": 1.0,
        "chance": 0.25,
        "identities": 4,
        "probe_view": "same sweep (elevation and light shared with the gallery entry)",
    }
    with pytest.raises(ValueError, match="identities=5, but 120 azimuth sweeps showed only 4 distinct ones"):
        distinct_identity_sweeps(CodeOfIdentity(), identity_sweeps(4), 5, seed=0)
    with pytest.raises(ValueError, match="needs two poses per sweep, got a sweep of 1 image"):
        cross_pose_retrieval([(s[0][:1], s[1][:1], s[2]) for s in sweeps], (0, 4))


class LightingOnly:
    """A stand-in renderer whose images show a sweep's elevation, light azimuth and light elevation in their
    first three pixels and nothing of its identity, with the sampler's render(factors) and ranges."""

    ranges = SweepRanges()

    def render(self, factors: dict) -> torch.Tensor:
        images = torch.zeros(len(factors["identity"]), 1, 4, 4)
        for pixel, key in enumerate(("elevation", "light", "light_elevation")):
            images.view(len(images), -1)[:, pixel] = (factors[key] + 2) / 4  # (in [0, 1])
        return images

    def batch(self, kind: str, generator: torch.Generator):
        n = 8
        fixed = (torch.rand(3, generator=generator) * 2 - 1) * 0.4
        factors = {"azimuth": torch.linspace(-1, 1, n), "elevation": fixed[0].expand(n), "light": fixed[1].expand(n)}
        factors |= {"light_elevation": fixed[2].expand(n), "identity": torch.randint(10**6, (), generator=generator)}
        factors["identity"] = factors["identity"].expand(n)
        return self.render(factors), factors


def test_relit_probes_share_only_identity_and_pose_with_the_gallery():
    """Gallery and probe came from one sweep, whose elevation and light are fixed: an embedding of the lighting,
    with no identity in it at all, retrieved every identity. With the renderer, probes are relit afresh."""
    renderer, model = LightingOnly(), CodeOfIdentity()  # (its latent means: the first pixels, the lighting here)
    sweeps = distinct_identity_sweeps(model, renderer.batch, 50, seed=0)
    assert cross_pose_retrieval(sweeps, (0, 3))["intrinsic_latents"] == 1.0  # the confound
    probes = relit_probes(model, renderer, sweeps, seed=0)
    result = cross_pose_retrieval(sweeps, (0, 3), probes)
    assert result["intrinsic_latents"] <= 0.1 and result["probe_view"] == "elevation and light drawn afresh"
    assert result["raw_pixels"] <= 0.1  # (the pixels, which show the lighting alone, are matched on the same probes)
    # Each probe is its sweep's identity at the azimuth three quarters into the sweep, in the ranges' lighting.
    recorded: list[dict] = []
    renderer.render = lambda factors: recorded.append(factors) or LightingOnly.render(renderer, factors)
    relit_probes(model, renderer, sweeps, seed=0)
    (factors,) = recorded
    assert torch.equal(factors["identity"], torch.stack([f["identity"][0] for _, _, f in sweeps]))
    assert torch.equal(factors["azimuth"], torch.stack([f["azimuth"][6] for _, _, f in sweeps]))
    assert factors["elevation"].abs().max() <= renderer.ranges.elevation and factors["elevation"].std() > 0.1


def test_evaluate_relights_the_probes_of_a_sweep_samplers_batch():
    """The demo passes sampler.batch: it fell back to the same-sweep probes, which only batch=None relit."""
    from dcign_fast.data import SweepSampler
    from dcign_fast.eval import evaluate
    from dcign_fast.models import DCIGN

    sampler = SweepSampler(size=64, batch_size=4)
    result = evaluate(DCIGN.from_preset("demo64"), sampler.batch, sweeps=1, identities=2)["identity_retrieval"]
    assert result["probe_view"] == "elevation and light drawn afresh"
    stored = evaluate(DCIGN.from_preset("demo64"), lambda k, g: sampler.batch(k, g), sweeps=1, identities=2)
    assert stored["identity_retrieval"]["probe_view"].startswith("same sweep")  # (any other callable)


def test_more_retrieval_identities_than_the_renderer_has_are_refused_up_front(monkeypatch):
    from dcign_fast.models import DCIGN

    evaluation = importlib.import_module("dcign_fast.eval.evaluate")  # the module, not the function

    monkeypatch.setattr(evaluation, "encode_sweeps", lambda *args: pytest.fail("drew sweeps before refusing"))
    with pytest.raises(ValueError, match="identities must be at most the renderer's 10000, got 10001"):
        evaluation.evaluate(DCIGN.from_preset("demo64"), identities=10_001)


def test_a_diverged_model_or_unknown_factors_are_refused_by_name():
    # NaN would reach every metric (a max over latents then depends on which latent held it) and eval.json.
    with pytest.raises(ValueError, match="model: its latent means are not finite .* azimuth sweep 0"):
        encode_sweeps(CodeOfIdentity(diverged=True), identity_sweeps(4), "azimuth", 2, seed=0)
    with pytest.raises(ValueError, match=r"batch: the light sweep's true factors \['azimuth'\] are not finite"):
        encode_sweeps(CodeOfIdentity(), identity_sweeps(4, float("nan")), "light", 2, seed=0)
    assert len(encode_sweeps(CodeOfIdentity(), identity_sweeps(4), "azimuth", 3, seed=0, first=5)) == 3


def test_retrieval():
    gallery = torch.randn(30, 8)
    assert top1_retrieval(gallery, gallery + 0.01 * torch.randn(30, 8)) == 1.0
    assert top1_retrieval(gallery, torch.randn(30, 8)) < 0.3
    # z[3:6] code the identity, the same in every view; z[0:3] are large and differ from view to view: matched
    # on the intrinsic slice alone, every identity is found; on all six latents, few are.
    torch.manual_seed(0)
    sweeps = []
    for _ in range(10):
        mu = torch.cat([10 * torch.randn(8, 3), torch.randn(1, 3).expand(8, 3)], dim=1)
        sweeps.append((torch.rand(8, 1, 4, 4), mu, {}))
    result = cross_pose_retrieval(sweeps, (3, 6))
    assert result["intrinsic_latents"] == 1.0 and result["chance"] == 0.1
    assert cross_pose_retrieval(sweeps, (0, 6))["intrinsic_latents"] <= 0.5


def test_short_sweeps_and_a_decoder_that_diverged_are_refused_by_name():
    """Sweeps of one image gave r = 0 and of two only each sweep's sign, silently; a decoder gone NaN gave torch's
    "all elements of input should be between 0 and 1" from evaluation and a black grid from rerender."""
    from dcign_fast.eval import rerender
    from dcign_fast.eval.evaluate import reconstruction_errors
    from dcign_fast.models import DCIGN

    sweeps = encode_sweeps(CodeOfIdentity(), identity_sweeps(4), "azimuth", 3, seed=0)
    for frames in (1, 2):
        short = [(images[:frames], mu[:frames], {k: v[:frames] for k, v in f.items()}) for images, mu, f in sweeps]
        with pytest.raises(ValueError, match=f"azimuth sweeps must hold 3 or more images .*got {frames}"):
            group_correlation(short, (0, 1), "azimuth")
    model = DCIGN.from_preset("demo64")
    with torch.no_grad():
        model.decoder[-1].bias.fill_(float("nan"))
    image = torch.rand(1, 64, 64)
    with pytest.raises(ValueError, match="model: its re-rendered images are not finite"):
        rerender(model, image, "azimuth", torch.zeros(2))
    with pytest.raises(ValueError, match="model: its reconstructions are not finite .* azimuth sweep 0"):
        reconstruction_errors(model, lambda kind, g: (torch.rand(2, 1, 64, 64), {}), seed=0)


def test_train_from_folders_then_eval_and_rerender(tmp_path, capsys):
    from dcign_fast.data import SweepSampler
    from dcign_fast.data.folders import export_sweeps

    sampler = SweepSampler(size=64, batch_size=4, seed=3)
    gen = torch.Generator().manual_seed(0)
    export_sweeps((sampler.batch(kind, gen) for kind in ("azimuth", "light", "intrinsic")), tmp_path / "data")
    config = TrainConfig(
        out=str(tmp_path / "run"),
        steps=2,
        batch_size=4,
        data=str(tmp_path / "data"),
        checkpoint_every=2,
        image_every=100,
        device="cpu",
    )
    trainer = Trainer(config)
    assert trainer.stream.kinds == ["azimuth", "light", "intrinsic"]
    checkpoint = trainer.train().checkpoint

    # Given the weights file, the default output lands beside the run's checkpoints, as for the folder.
    args = ["eval", "--checkpoint", str(checkpoint / "model.safetensors"), "--sweeps", "2", "--identities", "3"]
    assert main(args) == 0
    results = json.loads((tmp_path / "run" / "eval" / "eval.json").read_text())
    assert results["checkpoint"] == str((checkpoint / "model.safetensors").resolve())  # which one of the run's
    assert set(results["correlation"]) == set(results["best_single_latent"]) == {"azimuth", "elevation", "light"}
    assert all(results["best_single_latent"][k] >= results["correlation"][k] - 1e-9 for k in results["correlation"])
    assert (tmp_path / "run" / "eval" / "scatter.png").stat().st_size > 0

    # A run folder stands for its newest checkpoint; the output goes to the run's eval folder too.
    assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--sweeps", "2", "--identities", "3"]) == 0
    assert json.loads((tmp_path / "run" / "eval" / "eval.json").read_text()) == results

    face = next((tmp_path / "data").rglob("*.png"))
    assert (
        main(
            [
                "rerender",
                "--checkpoint",
                str(checkpoint),
                "--image",
                str(face),
                "--out",
                str(tmp_path / "sweeps.png"),
                "--frames",
                "5",
            ]
        )
        == 0
    )
    from PIL import Image

    with Image.open(tmp_path / "sweeps.png") as grid:
        assert grid.width > 5 * 64 and grid.height > 4 * 64
    assert "sweeps.png" in capsys.readouterr().out


def test_demo_end_to_end(tmp_path, monkeypatch, capsys):
    from dcign_fast.train.trainer import stored_config

    evaluation = importlib.import_module("dcign_fast.eval.evaluate")  # the module, not the function
    real = evaluation.evaluate
    monkeypatch.setattr(evaluation, "evaluate", lambda model, batch, out, **kw: real(model, batch, out, 2, 3, **kw))
    out = tmp_path / "demo"
    small = ["--set", "batch_size=4", "--set", "contrast_views=4"]
    assert main(["demo", "--out", str(out), "--steps", "3", "--device", "cpu", *small]) == 0
    # A short demo renders a pool of no more batches per kind than its steps.
    assert (stored_config(out).data_pool, stored_config(out).device) == (3, "cpu")
    printed = capsys.readouterr().out
    for produced in ("checkpoints/step-00000003", "sweeps.png", "eval/eval.json", "eval/scatter.png"):
        assert (out / produced).exists() and produced.split("/")[-1] in printed
    assert json.loads((out / "eval" / "eval.json").read_text())["checkpoint"] == str(out / "checkpoints/step-00000003")
    # A resumed demo keeps its own step count unless --steps is given (the 6000 default took over before).
    assert main(["demo", "--out", str(out), "--resume", *small]) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000003"]


def test_eval_output_goes_to_the_run_whichever_path_names_it(tmp_path):
    from dcign_fast.eval.eval_cli import default_out

    step = tmp_path / "run" / "checkpoints" / "step-00000002"
    step.mkdir(parents=True)
    (step / "model.safetensors").touch()
    for path in (tmp_path / "run", tmp_path / "run" / "checkpoints", step, step / "model.safetensors"):
        assert default_out(path) == tmp_path / "run" / "eval", path
    # A weights file kept outside a run (it went two folders up, and raised IndexError near the root).
    (tmp_path / "faces.safetensors").touch()
    assert default_out(tmp_path / "faces.safetensors") == tmp_path / "faces-eval"


def test_rerender_keeps_the_models_mode_and_takes_its_dtype(tmp_path):
    """rerender left a training model in eval mode, and fed float32 images to a float64 (or bf16) model."""
    from dcign_fast.eval import rerender, sweep_grid
    from dcign_fast.models import DCIGN

    model = DCIGN.from_preset("demo64").double().train()
    image = torch.rand(1, 1, 64, 64)
    out = rerender(model, image, "azimuth", torch.tensor([-1.0, 0.0, 1.0]))
    assert out.shape == (3, 1, 64, 64) and out.dtype == torch.float64 and model.training
    assert sweep_grid(model, image[0], tmp_path / "grid.png", count=3).stat().st_size > 0 and model.training
    with pytest.raises(ValueError, match=r"image must be one image, .* got shape \(2, 1, 64, 64\)"):
        rerender(model, torch.rand(2, 1, 64, 64), "azimuth", torch.tensor([0.0]))
    # uint8 pixels reached the model as 0..255 and gave garbage, without a word
    with pytest.raises(TypeError, match=r"image must be floating-point images in \[0, 1\] \(uint8 pixels: divide by"):
        rerender(model, (image * 255).byte(), "azimuth", torch.tensor([0.0]))
    with pytest.raises(TypeError, match=r"image must be floating-point images .* got torch.uint8"):
        sweep_grid(model, (image * 255).byte(), tmp_path / "grid.png", count=3)
    with pytest.raises(ValueError, match=r"values must be a 1-D tensor \[V\] .* got \(3, 2\)"):
        rerender(model, image, "azimuth", torch.zeros(3, 2))
    with pytest.raises(TypeError, match=r"count must be an integer, got 2.5"):
        sweep_grid(model, image, tmp_path / "grid.png", count=2.5)


def test_a_model_without_the_paper_groups_is_refused_by_name(tmp_path):
    from dcign_fast.eval import evaluate, sweep_grid
    from dcign_fast.models import DCIGN, preset

    config = preset("demo64")
    config.latent_groups = {"pose": (0, 2), "rest": (2, 32)}
    model = DCIGN(config)
    with pytest.raises(ValueError, match=r"sweep_grid needs the latent groups .* lack \['azimuth', 'elevation'"):
        sweep_grid(model, torch.rand(1, 64, 64), tmp_path / "grid.png")
    with pytest.raises(ValueError, match=r"evaluate needs the latent groups"):
        evaluate(model, sweeps=1)
    with_paper_groups = DCIGN.from_preset("demo64")
    with pytest.raises(ValueError, match="sweeps must be >= 1, got 0"):  # (torch.cat's error on no sweeps)
        evaluate(with_paper_groups, sweeps=0)
    with pytest.raises(ValueError, match="identities must be >= 1, got 0"):
        evaluate(with_paper_groups, identities=0)
    with pytest.raises(TypeError, match="model must be a DCIGN, got NoneType"):
        evaluate(None)


def test_a_latent_that_falls_as_the_factor_rises_scores_one():
    """|r|: the sign of a latent's code is arbitrary (best_single_latent and the scatter plot title say |r|)."""
    factor = torch.linspace(-1, 1, 20)
    falling = [(None, -factor.view(20, 1), {"azimuth": factor})] * 5
    assert group_correlation(falling, (0, 1), "azimuth")[0] > 0.999


def test_binned_puts_the_maximum_in_the_last_of_its_bins():
    from dcign_fast.eval.metrics import binned

    assert binned(torch.tensor([0.0, 0.4, 0.6, 1.0]), bins=2).tolist() == [0, 0, 1, 1]


class ConstantDecoder(torch.nn.Module):
    """A stand-in model whose reconstructions are all 0.25 (logits log 1/3), whatever the input."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(len(images), 2), torch.zeros(len(images), 2)

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        return torch.full((len(z), 1, 4, 4), math.log(1 / 3))


def test_a_16_bit_models_reconstruction_bce_is_its_float32_copys():
    """A bfloat16 sigmoid is exactly 1 from a logit of ~7 on: the BCE of a pixel below 1 there was log(0),
    clamped to -100 (337,500 per image against float32's 26,987 with these saturated logits)."""
    from dcign_fast.data import SweepSampler
    from dcign_fast.eval.evaluate import reconstruction_errors
    from dcign_fast.models import DCIGN

    model = DCIGN.from_preset("demo64").eval()
    torch.nn.init.constant_(model.decoder[-1].bias, 8.0)
    batch = SweepSampler(size=64, batch_size=4).batch
    full = reconstruction_errors(model, batch, seed=0, count=2)
    half = reconstruction_errors(model.to(torch.bfloat16), batch, seed=0, count=2)
    assert half["bce_per_image"] == pytest.approx(full["bce_per_image"], rel=0.05)
    assert half["mse_per_pixel"] == pytest.approx(full["mse_per_pixel"], rel=0.05)


def test_reconstruction_errors_are_per_image_and_per_pixel():
    from dcign_fast.eval.evaluate import reconstruction_errors

    def black(kind: str, generator: torch.Generator):  # 3-image sweeps of 16 black pixels
        return torch.zeros(3, 1, 4, 4), {}

    errors = reconstruction_errors(ConstantDecoder(), black, seed=0, count=10)
    assert errors["mse_per_pixel"] == pytest.approx(0.25**2)
    assert errors["bce_per_image"] == pytest.approx(-16 * torch.log(torch.tensor(0.75)).item())


def test_all_the_renderers_identities_may_be_asked_for(monkeypatch):
    from dcign_fast.models import DCIGN

    evaluation = importlib.import_module("dcign_fast.eval.evaluate")

    class Drawn(Exception):
        pass

    def refuse(*args):
        raise Drawn

    monkeypatch.setattr(evaluation, "encode_sweeps", refuse)
    with pytest.raises(Drawn):  # got past the check
        evaluation.evaluate(DCIGN.from_preset("demo64"), identities=10_000)


def test_each_kind_is_evaluated_on_sweeps_of_its_own(monkeypatch):
    from dcign_fast.models import DCIGN

    evaluation = importlib.import_module("dcign_fast.eval.evaluate")
    seeds = []

    def record(model, batch, kind, count, seed, first=0):
        seeds.append(seed)
        if len(seeds) == 4:
            raise StopIteration
        return []

    monkeypatch.setattr(evaluation, "encode_sweeps", record)
    monkeypatch.setattr(evaluation, "group_correlation", lambda *args: (0.0, None, None))
    with pytest.raises(StopIteration):
        evaluation.evaluate(DCIGN.from_preset("demo64"), identities=2)
    assert len(set(seeds)) == 4


def test_a_probe_is_retrieved_by_its_own_nearest_gallery_entry():
    # Both probes lie nearest gallery row 0: probe 0 is matched, probe 1 is not (1/2). Row by row of the gallery
    # instead, the nearest probe to row 0 is probe 1 and to row 1 probe 0: none matched.
    gallery = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    probes = torch.tensor([[1.0, 0.9], [1.0, 0.5]])
    assert top1_retrieval(gallery, probes) == 0.5


def test_retrieval_matches_by_direction_not_distance():
    # Probe 0 points along gallery row 0 but lies nearer row 1; probe 1 the other way round.
    gallery = torch.tensor([[1.0, 0.0], [7.0, 7.0]])
    probes = torch.tensor([[10.0, 0.0], [1.0, 1.2]])
    assert top1_retrieval(gallery, probes) == 1.0  # (Euclidean distance: 0.0)
    with pytest.raises(ValueError, match=r"gallery and probes must be \[N, F\] tensors of one shape"):
        top1_retrieval(gallery, probes[:1])


def test_gallery_and_probes_are_views_at_two_poses():
    """The gallery is the view a quarter into each sweep, the probe three quarters in: here each probe looks
    like the next identity's gallery view, so none is recognised (at one pose, all would be)."""
    codes = torch.eye(4)
    sweeps = []
    for i in range(4):
        mu = codes[i].repeat(8, 1)
        mu[6] = codes[(i + 1) % 4]
        sweeps.append((mu.view(8, 1, 2, 2), mu, {}))
    result = cross_pose_retrieval(sweeps, (0, 4))
    assert result["intrinsic_latents"] == 0.0 and result["raw_pixels"] == 0.0


def test_rerender_sets_the_group_to_each_value_and_keeps_an_eval_model_in_eval():
    from dcign_fast.eval import rerender
    from dcign_fast.models import DCIGN

    model = DCIGN.from_preset("demo64").eval()
    decoded, decode = [], model.decode
    model.decode = lambda z: decoded.append(z.clone()) or decode(z)
    values, image = torch.tensor([-2.0, 0.0, 3.0]), torch.rand(1, 1, 64, 64)
    rerender(model, image, "azimuth", values)
    start, stop = model.config.latent_groups["azimuth"]
    assert torch.equal(decoded[0][:, start:stop], values.view(3, 1).expand(3, stop - start))
    # The other latents stay at the image's posterior mean, in every frame (not zeros: the image is kept).
    mu = model.encode(image)[0]
    others = torch.cat([decoded[0][:, :start], decoded[0][:, stop:]], dim=1)
    assert torch.equal(others, torch.cat([mu[:, :start], mu[:, stop:]], dim=1).expand(3, -1))
    assert not model.training


def test_sweep_values_span_the_groups_latent_over_the_images():
    from dcign_fast.eval.rerender import sweep_values
    from dcign_fast.models import DCIGN

    model = DCIGN.from_preset("demo64").eval()
    images = torch.rand(6, 1, 64, 64)
    start, stop = model.config.latent_groups["light"]
    latent = model.encode(images)[0][:, start:stop].mean(dim=1)
    values = sweep_values(model, images, "light", 5)
    assert values[0] == pytest.approx(latent.min().item()) and values[-1] == pytest.approx(latent.max().item())


def test_mig_is_zero_for_a_factor_two_latents_share():
    """The gap: a factor coded as well by a second latent is not disentangled (MI alone would score it 1)."""
    a = torch.rand(2000)
    assert mig(torch.stack([a, a, torch.rand(2000)], dim=1), {"a": a}) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("command", ["eval", "rerender"])
def test_eval_and_rerender_choose_their_device_as_train_does(command, tmp_path, capsys, monkeypatch):
    """eval defaulted to --device cpu (train to auto) and said nothing of it in --help; rerender had no
    --device. Both default to auto now and resolve it by train's rules, before the checkpoint loads."""
    import argparse

    from dcign_fast.devices import resolve_device

    module = importlib.import_module(f"dcign_fast.eval.{command}_cli")
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    given = ["--checkpoint", str(tmp_path / "missing"), *(["--image", "face.png"] if command == "rerender" else [])]
    device = parser.parse_args(given).device
    assert device == "auto" and resolve_device(device) == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert "auto (a CUDA GPU when there is one" in " ".join(parser.format_help().split())
    monkeypatch.delenv("DCIGN_FAST_DEBUG", raising=False)
    refusals = {"xpu": "--device must be 'auto', cpu, cuda or cuda:N, got 'xpu'", "cuda:99": "--device='cuda:99' but"}
    for bad, words in refusals.items():
        assert main([command, *given, "--device", bad]) == 2  # not "no weights file": the device is checked first
        err = capsys.readouterr().err
        assert f"dcign-fast {command}: error: {words}" in err and "Traceback" not in err


def test_rerender_counts_frames_not_steps_and_keeps_the_old_name(capsys):
    """rerender's --steps meant images per sweep, train's optimizer steps: it is --frames now, and --steps
    stays a second name for it (scripts that used it run as they did)."""
    import argparse

    from dcign_fast.eval.rerender_cli import MAX_FRAMES, add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    given = ["--checkpoint", "c", "--image", "face.png"]
    assert parser.parse_args(given).frames == 9
    for name in ("--frames", "--steps"):
        assert parser.parse_args([*given, name, "5"]).frames == 5
    for frames in (1, MAX_FRAMES + 1):  # one frame was drawn at an end of the range, not the image's own value
        with pytest.raises(SystemExit):
            parser.parse_args([*given, "--frames", str(frames)])
        assert f"must be 2 to {MAX_FRAMES}" in capsys.readouterr().err


def test_rerender_refuses_a_model_of_colour_images_by_name(tmp_path, capsys):
    """It read every image as grey and fed a 3-channel model a 1-channel one (an error about shapes)."""
    import dataclasses

    from dcign_fast.models import DCIGN
    from dcign_fast.models.dcign import PRESETS

    path = DCIGN(dataclasses.replace(PRESETS["demo64"], in_channels=3)).save(tmp_path / "rgb64")
    assert main(["rerender", "--checkpoint", str(path), "--image", "face.png", "--device", "cpu"]) == 2
    assert "takes 3-channel images; rerender reads the image as grey" in capsys.readouterr().err


def _tiny_model():
    from dcign_fast.models import DCIGN

    return DCIGN.from_preset("demo64").eval()


def _not_computed(monkeypatch):
    """rerender's module with sweep_values, which each of sweep_grid's rows calls first, replaced by a test
    failure: what is refused, is refused before anything is computed."""
    rerendering = importlib.import_module("dcign_fast.eval.rerender")
    monkeypatch.setattr(rerendering, "sweep_values", lambda *args: pytest.fail("computed before refusing"))
    return rerendering


@pytest.mark.parametrize(
    "change, error, words",
    [
        (
            {"values": torch.tensor([float("nan"), 0.0])},
            ValueError,
            r"values must be finite, got 1 NaN or inf of 2: tensor\(\[nan, 0\.\]\)",
        ),
        ({"values": torch.tensor([0.0, float("inf")])}, ValueError, r"values must be finite"),
        ({"values": torch.tensor([True, False])}, TypeError, r"values must be real numbers .*torch.bool"),
        ({"group": ["azimuth"]}, ValueError, r"group must be one of \['azimuth', .*got \['azimuth'\]"),
        ({"model": torch.nn.Linear(2, 2)}, TypeError, r"model must be a DCIGN, got Linear"),
        (
            {"image": torch.rand(1, 1, 32, 32)},
            ValueError,
            r"image must be one image, \[1, 1, 64, 64\] or \[1, 64, 64\]",
        ),
        ({"image": torch.rand(1, 3, 64, 64)}, ValueError, r"image must be one image, .*got shape \(1, 3, 64, 64\)"),
        ({"image": torch.rand(1, 1, 64, 64) * 255}, ValueError, r"image must hold images in \[0, 1\].*divide by 255"),
        (
            {"image": torch.full((1, 64, 64), float("nan"))},
            ValueError,
            r"image must hold images in \[0, 1\], got \[nan",
        ),
    ],
)
def test_rerender_names_a_bad_argument(change, error, words):
    """NaN values decoded to NaN images, a list group failed as unhashable, another module on a missing
    attribute, and a wrong image was reported as the model's x; images in 0..255 gave garbage."""
    from dcign_fast.eval import rerender

    args = {"model": _tiny_model(), "image": torch.rand(1, 1, 64, 64), "group": "azimuth"}
    args |= {"values": torch.tensor([0.0, 1.0]), **change}
    with pytest.raises(error, match=words):
        rerender(**args)


@pytest.mark.parametrize(
    "change, error, words",
    [
        ({"spread": float("nan")}, ValueError, r"spread must be > 0 and finite, got nan"),
        ({"spread": float("inf")}, ValueError, r"spread must be > 0 and finite, got inf"),
        ({"spread": 0.0}, ValueError, r"spread must be > 0"),
        ({"spread": "2"}, TypeError, r"spread must be a number, got '2'"),
        ({"references": {"azimut": torch.rand(3, 1, 64, 64)}}, ValueError, r"references: unknown groups \['azimut'\]"),
        ({"references": [torch.rand(3, 1, 64, 64)]}, TypeError, r"references must be a dict .*got list"),
        ({"references": torch.rand(3, 1, 64, 64)}, TypeError, r"references must be a dict .*got Tensor"),
        (
            {"references": {"light": torch.rand(0, 1, 64, 64)}},
            ValueError,
            r"references\['light'\] must hold at least one image, got shape \(0, 1, 64, 64\)",
        ),
        (
            {"references": {"light": torch.rand(3, 1, 32, 32)}},
            ValueError,
            r"references\['light'\] must be \[B, 1, 64, 64\] images for this model, got \(3, 1, 32, 32\)",
        ),
        (
            {"references": {"light": torch.rand(3, 1, 64, 64) * 255}},
            ValueError,
            r"references\['light'\] must hold images in \[0, 1\]",
        ),
        ({"image": torch.rand(64, 64)}, ValueError, r"image must be one image, .*got shape \(64, 64\)"),
        ({"image": torch.rand(1, 64, 64) - 1}, ValueError, r"image must hold images in \[0, 1\]"),
        ({"model": torch.nn.Linear(2, 2)}, TypeError, r"model must be a DCIGN, got Linear"),
        ({"path": "grid.foo"}, ValueError, r"path must end in an image extension such as \.png, got '.*grid\.foo'"),
        ({"path": "grid"}, ValueError, r"path must end in an image extension such as \.png"),
        ({"path": "."}, ValueError, r"path must be a file to write, got the folder"),
        ({"path": "a-file/grid.png"}, ValueError, r"path's folder: cannot make the folder '.*a-file'"),
        ({"path": 3}, TypeError, r"path must be a str or Path of an image file"),
    ],
)
def test_sweep_grid_refuses_a_bad_argument_before_computing(change, error, words, tmp_path, monkeypatch):
    """A NaN or inf spread drew black rows; a misspelt or non-dict references was ignored; PIL refused an
    extension only when saving the computed grid."""
    rerendering = _not_computed(monkeypatch)
    (tmp_path / "a-file").write_text("")
    monkeypatch.chdir(tmp_path)
    args = {"model": _tiny_model(), "image": torch.rand(1, 1, 64, 64), "path": tmp_path / "out" / "grid.png"}
    with pytest.raises(error, match=words):
        rerendering.sweep_grid(**{**args, **change})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # nothing written, no folder made


def test_sweep_grid_takes_numpy_numbers_and_any_reference_groups(tmp_path):
    import numpy as np

    from dcign_fast.eval import sweep_grid

    references = {"light": torch.rand(3, 1, 64, 64)}  # the others span the image's value +- spread
    path = sweep_grid(
        _tiny_model(), torch.rand(1, 64, 64), str(tmp_path / "g.png"), np.int64(3), references, np.float32(1)
    )
    assert path == tmp_path / "g.png" and path.stat().st_size > 0


def _sweeps_of(change=None):
    """batch(kind, generator) for demo64: 4 images, all four factors; ``change(images, factors)`` edits them."""

    def batch(kind, generator):
        images = torch.rand(4, 1, 64, 64, generator=generator)
        factors = {k: torch.rand(4, generator=generator) for k in ("azimuth", "elevation", "light")}
        factors["identity"] = torch.randint(0, 1000, (), generator=generator).expand(4).clone()
        return change(images, factors) if change else (images, factors)

    return batch


@pytest.mark.parametrize(
    "change, error, words",
    [
        (lambda x, f: (x * 255, f), ValueError, r"images must hold images in \[0, 1\], got .*divide by 255"),
        (lambda x, f: (x * 1.5, f), ValueError, r"images must hold images in \[0, 1\], got \[.*, 1\.\d+\];"),
        (lambda x, f: (x - 0.5, f), ValueError, r"images must hold images in \[0, 1\], got \[-0\.\d+"),
        (lambda x, f: ((x * 255).byte(), f), TypeError, r"images must be floating-point images .*torch.uint8"),
        (lambda x, f: (x[:, :, :32, :32], f), ValueError, r"images have shape \(4, 1, 32, 32\)"),
        (lambda x, f: (x[:0], f), ValueError, r"images have shape \(0, 1, 64, 64\)"),
        (lambda x, f: x, TypeError, r"its azimuth sweep 0 is a Tensor"),
        (lambda x, f: (x, list(f.values())), TypeError, r"factors are a list"),
        (lambda x, f: (x, {k: v for k, v in f.items() if k != "azimuth"}), ValueError, r"factors lack \['azimuth'\]"),
        (lambda x, f: (x, {k: v for k, v in f.items() if k != "identity"}), ValueError, r"factors lack \['identity'\]"),
        (lambda x, f: (x, {k: v[:2] for k, v in f.items()}), ValueError, r"factors\['azimuth'\] has shape \(2,\)"),
        (lambda x, f: (x, {k: v.tolist() for k, v in f.items()}), ValueError, r"factors\['azimuth'\] is a list"),
    ],
)
def test_evaluate_checks_what_batch_returns_at_its_first_sweep(change, error, words):
    """torch's errors came from deep inside (a KeyError, a size mismatch in pearson) or, for images outside
    [0, 1], from the reconstruction's BCE after every sweep had been encoded."""
    from dcign_fast.eval import evaluate

    model = _tiny_model()
    encoded, drawn, batch = [], [], _sweeps_of(change)
    model.encode = lambda x: encoded.append(x) or pytest.fail("encoded a sweep before checking it")
    contract = r"; batch\(kind, generator\) must return \(images, factors\): images a floating-point \[B, 1, 64, 64\]"
    with pytest.raises(error, match=r"batch: its azimuth sweep 0.*" + words.removeprefix(r"its azimuth sweep 0")):
        evaluate(model, lambda kind, g: drawn.append(kind) or batch(kind, g), sweeps=3, identities=2)
    with pytest.raises(error, match=contract):
        evaluate(model, batch, sweeps=3, identities=2)
    assert drawn == ["azimuth"] and not encoded


@pytest.mark.parametrize(
    "change, error, words",
    [
        ({"seed": 1.5}, TypeError, r"seed must be an integer, got 1\.5"),
        ({"seed": None}, TypeError, r"seed must be an integer, got None"),
        ({"seed": "0"}, TypeError, r"seed must be an integer, got '0'"),
        ({"batch": 3}, TypeError, r"batch must be a callable, batch\(kind, generator\) -> \(images, factors\), got 3"),
        ({"out": "a-file"}, ValueError, r"out: cannot make the folder 'a-file'"),
        ({"model": torch.nn.Linear(2, 2)}, TypeError, r"model must be a DCIGN, got Linear"),
        ({"checkpoint": 3}, TypeError, r"checkpoint must be a path \(str or Path\), got int"),  # Path(3)'s own
    ],
)
def test_evaluate_refuses_a_bad_argument_before_drawing(change, error, words, tmp_path, monkeypatch):
    evaluation = importlib.import_module("dcign_fast.eval.evaluate")
    monkeypatch.setattr(evaluation, "encode_sweeps", lambda *args: pytest.fail("drew sweeps before refusing"))
    (tmp_path / "a-file").write_text("")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(error, match=words):
        evaluation.evaluate(**{"model": _tiny_model(), "batch": _sweeps_of(), "identities": 2, **change})


def test_evaluate_takes_a_numpy_seed_and_a_negative_one(tmp_path):
    import numpy as np

    from dcign_fast.eval import evaluate

    model = _tiny_model()
    first = evaluate(model, _sweeps_of(), sweeps=2, identities=2, seed=np.int64(-5), out=tmp_path / "e")
    assert first == evaluate(model, _sweeps_of(), sweeps=2, identities=2, seed=-5)
    assert json.loads((tmp_path / "e" / "eval.json").read_text())["sweeps_per_group"] == 2


def test_evaluates_numbers_match_an_independent_computation_on_its_sweeps():
    """Recomputed with numpy from the sweeps evaluate drew: |r| of each group's mean latent, both z-scored per
    sweep and pooled; the best single latent over all of them; MIG over every latent of all four kinds' sweeps
    with the extrinsic factors (not identity). Each sweep's factors are rescaled and shifted, so that pooling them
    without the per-sweep z-scores would give another r."""
    from dcign_fast.data import SweepSampler
    from dcign_fast.eval import evaluate
    from dcign_fast.eval.metrics import EXTRINSIC
    from dcign_fast.models import DCIGN

    torch.manual_seed(0)
    model = DCIGN.from_preset("demo64").eval()
    sampler, drawn = SweepSampler(size=64, batch_size=6), []

    def batch(kind: str, generator: torch.Generator):
        images, factors, _ = sampler.batch(kind, generator)
        scale, shift = 1 + 4 * torch.rand(2, generator=generator)
        drawn.append((kind, images, {k: v * scale + shift if k in EXTRINSIC else v for k, v in factors.items()}))
        return drawn[-1][1:]

    sweeps = 3
    result = evaluate(model, batch, sweeps=sweeps, identities=4)
    metric_sweeps = drawn[: 4 * sweeps]  # (then the reconstructions' and retrieval's)
    assert [kind for kind, _, _ in metric_sweeps] == [k for k in (*EXTRINSIC, "intrinsic") for _ in range(sweeps)]
    with torch.no_grad():
        mus = [model.encode(images)[0].double().numpy() for _, images, _ in metric_sweeps]

    def z(values):
        return (values - values.mean()) / values.std()

    def r(own: range, truths: np.ndarray, start: int, stop: int) -> float:
        latents = np.concatenate([z(mus[j][:, start:stop].mean(axis=1)) for j in own])
        return abs(np.corrcoef(latents, truths)[0, 1])

    groups = model.config.latent_groups
    for i, factor in enumerate(EXTRINSIC):
        own = range(i * sweeps, (i + 1) * sweeps)
        truths = np.concatenate([z(metric_sweeps[j][2][factor].double().numpy()) for j in own])
        assert result["correlation"][factor] == pytest.approx(r(own, truths, *groups[factor]), abs=1e-9)
        best = max(r(own, truths, d, d + 1) for d in range(model.config.latent_dim))
        assert result["best_single_latent"][factor] == pytest.approx(best, abs=1e-9)
    pooled = {k: torch.cat([f[k] for _, _, f in metric_sweeps]) for k in EXTRINSIC}
    assert result["mig"] == pytest.approx(mig(torch.from_numpy(np.concatenate(mus)).float(), pooled), abs=1e-12)
