"""Promises of evaluation, re-rendering, the command line and the benchmark harness that other tests leave open:
each test here fails on a plausible mistake (a mean for a median, a weakened check, a dropped argument) that the
rest of the suite lets through. Inputs are fresh random values; formulas are checked against hand computations."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dcign_fast.cli import main

# ---------------------------------------------------------------------------------------------------- stand-ins


class FirstPixels(torch.nn.Module):
    """A stand-in encoder: the latent means are the images' first ``dim`` pixels."""

    def __init__(self, dim: int = 3) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.ones(()))
        self.dim = dim

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu = images.flatten(1)[:, : self.dim].float()
        return mu, torch.zeros_like(mu)


class FixedLogits(torch.nn.Module):
    """A stand-in model whose reconstruction logits are ``logits`` (one per pixel), whatever the input."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.ones(()))
        self.logits = logits

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ones(len(images), 2), torch.ones(len(images), 2)

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        return self.logits[: len(z)]


def random_sweeps(images: int = 4, size: int = 64):
    """batch(kind, generator) for a demo64 model: random images and factors; it records each generator's seed."""
    seeds: list[int] = []

    def batch(kind: str, generator: torch.Generator):
        seeds.append(generator.initial_seed())
        pictures = 0.05 + 0.9 * torch.rand(images, 1, size, size, generator=generator)
        factors = {k: torch.randn(images, generator=generator) for k in ("azimuth", "elevation", "light")}
        factors["identity"] = torch.randint(0, 10**6, (), generator=generator).expand(images).clone()
        return pictures, factors

    batch.seeds = seeds  # type: ignore[attr-defined]
    return batch


def demo_model():
    from dcign_fast.models import DCIGN

    return DCIGN.from_preset("demo64").eval()


# ------------------------------------------------------------------------------------------------------ metrics


def test_zscore_is_the_population_z_score():
    """metrics.zscore: (x - mean) / the population std (n, not n - 1); not a sum of squares."""
    from dcign_fast.eval.metrics import zscore

    x = 1 + 5 * torch.rand(7)
    values = x.double().numpy()
    expected = (values - values.mean()) / np.sqrt(((values - values.mean()) ** 2).mean())
    np.testing.assert_allclose(zscore(x).numpy(), expected, rtol=1e-12)


def _independent_codes() -> tuple[torch.Tensor, torch.Tensor]:
    """Two integer factors of 20 values each, every pair once (so exactly independent), in a random order."""
    order = torch.randperm(400)
    return order // 20, order % 20


def test_mig_is_the_mean_over_factors_of_their_gaps():
    """A factor coded by one latent alone has a gap of 1, a factor coded equally by two latents 0: MIG 1/2."""
    from dcign_fast.eval.metrics import mig

    a, b = _independent_codes()
    latents = torch.stack([a, b, b], dim=1).float() * (0.5 + torch.rand(()))  # (any scale: binned over the range)
    assert mig(latents, {"a": a, "b": b}) == pytest.approx(0.5, abs=1e-12)
    # One latent, one factor it codes: the gap is its whole mutual information over the entropy.
    assert mig(latents[:, :1], {"a": a}) == pytest.approx(1.0, abs=1e-12)


def test_mig_takes_integer_factors_as_labels_not_bins():
    """Integer factors are labels: 40 labels, a latent that tells only pairs of them apart (20 values, one per bin):
    MI log 20 over H log 40. Binning the labels into 20 bins would merge them and call the code perfect."""
    from dcign_fast.eval.metrics import mig

    labels = torch.randperm(400) % 40
    latents = torch.stack([(labels // 2).float(), torch.full((400,), 0.7)], dim=1)
    assert mig(latents, {"identity": labels}) == pytest.approx(math.log(20) / math.log(40), abs=1e-12)


def test_evaluation_draws_only_held_out_streams(monkeypatch):
    """README: evaluation's generators have odd seeds, training's even (data/seeds.py): the metrics' sweeps, the
    reconstructions' and the relit probes' are all drawn from held-out streams."""
    from dcign_fast.data.sweeps import SweepRanges
    from dcign_fast.eval import recognition
    from dcign_fast.eval.evaluate import reconstruction_errors
    from dcign_fast.eval.metrics import encode_sweeps

    batch = random_sweeps(images=3, size=4)
    encode_sweeps(FirstPixels(), batch, "light", 3, seed=int(torch.randint(0, 10**6, ())))
    reconstruction_errors(FixedLogits(torch.randn(3, 1, 4, 4)), batch, seed=int(torch.randint(0, 10**6, ())))
    assert len(batch.seeds) == 3 + 10 and all(seed % 2 == 1 for seed in batch.seeds)

    drawn: list[int] = []
    real = recognition.stream_generator

    def recorded(*key, **kwargs):
        generator = real(*key, **kwargs)
        drawn.append(generator.initial_seed())
        return generator

    class Renderer:
        ranges = SweepRanges()

        def render(self, factors: dict) -> torch.Tensor:
            return torch.rand(len(factors["identity"]), 1, 4, 4)

    monkeypatch.setattr(recognition, "stream_generator", recorded)
    sweeps = [(None, None, {"azimuth": torch.randn(8), "identity": torch.full((8,), i)}) for i in range(3)]
    recognition.relit_probes(FirstPixels(), Renderer(), sweeps, seed=int(torch.randint(0, 10**6, ())))
    assert len(drawn) == 1 and drawn[0] % 2 == 1


@pytest.mark.parametrize("factor", ["elevation", "light"])
def test_a_sweep_with_any_extrinsic_factor_not_finite_is_refused(factor):
    """encode_sweeps: a ValueError when the batch's extrinsic factors are not finite, whichever of them it is."""
    from dcign_fast.eval.metrics import encode_sweeps

    def batch(kind: str, generator: torch.Generator):
        images, factors = random_sweeps(images=3, size=4)(kind, generator)
        factors[factor][int(torch.randint(0, 3, ()))] = float("nan")
        return images, factors

    with pytest.raises(ValueError, match=rf"batch: the azimuth sweep's true factors \['{factor}'\] are not finite"):
        encode_sweeps(FirstPixels(), batch, "azimuth", 2, seed=0)


def test_reconstruction_bce_is_taken_from_the_logits_in_float32():
    """README: BCE from the logits, in float32. Where the sigmoid rounds to exactly 1 (logits above ~17), a BCE of
    the sigmoid's output clamps log(0) to -100; from a bfloat16 model's logits the float32 BCE still holds."""
    from dcign_fast.eval.evaluate import reconstruction_errors

    logits = torch.cat([20 + 20 * torch.rand(3, 1, 2, 4), 8 * torch.rand(3, 1, 2, 4) - 4], dim=2).bfloat16()
    images = 0.05 + 0.9 * torch.rand(3, 1, 4, 4)
    errors = reconstruction_errors(FixedLogits(logits), lambda kind, g: (images, {}), seed=0, count=1)
    exact, target = logits.double(), images.double()
    bce = (torch.nn.functional.softplus(exact) - target * exact).sum() / 3
    mse = (torch.sigmoid(exact) - target).square().sum() / 3 / 16
    assert errors["bce_per_image"] == pytest.approx(bce.item(), rel=1e-5)
    assert errors["mse_per_pixel"] == pytest.approx(mse.item(), rel=1e-5)


def test_evaluate_records_the_checkpoints_resolved_path(tmp_path, monkeypatch):
    """evaluate's docstring: "checkpoint" (its resolved path) in the results and eval.json, not the text given."""
    from dcign_fast.eval import evaluate

    monkeypatch.chdir(tmp_path)
    result = evaluate(demo_model(), random_sweeps(), sweeps=1, identities=2, checkpoint="run/model.safetensors")
    assert result["checkpoint"] == str(tmp_path.resolve() / "run" / "model.safetensors")


def test_best_single_latent_searches_every_latent_the_last_too():
    """best_single_latent: the best |r| of any one latent. Here the model's last latent, z[31], is azimuth itself
    (an encoder that reads it from a pixel), and its assigned latent z[0] noise: 1 against little."""
    from dcign_fast.eval import evaluate

    model = demo_model()

    def encode(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu = torch.randn(len(images), 32)
        mu[:, 31] = images[:, 0, 0, 0]
        return mu, torch.zeros_like(mu)

    def batch(kind: str, generator: torch.Generator):
        images, factors = random_sweeps(images=6)(kind, generator)
        images[:, 0, 0, 0] = (factors["azimuth"].clamp(-3, 3) + 3) / 6
        return images, {**factors, "azimuth": factors["azimuth"].clamp(-3, 3)}

    model.encode = encode
    result = evaluate(model, batch, sweeps=3, identities=2)
    assert result["best_single_latent"]["azimuth"] == pytest.approx(1.0, abs=1e-6)
    assert result["correlation"]["azimuth"] < 0.9


# -------------------------------------------------------------------------------------------------- recognition


def test_retrieval_reads_only_the_intrinsic_slice_wherever_it_lies():
    """Retrieval on z[0:3], the identity, with large per-view noise after it: every identity found. Latents past
    the slice's end must not count (a model's latent_groups need not end with the intrinsic group)."""
    from dcign_fast.eval.recognition import cross_pose_retrieval

    sweeps = []
    for _ in range(12):
        mu = torch.cat([(1 + torch.rand(1, 3)).expand(8, 3), 20 * torch.randn(8, 3)], dim=1)
        sweeps.append((torch.rand(8, 1, 2, 2), mu, {}))
    result = cross_pose_retrieval(sweeps, (0, 3))
    assert result["intrinsic_latents"] == 1.0
    assert cross_pose_retrieval(sweeps, (0, 6))["intrinsic_latents"] < 0.8  # (the noise does hide them)


def test_relit_probes_draw_elevation_and_light_over_their_whole_ranges():
    """recognition.relit_probes: elevation, light azimuth and light elevation drawn afresh from the sampler's
    ranges: elevation of both signs within +-0.4 rad, light within +-80 degrees (beyond elevation's range)."""
    from dcign_fast.data.sweeps import SweepRanges
    from dcign_fast.eval.recognition import relit_probes

    recorded: list[dict] = []

    class Renderer:
        ranges = SweepRanges()

        def render(self, factors: dict) -> torch.Tensor:
            recorded.append(factors)
            return torch.rand(len(factors["identity"]), 1, 4, 4)

    sweeps = [(None, None, {"azimuth": torch.randn(8), "identity": torch.full((8,), i)}) for i in range(300)]
    probes = relit_probes(FirstPixels(), Renderer(), sweeps, seed=int(torch.randint(0, 10**6, ())))
    (factors,) = recorded
    r = SweepRanges()
    assert len(probes) == 300
    elevation, light, light_elevation = factors["elevation"], factors["light"], factors["light_elevation"]
    assert elevation.abs().max() <= r.elevation
    assert elevation.min() < -r.elevation / 2 and elevation.max() > r.elevation / 2
    assert light.abs().max() <= r.light and light.min() < -2 * r.elevation and light.max() > 2 * r.elevation
    low, high = r.light_elevation
    assert low <= light_elevation.min() and light_elevation.max() <= high and light_elevation.std() > 0.05


# ------------------------------------------------------------------------------------------------- re-rendering


def test_a_compiled_model_is_accepted_as_a_dcign():
    """inference.check_model: torch.compile's wrapper of a DCIGN is one (it forwards config, encode and decode)."""
    from dcign_fast.eval import rerender
    from dcign_fast.eval.inference import check_model

    model = demo_model()
    compiled = torch.compile(model)
    check_model(compiled)
    image, values = torch.rand(1, 1, 64, 64), torch.randn(3)
    assert torch.equal(rerender(compiled, image, "light", values), rerender(model, image, "light", values))


def test_a_training_model_runs_in_eval_mode_and_is_given_back_training():
    """inference.eval_mode: evaluation code runs the model in eval mode (dropout or batch norm a subclass adds
    must not act), and leaves it as it was."""
    from dcign_fast.eval import rerender

    model = demo_model().train()
    modes: list[bool] = []
    encode = model.encode
    model.encode = lambda images: modes.append(model.training) or encode(images)
    rerender(model, torch.rand(1, 1, 64, 64), "elevation", torch.randn(2))
    assert modes == [False] and model.training


def _recording_grid(monkeypatch) -> tuple[object, list, list]:
    """rerender's module with _rerender and save_grid recording what sweep_grid gives them."""
    import importlib

    rerendering = importlib.import_module("dcign_fast.eval.rerender")
    swept: list[tuple[str, torch.Tensor]] = []
    saved: list[tuple[list, list]] = []
    real = rerendering._rerender

    def rerender(model, image, group, values):
        swept.append((group, values.clone()))
        return real(model, image, group, values)

    monkeypatch.setattr(rerendering, "_rerender", rerender)
    monkeypatch.setattr(rerendering, "save_grid", lambda path, rows, labels, scale=1: saved.append((rows, labels)))
    return rerendering, swept, saved


def test_sweep_grid_rows_span_the_images_value_or_the_references_range(tmp_path, monkeypatch):
    """sweep_grid: the input, then one row per extrinsic group; without references a group's values are the
    image's own latent +- spread, with references[group] the range its latent spans over those images."""
    rerendering, swept, saved = _recording_grid(monkeypatch)
    model, image = demo_model(), torch.rand(1, 64, 64)
    references = {"elevation": torch.rand(5, 1, 64, 64)}
    spread = 0.5 + torch.rand(()).item()
    rerendering.sweep_grid(model, image, tmp_path / "g.png", count=4, references=references, spread=spread)
    ((rows, labels),) = saved
    assert labels == ["input", "azimuth", "elevation", "light"] and [len(r) for r in rows] == [1, 4, 4, 4]
    groups = model.config.latent_groups
    with torch.no_grad():
        own = model.encode(image[None])[0][0]
        spanned = model.encode(references["elevation"])[0]
    assert [group for group, _ in swept] == ["azimuth", "elevation", "light"]
    for group, values in swept:
        start, stop = groups[group]
        if group == "elevation":
            latent = spanned[:, start:stop].mean(dim=1)
            expected = torch.linspace(latent.min().item(), latent.max().item(), 4)
        else:
            expected = own[start:stop].mean().item() + torch.linspace(-spread, spread, 4)
        torch.testing.assert_close(values, expected)


def test_sweep_values_follow_the_mean_of_a_groups_latents():
    """A group of several latents (latent_groups are editable): its range is that of their mean, the quantity
    group_correlation scores."""
    from dcign_fast.eval.rerender import sweep_values
    from dcign_fast.models import DCIGN, preset

    config = preset("demo64")
    config.latent_groups = {"azimuth": (0, 3), "elevation": (3, 4), "light": (4, 5), "intrinsic": (5, 32)}
    model = DCIGN(config).eval()
    images = torch.rand(6, 1, 64, 64)
    with torch.no_grad():
        latent = model.encode(images)[0][:, 0:3].mean(dim=1)
    values = sweep_values(model, images, "azimuth", 3)
    torch.testing.assert_close(values, torch.linspace(latent.min().item(), latent.max().item(), 3))


def test_sweep_grid_refuses_a_single_frame(tmp_path):
    """count >= 2: one frame would show an end of the range, not the image's value."""
    from dcign_fast.eval import sweep_grid

    with pytest.raises(ValueError, match="count must be >= 2, got 1"):
        sweep_grid(demo_model(), torch.rand(1, 64, 64), tmp_path / "g.png", count=1)


def test_grid_image_is_as_wide_as_its_longest_row():
    from dcign_fast.eval.grid import LABEL_WIDTH, PAD, grid_image

    shade = 0.2 + 0.6 * torch.rand(())
    rows = [torch.rand(1, 1, 5, 5), torch.full((3, 1, 5, 5), shade.item()), torch.rand(2, 1, 5, 5)]
    picture = grid_image(rows, ["a", "b", "c"])
    assert picture.size == (LABEL_WIDTH + 3 * (5 + PAD), 3 * (5 + PAD) + PAD)
    third_of_row_b = (LABEL_WIDTH + 2 * (5 + PAD) + 2, PAD + (5 + PAD) + 2)
    assert picture.getpixel(third_of_row_b) == (round(shade.item() * 255),) * 3
    with pytest.raises(ValueError, match="got 3 rows but 2 labels"):
        grid_image(rows, ["a", "b"])


# ------------------------------------------------------------------------------------------------ command lines


@pytest.fixture
def saved_model(tmp_path) -> Path:
    return demo_model().save(tmp_path / "model")


def test_rerender_draws_the_frames_asked_for(saved_model, tmp_path):
    """--frames N: each sweep row has N images (the grid's columns), up to MAX_FRAMES."""
    from PIL import Image

    from dcign_fast.eval.grid import LABEL_WIDTH, PAD
    from dcign_fast.eval.rerender_cli import MAX_FRAMES, sweep_frames

    face = tmp_path / "face.png"
    Image.fromarray((torch.rand(80, 80) * 255).to(torch.uint8).numpy()).save(face)
    out = tmp_path / "grid.png"
    argv = ["rerender", "--checkpoint", str(saved_model), "--image", str(face), "--out", str(out), "--device", "cpu"]
    assert main([*argv, "--frames", "3"]) == 0
    with Image.open(out) as grid:
        assert grid.width == LABEL_WIDTH + 3 * (2 * 64 + PAD)  # (drawn at twice the model's size)
    assert sweep_frames(str(MAX_FRAMES)) == MAX_FRAMES


def test_rerender_refuses_an_output_it_cannot_write_before_loading_anything(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["rerender", "--checkpoint", str(tmp_path / "missing"), "--image", "x.png", "--out", "grid.xyz"])
    assert exit_info.value.code == 2 and "must end in an image extension" in capsys.readouterr().err


def test_eval_passes_its_options_to_evaluate(saved_model, monkeypatch, capsys):
    """--sweeps and --identities reach evaluate as given, with the weights file evaluated as checkpoint; their
    defaults are those --help states (40 sweeps, 100 identities)."""
    import importlib

    from dcign_fast.eval.eval_cli import add_arguments

    evaluation = importlib.import_module("dcign_fast.eval.evaluate")
    calls: list[dict] = []
    monkeypatch.setattr(evaluation, "evaluate", lambda model, **kwargs: calls.append(kwargs) or {})
    sweeps, identities = (int(n) for n in torch.randint(2, 30, (2,)))
    argv = ["eval", "--checkpoint", str(saved_model.parent), "--device", "cpu"]
    assert main([*argv, "--sweeps", str(sweeps), "--identities", str(identities)]) == 0
    (kwargs,) = calls
    assert (kwargs["sweeps"], kwargs["identities"]) == (sweeps, identities)
    assert kwargs["checkpoint"] == saved_model.resolve()
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    defaults = parser.parse_args(["--checkpoint", "c"])
    assert (defaults.sweeps, defaults.identities) == (40, 100)
    assert "(default 40)" in parser.format_help() and "(default 100)" in parser.format_help()


def test_info_reports_whether_the_extension_is_built(capsys):
    from dcign_fast.kernels import cuda

    assert main(["info"]) == 0
    assert json.loads(capsys.readouterr().out)["cuda_extension_built"] is cuda.available()


def test_a_run_folder_of_blanks_is_refused():
    from dcign_fast.cli import run_folder

    with pytest.raises(argparse.ArgumentTypeError, match="must name a folder"):
        run_folder(" \t ")


def test_the_demos_options_are_those_the_readme_gives(capsys):
    """README / docs/results.md: the demo pulls with invariance 0.2 and adds the identity contrast at 300, with a
    pool of 150 sweeps per kind."""
    import re

    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    listed = dict(re.findall(r"^  (\w+) = (.+?): ", capsys.readouterr().out, flags=re.MULTILINE))
    assert (listed["invariance"], listed["identity_contrast"], listed["data_pool"]) == ("0.2", "300.0", "150")


QUICK = ["--set", "batch_size=2", "--set", "contrast_views=2", "--set", "device=cpu"]


def test_a_resumed_demo_takes_a_new_step_count(tmp_path):
    """README: `dcign-fast demo --resume` continues to the step count it was started with unless --steps gives
    another: a resume with --steps must not count as a change of the pool it rendered (refused, exit 2)."""
    out = str(tmp_path / "demo")
    assert main(["demo", "--out", out, "--steps", "1", "--set", "time_limit_s=0", *QUICK]) == 75
    assert main(["demo", "--out", out, "--resume", "--steps", "2", "--set", "time_limit_s=0"]) == 75


def test_the_demos_grid_spans_held_out_sweeps(tmp_path, monkeypatch, capsys):
    """The demo's grid moves each extrinsic latent across the range it takes over a held-out sweep of its factor
    (docs/results.md, Re-rendering): sweep_grid gets those sweeps as references."""
    import importlib

    evaluation = importlib.import_module("dcign_fast.eval.evaluate")
    rerendering = importlib.import_module("dcign_fast.eval.rerender")
    grids: list[dict] = []
    monkeypatch.setattr(evaluation, "evaluate", lambda *args, **kwargs: {"correlation": {}})
    monkeypatch.setattr(rerendering, "sweep_grid", lambda model, face, path, **kw: grids.append(kw) or path)
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "1", "--set", "data_pool=1", *QUICK]) == 0
    (kwargs,) = grids
    references = kwargs["references"]
    assert sorted(references) == ["azimuth", "elevation", "light"]
    assert all(images.dim() == 4 and len(images) >= 3 for images in references.values())


# ---------------------------------------------------------------------------------------------------- devices


def test_devices_follow_what_torch_reports(monkeypatch):
    """resolve_device: auto is the GPU when there is one; cuda:N must name a present device; cuda without CUDA is
    refused; other device types (meta) are refused by name."""
    from dcign_fast.devices import check_device, resolve_device

    with pytest.raises(ValueError, match="device must be 'auto', cpu, cuda or cuda:N, got 'meta'"):
        check_device("meta")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="--device='cuda' but CUDA is not available"):
        resolve_device("cuda", "--device")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(ValueError, match=r"device='cuda:1' but this machine has 1 CUDA device\(s\)"):
        resolve_device("cuda:1")


# ----------------------------------------------------------------------------------------------------- bounds


def test_bounds_exclude_their_upper_end_and_refuse_infinities_bools_and_huge_ints():
    from dcign_fast.bounds import Bounds, is_integer

    below = int(torch.randint(2, 100, ()))
    Bounds(0, below=below).check("n", below - 1, integer=True)
    with pytest.raises(ValueError, match=rf"n must be in \[0, {below}\), got {below}"):
        Bounds(0, below=below).check("n", below, integer=True)
    with pytest.raises(ValueError, match="x must be >= -inf and finite, got -inf"):
        Bounds(-math.inf).check("x", -math.inf)
    with pytest.raises(TypeError, match="n must be an integer, got True"):
        Bounds(0).check("n", True, integer=True)
    with pytest.raises(ValueError, match="x must be >= 0 and finite, got an int too large for a float"):
        Bounds(0).check("x", 10**400)
    assert is_integer(np.int64(3)) and not is_integer(True)


# ------------------------------------------------------------------------------------------ benchmark harness


class FakeClock:
    """time.perf_counter for the harness: calls advance it by their planned host time; synchronize by their
    device time."""

    def __init__(self) -> None:
        self.now, self.queued = 0.0, 0.0

    def __call__(self) -> float:
        return self.now

    def call(self, host_ms: float, device_ms: float = 0.0) -> None:
        self.now += host_ms / 1e3
        self.queued = device_ms / 1e3

    def synchronize(self, device: str) -> None:
        self.now += self.queued
        self.queued = 0.0


def test_times_are_medians_of_interleaved_repeats_after_warm_up(monkeypatch):
    """harness.time_side_by_side: warm-up calls first (not timed), then the variants alternate within every repeat;
    each time is the median of its repeats, host and wall alike."""
    from benchmarks import harness

    clock = FakeClock()
    monkeypatch.setattr(harness.time, "perf_counter", clock)
    monkeypatch.setattr(harness, "synchronize", clock.synchronize)
    order: list[str] = []
    host = {"a": [500.0, 500.0, 3.0, 1.0, 40.0], "b": [500.0, 500.0, 2.0, 7.0, 5.0]}  # two warm-ups, three repeats
    device = {"a": [0.0, 0.0, 10.0, 30.0, 20.0], "b": [0.0, 0.0, 1.0, 1.0, 90.0]}

    def variant(name: str):
        def call() -> None:
            i = order.count(name)
            order.append(name)
            clock.call(host[name][i], device[name][i])

        return call

    host_ms: dict[str, float] = {}
    times = harness.time_side_by_side({"a": variant("a"), "b": variant("b")}, "cuda", 2, 3, host_ms)
    assert order == ["a", "a", "b", "b", "a", "b", "a", "b", "a", "b"]
    assert times["a"] == pytest.approx(31.0) and times["b"] == pytest.approx(8.0)  # medians of 13/31/60, 3/8/95
    assert host_ms["a"] == pytest.approx(3.0) and host_ms["b"] == pytest.approx(5.0)


def test_compare_warms_each_variant_up_and_divides_the_baselines_time_by_the_rows(monkeypatch):
    from benchmarks import harness

    timed = {"reference": 3 + 10 * torch.rand(()).item(), "fast": 0.5 + torch.rand(()).item()}
    monkeypatch.setattr(harness, "time_side_by_side", lambda variants, *args, **kwargs: {n: timed[n] for n in variants})
    calls = {"reference": 0, "fast": 0, "dcign_fast compiled": 0}

    def counted(name: str):
        return lambda: calls.__setitem__(name, calls[name] + 1)

    variants = {name: counted(name) for name in calls}
    rows = harness.compare(variants, "cpu", {"case": "c"}, "reference", warmup=0, budget=harness.CompileBudget(0))
    by_backend = {row["backend"]: row for row in rows}
    assert by_backend["fast"]["speedup"] == pytest.approx(timed["reference"] / timed["fast"])
    assert by_backend["reference"]["speedup"] == 1.0
    assert (calls["reference"], calls["fast"]) == (1, 1)  # at least one warm-up call, warmup=0 or not
    assert calls["dcign_fast compiled"] == 0 and by_backend["dcign_fast compiled"]["note"] == harness.BUDGET_SPENT


def test_the_compile_budget_defaults_to_100_seconds(monkeypatch):
    from benchmarks.harness import CompileBudget

    monkeypatch.delenv("DCIGN_BENCH_COMPILE_S", raising=False)
    assert CompileBudget().left == 100
    monkeypatch.setenv("DCIGN_BENCH_COMPILE_S", "7.5")
    assert CompileBudget().left == 7.5


def test_a_gpu_run_is_named_by_its_card_and_a_cpu_run_by_its_cpu_and_threads():
    from benchmarks import report
    from benchmarks.harness import machine_label

    gpu = {"card": "NVIDIA H200", "cpu": "Intel Xeon", "cpu_threads": 16}
    assert machine_label(gpu) == "NVIDIA H200" and report._machine(gpu) == "NVIDIA H200"
    assert report._machine({"cpu": "Intel Xeon", "cpu_threads": 2}) == "Intel Xeon, 2 threads"


# ------------------------------------------------------------------------------------------------------ report


def _run(date: str, rows: list[dict], suite: str = "ops", **machine: object) -> dict:
    machine = {"device": "cpu", "cpu": "Xeon", "cpu_threads": 2, "torch": "2.x", "date": date, **machine}
    return {"suite": suite, "machine": machine, "rows": rows}


def test_results_are_read_in_date_order_not_file_name_order(tmp_path):
    from benchmarks import report

    (tmp_path / "a.json").write_text(json.dumps(_run("2026-03-01", [])))
    (tmp_path / "b.json").write_text(json.dumps(_run("2026-01-01", [])))
    assert [run["machine"]["date"] for run in report.load_results(tmp_path)] == ["2026-01-01", "2026-03-01"]


def test_headlines_prefer_forward_backward_and_leave_every_baseline_out():
    """The summary and plot compare a backend with its suite's baseline (unpatched for patch), forward+backward
    where a case has it; where the baseline wins, the summary shows the baseline's row of that pass."""
    from benchmarks import report

    fwd, both = {"case": "c", "pass": "forward"}, {"case": "c", "pass": "forward+backward"}
    rows = [
        {**fwd, "backend": "reference", "median_ms": 1.0, "speedup": 1.0},
        {**both, "backend": "reference", "median_ms": 5.0, "speedup": 1.0},
        {**fwd, "backend": "torch", "median_ms": 0.5, "speedup": 2.0},
        {**both, "backend": "torch", "median_ms": 10.0, "speedup": 0.5},
    ]
    (row,) = report.summary_rows([_run("2026-01-01", rows)])
    assert (row["best"], row["pass"], row["median_ms"], row["speedup"]) == ("reference", "forward+backward", 5.0, 1.0)
    patch = [{**fwd, "backend": "unpatched", "speedup": 1.0}, {**fwd, "backend": "patched", "speedup": 1.3}]
    (headlines,) = report.newest_rows([_run("2026-01-01", patch, suite="patch")]).values()
    assert list(headlines[1]) == ["patched"]


def test_results_md_shows_kernel_rows_without_floor_ms_and_says_whether_tf32_was_on(tmp_path):
    from benchmarks import report

    kernels = [{"case": "k", "backend": "torch", "kernel": "conv", "kernel_ms": 0.25, "share": 1.0}]
    ops = [{"case": "c", "backend": "torch", "median_ms": 2.0, "floor_ms": 0.5, "over_floor": 4.0}]
    gpu = {"card": "H200", "cuda": "12.8", "cudnn_allow_tf32": True}
    runs = [_run("2026-01-01", kernels, suite="kernels"), _run("2026-01-02", ops, **gpu)]
    path = tmp_path / "RESULTS.md"
    report.write_markdown(runs, path, 0, tmp_path)
    text = path.read_text()
    assert "| conv |" in text and "(no rows)" not in text
    assert "over_floor" in text and "floor_ms" not in text
    assert "cuDNN TF32 on" in text


def test_benchmarks_go_to_the_results_folder_and_refuse_cuda_without_a_gpu(tmp_path, monkeypatch, capsys):
    from benchmarks import run

    monkeypatch.chdir(tmp_path)
    assert run.output_folder(None, quick=False) == Path("benchmarks/results") and not list(tmp_path.iterdir())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        run.main(["--suite", "latent", "--device", "cuda", "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and "needs a CUDA GPU" in capsys.readouterr().err
