"""fastcnn.ops.conv_bn_act against the float64 reference: every conv family of ResNet-18/50 and
GoogLeNet (scaled down), fp32 and fp16, NCHW and channels_last, with and without residual/ReLU,
and out= channel slices whose neighbours are poisoned."""

from __future__ import annotations

import importlib

import pytest
import torch
from conv_cases import CASE_IDS, CASES
from fastcnn_testing import (
    assert_matches,
    conv_reference64,
    op_backend_params,
    poisoned_like,
    random_conv_inputs,
    random_tensor,
    runs_on,
    skip_unsupported,
)

import fastcnn
from fastcnn.common.shapes import output_shape

conv_module = importlib.import_module("fastcnn.ops.conv_bn_act")
BACKENDS = op_backend_params(conv_module._IMPLS)
DTYPES = [torch.float32, torch.float16]  # bf16: tests/ops/test_conv_bn_act_cuda.py (GPU only)
EPILOGUES = {"relu": (False, True), "residual_relu": (True, True), "plain": (False, False)}


def _inputs(case, dtype, device, channels_last, residual, seed=0):
    cin, cout, h, w = case.small
    x, weight, bias = random_conv_inputs(
        cin, cout, case.kernel, h, w, dtype, device, channels_last=channels_last, seed=seed
    )
    shape = output_shape(x.shape, weight.shape, [case.stride] * 2, [case.padding] * 2, [1, 1])
    # the residual in x's layout, as a network makes it (another layout costs the cpu backend
    # a copy, which its trace reports: test_residual_in_another_layout)
    res = random_tensor(shape, dtype, device, channels_last, seed=seed + 1) if residual else None
    return x, weight, bias, res


@pytest.mark.parametrize(("device", "backend"), BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "nchw"])
@pytest.mark.parametrize("epilogue", list(EPILOGUES))
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_matches_reference(device, backend, dtype, channels_last, epilogue, case):
    skip_unsupported(device, backend, dtype)
    has_residual, relu = EPILOGUES[epilogue]
    x, weight, bias, res = _inputs(case, dtype, device, channels_last, has_residual)
    with runs_on("conv_bn_act", backend, dtype) as t:
        out = fastcnn.ops.conv_bn_act(
            x, weight, bias, case.stride, case.padding, residual=res, relu=relu
        )
    assert out.is_contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format
    ), "the output must follow the input's memory format"
    assert not torch.isnan(out).any()
    expected = conv_reference64(x, weight, bias, case.stride, case.padding, res, relu)
    assert_matches(out, expected, dtype, t.kernels())


@pytest.mark.parametrize(("device", "backend"), BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_out_channel_slice_writes_only_its_channels(device, backend, dtype, case):
    skip_unsupported(device, backend, dtype)
    x, weight, bias, res = _inputs(case, dtype, device, True, True, seed=3)
    n, cout, ho, wo = res.shape
    big = poisoned_like(torch.empty(n, cout + 9, ho, wo, dtype=dtype, device=device))
    big = big.contiguous(memory_format=torch.channels_last)
    out = big[:, 4 : 4 + cout]
    with runs_on("conv_bn_act", backend, dtype) as t:
        got = fastcnn.ops.conv_bn_act(
            x, weight, bias, case.stride, case.padding, residual=res, out=out
        )
    assert got is out
    assert torch.isnan(big[:, :4]).all() and torch.isnan(big[:, 4 + cout :]).all(), (
        "wrote outside the out= slice"
    )
    assert not torch.isnan(out).any(), "left part of the slice unwritten"
    expected = conv_reference64(x, weight, bias, case.stride, case.padding, res)
    assert_matches(out, expected, dtype, t.kernels())


@pytest.mark.parametrize(("device", "backend"), BACKENDS)
def test_no_bias(device, backend):
    skip_unsupported(device, backend, torch.float32)
    x, weight, _ = random_conv_inputs(13, 24, 3, 7, 9, torch.float32, device)
    with runs_on("conv_bn_act", backend, torch.float32):
        out = fastcnn.ops.conv_bn_act(x, weight, None, 1, 1)
    expected = conv_reference64(x, weight, None, 1, 1)
    assert_matches(out, expected, torch.float32)


@pytest.mark.parametrize(("device", "backend"), BACKENDS)
def test_a_strided_bias_is_read_by_its_strides(device, backend):
    # every kernel reads the bias as ptr + channel: a view with stride 2 was read wrong on the
    # triton and cpu backends (the neighbouring values) until the op made it dense
    skip_unsupported(device, backend, torch.float32)
    x, weight, _ = random_conv_inputs(13, 24, 3, 7, 9, torch.float32, device)
    bias = random_tensor((48,), torch.float32, device, seed=5)[::2]
    with runs_on("conv_bn_act", backend, torch.float32):
        out = fastcnn.ops.conv_bn_act(x, weight, bias, 1, 1)
    assert_matches(out, conv_reference64(x, weight, bias, 1, 1), torch.float32)


@pytest.mark.parametrize(("device", "backend"), BACKENDS)
def test_rectangular_stride_and_padding(device, backend):
    skip_unsupported(device, backend, torch.float32)
    x, weight, bias = random_conv_inputs(13, 24, 3, 9, 11, torch.float32, device)
    with runs_on("conv_bn_act", backend, torch.float32):
        out = fastcnn.ops.conv_bn_act(x, weight, bias, stride=(2, 1), padding=(0, 2))
    expected = conv_reference64(x, weight, bias, (2, 1), (0, 2))
    assert out.shape == expected.shape
    assert_matches(out, expected, torch.float32)


@pytest.mark.parametrize(("device", "backend"), BACKENDS)
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("kernel", [1, 3])  # on "cuda": cuBLASLt, and cuDNN + epilogue
def test_nan_input_as_documented(device, backend, relu, kernel):
    """A NaN input pixel reaches the output through every path without ReLU; through the fused
    ReLU, exactly the kernels in NAN_TO_ZERO_KERNELS map it to 0 (the op's docstring)."""
    skip_unsupported(device, backend, torch.float32)
    x, weight, bias = random_conv_inputs(13, 24, kernel, 7, 9, torch.float32, device)
    x[0, :, 3, 4] = float("nan")
    with runs_on("conv_bn_act", backend, torch.float32) as t:
        out = fastcnn.ops.conv_bn_act(x, weight, bias, padding=kernel // 2, relu=relu)
    (ran,) = t.kernels()
    assert not torch.isnan(out[1]).any()
    if relu and ran in conv_module.NAN_TO_ZERO_KERNELS:
        assert (out[0, :, 3, 4] == 0).all(), f"{ran} maps NaN to 0 (documented)"
    else:
        assert torch.isnan(out[0, :, 3, 4]).all(), f"{ran}: NaN must reach the output"


def test_dilation_runs_the_reference_with_a_note(monkeypatch):
    monkeypatch.setattr(fastcnn._backend, "_warned", set())
    x = torch.randn(2, 14, 9, 9).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(24, 14, 3, 3) * 0.1
    warns = pytest.warns(RuntimeWarning, match="dilation != 1 have no fused kernel")
    with warns, fastcnn.trace() as t:
        out = fastcnn.ops.conv_bn_act(x, weight, None, 1, 1, dilation=2)
    assert t.kernels() == {"eager:reference"} and "dilation" in t.fallbacks()[0].fallback
    assert_matches(out, conv_reference64(x, weight, None, 1, 1, dilation=2), torch.float32)


@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "nchw"])
def test_residual_in_another_layout(channels_last):
    """An NCHW residual for a channels_last x (or the reverse): right on every CPU backend; the
    cpu backend copies it first and says so in the trace."""
    x, weight, bias = random_conv_inputs(13, 24, 3, 7, 9, torch.float32, "cpu", channels_last=True)
    x = x if channels_last else x.contiguous()
    res = random_tensor([2, 24, 7, 9], torch.float32, "cpu", not channels_last, seed=5)
    expected = conv_reference64(x, weight, bias, 1, 1, res)
    with fastcnn.use_backend("cpu"), fastcnn.trace() as t:
        out = fastcnn.ops.conv_bn_act(x, weight, bias, 1, 1, residual=res)
    assert_matches(out, expected, torch.float32)
    (event,) = t.events
    assert event.kernel == "onednn"
    if channels_last:
        assert "residual is not channels_last" in event.fallback
    else:
        assert event.fallback is None  # oneDNN reads an NCHW x's residual as it is


@pytest.mark.parametrize(
    ("cin", "cout", "groups", "kernel", "stride"),
    [(16, 24, 2, 3, 1), (12, 12, 4, 1, 1), (8, 8, 8, 3, 2), (40, 40, 40, 3, 1)],
    ids=["groups2-3x3", "groups4-1x1", "depthwise-s2", "depthwise-40"],
)
def test_grouped_conv_on_triton(cin, cout, groups, kernel, stride):
    """Triton runs a grouped (and depthwise) conv as one GEMM per group in one launch, with the
    residual and an out= channel slice, and records no fallback."""
    skip_unsupported("cpu", "triton", torch.float32)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, cin, 9, 7, generator=g).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(cout, cin // groups, kernel, kernel, generator=g) * 0.3
    bias = torch.randn(cout, generator=g) * 0.1
    pad = kernel // 2
    shape = output_shape(x.shape, weight.shape, [stride] * 2, [pad] * 2, [1, 1])
    residual = torch.randn(shape, generator=g).contiguous(memory_format=torch.channels_last)
    big = torch.full((2, cout + 6, *shape[2:]), float("nan"))
    big = big.contiguous(memory_format=torch.channels_last)
    with fastcnn.use_backend("triton"), fastcnn.trace() as t:
        fastcnn.ops.conv_bn_act(
            x, weight, bias, stride, pad, groups, residual=residual, out=big[:, 3 : 3 + cout]
        )
    assert t.kernels() == {"triton:implicit_gemm"} and not t.fallbacks(), str(t)
    expected = conv_reference64(x, weight, bias, stride, pad, residual, groups=groups)
    assert torch.isnan(big[:, :3]).all() and torch.isnan(big[:, 3 + cout :]).all()
    assert_matches(big[:, 3 : 3 + cout], expected, torch.float32)
