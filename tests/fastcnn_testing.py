"""What the tests share: the per-dtype tolerance table, poisoned outputs, backend/device grids."""

from __future__ import annotations

import pytest
import torch

import fastcnn
from fastcnn import reference
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


def conv_reference64(x, weight, bias, stride, padding, residual=None, relu=True, **kwargs):
    """fastcnn.reference.conv_bn_act in float64 (every tensor argument cast): what each conv test
    compares a kernel against. kwargs: groups, dilation."""

    def f64(t):
        return None if t is None else t.double()

    return reference.conv_bn_act(
        f64(x), f64(weight), f64(bias), stride, padding, residual=f64(residual), relu=relu, **kwargs
    )
