"""fastcnn.nn.ConvBNAct: from_modules equals eval-mode Conv2d -> BatchNorm2d (-> ReLU), holds
its folded weights as buffers, and round-trips through its own state_dict."""

from __future__ import annotations

import math

import pytest
import torch
from fastcnn_testing import assert_matches, random_tensor, runs_on, skip_unsupported
from torch import nn

import fastcnn


def _conv_bn(cin=13, cout=24, k=3, stride=2, padding=1, seed=0):
    torch.manual_seed(seed)
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, bias=False)
    bn = nn.BatchNorm2d(cout)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
        bn.bias.normal_()
    return conv.eval(), bn.eval()


@pytest.mark.parametrize("backend", ["triton", "eager"])
@pytest.mark.parametrize("relu", [nn.ReLU(), True, None])
def test_from_modules_matches_the_eager_sequence(backend, relu):
    skip_unsupported("cpu", backend, torch.float32)
    conv, bn = _conv_bn()
    fused = fastcnn.nn.ConvBNAct.from_modules(conv, bn, relu)
    x = random_tensor((2, 13, 9, 7), torch.float32, "cpu", channels_last=True)
    with torch.no_grad():
        y = bn(conv(x.double().float()))
        expected = (torch.relu(y) if relu is not None else y).double()
    with runs_on("conv_bn_act", backend, torch.float32), torch.no_grad():
        got = fused(x)
    assert_matches(got, expected, torch.float32)


def test_residual_and_out_pass_through():
    conv, bn = _conv_bn(stride=1)
    fused = fastcnn.nn.ConvBNAct.from_modules(conv, bn, nn.ReLU())
    x = random_tensor((2, 13, 7, 9), torch.float32, "cpu", channels_last=True, seed=1)
    res = random_tensor((2, 24, 7, 9), torch.float32, "cpu", seed=2)
    big = torch.full((2, 30, 7, 9), float("nan")).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        fused(x, residual=res, out=big[:, 6:])
        expected = torch.relu(bn(conv(x)) + res).double()
    assert torch.isnan(big[:, :6]).all()
    assert_matches(big[:, 6:], expected, torch.float32)


def test_buffers_state_dict_round_trip():
    conv, bn = _conv_bn()
    fused = fastcnn.nn.ConvBNAct.from_modules(conv, bn, nn.ReLU())
    assert set(fused.state_dict()) == {"weight", "bias"}
    assert not list(fused.parameters()), "folded weights are buffers, not trainable parameters"
    assert fused.weight.is_contiguous(memory_format=torch.channels_last)
    fresh = fastcnn.nn.ConvBNAct(13, 24, 3, stride=2, padding=1)
    fresh.load_state_dict(fused.state_dict(), strict=True)
    x = random_tensor((1, 13, 9, 7), torch.float32, "cpu", seed=4)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), fused(x), rtol=0, atol=0)


def test_from_modules_does_not_change_the_originals():
    conv, bn = _conv_bn()
    w = conv.weight.detach().clone()
    fastcnn.nn.ConvBNAct.from_modules(conv, bn).weight.add_(1)
    assert torch.equal(conv.weight, w)


@pytest.mark.parametrize(
    ("conv", "relu", "error", "message"),
    [
        (nn.Conv2d(3, 4, 3, padding="same"), None, ValueError, "padding='same'"),
        (nn.Conv2d(3, 4, 3, padding_mode="reflect"), None, ValueError, "padding_mode='reflect'"),
        (nn.Conv2d(3, 4, 3), nn.GELU(), TypeError, "fuses nn.ReLU only, got GELU"),
    ],
)
def test_unsupported_modules_are_refused(conv, relu, error, message):
    bn = nn.BatchNorm2d(4).eval()
    with pytest.raises(error, match=message):
        fastcnn.nn.ConvBNAct.from_modules(conv, bn, relu)


def test_channels_must_divide_groups():
    with pytest.raises(ValueError, match="divisible by groups"):
        fastcnn.nn.ConvBNAct(13, 24, 3, groups=2)


def test_a_module_built_directly_has_defined_weights():
    """Built without from_modules or a state dict, it computes with nn.Conv2d's default
    initialization, never with uninitialized memory."""
    torch.manual_seed(0)
    m = fastcnn.nn.ConvBNAct(6, 10, 3, padding=1)
    bound = 1 / math.sqrt(6 * 9)  # kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(fan_in), +)
    assert torch.isfinite(m.weight).all() and m.weight.abs().max() <= bound
    assert m.weight.std() > bound / 4  # not all zeros either
    assert (m.bias == 0).all()
