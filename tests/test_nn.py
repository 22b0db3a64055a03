"""UnpoolConv2d as a drop-in for nn.Sequential(nn.Upsample, nn.Conv2d)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dcign_fast.nn import UnpoolConv2d
from dcign_fast.patch import patch
from tests.helpers import rel_error


def upsample_conv(c: int, o: int, k: int, p: int) -> nn.Sequential:
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, o, k, padding=p))


@pytest.mark.parametrize("backend", ["reference", "torch", "auto"])
def test_loads_a_conv2d_state_dict_and_matches(backend):
    seq = upsample_conv(3, 5, 5, 2).double()
    fused = UnpoolConv2d(3, 5, 5, padding=2, backend=backend).double()
    fused.load_state_dict(seq[1].state_dict())
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    assert rel_error(fused(x), seq(x)) < 1e-12


def test_parameters_are_shaped_like_conv2d():
    fused, conv = UnpoolConv2d(4, 6, (3, 5), bias=False), nn.Conv2d(4, 6, (3, 5), bias=False)
    assert {k: v.shape for k, v in fused.state_dict().items()} == {k: v.shape for k, v in conv.state_dict().items()}


def test_initialisation_is_conv2ds():
    """The same draws as nn.Conv2d (kaiming-uniform weight, bias bound 1/sqrt(fan_in)): a seeded model
    starts where the unfused one would."""
    torch.manual_seed(0)
    fused = UnpoolConv2d(3, 5, (5, 3))
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, (5, 3))
    assert torch.equal(fused.weight, conv.weight) and torch.equal(fused.bias, conv.bias)


def test_patch_in_place_shares_parameters_and_keeps_keys():
    model = nn.Sequential(
        nn.Linear(4, 4), nn.Sequential(upsample_conv(3, 4, 3, 1), nn.ReLU(), upsample_conv(4, 2, 7, 0))
    )
    keys = list(model.state_dict())
    conv_weight = model[1][0][1].weight
    x = torch.randn(2, 3, 9, 9)
    before = model[1](x)
    assert len(patch(model).replaced) == 2
    assert list(model.state_dict()) == keys
    fused = model[1][0][1]
    assert isinstance(fused, UnpoolConv2d) and fused.weight is conv_weight
    assert isinstance(model[1][0][0], nn.Identity)
    assert rel_error(model[1](x), before) < 1e-5


def test_patch_leaves_unsupported_pairs_alone():
    bilinear = nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear"), nn.Conv2d(3, 3, 3))
    strided = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(3, 3, 3, stride=2))
    assert not patch(bilinear).replaced and not patch(strided).replaced
    with pytest.raises(ValueError, match="stride 1"):
        UnpoolConv2d.from_modules(strided[0], strided[1])
    for upsample, conv in (
        (nn.Upsample(scale_factor=2.5), nn.Conv2d(4, 4, 3, padding=1)),
        (nn.Upsample(scale_factor=2), nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")),
        (nn.Upsample(scale_factor=2), nn.Conv2d(4, 4, 3, padding=1, groups=2)),
        (nn.Upsample(scale_factor=2), nn.Conv2d(4, 4, 3, padding=2, dilation=2)),
    ):
        assert not patch(nn.Sequential(upsample, conv)).replaced, (upsample, conv)
    normed = nn.Sequential(nn.Upsample(scale_factor=2), nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 3, 3)))
    assert not patch(normed).replaced
    with pytest.raises(ValueError, match="parametrized"):
        UnpoolConv2d.from_modules(normed[0], normed[1])


def test_a_pair_of_equal_scale_factors_is_fused():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    fused = UnpoolConv2d.from_modules(nn.Upsample(scale_factor=(2, 2)), conv)
    x = torch.randn(2, 3, 4, 5)
    assert fused.scale_factor == 2
    assert rel_error(fused(x), conv(F.interpolate(x, scale_factor=2, mode="nearest"))) < 1e-5


def test_bad_backend_name_at_construction():
    with pytest.raises(ValueError, match="backend must be one of"):
        UnpoolConv2d(1, 1, 3, backend="fastest")


@pytest.mark.parametrize(
    "channels, error, words",
    [
        ((-1, 3), ValueError, "in_channels must be >= 1"),
        ((2.5, 3), TypeError, "in_channels must be an integer"),
        ((True, 3), TypeError, "in_channels must be an integer"),
        ((2, 0), ValueError, "out_channels must be >= 1"),
    ],
)
def test_bad_channel_counts_at_construction(channels, error, words):
    with pytest.raises(error, match=words):
        UnpoolConv2d(*channels, 3)


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"activation": "gelu"}, ValueError, "activation must be one of"),
        ({"kernel_size": 0}, ValueError, "kernel_size must be an int >= 1"),
        ({"kernel_size": (3, True)}, ValueError, "kernel_size must be an int >= 1"),
        ({"out_channels": 2.5}, TypeError, "out_channels must be an integer"),
        ({"bias": 2}, TypeError, "bias must be True or False, got 2"),
        ({"dtype": torch.int32}, TypeError, "dtype must be a floating-point torch.dtype or None, got torch.int32"),
    ],
)
def test_bad_arguments_at_construction(kwargs, error, words):
    with pytest.raises(error, match=words):
        UnpoolConv2d(**{"in_channels": 2, "out_channels": 3, "kernel_size": 3, **kwargs})


def test_positional_arguments_follow_the_design():
    """UnpoolConv2d(in, out, k, padding, bias, backend), as DESIGN.md lists them; the rest by keyword."""
    layer = UnpoolConv2d(2, 3, 3, 1, False, "torch", scale_factor=3)
    assert (layer.padding, layer.bias, layer.backend, layer.scale_factor) == ((1, 1), None, "torch", 3)
