"""conv_bn_act with out= the residual itself: the result overwrites the residual (fastcnn.optimize
does this for ResNet's shortcut), on every backend that runs here."""

from __future__ import annotations

import importlib

import pytest
import torch
from fastcnn_testing import (
    assert_matches,
    conv_reference64,
    op_backend_params,
    random_conv_inputs,
    random_tensor,
    skip_unsupported,
)

import fastcnn

conv_module = importlib.import_module("fastcnn.ops.conv_bn_act")


@pytest.mark.parametrize(("device", "backend"), op_backend_params(conv_module._IMPLS))
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize(("kernel", "padding"), [(1, 0), (3, 1)])
def test_out_is_the_residual(device, backend, relu, kernel, padding):
    skip_unsupported(device, backend, torch.float32)
    x, weight, bias = random_conv_inputs(13, 24, kernel, 7, 9, torch.float32, device)
    residual = random_tensor((2, 24, 7, 9), torch.float32, device, channels_last=True, seed=5)
    expected = conv_reference64(x, weight, bias, 1, padding, residual, relu)
    with fastcnn.use_backend(backend):
        got = fastcnn.ops.conv_bn_act(
            x, weight, bias, 1, padding, residual=residual, relu=relu, out=residual
        )
    assert got.data_ptr() == residual.data_ptr()
    assert_matches(residual, expected, torch.float32)
