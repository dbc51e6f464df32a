"""What the tests share: the per-dtype tolerance table, poisoned outputs, backend/device grids."""

from __future__ import annotations

import contextlib

import pytest
import torch

import fastcnn
from fastcnn.triton._common import interpreting

# (rtol, atol) for comparing a kernel's output with the float64 reference.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1e-2, 1e-2),
}
DTYPES = list(TOLERANCES)

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


def assert_matches(actual: torch.Tensor, expected64: torch.Tensor, dtype: torch.dtype) -> None:
    """actual (dtype) against a float64 reference, with the table's tolerance. NaN never passes
    unless the reference has NaN at the same place."""
    assert actual.dtype == dtype, f"dtype {actual.dtype}, expected {dtype}"
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


def assert_logits_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Model outputs: the dtype's tolerance relative to the logits' scale (errors accumulate
    through dozens of layers, so an element-wise relative bound would test noise)."""
    rtol, _ = TOLERANCES[dtype]
    scale = expected.abs().max().item()
    err = (actual.double() - expected.double()).abs().max().item()
    assert not torch.isnan(actual).any(), "NaN in the output"
    assert err <= 10 * rtol * max(scale, 1.0), f"max error {err:.3g} at logit scale {scale:.3g}"


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
    ("conv_bn_act", "cpu"): {"onednn"},
    ("conv_bn_act", "cuda"): {"cublaslt", "cudnn+epilogue", "extension"},
    ("conv_bn_act", "eager"): {"reference"},
    ("inception", "triton"): {"4 implicit_gemm launches"},
    ("inception", "cpu"): {"onednn+cat"},
    ("inception", "cuda"): {"extension"},
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
