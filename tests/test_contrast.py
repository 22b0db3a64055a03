"""Identity contrast (train/contrast.py): the other identities' renders, the InfoNCE term against a loop over
its definition, what it trains, and a run with it that resumes exactly."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from dcign_fast.data import SweepSampler
from dcign_fast.models import DCIGN
from dcign_fast.train import TrainConfig, Trainer
from dcign_fast.train.checkpoint import load_checkpoint
from dcign_fast.train.contrast import contrast_views, identity_contrast_loss, with_contrast_images

CONTRAST = {"identity_contrast": 300.0, "contrast_identities": 3, "contrast_views": 3}


def contrast_config(**changes) -> TrainConfig:
    return TrainConfig.from_dict({"batch_size": 6, "device": "cpu", **CONTRAST, **changes})


def test_contrast_views_are_distinct_and_span_the_sweep():
    for n in range(2, 30):
        for m in range(2, n + 1):
            at = contrast_views(n, m).tolist()
            assert len(set(at)) == m and at[0] == 0 and at[-1] == n - 1 and at == sorted(at)


def recording_sampler() -> tuple[SweepSampler, list[dict[str, torch.Tensor]], Callable]:
    """(a 32 px sampler of 6-image sweeps whose renders append their factors to the list, that list, its own
    render)."""
    sampler = SweepSampler(size=32, batch_size=6)
    shown: list[dict[str, torch.Tensor]] = []
    render = sampler.render
    sampler.render = lambda factors: shown.append(factors) or render(factors)  # type: ignore[method-assign]
    return sampler, shown, render


def test_other_identities_are_rendered_at_the_sweeps_views():
    sampler, shown, render = recording_sampler()
    batch = with_contrast_images(sampler, identities=3, views=3)
    for kind in ("azimuth", "elevation", "light"):
        shown.clear()
        images, factors, _ = batch(kind, torch.Generator().manual_seed(1))
        sweep, others = shown
        assert torch.equal(factors["identity"], sweep["identity"]) and images.shape == (6 + 9, 1, 32, 32)
        at = torch.tensor([0, 2, 5])  # (contrast_views(6, 3))
        for name in ("azimuth", "elevation", "light", "light_elevation"):  # each identity at each of those views
            assert torch.equal(others[name], sweep[name][at].repeat(3)), name
        identities = others["identity"].view(3, 3)
        assert (identities == identities[:, :1]).all() and len(set(identities[:, 0].tolist())) == 3
        assert int(sweep["identity"][0]) not in identities[:, 0].tolist()
        assert torch.equal(images[6:], render(others))  # (the sweep's own images first)
    shown.clear()
    images, _, _ = batch("intrinsic", torch.Generator().manual_seed(1))
    assert len(images) == 6 and len(shown) == 1  # an intrinsic batch varies identity at one pose already
    with pytest.raises(ValueError, match="contrast_identities must be below the renderer's 10000 identities"):
        with_contrast_images(sampler, identities=10_000, views=3)


def test_mixed_views_render_every_identity_at_views_that_change_every_factor():
    sampler, shown, render = recording_sampler()
    batch = with_contrast_images(sampler, identities=3, views=4, mixed_views=True)
    for kind in ("azimuth", "elevation", "light"):
        shown.clear()
        images, factors, _ = batch(kind, torch.Generator().manual_seed(2))
        sweep, rendered = shown
        assert images.shape == (6 + 16, 1, 32, 32) and torch.equal(images[6:], render(rendered))
        identities = rendered["identity"].view(4, 4)  # the sweep's own first, then 3 others, each at every view
        assert (identities == identities[:, :1]).all() and len(set(identities[:, 0].tolist())) == 4
        assert int(identities[0, 0]) == int(sweep["identity"][0])
        for name, half_width in vars(sampler.ranges).items():
            views = rendered[name].view(4, 4)
            assert (views == views[:1]).all(), name  # every identity at the same 4 views
            assert len(set(views[0].tolist())) == 4, name  # each drawn on its own, every factor changing
            low, high = half_width if name == "light_elevation" else (-half_width, half_width)
            assert ((low <= views) & (views <= high)).all(), name


class Codes(torch.nn.Module):
    """A stand-in model whose intrinsic latents (z[1:]) are given codes, looked up by each image's first pixel."""

    def __init__(self, codes: torch.Tensor) -> None:
        super().__init__()
        self.codes = torch.nn.Parameter(codes)
        self.config = SimpleNamespace(latent_groups={"intrinsic": (1, 1 + codes.shape[1])})

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        code = self.codes[images.flatten(1)[:, 0].long()]
        mu = torch.cat([torch.randn(len(images), 1), code], dim=1)  # (z[0], pose, is not contrasted)
        return mu, torch.zeros_like(mu)


def contrast_by_definition(
    sweep: torch.Tensor, others: torch.Tensor, n: int, k: int, m: int, t: float, mixed: bool = False
) -> float:
    """The term, one (anchor, view) pair at a time: identity 0 is the sweep's, at each of its n positions;
    identity q > 0 is others[(q - 1) * m + j], at contrast view j. With mixed views the contrast views are m
    drawn ones, none of the sweep's, and identity q >= 0 is others[q * m + j] at drawn view j."""
    if mixed:
        at: list = [("drawn", j) for j in range(m)]
        codes = {(0, ("sweep", p)): sweep[p] for p in range(n)}
        codes |= {(q, at[j]): others[q * m + j] for q in range(k + 1) for j in range(m)}
    else:
        at = contrast_views(n, m).tolist()
        codes = {(0, p): sweep[p] for p in range(n)}
        codes |= {(q, at[j]): others[(q - 1) * m + j] for q in range(1, k + 1) for j in range(m)}
    terms = []
    for (identity, place), anchor in codes.items():
        for view in at:
            if view != place:
                scores = torch.stack([F.cosine_similarity(anchor, codes[q, view], dim=0) for q in range(k + 1)])
                terms.append(-torch.log_softmax(scores.double() / t, dim=0)[identity])
    return float(torch.stack(terms).mean())


@pytest.mark.parametrize("mixed", [False, True], ids=["sweep views", "mixed views"])
def test_the_term_is_its_definition_and_pose_cannot_meet_it(mixed: bool):
    n, k, m = 6, 3, 3
    rendered = (k + mixed) * m
    sweep_images = torch.arange(n).float().view(n, 1, 1, 1)  # image i shows code i
    others = torch.arange(n, n + rendered).float().view(rendered, 1, 1, 1)

    def term(codes: torch.Tensor, temperature: float) -> float:
        model = Codes(codes)
        config = contrast_config(contrast_temperature=temperature, contrast_mixed_views=mixed)
        return float(identity_contrast_loss(model, model.encode(sweep_images)[0], others, config).detach())  # type: ignore[arg-type]

    def by_definition(codes: torch.Tensor, temperature: float) -> float:
        return contrast_by_definition(codes[:n], codes[n:], n, k, m, temperature, mixed)

    codes = torch.randn(n + rendered, 5)
    assert term(codes, 0.5) == pytest.approx(by_definition(codes, 0.5), rel=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # (in float32 all the same: bf16 logits near 10 lose 1/16)
        assert term(codes, 0.1) == pytest.approx(by_definition(codes, 0.1), rel=1e-5)
    # Codes of identity alone (the same at every view): each anchor finds its own identity, at a margin of 1 / t.
    rendered_identity = torch.arange(1 - mixed, k + 1).repeat_interleave(m)
    identity = torch.eye(k + 1)[torch.cat([torch.zeros(n), rendered_identity]).long()]
    assert term(identity, 0.1) == pytest.approx(math.log(1 + k * math.exp(-10)), abs=1e-6)
    # Codes of pose alone (every identity alike at one view): chance, log(k + 1), however distinct the views are.
    at = torch.arange(n, n + m) if mixed else contrast_views(n, m)  # (drawn views: poses none of the sweep has)
    pose = torch.randn(n + m, 5)[torch.cat([torch.arange(n), at.repeat(k + mixed)])]
    assert term(pose, 0.5) == pytest.approx(math.log(k + 1), rel=1e-6)


def test_the_term_trains_the_encoder_alone():
    model = DCIGN.from_preset("demo64")
    sweep, others = torch.rand(6, 1, 64, 64), torch.rand(9, 1, 64, 64)
    identity_contrast_loss(model, model.encode(sweep)[0], others, contrast_config()).backward()
    assert all(p.grad is None for p in model.decoder.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.parameters())


@pytest.mark.parametrize(
    "change, words",
    [
        ({"data": "runs/stored"}, "identity_contrast needs data='render'"),
        ({"contrast_views": 7}, r"contrast_views must be at most batch_size \(6\)"),
        ({"contrast_views": 1}, "contrast_views must be >= 2"),
        ({"contrast_temperature": 0.0}, r"contrast_temperature must be in \(0, .* got 0.0"),
        ({"identity_contrast": -1.0}, r"identity_contrast must be in \[0, .* got -1.0"),
        ({"kind_weights": {"azimuth": 0, "elevation": 0, "light": 0}}, "identity_contrast acts on extrinsic sweeps"),
    ],
)
def test_options_that_cannot_work_are_refused_by_name(change, words):
    with pytest.raises(ValueError, match=words):
        contrast_config(**change)


def test_mixed_views_may_outnumber_a_sweeps_images():
    assert contrast_config(contrast_views=7, contrast_mixed_views=True).contrast_views == 7


@pytest.mark.parametrize("mixed", [False, True], ids=["sweep views", "mixed views"])
def test_progress_pictures_show_a_sweeps_own_images(mixed: bool):
    from dcign_fast.train.data import BatchStream, default_source
    from dcign_fast.train.logs import _fixed_batch

    config = contrast_config(contrast_mixed_views=mixed)
    render, kinds = default_source(config, 64, torch.device("cpu"))
    stream = BatchStream(render, config, kinds=kinds, show_progress=False)
    assert len(stream.render("azimuth", torch.Generator().manual_seed(0))[0]) == 6 + (3 + mixed) * 3
    assert all(len(_fixed_batch(stream, kind)) == 6 for kind in stream.kinds)


def test_a_render_callable_is_refused(tmp_path):
    with pytest.raises(ValueError, match="render= cannot be used with identity_contrast"):
        Trainer(contrast_config(out=str(tmp_path / "run")), render=lambda kind, generator: None)


def test_a_run_with_it_logs_the_term_and_resumes_exactly(tmp_path):
    options = {"steps": 6, "checkpoint_every": 3, "log_every": 1, "image_every": 3, "shape_bias": 1.0, "threads": 1}
    straight = Trainer(contrast_config(out=str(tmp_path / "straight"), **options))
    straight.train()
    straight.close()
    Trainer(contrast_config(out=str(tmp_path / "halves"), **{**options, "steps": 3})).train()
    resumed = Trainer(contrast_config(out=str(tmp_path / "halves"), **options), resume=True)
    resumed.train()
    resumed.close()
    a, b = (load_checkpoint(tmp_path / run / "checkpoints" / "step-00000006")[0] for run in ("straight", "halves"))
    assert all(torch.equal(a[name], b[name]) for name in a)
    lines = (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
    terms = [(line["kind"], line["contrast"]) for line in map(json.loads, lines)]
    assert any(kind != "intrinsic" and term > 0 for kind, term in terms)
    assert all(term == 0 for kind, term in terms if kind == "intrinsic")
