"""What the tests share: the per-dtype tolerance table, poisoned outputs, backend/device grids."""

from __future__ import annotations

import contextlib
import threading

import pytest
import torch

import fastcnn
from fastcnn.common.env import interpreting

# (rtol, atol) for comparing a kernel's output with the float64 reference, on the small,
# order-1 outputs of the interpreter and CPU tests (a few roundings: see the rule below).
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1e-2, 1e-2),
}
DTYPES = list(TOLERANCES)

# Tolerances from the arithmetic, for the full-size GPU tests (where a flat rtol/atol misses:
# eager fp16 rounds three times, 3 * 2^-11 = 1.5e-3 > 1e-3, and y = conv + bias + residual can
# cancel to far below its terms).
#
# y = relu(conv(x, w) + bias + residual), every input already in the dtype, compared with the
# same function in float64 on those inputs. Error sources, per output element:
#   - each rounding of a partial result s to the dtype adds at most u * |s|, and every partial
#     (conv, conv + bias, conv + bias + residual) is at most |conv| + |bias| + |residual|, the
#     magnitude of the terms (conv in float64);
#   - the fp32 accumulation of the K = Cin*KH*KW products adds at most K * 2^-24 * conv(|x|,
#     |w|) (Higham's gamma_K; fp16/bf16 products are exact in fp32; TF32 is off in the tests);
#   - ReLU is exact and 1-Lipschitz: it never grows an error.
# So |y - y64| <= n * u * (|conv| + |bias| + |residual|) + K * 2^-24 * conv(|x|, |w|), with n
# the number of roundings to the dtype of the path that ran (ROUNDINGS) and u the dtype's unit
# roundoff. A layer fed by another adds what its input already carries: conv(E_in, |w|) for an
# input error bound E_in (inception_bound64). This is a bound, not an estimate: a test that
# exceeds it has found a bug, not noise. (Against a flat 1e-3 it is tighter where terms cancel
# and about as tight elsewhere; simulated on the CPU with the eager path, the worst element of
# a 2x64x28x28 conv reaches 15-30% of it.)
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
ROUNDINGS = {
    "triton:implicit_gemm": 1,  # one store of the fp32 result
    "cuda:cublaslt": 1,  # bias, residual (C, beta = 1) and ReLU in the GEMM's fp32 epilogue
    "cuda:cudnn+epilogue": 2,  # cuDNN's conv output, then the epilogue pass's store
    "eager:reference": 3,  # conv2d's output, + bias, + residual: each op rounds
}


def _layer_bound64(x, weight, bias, stride, padding, residual, dtype, roundings, error_in=None):
    """(y64, bound) of one conv layer by the rule above; error_in bounds x's own error."""

    def f64(t):
        return None if t is None else t.double()

    conv = torch.nn.functional.conv2d
    x64, w64 = f64(x), f64(weight)
    y = conv(x64, w64, None, stride, padding)
    magnitude = y.abs()
    if bias is not None:
        y = y + f64(bias)[None, :, None, None]
        magnitude = magnitude + f64(bias).abs()[None, :, None, None]
    if residual is not None:
        y = y + f64(residual)
        magnitude = magnitude + f64(residual).abs()
    k = weight[0].numel()
    bound = roundings * UNIT_ROUNDOFF[dtype] * magnitude
    bound = bound + k * 2.0**-24 * conv(x64.abs(), w64.abs(), None, stride, padding)
    if error_in is not None:
        bound = bound + conv(error_in, w64.abs(), None, stride, padding)
    return y, bound


def conv_bound64(x, weight, bias, stride, padding, residual, dtype, roundings) -> torch.Tensor:
    """The largest error the rule allows, per output element of conv_bn_act."""
    return _layer_bound64(x, weight, bias, stride, padding, residual, dtype, roundings)[1]


def inception_bound64(x, args, widths, pool, dtype, roundings) -> torch.Tensor:
    """The rule's bound for fastcnn.ops.inception(x, reduce_weight, reduce_bias, widths, w2, b2,
    w3, b3, w4, b4, pool): the kxk convs add the reduce convs' bound that they read."""
    rw, rb, w2, b2, w3, b3, w4, b4 = args
    reduced, e_reduced = _layer_bound64(x, rw, rb, 1, 0, None, dtype, roundings)
    reduced = torch.relu(reduced)  # ReLU: exact, and no larger an error
    c1, c2r, _ = widths
    parts = [e_reduced[:, :c1]]
    for w, b, sl in ((w2, b2, slice(c1, c1 + c2r)), (w3, b3, slice(c1 + c2r, None))):
        k = w.shape[-1] // 2
        parts.append(
            _layer_bound64(
                reduced[:, sl], w, b, 1, k, None, dtype, roundings, error_in=e_reduced[:, sl]
            )[1]
        )
    pooled = torch.nn.functional.max_pool2d(x.double(), pool, 1, pool // 2, ceil_mode=True)
    parts.append(_layer_bound64(pooled, w4, b4, 1, 0, None, dtype, roundings)[1])
    return torch.cat(parts, 1)


def assert_within_bound(actual, expected64, bound64, what: str = "") -> None:
    """Every element of actual within bound64 of the float64 expected; NaN fails unless the
    reference has NaN there. The message names the worst element and its bound."""
    nan = torch.isnan(actual)
    assert torch.equal(nan, torch.isnan(expected64)), f"{what}: NaN where the reference has none"
    err = (actual.double() - expected64).abs()
    over = torch.where(nan, 0.0, err - bound64)
    worst = int(over.flatten().argmax())
    excess = over.flatten()[worst].item()
    assert excess <= 0, (
        f"{what}: error {err.flatten()[worst].item():.3g} at element {worst} exceeds its "
        f"rounding bound {bound64.flatten()[worst].item():.3g}"
    )


HAS_CUDA = torch.cuda.is_available()
NO_GPU_REASON = "needs a CUDA GPU (none here); benchmarks/gpu_check.sh runs these on one"
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason=NO_GPU_REASON)

# Backends with kernels for each device type; the extension's "cpu"/"cuda" halves by device.
BACKENDS_BY_DEVICE = {"cpu": ("triton", "cpu", "eager"), "cuda": ("triton", "cuda", "eager")}


def device_backend_params() -> list:
    """pytest params (device, backend): CUDA ones are marked to skip without a GPU."""
    params = []
    for device, backends in BACKENDS_BY_DEVICE.items():
        marks = [pytest.mark.cuda, requires_cuda] if device == "cuda" else []
        params += [pytest.param(device, b, marks=marks, id=f"{device}-{b}") for b in backends]
    return params


def op_backend_params(impls) -> list:
    """device_backend_params() narrowed to the backends an op has kernels for (its _IMPLS)."""
    return [p for p in device_backend_params() if p.values[1] in impls]


def skip_unsupported(device: str, backend: str, dtype: torch.dtype) -> None:
    """Skip, with the reason, combinations this machine cannot check."""
    if backend == "triton" and device == "cpu":
        if not interpreting():
            pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")
        if dtype == torch.bfloat16:
            pytest.skip("Triton's interpreter computes bf16 wrongly; bf16 is checked on a GPU")
    status = fastcnn._backend.backend_status(backend, device)
    if not status:
        pytest.fail(f"backend {backend!r} should run {device} tensors here but: {status.reason}")


def skip_unless_available(backend: str) -> None:
    """Skip when `backend` runs no tensors on this machine (use_backend would refuse it): e.g.
    "triton" on a machine with neither a GPU nor TRITON_INTERPRET=1."""
    if not any(fastcnn._backend.backend_status(backend, d) for d in ("cpu", "cuda")):
        pytest.skip(f"backend {backend!r} cannot run here")


def poisoned_like(t: torch.Tensor) -> torch.Tensor:
    """An output buffer full of NaN (same shape, dtype, device, strides as t): any element a
    kernel forgets to write stays NaN and fails the comparison."""
    return torch.full_like(t, float("nan"))


# Winograd F(4x4, 3x3) ("cpu:winograd", fastcnn.cpu.winograd) is fp32 with a larger error: its
# transforms' coefficients (up to 5 and 8) grow the roundings to ~10x direct's, spread over each
# 4x4 tile, so it is compared relative to the outputs' scale (max |y|, at least 1). Measured:
# 2-4e-6 of the scale at C <= 64 (the tests' sizes), 1.5e-5 at C = 512 (ResNet-50's widest).
# A wrong tile, channel or coefficient misses it by orders of magnitude.
WINOGRAD_RTOL = 2e-5


def assert_winograd_close(actual: torch.Tensor, expected64: torch.Tensor) -> None:
    assert actual.dtype == torch.float32 and actual.shape == expected64.shape
    assert not torch.isnan(actual).any(), "NaN in the output (an element left unwritten?)"
    scale = max(expected64.abs().max().item(), 1.0)
    err = (actual.double() - expected64).abs().max().item()
    assert err <= WINOGRAD_RTOL * scale, f"max error {err:.3g} at scale {scale:.3g}"


def assert_matches(
    actual: torch.Tensor, expected64: torch.Tensor, dtype: torch.dtype, kernels=()
) -> None:
    """actual (dtype) against a float64 reference, with the table's tolerance (Winograd's where
    `kernels`, what fastcnn.trace recorded, include Winograd convs). NaN never passes unless the
    reference has NaN at the same place."""
    assert actual.dtype == dtype, f"dtype {actual.dtype}, expected {dtype}"
    if any(k == "cpu:winograd" or "winograd 3x3s" in k for k in kernels):
        assert_winograd_close(actual, expected64)
        return
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(
        actual.double(), expected64, rtol=rtol, atol=atol, equal_nan=True, check_stride=False
    )


def random_tensor(shape, dtype, device, channels_last=False, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g, dtype=torch.float32).to(dtype=dtype, device=device)
    return t.to(memory_format=torch.channels_last) if channels_last else t


def random_conv_inputs(cin, cout, k, h, w, dtype, device, *, batch=2, channels_last=True, seed=0):
    """x, and a He-scaled weight and bias as fold_bn would give: outputs of order 1."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cin, h, w, generator=g)
    weight = torch.randn(cout, cin, k, k, generator=g) * (2.0 / (cin * k * k)) ** 0.5
    bias = torch.randn(cout, generator=g) * 0.1
    x = x.to(dtype=dtype, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = weight.to(dtype=dtype, device=device).contiguous(memory_format=torch.channels_last)
    return x, weight, bias.to(dtype=dtype, device=device)


def randomize_batchnorm(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every BatchNorm2d non-trivial running statistics and affine parameters: with fresh
    BN layers (mean 0, var 1, gamma 1, beta 0) folding is trivially right and proves nothing."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(c, generator=g) * 0.1)
    return model


# Model outputs, relative to the logits' scale. Per layer, each path rounds at most n = 4 times
# (three ops of eager, plus the weights rounded to the dtype) with an accumulation error near
# sqrt(K) * 2^-24 (K <= 4608 in these models), on activations that BatchNorm keeps near the
# output's scale; the deepest path has L <= 50 such layers, and independent roundings add in
# quadrature: rtol = n * sqrt(L) * (u + sqrt(K) * 2^-24) = 1.2e-4 (fp32), 1.4e-2 (fp16), 0.11
# (bf16), the flat table's 10x within 20%. An estimate, not a bound (a bound over 50 layers
# would test nothing): it is what the comparison of two correct paths leaves, and a wrong
# kernel misses it by orders of magnitude.
LOGIT_DEPTH, LOGIT_K, LOGIT_ROUNDINGS = 50, 4608, 4


def logit_rtol(dtype: torch.dtype) -> float:
    u, acc = UNIT_ROUNDOFF[dtype], LOGIT_K**0.5 * 2.0**-24
    return LOGIT_ROUNDINGS * LOGIT_DEPTH**0.5 * (u + acc)


def assert_logits_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Model outputs: logit_rtol(dtype) relative to the logits' scale (errors accumulate through
    dozens of layers, so an element-wise relative bound would test noise)."""
    scale = expected.abs().max().item()
    err = (actual.double() - expected.double()).abs().max().item()
    assert not torch.isnan(actual).any(), "NaN in the output"
    assert err <= logit_rtol(dtype) * max(scale, 1.0), (
        f"max error {err:.3g} at logit scale {scale:.3g}"
    )


def run_threads(target, count: int, timeout: float) -> None:
    """target(i) for i in range(count), each on a thread of its own, all started before any is
    joined; fails if one is still running after timeout seconds (a hang, not a pass)."""
    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    assert not any(t.is_alive() for t in threads), f"a thread still runs after {timeout} s"


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def conv_reference64(
    x, weight, bias, stride, padding, residual=None, relu=True, groups=1, dilation=1
) -> torch.Tensor:
    """relu(conv2d(x, weight, bias) + residual) in float64, computed independently of
    fastcnn.reference (which is the "eager" backend: comparing it with itself would prove
    nothing): im2col by F.unfold, then one float64 matmul per group."""
    x, weight = x.double(), weight.double()
    n, _, h, w = x.shape
    c_out, c_per_group, kh, kw = weight.shape
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    cols = torch.nn.functional.unfold(x, (kh, kw), (dh, dw), (ph, pw), (sh, sw))
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    cols = cols.view(n, groups, c_per_group * kh * kw, ho * wo)
    w_mat = weight.reshape(groups, c_out // groups, c_per_group * kh * kw)
    y = torch.einsum("gok,ngkl->ngol", w_mat, cols).reshape(n, c_out, ho, wo)
    if bias is not None:
        y = y + bias.double().view(1, -1, 1, 1)
    if residual is not None:
        y = y + residual.double()
    return torch.relu(y) if relu else y


# The kernel each backend's own path runs, per op (fastcnn.trace's KernelKey.kernel). The
# extension's CUDA conv picks cuBLASLt (1x1, stride 1, NHWC) or cuDNN + an epilogue pass.
OWN_KERNELS = {
    ("conv_bn_act", "triton"): {"implicit_gemm"},
    # oneDNN's direct kernels, or Winograd for the 3x3 convs fastcnn.cpu.winograd chooses
    ("conv_bn_act", "cpu"): {"onednn", "winograd"},
    ("conv_bn_act", "cuda"): {"cublaslt", "cudnn+epilogue"},
    ("conv_bn_act", "eager"): {"reference"},
    ("inception", "triton"): {"4 implicit_gemm launches"},
    # the structure timed faster here (fastcnn/cpu/inception.py)
    ("inception", "cpu"): {
        f"onednn+cat ({variant} 1x1s{winograd})"
        for variant in ("merged", "separate")
        for winograd in ("", ", winograd 3x3s")
    },
    # the extension's block: three 1x1 convs and the pool's 1x1 as cuBLASLt GEMMs, the two kxk
    # convs through cuDNN + epilogue (fastcnn/ops/_extension_paths.py)
    ("inception", "cuda"): {"4 cublaslt + 2 cudnn+epilogue"},
    ("inception", "eager"): {"reference"},
    ("add_relu", "triton"): {"elementwise"},
    ("add_relu", "cpu"): {"elementwise"},
    ("add_relu", "cuda"): {"elementwise"},
    ("add_relu", "eager"): {"reference"},
}


def expected_kernels(op: str, backend: str, dtype: torch.dtype) -> tuple[set[str], str | None]:
    """(kernels, fallback reason or None) that `op` must run on `backend` for `dtype` here: its
    own kernels, or, where this machine cannot run them, the documented fallback."""
    if backend == "cpu" and op in ("conv_bn_act", "inception"):
        from fastcnn.cpu import onednn

        if not onednn.supports(dtype):
            return {"reference"}, f"oneDNN cannot run {dtype} convolutions on this CPU"
    return OWN_KERNELS[(op, backend)], None


def assert_ran(t, op: str, backend: str, dtype: torch.dtype) -> None:
    """Every call of `op` in trace t ran `backend`'s kernel for dtype (or its documented
    fallback, with that reason), and at least one call was made."""
    kernels, fallback = expected_kernels(op, backend, dtype)
    events = [e for e in t.events if e.op == op]
    assert events, f"no {op} call was traced"
    for e in events:
        assert e.backend == backend and e.kernel in kernels, (
            f"{op} ran {e.backend}:{e.kernel} (fallback: {e.fallback}), expected {backend}:"
            f"{sorted(kernels)}"
        )
        if fallback is None:
            assert e.fallback is None, f"{op} fell back: {e.fallback}"
        else:
            assert e.fallback is not None and fallback in e.fallback, e.fallback


@contextlib.contextmanager
def runs_on(op: str, backend: str, dtype: torch.dtype):
    """use_backend(backend) for the block, then assert_ran: the test checks the path it means."""
    with fastcnn.use_backend(backend), fastcnn.trace() as t:
        yield t
    assert_ran(t, op, backend, dtype)
