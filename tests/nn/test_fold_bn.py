"""fastcnn.fold_bn: conv2d with the folded weights equals bn(conv(x)) in eval mode."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastcnn


def _randomized_bn(channels: int, affine: bool, eps: float, seed: int) -> nn.BatchNorm2d:
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(channels, eps=eps, affine=affine)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(channels, generator=g))
        bn.running_var.copy_(torch.rand(channels, generator=g) * 2 + 0.05)
        if affine:
            bn.weight.copy_(torch.randn(channels, generator=g))
            bn.bias.copy_(torch.randn(channels, generator=g))
    return bn.eval()


@pytest.mark.parametrize("conv_bias", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("eps", [1e-5, 1e-3, 0.1])
def test_folded_conv_equals_conv_then_bn(conv_bias, affine, eps):
    torch.manual_seed(0)
    conv = nn.Conv2d(13, 24, 3, stride=2, padding=1, bias=conv_bias).double()
    bn = _randomized_bn(24, affine, eps, seed=1).double()
    x = torch.randn(2, 13, 9, 7, dtype=torch.float64)
    weight, bias = fastcnn.fold_bn(conv, bn)
    assert weight.dtype == bias.dtype == torch.float64
    got = nn.functional.conv2d(x, weight, bias, stride=2, padding=1)
    torch.testing.assert_close(got, bn(conv(x)), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_computed_in_fp32_and_rounded_once(dtype):
    conv = nn.Conv2d(13, 24, 1, bias=True).to(dtype)
    bn = _randomized_bn(24, True, 1e-5, seed=2).to(dtype)
    weight, bias = fastcnn.fold_bn(conv, bn)
    assert weight.dtype == bias.dtype == dtype
    # Exactly the fp32 fold of the same (already rounded) parameters, rounded once at the end;
    # folding in the low dtype itself would round every intermediate product.
    w32, b32 = fastcnn.fold_bn(conv.float(), bn.float())
    assert torch.equal(weight, w32.to(dtype))
    assert torch.equal(bias, b32.to(dtype))


def test_does_not_modify_or_alias_the_modules():
    conv, bn = nn.Conv2d(3, 4, 3), _randomized_bn(4, True, 1e-5, seed=3)
    before = {k: v.clone() for k, v in {**conv.state_dict(), **bn.state_dict()}.items()}
    weight, bias = fastcnn.fold_bn(conv, bn)
    weight.add_(1)
    after = {**conv.state_dict(), **bn.state_dict()}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not weight.requires_grad and not bias.requires_grad


def test_training_mode_is_refused():
    with pytest.raises(RuntimeError, match="training mode"):
        fastcnn.fold_bn(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))


def test_channel_mismatch_is_refused():
    with pytest.raises(ValueError, match="4 output channels but the BatchNorm2d normalizes 5"):
        fastcnn.fold_bn(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(5).eval())


def test_no_running_stats_is_refused():
    bn = nn.BatchNorm2d(4, track_running_stats=False).eval()
    with pytest.raises(ValueError, match="no running statistics"):
        fastcnn.fold_bn(nn.Conv2d(3, 4, 3), bn)


def test_wrong_module_types_are_refused():
    with pytest.raises(TypeError, match=r"expects \(nn.Conv2d, nn.BatchNorm2d\)"):
        fastcnn.fold_bn(nn.Linear(3, 4), nn.BatchNorm2d(4).eval())
