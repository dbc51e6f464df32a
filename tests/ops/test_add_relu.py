"""fastcnn.ops.add_relu against torch.relu(x + residual), per backend, dtype, shape and layout."""

from __future__ import annotations

import pytest
import torch
from fastcnn_testing import (
    DTYPES,
    assert_matches,
    device_backend_params,
    poisoned_like,
    random_tensor,
    runs_on,
    skip_unsupported,
)

import fastcnn

SHAPES = [(2, 13, 7, 9), (1, 3, 5, 5), (3, 40, 11, 6), (1, 24, 1, 1)]  # NCHW activations
OTHER_RANKS = [(), (1037,), (4, 33), (3, 5, 7)]
# How x, residual and out are laid out: (x channels_last, residual channels_last, out kind)
LAYOUTS = {
    "nchw": (False, False, "new"),
    "channels_last": (True, True, "new"),
    "mixed": (True, False, "new"),
    "out_nchw": (False, False, "poisoned"),
    "out_channel_slice": (True, True, "slice"),
    "out_mixed_slice": (False, True, "slice"),
}


def _reference64(x, residual):
    """relu(x + residual) in float64, written apart from fastcnn.reference (the eager backend):
    clamp_min propagates NaN as relu does."""
    return (x.double() + residual.double()).clamp_min(0)


@pytest.mark.parametrize(("device", "backend"), device_backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_matches_reference(device, backend, dtype, shape, layout):
    skip_unsupported(device, backend, dtype)
    x_cl, r_cl, out_kind = LAYOUTS[layout]
    x = random_tensor(shape, dtype, device, channels_last=x_cl, seed=1)
    r = random_tensor(shape, dtype, device, channels_last=r_cl, seed=2)
    expected = _reference64(x, r)
    with runs_on("add_relu", backend, dtype):
        if out_kind == "new":
            out = fastcnn.ops.add_relu(x, r)
            assert out.stride() == x.stride(), "the result must take x's memory format"
        elif out_kind == "poisoned":
            out = poisoned_like(x)
            assert fastcnn.ops.add_relu(x, r, out=out) is out
        else:  # a channel slice of a larger channels_last tensor, neighbours poisoned with NaN
            n, c, *rest = shape
            big = poisoned_like(random_tensor((n, c + 7, *rest), dtype, device, True))
            out = big[:, 3 : 3 + c]
            fastcnn.ops.add_relu(x, r, out=out)
            outside = torch.cat([big[:, :3], big[:, 3 + c :]], dim=1)
            assert torch.isnan(outside).all(), "wrote outside the out= slice"
    assert not torch.isnan(out).any(), "an output element was left unwritten (still NaN)"
    assert_matches(out, expected, dtype)


@pytest.mark.parametrize(("device", "backend"), device_backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", OTHER_RANKS, ids=lambda s: "x".join(map(str, s)) or "scalar")
def test_other_ranks(device, backend, dtype, shape):
    skip_unsupported(device, backend, dtype)
    x = random_tensor(shape, dtype, device, seed=5)
    r = random_tensor(shape, dtype, device, seed=6)
    out = poisoned_like(x)
    with runs_on("add_relu", backend, dtype):
        fastcnn.ops.add_relu(x, r, out=out)
    assert not torch.isnan(out).any(), "an output element was left unwritten (still NaN)"
    assert_matches(out, _reference64(x, r), dtype)


@pytest.mark.parametrize(("device", "backend"), device_backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_and_inf_as_reference(device, backend, dtype):
    skip_unsupported(device, backend, dtype)
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1.5, -2.0])
    x = specials.repeat_interleave(7).reshape(1, 7, 7, 1).to(dtype=dtype, device=device)
    r = specials.repeat(7).reshape(1, 7, 7, 1).to(dtype=dtype, device=device)
    with runs_on("add_relu", backend, dtype):
        out = fastcnn.ops.add_relu(x, r)
    expected = _reference64(x, r)
    assert torch.equal(torch.isnan(out), torch.isnan(expected)), "NaN pattern differs"
    assert_matches(out, expected, dtype)


@pytest.mark.parametrize(("device", "backend"), device_backend_params())
def test_in_place_into_x(device, backend):
    skip_unsupported(device, backend, torch.float32)
    x = random_tensor((2, 13, 7, 9), torch.float32, device, channels_last=True, seed=3)
    r = random_tensor((2, 13, 7, 9), torch.float32, device, seed=4)
    expected = _reference64(x, r)
    with runs_on("add_relu", backend, torch.float32):
        out = fastcnn.ops.add_relu(x, r, out=x)
    assert out is x
    assert_matches(x, expected, torch.float32)


@pytest.mark.parametrize(("device", "backend"), device_backend_params())
def test_empty_tensor(device, backend):
    skip_unsupported(device, backend, torch.float32)
    x = torch.empty(0, 13, 7, 9, device=device)
    with fastcnn.use_backend(backend):
        assert fastcnn.ops.add_relu(x, x.clone()).shape == x.shape


def test_op_allocated_outputs_are_poisoned_in_tests():
    """The suite-wide hook (tests/conftest.py): a buffer an op allocates starts as NaN, so a
    kernel that skips an element fails instead of passing on leftover memory."""
    from fastcnn.common import alloc

    x = torch.randn(2, 3, 4, 5)
    assert torch.isnan(alloc.empty_like(x)).all()
    assert torch.isnan(alloc.empty((2, 3), x)).all()
    with alloc.poisoned(7.0):
        assert (alloc.empty_like(x) == 7.0).all()
    assert torch.isnan(alloc.empty_like(x)).all()
