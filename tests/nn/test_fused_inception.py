"""fastcnn.nn.FusedInception (and fastcnn.ops.inception behind it) against torchvision's eval
Inception block with randomized BN: every GoogLeNet configuration at small odd spatial sizes,
fp32 and fp16, the 5x5 variant, out= slices, NCHW, and no torch.cat in the fused forward."""

from __future__ import annotations

import pytest
import torch
from fastcnn_testing import (
    TOLERANCES,
    poisoned_like,
    random_tensor,
    randomize_batchnorm,
    runs_on,
    skip_unsupported,
)
from inception_cases import INCEPTION_CONFIGS
from torchvision.models.googlenet import Inception as TorchvisionInception

import fastcnn
from fastcnn.models.googlenet import Inception as FastcnnInception

BACKENDS = ["triton", "cpu", "eager"]


def _block(config, seed=0, cls=TorchvisionInception, **kwargs):
    torch.manual_seed(seed)
    return randomize_batchnorm(cls(*config, **kwargs), seed=seed + 1).eval()


def _assert_close(got, expected, dtype):
    rtol, atol = TOLERANCES[dtype]
    assert not torch.isnan(got).any(), "an output element was left unwritten"
    torch.testing.assert_close(got.double(), expected.double(), rtol=4 * rtol, atol=4 * atol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("name", list(INCEPTION_CONFIGS))
def test_matches_torchvision_block(name, dtype, backend):
    skip_unsupported("cpu", backend, dtype)
    config, _ = INCEPTION_CONFIGS[name]
    block = _block(config)
    x = random_tensor((1, config[0], 7, 5), torch.float32, "cpu", channels_last=True, seed=2)
    with torch.no_grad():
        expected = block.double()(x.double())  # float64 reference on the same (rounded) input
        fused = fastcnn.nn.FusedInception.from_module(block.to(dtype))
        with runs_on("inception", backend, dtype):
            got = fused(x.to(dtype))
    assert got.shape == expected.shape and got.dtype == dtype
    assert got.is_contiguous(memory_format=torch.channels_last)
    _assert_close(got, expected, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_paper_5x5_variant(backend):
    skip_unsupported("cpu", backend, torch.float32)
    block = _block((24, 8, 6, 10, 3, 5, 7), cls=FastcnnInception, branch3_kernel=5)
    assert block.branch3[1].conv.kernel_size == (5, 5)
    x = random_tensor((2, 24, 9, 7), torch.float32, "cpu", channels_last=True, seed=3)
    fused = fastcnn.nn.FusedInception.from_module(block)
    with torch.no_grad():
        expected = block(x)
        with runs_on("inception", backend, torch.float32):
            got = fused(x)
    _assert_close(got, expected, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_slice_and_nchw_input(backend):
    skip_unsupported("cpu", backend, torch.float32)
    block = _block((19, 8, 6, 10, 3, 5, 7))
    fused = fastcnn.nn.FusedInception.from_module(block)
    x = random_tensor((2, 19, 7, 9), torch.float32, "cpu", seed=4)  # NCHW
    big = poisoned_like(torch.empty(2, 41, 7, 9)).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = block(x)
        with runs_on("inception", backend, torch.float32):
            got = fused(x, out=big[:, 5:35])
            nchw = fused(x)
    assert got.data_ptr() == big[:, 5:35].data_ptr()
    assert torch.isnan(big[:, :5]).all() and torch.isnan(big[:, 35:]).all()
    _assert_close(got, expected, torch.float32)
    assert nchw.is_contiguous(), "an NCHW input gives an NCHW output"
    _assert_close(nchw, expected, torch.float32)


def test_triton_forward_has_no_concat():
    skip_unsupported("cpu", "triton", torch.float32)
    fused = fastcnn.nn.FusedInception.from_module(_block((19, 8, 6, 10, 3, 5, 7)))
    x = random_tensor((1, 19, 7, 9), torch.float32, "cpu", channels_last=True)
    with torch.no_grad(), fastcnn.use_backend("triton"), torch.profiler.profile() as prof:
        fused(x)
    names = {e.name for e in prof.events()}
    assert "aten::cat" not in names
    assert "aten::max_pool2d" not in names, "the pool must be fused into branch 4's conv"


def test_state_dict_round_trip_and_buffers():
    fused = fastcnn.nn.FusedInception.from_module(_block((19, 8, 6, 10, 3, 5, 7)))
    keys = {"reduce_weight", "reduce_bias", "w2", "b2", "w3", "b3", "w4", "b4"}
    assert set(fused.state_dict()) == keys and not list(fused.parameters())
    assert fused.reduce_weight.shape == (8 + 6 + 3, 19, 1, 1)
    fresh = fastcnn.nn.FusedInception(19, 8, 6, 10, 3, 5, 7)
    fresh.load_state_dict(fused.state_dict(), strict=True)
    x = random_tensor((1, 19, 5, 5), torch.float32, "cpu", seed=5)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), fused(x), rtol=0, atol=0)


def test_from_module_refuses_what_it_cannot_fuse():
    with pytest.raises(TypeError, match="is not an Inception block"):
        fastcnn.nn.FusedInception.from_module(torch.nn.Conv2d(3, 3, 1))
    block = _block((19, 8, 6, 10, 3, 5, 7))
    block.branch4[0] = torch.nn.MaxPool2d(3, stride=2, padding=1)
    with pytest.raises(ValueError, match="MaxPool2d\\(k, stride=1"):
        fastcnn.nn.FusedInception.from_module(block)


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"widths": [8, 6, 4]}, ValueError, "must be three positive channel counts"),
        ({"pool": 2}, ValueError, "pool must be an odd size"),
        ({"b2": torch.zeros(9)}, ValueError, r"b2 has shape \(9,\)"),
        ({"x": torch.randn(1, 18, 5, 5)}, ValueError, "reduce_weight expects 19 input channels"),
    ],
)
def test_op_bad_input(change, error, message):
    fused = fastcnn.nn.FusedInception.from_module(_block((19, 8, 6, 10, 3, 5, 7)))
    args = {
        "x": torch.randn(1, 19, 5, 5),
        "reduce_weight": fused.reduce_weight,
        "reduce_bias": fused.reduce_bias,
        "widths": fused.widths,
        "w2": fused.w2,
        "b2": fused.b2,
        "w3": fused.w3,
        "b3": fused.b3,
        "w4": fused.w4,
        "b4": fused.b4,
        "pool": 3,
    }
    args.update(change)
    with pytest.raises(error, match=message):
        fastcnn.ops.inception(**args)
