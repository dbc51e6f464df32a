"""Bad input to fastcnn.ops.conv_bn_act gets an error that names the problem."""

from __future__ import annotations

import pytest
import torch
from fastcnn_testing import skip_unless_available

import fastcnn

X = torch.randn(2, 13, 7, 9).contiguous(memory_format=torch.channels_last)
W = torch.randn(24, 13, 3, 3)
B = torch.randn(24)


def call(**overrides):
    kwargs = {"x": X, "weight": W, "bias": B, "stride": 1, "padding": 1, **overrides}
    return fastcnn.ops.conv_bn_act(**kwargs)


@pytest.mark.parametrize("backend", ["auto", "eager", "triton"])
@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        ({"x": X[0]}, ValueError, "x must have 4 dimensions, got 3"),
        ({"weight": W[0]}, ValueError, "weight must have 4 dimensions"),
        ({"weight": torch.randn(24, 12, 3, 3)}, ValueError, "x has 13 channels but weight"),
        ({"x": X.double()}, TypeError, "x has dtype torch.float64"),
        ({"weight": W.half()}, TypeError, "weight has dtype torch.float16 but x torch.float32"),
        ({"bias": torch.randn(23)}, ValueError, r"bias has shape \(23,\), expected \(24,\)"),
        ({"bias": B.to("meta")}, RuntimeError, "bias is on meta but x is on cpu"),
        ({"residual": torch.randn(2, 24, 7, 8)}, ValueError, "residual has shape"),
        ({"out": torch.empty(2, 24, 7, 8)}, ValueError, "out has shape"),
        ({"out": torch.empty(2, 24, 7, 9).half()}, TypeError, "out has dtype"),
        ({"stride": 0}, ValueError, "stride must be >= 1"),
        ({"padding": -1}, ValueError, "padding must be >= 0"),
        ({"padding": (1, 1, 1)}, TypeError, "padding must be an int or two ints"),
        ({"padding": 0, "x": X[:, :, :2, :2]}, ValueError, "larger than the padded input"),
        ({"groups": True}, TypeError, "groups must be an int"),
        ({"relu": 1}, TypeError, "relu must be a bool"),
        ({"weight": "w"}, TypeError, "weight must be a torch.Tensor"),
    ],
)
def test_bad_input(backend, overrides, error, message):
    skip_unless_available(backend)
    with fastcnn.use_backend(backend), pytest.raises(error, match=message):
        call(**overrides)


def test_out_overlapping_the_input():
    buf = torch.randn(2, 40, 7, 9).contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="out overlaps x"):
        call(x=buf[:, :13], out=buf[:, 13:37])


def test_out_partially_overlapping_the_residual():
    buf = torch.randn(2, 30, 7, 9).contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="out partially overlaps residual"):
        call(residual=buf[:, :24], out=buf[:, 6:30])


def test_inputs_that_require_grad_are_refused_while_recording():
    with pytest.raises(RuntimeError, match="inference-only and weight requires grad"):
        call(weight=W.clone().requires_grad_())
    with torch.no_grad():
        call(weight=W.clone().requires_grad_())  # fine when autograd is off
