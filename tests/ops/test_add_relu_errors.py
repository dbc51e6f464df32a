"""Bad input to fastcnn.ops.add_relu gets an error that names the problem."""

from __future__ import annotations

import pytest
import torch

import fastcnn

X = torch.randn(2, 13, 7, 9)


@pytest.mark.parametrize("backend", ["auto", "eager", "cpu"])
@pytest.mark.parametrize(
    ("args", "kwargs", "error", "message"),
    [
        ((X, torch.randn(2, 13, 7, 8)), {}, ValueError, "residual has shape"),
        ((X, X.half()), {}, TypeError, "residual has dtype"),
        ((X.int(), X.int()), {}, TypeError, "x has dtype torch.int32"),
        ((X.double(), X.double()), {}, TypeError, "supported: float32, float16, bfloat16"),
        ((X[None], X[None]), {}, ValueError, "must have 0 to 4 dimensions, got 5"),
        ((X, X.to("meta")), {}, RuntimeError, "residual is on meta but x is on cpu"),
        ((X, [1.0]), {}, TypeError, "residual must be a torch.Tensor"),
        ((X, X), {"out": torch.empty(2, 13, 7)}, ValueError, "out has shape"),
        ((X, X), {"out": torch.empty(2, 13, 7, 9).half()}, TypeError, "out has dtype"),
        ((X, X), {"out": torch.empty(2, 13, 7, 9, device="meta")}, RuntimeError, "out is on"),
    ],
)
def test_bad_input(backend, args, kwargs, error, message):
    with fastcnn.use_backend(backend), pytest.raises(error, match=message):
        fastcnn.ops.add_relu(*args, **kwargs)


def test_out_partially_overlapping_an_input():
    buf = torch.randn(2, 20, 7, 9)
    x, out = buf[:, :13], buf[:, 5:18]
    with pytest.raises(ValueError, match="out partially overlaps x"):
        fastcnn.ops.add_relu(x, torch.randn(2, 13, 7, 9), out=out)


def test_out_that_requires_grad():
    out = torch.empty(2, 13, 7, 9, requires_grad=True)
    with pytest.raises(RuntimeError, match="out= does not support autograd"):
        fastcnn.ops.add_relu(X, X, out=out)


def test_extension_kernel_checks_its_own_arguments():
    """Called directly (bypassing fastcnn.ops), the C++ kernel still refuses bad shapes."""
    from fastcnn import _extension

    ext = _extension.ops()
    with pytest.raises(RuntimeError, match="residual has"):
        ext.add_relu_out(X, torch.randn(2, 13, 7, 8), torch.empty_like(X))
    with pytest.raises(RuntimeError, match="overlapping memory"):
        ext.add_relu_out(X[:1], X[:1], torch.empty(1, 1, 1, 1).expand(1, 13, 7, 9))
