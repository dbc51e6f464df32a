"""conv_bn_act on a GPU at full network sizes (every ResNet-18/50 and GoogLeNet conv family),
fp32/fp16/bf16, against the float64 reference within the rounding bound of the path that ran
(fastcnn_testing.ROUNDINGS), and the extension's path asserted through fastcnn.trace. Skipped
without a CUDA GPU."""

from __future__ import annotations

import importlib

import pytest
import torch
from conv_cases import CASE_IDS, CASES
from fastcnn_testing import (
    NO_GPU_REASON,
    ROUNDINGS,
    TOLERANCES,
    assert_matches,
    assert_within_bound,
    conv_bound64,
    conv_reference64,
    poisoned_like,
    random_conv_inputs,
    random_tensor,
)

import fastcnn
from fastcnn.common.shapes import output_shape

conv_module = importlib.import_module("fastcnn.ops.conv_bn_act")

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU_REASON),
]


def expected_kernel(case, backend: str) -> str:
    """The kernel each backend must run for a channels_last case with an NHWC residual."""
    if backend == "cuda":
        gemm = (case.kernel, case.stride, case.padding) == (1, 1, 0)
        return "cuda:cublaslt" if gemm else "cuda:cudnn+epilogue"
    return {"triton": "triton:implicit_gemm", "eager": "eager:reference"}[backend]


def _run_case(case, dtype, backend, *, residual=True, out_slice=False, batch=2):
    cin, cout, h, w = case.full
    x, weight, bias = random_conv_inputs(cin, cout, case.kernel, h, w, dtype, "cuda", batch=batch)
    pair = [case.stride] * 2, [case.padding] * 2
    shape = output_shape(x.shape, weight.shape, *pair, [1, 1])
    # an NHWC residual, as fastcnn's models make it: what the cuBLASLt epilogue reads
    res = random_tensor(shape, dtype, "cuda", channels_last=True, seed=7) if residual else None
    out = None
    if out_slice:
        big = poisoned_like(torch.empty(batch, cout + 16, *shape[2:], dtype=dtype, device="cuda"))
        big = big.contiguous(memory_format=torch.channels_last)
        out = big[:, 8 : 8 + cout]
    with fastcnn.use_backend(backend), fastcnn.trace() as t:
        got = fastcnn.ops.conv_bn_act(
            x, weight, bias, case.stride, case.padding, residual=res, out=out
        )
    kernel = expected_kernel(case, backend)
    assert t.kernels() == {kernel} and not t.fallbacks(), str(t)
    expected = conv_reference64(x, weight, bias, case.stride, case.padding, res)
    if dtype == torch.float32:
        assert_matches(got, expected, dtype)
    else:  # fp16/bf16: the rounding bound of the path that ran
        bound = conv_bound64(
            x, weight, bias, case.stride, case.padding, res, dtype, ROUNDINGS[kernel]
        )
        assert_within_bound(got, expected, bound, f"{case.name} {dtype} {kernel}")
    if out_slice:
        assert torch.isnan(big[:, :8]).all() and torch.isnan(big[:, 8 + cout :]).all()


@pytest.mark.parametrize("backend", ["triton", "cuda", "eager"])
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_full_size_matches_reference(case, dtype, backend):
    _run_case(case, dtype, backend)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_full_size_out_slice(case, dtype, backend):
    _run_case(case, dtype, backend, out_slice=True)


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
def test_cuda_backend_nchw_input_and_no_bias(dtype, residual):
    """The extension's conv with an NCHW x (converted inside) and no bias, 1x1 and 3x3: the 1x1
    misses cuBLASLt, and the trace says why."""
    for kernel, padding in ((1, 0), (3, 1)):
        x, weight, _ = random_conv_inputs(19, 24, kernel, 9, 11, dtype, "cuda", batch=3)
        x = x.contiguous()
        res = random_tensor((3, 24, 9, 11), dtype, "cuda", seed=3) if residual else None
        with fastcnn.use_backend("cuda"), fastcnn.trace() as t:
            got = fastcnn.ops.conv_bn_act(x, weight, None, 1, padding, residual=res)
        expected = conv_reference64(x, weight, None, 1, padding, res)
        assert got.is_contiguous()  # the result follows x's memory format
        (event,) = t.events
        assert event.kernel == "cudnn+epilogue"
        if kernel == 1:
            assert event.fallback == "x is not channels_last (cuBLASLt reads NHWC rows)"
        else:
            assert event.fallback is None  # cuDNN is the 3x3's own path
        bound = conv_bound64(x, weight, None, 1, padding, res, dtype, 2)
        assert_within_bound(got, expected, bound, f"{kernel}x{kernel} {dtype}")


@pytest.mark.parametrize(
    ("layout", "reason"),
    [
        ("nchw_residual", "residual is not channels_last (cuBLASLt reads it as NHWC rows)"),
        ("nchw_out", "out is not channels_last (cuBLASLt writes NHWC rows)"),
        ("channel_slices", None),  # x, residual and out channel slices: cuBLASLt's row strides
    ],
)
def test_cuda_1x1_paths_and_fallback_reasons(layout, reason):
    """A 1x1 stride-1 conv runs as one cuBLASLt GEMM whenever x, residual and out are NHWC
    rows (channel slices included); otherwise cuDNN + epilogue, with the reason in the trace."""
    dtype = torch.float16
    x, weight, bias = random_conv_inputs(64, 96, 1, 14, 14, dtype, "cuda", batch=4)
    res = random_tensor((4, 96, 14, 14), dtype, "cuda", channels_last=True, seed=4)
    out = None
    if layout == "nchw_residual":
        res = res.contiguous()
    elif layout == "nchw_out":
        out = poisoned_like(torch.empty(4, 96, 14, 14, dtype=dtype, device="cuda"))
    else:
        wide = random_tensor((4, 80, 14, 14), dtype, "cuda", channels_last=True, seed=5)
        x = wide[:, 8:72]
        res = random_tensor((4, 128, 14, 14), dtype, "cuda", channels_last=True, seed=6)
        res = res[:, 16:112]
        big = poisoned_like(torch.empty(4, 112, 14, 14, dtype=dtype, device="cuda"))
        out = big.contiguous(memory_format=torch.channels_last)[:, 8:104]
    expected = conv_reference64(x, weight, bias, 1, 0, res)
    with fastcnn.use_backend("cuda"), fastcnn.trace() as t:
        got = fastcnn.ops.conv_bn_act(x, weight, bias, 1, 0, residual=res, out=out)
    (event,) = t.events
    assert (event.kernel, event.fallback) == (
        ("cublaslt", None) if reason is None else ("cudnn+epilogue", reason)
    ), str(t)
    rounds = ROUNDINGS[f"cuda:{event.kernel}"]
    assert_within_bound(got, expected, conv_bound64(x, weight, bias, 1, 0, res, dtype, rounds))


def test_fp32_follows_cudnn_allow_tf32(monkeypatch):
    from fastcnn.triton import conv_bn_act as kernels

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert kernels._input_precision(torch.float32) == "tf32"
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert kernels._input_precision(torch.float32) == "ieee"
    assert kernels._input_precision(torch.float16) == "ieee"


@pytest.mark.parametrize("case", [CASES[1], CASES[5]], ids=[CASE_IDS[1], CASE_IDS[5]])
def test_autotuned_kernel_matches_reference(monkeypatch, case):
    """gpu_check runs the suite with FASTCNN_TRITON_AUTOTUNE=0 for time; this covers tuning."""
    monkeypatch.setenv("FASTCNN_TRITON_AUTOTUNE", "1")
    _run_case(case, torch.float16, "triton")


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_in_place_over_the_residual_with_autotuning(backend, monkeypatch):
    """out=residual on a GPU, autotuner on: its timed runs must not add onto each other."""
    monkeypatch.setenv("FASTCNN_TRITON_AUTOTUNE", "1")
    x, weight, bias = random_conv_inputs(64, 256, 1, 28, 28, torch.float16, "cuda", batch=4)
    res = random_tensor((4, 256, 28, 28), torch.float16, "cuda", channels_last=True, seed=9)
    expected = conv_reference64(x, weight, bias, 1, 0, res)
    bound = conv_bound64(x, weight, bias, 1, 0, res, torch.float16, 1)  # triton, cuBLASLt
    with fastcnn.use_backend(backend), fastcnn.trace() as t:
        got = fastcnn.ops.conv_bn_act(x, weight, bias, 1, 0, residual=res, out=res)
    assert got.data_ptr() == res.data_ptr()
    assert t.kernels() <= {"triton:implicit_gemm", "cuda:cublaslt"}, str(t)
    assert_within_bound(res, expected, bound)


@pytest.mark.parametrize("autotune", ["0", "1"])
def test_planned_module_calls_launch_directly_and_match(monkeypatch, autotune):
    """A module's second call with the same layout skips checks, the autotuner and the JIT
    binder (fastcnn.triton.conv_bn_act._Launch): it must compute the same result."""
    from fastcnn.triton import conv_bn_act as kernels

    monkeypatch.setenv("FASTCNN_TRITON_AUTOTUNE", autotune)
    conv = torch.nn.Conv2d(64, 64, 3, padding=1, bias=False)
    bn = torch.nn.BatchNorm2d(64).eval()
    fused = fastcnn.nn.ConvBNAct.from_modules(conv, bn, torch.nn.ReLU()).cuda().half()
    x, _, _ = random_conv_inputs(64, 64, 3, 28, 28, torch.float16, "cuda", batch=2)
    expected = conv_reference64(x, fused.weight, fused.bias, 1, 1)
    bound = conv_bound64(x, fused.weight, fused.bias, 1, 1, None, torch.float16, 1)
    with torch.no_grad(), fastcnn.use_backend("triton"):
        first = fused(x)
        before = kernels.direct_launches[0]
        second = fused(x)
    assert kernels.direct_launches[0] == before + 1, "the second call did not launch directly"
    assert_within_bound(first, expected, bound, "first call")
    assert torch.equal(first, second)
