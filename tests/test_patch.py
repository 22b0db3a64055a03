"""dcign_fast.patch: fused upsample+conv in other models' Sequentials and in diffusers' Upsample2D."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dcign_fast as dc
from dcign_fast.nn import UnpoolConv2d


def _upsample2d_class() -> type:
    """diffusers' Upsample2D (diffusers is a test extra: the test is skipped without it)."""
    return pytest.importorskip("diffusers.models.upsampling").Upsample2D


def _no_interpolate(monkeypatch: pytest.MonkeyPatch) -> None:
    """Makes any nearest upsampling an error: a patched layer must not upsample."""

    def fail(*args, **kwargs):
        raise AssertionError("F.interpolate called by a patched layer")

    monkeypatch.setattr(F, "interpolate", fail)


def _sequential_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()),
        nn.Upsample(scale_factor=2, mode="bilinear"),  # not nearest
        nn.Conv2d(8, 4, 3),
        nn.Upsample(scale_factor=3),
        nn.Conv2d(4, 4, 3, stride=2),  # strided
        nn.Upsample(scale_factor=2),
        nn.Conv2d(4, 2, 5, padding=2, bias=False),
    )


def test_sequential_pairs_are_fused_sharing_parameters(monkeypatch):
    model = _sequential_model()
    x = torch.randn(2, 3, 6, 7)
    want = model(x)
    keys = list(model.state_dict())
    conv_weight = model[1][1].weight
    report = dc.patch(model)
    assert sorted(report.replaced) == ["1.0 + 1.1", "6 + 7"]
    assert [name for name, _ in report.skipped] == ["2", "4"]
    assert "nearest" in report.skipped[0][1] and "stride 1" in report.skipped[1][1]
    assert isinstance(model[1][1], UnpoolConv2d) and model[1][1].weight is conv_weight
    assert list(model.state_dict()) == keys
    with monkeypatch.context() as m:
        m.setattr(nn.Upsample, "forward", lambda *a: pytest.fail("a fused pair still upsamples"))
        model[1](torch.randn(1, 8, 4, 4))
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
    assert dc.unpatch(model) == 2
    assert isinstance(model[1][0], nn.Upsample) and type(model[1][1]) is nn.Conv2d
    assert model[1][1].weight is conv_weight
    assert torch.equal(model(x), want)


def test_bad_backend_is_refused_before_anything_is_replaced():
    model = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(2, 3, 3, padding=1))
    with pytest.raises(ValueError, match="backend must be one of"):
        dc.patch(model, backend="nonsense")
    assert isinstance(model[0], nn.Upsample)
    with pytest.raises(TypeError, match="module must be an nn.Module, got NoneType"):
        dc.unpatch(None)


def test_modules_it_does_not_understand_are_untouched():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    report = dc.patch(model)
    assert report.replaced == [] and report.skipped == []
    assert "found no nn.Upsample inside an nn.Sequential" in str(report)  # a hint where to look
    assert dc.unpatch(model) == 0
    report = dc.patch(nn.Sequential(nn.Upsample(scale_factor=2), nn.ReLU(), nn.Conv2d(4, 4, 3)))
    assert report.skipped == [("0", "the next module is ReLU, not an nn.Conv2d")]
    assert "found no" not in str(report)


def test_torchscript_is_refused_at_the_root_and_reported_inside():
    pair = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(2, 3, 3, padding=1))
    x = torch.randn(1, 2, 4, 4)
    for scripted in (torch.jit.script(pair), torch.jit.trace(pair, x)):
        with pytest.raises(TypeError, match="module is a TorchScript module .* patch the eager model before"):
            dc.patch(scripted)
    model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(torch.jit.script(pair)), torch.jit.script(nn.ReLU()))
    report = dc.patch(model)
    assert report.replaced == [] and report.skipped == [("1.0", "a TorchScript module: patch it before scripting")]
    with pytest.raises(TypeError, match="module must be an nn.Module, got function"):
        dc.patch(lambda x: x)


def _small_vae():
    diffusers = pytest.importorskip("diffusers")
    return diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
    ).eval()


def test_diffusers_vae_decode_matches_unpatched(monkeypatch):
    vae = _small_vae()
    z = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        want = vae.decode(z).sample
        report = dc.patch(vae)
        assert report.replaced == ["decoder.up_blocks.0.upsamplers.0", "decoder.up_blocks.1.upsamplers.0"]
        with monkeypatch.context() as m:
            _no_interpolate(m)
            got = vae.decode(z).sample
    assert got.shape == want.shape == (2, 3, 32, 32)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # Gradients flow to the shared conv parameters through the fused op.
    vae.decode(z).sample.square().mean().backward()
    conv = vae.decoder.up_blocks[0].upsamplers[0].conv
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    assert "already patched" in dc.patch(vae).skipped[0][1]
    assert dc.unpatch(vae) == 2
    with torch.no_grad():
        assert torch.equal(vae.decode(z).sample, want)


def test_upsample2d_falls_back_when_the_call_is_not_plain(monkeypatch):
    Upsample2D = _upsample2d_class()

    layer = Upsample2D(8, use_conv=True, out_channels=6)
    x = torch.randn(1, 8, 5, 5)
    with torch.no_grad():
        want_sized = layer(x, output_size=(11, 9))
        dc.patch(layer)
        torch.testing.assert_close(layer(x, output_size=(11, 9)), want_sized)  # original forward: sized upsample
        _no_interpolate(monkeypatch)
        assert layer(x).shape == (1, 6, 10, 10)


@pytest.mark.parametrize(
    "options, words",
    [
        ({"use_conv": False}, "use_conv=False"),
        ({"use_conv_transpose": True}, "transposed"),
        ({"use_conv": True, "interpolate": False}, "interpolate=False"),
        ({"use_conv": True, "norm_type": "rms_norm", "eps": 1e-6, "elementwise_affine": True}, "norm"),
        ({"use_conv": True, "name": "Conv2d_0", "kernel_size": 3, "padding": "same"}, "padding"),
    ],
)
def test_upsample2d_configurations_that_are_not_plain_are_skipped(options, words):
    Upsample2D = _upsample2d_class()

    layer = Upsample2D(8, **options)
    report = dc.patch(layer)
    assert report.replaced == [] and words in report.skipped[0][1]
    assert "forward" not in vars(layer)


def test_patch_benchmark_suite_runs_quick():
    pytest.importorskip("diffusers")
    from benchmarks.suites import patch as suite

    rows = list(suite.run("cpu", quick=True))
    assert {row["backend"] for row in rows} >= {"unpatched", "patched"}
    assert all(row["median_ms"] > 0 for row in rows if "median_ms" in row)


def _hook(module, *args):
    return None


def _with_parametrized_weight(conv: nn.Conv2d) -> nn.Conv2d:
    return torch.nn.utils.parametrizations.weight_norm(conv)


def _with_parametrized_spectral_norm(conv: nn.Conv2d) -> nn.Conv2d:
    return torch.nn.utils.parametrizations.spectral_norm(conv)


def _with_old_weight_norm(conv: nn.Conv2d) -> nn.Conv2d:
    return torch.nn.utils.weight_norm(conv)


def _with_old_spectral_norm(conv: nn.Conv2d) -> nn.Conv2d:
    return torch.nn.utils.spectral_norm(conv)


def _with_forward_hook(conv: nn.Conv2d) -> nn.Conv2d:
    conv.register_forward_hook(_hook)
    return conv


def _with_forward_pre_hook(conv: nn.Conv2d) -> nn.Conv2d:
    conv.register_forward_pre_hook(_hook)
    return conv


def _with_weight_subclass(conv: nn.Conv2d) -> nn.Conv2d:
    class Tagged(nn.Parameter):
        pass

    conv.weight = Tagged(conv.weight.detach())
    return conv


class _WeightStandardisedConv(nn.Conv2d):
    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        centred = weight - weight.mean((1, 2, 3), keepdim=True)
        return super()._conv_forward(x, centred / (centred.std((1, 2, 3), keepdim=True) + 1e-5), bias)


def _as_weight_standardised(conv: nn.Conv2d) -> nn.Conv2d:
    standardised = _WeightStandardisedConv(conv.in_channels, conv.out_channels, conv.kernel_size, padding=conv.padding)
    standardised.load_state_dict(conv.state_dict())
    return standardised


@pytest.mark.parametrize(
    "wrap, words",
    [
        (_as_weight_standardised, "a _WeightStandardisedConv, is an nn.Conv2d subclass that overrides its forward"),
        (_with_parametrized_weight, "parametriz"),
        (_with_parametrized_spectral_norm, "parametriz"),
        (_with_old_weight_norm, "not a plain nn.Parameter"),
        (_with_old_spectral_norm, "not a plain nn.Parameter"),
        (_with_forward_hook, "hooks"),
        (_with_forward_pre_hook, "hooks"),
        (_with_weight_subclass, "not a plain nn.Parameter"),
    ],
)
@pytest.mark.filterwarnings("ignore:.*torch.nn.utils.weight_norm.* is deprecated:FutureWarning")
def test_convs_whose_call_does_more_than_convolve_are_skipped(wrap, words):
    model = nn.Sequential(nn.Upsample(scale_factor=2), wrap(nn.Conv2d(4, 4, 3)))
    keys = list(model.state_dict())
    report = dc.patch(model)
    assert report.replaced == [] and report.skipped[0][0] == "0" and words in report.skipped[0][1]
    assert type(model[0]) is nn.Upsample and list(model.state_dict()) == keys

    Upsample2D = _upsample2d_class()

    layer = Upsample2D(4, use_conv=True)
    layer.conv = wrap(layer.conv)
    report = dc.patch(layer)
    assert report.replaced == [] and words in report.skipped[0][1]
    assert "forward" not in vars(layer)


@pytest.mark.parametrize(
    "add_hook",
    [
        pytest.param(lambda model: model[0].register_forward_hook(_hook), id="forward hook on the upsample"),
        pytest.param(lambda model: model[1].register_full_backward_hook(_hook), id="backward hook on the conv"),
        pytest.param(lambda model: model[1].register_full_backward_pre_hook(_hook), id="backward pre hook"),
        pytest.param(lambda model: model[1].register_state_dict_pre_hook(_hook), id="state_dict pre hook"),
        pytest.param(lambda model: model[1].register_state_dict_post_hook(_hook), id="state_dict post hook"),
    ],
)
def test_hooks_keep_the_pair_unfused(add_hook):
    """The fused layer would skip the replaced modules' hooks."""
    model = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(4, 4, 3))
    add_hook(model)
    report = dc.patch(model)
    assert report.replaced == [] and "hooks" in report.skipped[0][1]


def test_a_pair_under_accelerate_hooks_stays_unfused_and_computes_as_before():
    """accelerate attaches its hooks by replacing forward on the instance (add_hook_to_module)."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    class Doubles(ModelHook):
        def post_forward(self, module, output):
            return 2 * output

    model = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(2, 2, 3, padding=1))
    add_hook_to_module(model[1], Doubles())
    x = torch.randn(1, 2, 4, 4)
    before = model(x)
    report = dc.patch(model)
    assert report.replaced == [] and "forward is replaced on the instance" in report.skipped[0][1]
    assert torch.equal(model(x), before)


@pytest.mark.parametrize("index, method", [(0, "forward"), (1, "forward"), (1, "_conv_forward")])
def test_a_forward_replaced_on_the_instance_keeps_the_pair_unfused(index, method):
    """Only a subclass's override was seen: a forward set on the module (as a wrapper attaches its hook) was
    bypassed by the fused layer, and the outputs changed without a word."""
    model = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(2, 2, 3, padding=1))
    original = getattr(model[index], method)
    setattr(model[index], method, lambda *args: original(*args) * 2)
    x = torch.randn(1, 2, 4, 4)
    before = model(x)
    report = dc.patch(model)
    assert report.replaced == [] and f"{method} is replaced on the instance" in report.skipped[0][1]
    assert torch.equal(model(x), before)
    layer = _upsample2d_class()(2, use_conv=True)
    unfused = layer(x)
    assert dc.patch(layer).replaced == ["(root)"]
    original = layer.conv.forward  # replaced after the patch: the fused forward, checking each call, steps aside
    layer.conv.forward = lambda t: original(t) * 2
    torch.testing.assert_close(layer(x), 2 * unfused)


def test_an_upsample_subclass_with_its_own_forward_keeps_the_pair_unfused():
    class BilinearAfterAll(nn.Upsample):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.interpolate(x, scale_factor=2, mode="bilinear")

    model = nn.Sequential(BilinearAfterAll(scale_factor=2), nn.Conv2d(4, 4, 3))
    report = dc.patch(model)
    assert report.replaced == [] and "overrides nn.Upsample's forward" in report.skipped[0][1]
    model = nn.Sequential(nn.UpsamplingNearest2d(scale_factor=2), nn.Conv2d(4, 4, 3))  # inherits the forward
    assert dc.patch(model).replaced == ["0 + 1"]


def _zero_parameters(module: nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()


def test_copies_of_a_patched_upsample2d_use_their_own_parameters():
    Upsample2D = _upsample2d_class()

    layer = Upsample2D(8, use_conv=True, out_channels=8)
    x = torch.randn(1, 8, 5, 5)
    dc.patch(layer)
    want = layer(x).detach()
    twin = copy.deepcopy(layer)
    _zero_parameters(twin)
    assert torch.equal(twin(x), torch.zeros_like(want))
    torch.testing.assert_close(layer(x), want)  # the original is unaffected by its copy
    twin.conv.weight.requires_grad_(True)
    twin(x).sum().backward()
    assert twin.conv.weight.grad is not None and layer.conv.weight.grad is None
    loaded = pickle.loads(pickle.dumps(layer))
    torch.testing.assert_close(loaded(x), want)
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    torch.testing.assert_close(torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)(x), want)
    for copied in (twin, loaded):
        assert dc.unpatch(copied) == 1 and "forward" not in vars(copied)
    assert "forward" in vars(layer)  # unpatching a copy leaves the original patched


def test_unpatch_restores_the_parameters_and_mode_the_fused_layer_has_now():
    model = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(4, 4, 3, padding=1))
    x = torch.randn(1, 4, 5, 5)
    dc.patch(model)
    zeros = {key: torch.zeros_like(value) for key, value in model.state_dict().items()}
    model.load_state_dict(zeros, assign=True)
    weight = model[1].weight
    model.eval()
    assert torch.equal(model(x), torch.zeros(1, 4, 10, 10))
    assert dc.unpatch(model) == 1
    assert type(model[0]) is nn.Upsample and type(model[1]) is nn.Conv2d
    assert model[1].weight is weight and torch.equal(model(x), torch.zeros(1, 4, 10, 10))
    assert not any(sub.training for sub in model.modules())


def test_unpatch_works_on_copies_of_a_patched_sequential():
    model = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(4, 4, 3, padding=1))
    x = torch.randn(1, 4, 5, 5)
    dc.patch(model)
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        _zero_parameters(twin)
        assert dc.unpatch(twin) == 1
        assert type(twin[0]) is nn.Upsample and type(twin[1]) is nn.Conv2d
        assert torch.equal(twin(x), torch.zeros(1, 4, 10, 10))
    assert isinstance(model[1], UnpoolConv2d) and model(x).abs().sum() > 0


def test_upsample2d_with_another_kernel_and_padding_matches_unpatched():
    Upsample2D = _upsample2d_class()

    layer = Upsample2D(8, use_conv=True, out_channels=6, kernel_size=5, padding=2)
    x = torch.randn(1, 8, 5, 5)
    with torch.no_grad():
        expected = layer(x)
        assert dc.patch(layer).replaced == ["(root)"]
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_a_conv_padding_set_to_an_int_after_construction_is_fused():
    # nn.Conv2d keeps a pair, but F.conv2d takes an int too, so a conv whose padding was set later still runs.
    Upsample2D = _upsample2d_class()
    layer = Upsample2D(4, use_conv=True, out_channels=4)
    layer.conv.padding = 1
    conv = nn.Conv2d(4, 3, 3)
    conv.padding = 1
    pair = nn.Sequential(nn.Upsample(scale_factor=2), conv)
    x = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        expected = layer(x), pair(x)
        assert dc.patch(layer).replaced == ["(root)"] and dc.patch(pair).replaced == ["0 + 1"]
        torch.testing.assert_close((layer(x), pair(x)), expected, rtol=1e-5, atol=1e-5)


def test_a_root_upsample2d_is_reported_by_a_name():
    Upsample2D = _upsample2d_class()

    assert dc.patch(Upsample2D(4, use_conv=True)).replaced == ["(root)"]
    assert dc.patch(Upsample2D(4)).skipped[0][0] == "(root)"


def test_a_sequential_subclass_with_its_own_forward_is_not_fused():
    class SkipsTheUpsample(nn.Sequential):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self[1](x)

    model = SkipsTheUpsample(nn.Upsample(scale_factor=2), nn.Conv2d(3, 4, 3, padding=1))
    report = dc.patch(model)  # fusing would upsample where the model never does
    assert report.replaced == [] and "overrides nn.Sequential's forward" in report.skipped[0][1]
    assert model(torch.randn(2, 3, 5, 6)).shape == (2, 4, 5, 6)


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param(lambda conv: conv.register_parameter("gain", nn.Parameter(torch.ones(4))), id="parameter"),
        pytest.param(lambda conv: conv.register_buffer("calibration", torch.ones(4)), id="buffer"),
        pytest.param(lambda conv: conv.add_module("adapter", nn.Linear(4, 4)), id="submodule"),
    ],
)
def test_a_conv_holding_more_than_its_weights_is_not_fused(extra):
    model = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(4, 4, 3))
    extra(model[1])
    keys = list(model.state_dict())
    report = dc.patch(model)  # the fused layer would drop them from state_dict, and unpatch lose them
    assert report.replaced == [] and "besides its weights" in report.skipped[0][1]
    assert list(model.state_dict()) == keys


@pytest.mark.parametrize(
    "upsample, words",
    [
        (nn.Upsample(scale_factor=2, align_corners=True), "align_corners"),
        (nn.Upsample(scale_factor=2, align_corners=False), "align_corners"),
        (nn.Upsample(scale_factor=(2,)), "scale_factor must be one positive integer"),
        (nn.Upsample(scale_factor=(2, 2, 2)), "scale_factor must be one positive integer"),
        (nn.Upsample(scale_factor=-2.0), "scale_factor must be one positive integer"),
        (nn.Upsample(scale_factor=float("inf")), "scale_factor must be one positive integer"),
        (nn.Upsample(scale_factor=float("nan")), "scale_factor must be one positive integer"),
        (nn.Upsample(size=10, scale_factor=2), "not size"),
    ],
)
def test_upsamples_that_raise_for_images_are_not_fused(upsample, words):
    """Unpatched, these raise for a 4-D input: fused, they must not run."""
    model = nn.Sequential(upsample, nn.Conv2d(4, 4, 3))
    with pytest.raises((ValueError, RuntimeError, OverflowError)):
        model(torch.randn(1, 4, 5, 5))
    report = dc.patch(model)
    assert report.replaced == [] and words in report.skipped[0][1]


def test_patching_keeps_the_mode_and_refuses_what_it_would_compute_otherwise():
    model = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(4, 3, 3, padding=1)).eval()
    dc.patch(model)
    assert not any(sub.training for sub in model.modules())
    # nn.Upsample reads a 3-D [C, H, W] as [N, C, L] and upsamples L alone: no image to fuse, so no result.
    with pytest.raises(ValueError, match="x must be 4-D"):
        model(torch.randn(4, 5, 6))
    dc.unpatch(model)
    assert not any(sub.training for sub in model.modules())


def test_unpatch_refuses_to_drop_what_the_fused_layer_gained():
    model = nn.Sequential(
        nn.Upsample(scale_factor=2), nn.Conv2d(4, 4, 3), nn.Upsample(scale_factor=2), nn.Conv2d(4, 4, 3)
    )
    dc.patch(model)
    parametrize = torch.nn.utils.parametrize
    parametrize.register_parametrization(model[3], "weight", nn.Tanh())
    with pytest.raises(ValueError, match=r"cannot unpatch 3: the convolution is parametrized .* remove it first"):
        dc.unpatch(model)
    assert isinstance(model[1], UnpoolConv2d)  # nothing restored, not half
    parametrize.remove_parametrizations(model[3], "weight")
    handle = model[1].register_forward_hook(_hook)
    with pytest.raises(ValueError, match="cannot unpatch 1: the convolution has hooks"):
        dc.unpatch(model)
    handle.remove()
    # Hooks put on the nn.Identity in the upsample's slot were dropped when the upsample came back.
    handle = model[0].register_forward_pre_hook(lambda module, args: None)
    with pytest.raises(ValueError, match="cannot unpatch 1: the upsample has hooks"):
        dc.unpatch(model)
    handle.remove()
    model[2] = nn.ReLU()  # and whatever was put in that slot was overwritten
    with pytest.raises(ValueError, match=r"cannot unpatch 3: the upsample's slot 2 holds a ReLU now, not the nn.Ide"):
        dc.unpatch(model)
    model[2] = nn.Identity()
    assert dc.unpatch(model) == 2


def test_a_patched_upsample2d_follows_later_changes_to_its_conv(monkeypatch):
    """The conv stays a visible submodule: hooks, a replaced conv or another padding mode given after patch()
    must take effect, so the fused call gives way to the class's forward."""
    Upsample2D = _upsample2d_class()

    layer = Upsample2D(4, use_conv=True)
    x = torch.randn(1, 4, 5, 5)
    dc.patch(layer)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")  # the check per call traces
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), type(layer).forward(layer, x), rtol=1e-5, atol=1e-5)
    calls = []
    handle = layer.conv.register_forward_hook(lambda *args: calls.append(1))
    layer(x)
    assert calls == [1]
    handle.remove()
    with torch.no_grad():
        layer.conv.padding_mode = "reflect"
        torch.testing.assert_close(layer(x), type(layer).forward(layer, x))
        layer.conv.padding_mode = "zeros"
        _no_interpolate(monkeypatch)
        assert layer(x).shape == (1, 4, 10, 10)  # fused again


def test_unequal_scale_factors_are_not_fused():
    model = nn.Sequential(nn.Upsample(scale_factor=(2, 3)), nn.Conv2d(4, 4, 3, padding=1))
    report = dc.patch(model)
    assert report.replaced == [] and "scale_factor must be one positive integer" in report.skipped[0][1]


def test_an_upsample_holding_a_weight_is_not_fused():
    model = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(4, 4, 3))
    model[0].register_parameter("weight", nn.Parameter(torch.ones(1)))
    report = dc.patch(model)
    assert report.replaced == [] and "the upsample holds ['weight']" in report.skipped[0][1]


def test_patch_and_from_modules_keep_the_kernel_shape_and_the_backend():
    conv = nn.Conv2d(3, 4, (3, 5), padding=(1, 2))
    fused = UnpoolConv2d.from_modules(nn.Upsample(scale_factor=2), conv, backend="reference")
    assert (fused.kernel_size, fused.padding, fused.backend) == ((3, 5), (1, 2), "reference")
    model = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(3, 4, 3))
    dc.patch(model, backend="torch")
    assert model[1].backend == "torch"


# (ids not "cuda", a keyword the CPU run skips as a GPU test: patching needs no GPU)
@pytest.mark.runs_without_triton
@pytest.mark.parametrize("backend", ["triton", "cuda"], ids=["triton-backend", "cuda-backend"])
def test_pairs_a_kernel_backend_cannot_run_are_skipped_with_the_reason(backend):
    """Fused anyway, every call would raise; "auto" fuses them (the torch backend runs them)."""
    model = nn.Sequential(
        nn.Upsample(scale_factor=3), nn.Conv2d(2, 2, 3),
        nn.Upsample(scale_factor=2), nn.Conv2d(2, 2, 11, padding=5),
        nn.Upsample(scale_factor=2), nn.Conv2d(2, 2, 9, padding=4),
    )  # fmt: skip
    report = dc.patch(copy.deepcopy(model), backend=backend)
    assert report.replaced == ["4 + 5"]
    assert [reason for _, reason in report.skipped] == [
        f"backend={backend!r} supports scale_factor=2 only, got 3",
        f"backend={backend!r} supports kernel sizes up to 9, got (11, 11)",
    ]
    assert len(dc.patch(model, backend="auto").replaced) == 3
    with pytest.raises(ValueError, match=rf"backend={backend!r} supports kernel sizes up to 9, got \(11, 11\)"):
        UnpoolConv2d.from_modules(nn.Upsample(scale_factor=2), nn.Conv2d(2, 2, 11), backend=backend)


def test_an_upsample2d_a_kernel_backend_cannot_run_is_skipped():
    layer = _upsample2d_class()(4, use_conv=True, kernel_size=11, padding=5)
    report = dc.patch(layer, backend="triton")
    assert report.replaced == [] and "supports kernel sizes up to 9, got (11, 11)" in report.skipped[0][1]
    assert "forward" not in vars(layer)
