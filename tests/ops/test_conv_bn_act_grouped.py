"""Grouped and depthwise convolutions through conv_bn_act on the CPU backends: fused on the cpu
backend (oneDNN groups with bias/residual/ReLU post-ops) and on eager (Triton's grouped kernel:
tests/ops/test_conv_bn_act.py)."""

from __future__ import annotations

import pytest
import torch
from fastcnn_testing import assert_matches, conv_reference64, random_tensor

import fastcnn
from fastcnn.cpu import onednn

needs_onednn = pytest.mark.skipif(
    not onednn.supports(torch.float32), reason="this torch build has no oneDNN (mkldnn)"
)

# (Cin, Cout, groups, kernel, stride): ResNeXt's grouped 3x3 (32 groups), a strided one, a
# depthwise 3x3 as in MobileNetV2 and a grouped 1x1 with odd group widths
CASES = [(64, 64, 32, 3, 1), (64, 128, 32, 3, 2), (24, 24, 24, 3, 1), (18, 12, 3, 1, 1)]


def _inputs(cin, cout, groups, k, seed=0):
    x = random_tensor((2, cin, 9, 7), torch.float32, "cpu", channels_last=True, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    weight = torch.randn(cout, cin // groups, k, k, generator=g) * (2 / (cin // groups * k * k))
    bias = torch.randn(cout, generator=g) * 0.1
    return x, weight.contiguous(memory_format=torch.channels_last), bias


@needs_onednn
@pytest.mark.parametrize(("cin", "cout", "groups", "k", "stride"), CASES)
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_cpu_runs_grouped_convs_fused(cin, cout, groups, k, stride, with_residual):
    x, weight, bias = _inputs(cin, cout, groups, k)
    ho, wo = (9 - 1) // stride + 1, (7 - 1) // stride + 1
    residual = None
    if with_residual:
        residual = random_tensor((2, cout, ho, wo), torch.float32, "cpu", True, seed=5)
    expected = conv_reference64(x, weight, bias, stride, k // 2, residual, groups=groups)
    with fastcnn.use_backend("cpu"), fastcnn.trace() as t:
        out = fastcnn.ops.conv_bn_act(
            x, weight, bias, stride, k // 2, groups=groups, residual=residual
        )
    assert t.kernels("conv_bn_act") == {"cpu:onednn"} and not t.fallbacks()
    assert_matches(out, expected, torch.float32)
    assert out.is_contiguous(memory_format=torch.channels_last)


@needs_onednn
def test_cpu_grouped_conv_writes_into_a_slice():
    x, weight, bias = _inputs(64, 64, 32, 3)
    big = torch.full((2, 96, 9, 7), float("nan")).contiguous(memory_format=torch.channels_last)
    with fastcnn.use_backend("cpu"):
        fastcnn.ops.conv_bn_act(x, weight, bias, 1, 1, groups=32, out=big[:, 16:80])
    assert_matches(big[:, 16:80], conv_reference64(x, weight, bias, 1, 1, groups=32), torch.float32)
    assert torch.isnan(big[:, :16]).all() and torch.isnan(big[:, 80:]).all()


def test_eager_runs_grouped_convs_as_its_own_kernel():
    x, weight, bias = _inputs(24, 24, 24, 3)
    with fastcnn.use_backend("eager"), fastcnn.trace() as t:
        out = fastcnn.ops.conv_bn_act(x, weight, bias, 1, 1, groups=24)
    assert t.kernels("conv_bn_act") == {"eager:reference"} and not t.fallbacks()
    assert_matches(out, conv_reference64(x, weight, bias, 1, 1, groups=24), torch.float32)
