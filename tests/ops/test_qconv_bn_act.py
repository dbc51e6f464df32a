"""fastcnn.ops.qconv_bn_act against the exact integer reference (fastcnn.reference.qconv_bn_act)
on every backend: odd shapes, strides, padding, residual, out= channel slices, in place."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from fastcnn_testing import NO_GPU_REASON, op_backend_params, requires_cuda, skip_unsupported

import fastcnn
from fastcnn import reference
from fastcnn.ops.qconv_bn_act import _IMPLS

POISON = 0xA5  # a uint8 output cannot hold NaN: unwritten elements keep this and are counted
# (cin, cout, k, stride, padding, h, w): odd sizes, the 7x7/2 stem, 1x1, strided 3x3
CASES = [(5, 11, 3, 1, 1, 7, 9), (3, 8, 7, 2, 3, 15, 13), (33, 20, 1, 1, 0, 6, 5),
         (16, 24, 3, 2, 1, 9, 11)]  # fmt: skip
KERNEL = {
    "cpu": "cpu:onednn_int8",
    "triton": "triton:implicit_gemm_int8",
    "eager": "eager:reference",
}
# The most elements allowed one step off (never more than one): oneDNN multiplies the scales in
# its own order, so an exact .5 tie can round the other way; the Triton interpreter is exact.
OFF_BY_ONE = {"cpu": 1e-3, "triton": 0.0, "eager": 0.0}


def _weight_max(backend):
    """The full 8-bit range, but 7 bits (fastcnn.quantize's overflow_fix) for the cpu backend
    on a CPU whose oneDNN int8 kernel sums pairs without VNNI: it runs the reference otherwise
    (tested in test_an_isa_cap_on_onednn_is_probed_not_read_from_cpuinfo)."""
    from fastcnn.cpu import int8

    return int8.NO_VNNI_WEIGHT_MAX if backend == "cpu" and not int8.has_vnni() else 127


def _inputs(cin, cout, k, h, w, device, seed=0, weight_max=127):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (2, cin, h, w), generator=g, dtype=torch.uint8)
    weight = torch.randint(-weight_max, weight_max + 1, (cout, cin, k, k), generator=g,
                           dtype=torch.int8)  # fmt: skip
    # scales that put the int32 sums in the output's range: ~half the outputs clip at 0 (ReLU)
    w_scale = (torch.rand(cout, generator=g) + 0.5) / (cin * k * k * 40.0)
    bias = torch.randn(cout, generator=g)
    x = x.to(device).contiguous(memory_format=torch.channels_last)
    w = weight.to(device).contiguous(memory_format=torch.channels_last)
    return x, w, w_scale.to(device), bias.to(device)


def _assert_int8_close(actual, expected, backend):
    assert actual.dtype == torch.uint8 and actual.shape == expected.shape
    diff = (actual.int() - expected.int()).abs()
    assert diff.max().item() <= 1, f"off by {diff.max().item()} quantization steps"
    frac = (diff > 0).float().mean().item()
    assert frac <= OFF_BY_ONE[backend], f"{frac:.2%} of elements one step off"


def _kernel_of(t, backend):
    kernels = t.kernels("qconv_bn_act")
    assert len(kernels) == 1 and next(iter(kernels)).startswith(KERNEL[backend]), kernels


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize(("device", "backend"), op_backend_params(_IMPLS))
def test_matches_integer_reference(device, backend, case, residual):
    skip_unsupported(device, backend, torch.float32)
    cin, cout, k, s, p, h, w = case
    wmax = _weight_max(backend)
    x, weight, ws, bias = _inputs(cin, cout, k, h, w, device, weight_max=wmax)
    args = (x, 0.05, 7, weight, ws, bias, s, p)
    ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    r = None
    if residual:
        g = torch.Generator().manual_seed(1)
        r = torch.randint(0, 256, (2, cout, ho, wo), generator=g, dtype=torch.uint8).to(device)
    qargs = dict(residual=r, residual_scale=0.03, residual_zero_point=100, relu=True,
                 out_scale=0.02, out_zero_point=3)  # fmt: skip
    expected = reference.qconv_bn_act(*args, **qargs)
    with fastcnn.use_backend(backend), fastcnn.trace() as t:
        y = fastcnn.ops.qconv_bn_act(*args, **qargs, weight_max=wmax)
    _kernel_of(t, backend)
    _assert_int8_close(y, expected, backend)
    assert 0 < (y > 3).float().mean() < 1, "the case should exercise both ReLU's floor and values"


@pytest.mark.parametrize(("device", "backend"), op_backend_params(_IMPLS))
def test_out_channel_slice_and_in_place(device, backend):
    skip_unsupported(device, backend, torch.float32)
    wmax = _weight_max(backend)
    x, weight, ws, bias = _inputs(6, 10, 3, 7, 7, device, seed=2, weight_max=wmax)
    big = torch.full((2, 24, 7, 7), POISON, dtype=torch.uint8, device=device)
    big = big.contiguous(memory_format=torch.channels_last)
    q = dict(relu=False, out_scale=0.05, out_zero_point=128)
    expected = reference.qconv_bn_act(x, 0.05, 0, weight, ws, bias, 1, 1, **q)
    with fastcnn.use_backend(backend):
        fastcnn.ops.qconv_bn_act(x, 0.05, 0, weight, ws, bias, 1, 1, out=big[:, 7:17], **q,
                                 weight_max=wmax)  # fmt: skip
    _assert_int8_close(big[:, 7:17], expected, backend)
    assert (big[:, :7] == POISON).all() and (big[:, 17:] == POISON).all()
    # in place over the residual: out is the residual
    r = expected.clone()
    expected_r = reference.qconv_bn_act(x, 0.05, 0, weight, ws, bias, 1, 1, r, 0.05, 128, True,
                                        0.05, 128)  # fmt: skip
    with fastcnn.use_backend(backend):
        y = fastcnn.ops.qconv_bn_act(x, 0.05, 0, weight, ws, bias, 1, 1, r, 0.05, 128, True,
                                     0.05, 128, out=r, weight_max=wmax)  # fmt: skip
    assert y.data_ptr() == r.data_ptr()
    _assert_int8_close(r, expected_r, backend)


def test_residual_is_not_clobbered_without_out():
    x, weight, ws, bias = _inputs(4, 4, 3, 5, 5, "cpu", seed=3)
    r = torch.randint(0, 256, (2, 4, 5, 5), dtype=torch.uint8).contiguous(
        memory_format=torch.channels_last
    )
    before = r.clone()
    fastcnn.ops.qconv_bn_act(x, 0.05, 0, weight, ws, bias, 1, 1, r, 0.05, 10, True, 0.05, 0)
    assert torch.equal(r, before)


def test_nchw_input_keeps_its_format():
    x, weight, ws, bias = _inputs(4, 6, 3, 5, 5, "cpu")
    x = x.contiguous()
    y = fastcnn.ops.qconv_bn_act(x, 0.05, 0, weight, ws, bias, 1, 1, out_scale=0.1)
    assert y.is_contiguous()
    expected = reference.qconv_bn_act(x, 0.05, 0, weight, ws, bias, 1, 1, out_scale=0.1)
    _assert_int8_close(y, expected, "cpu")


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (dict(x=torch.zeros(1, 4, 5, 5)), TypeError, "x must be uint8"),
        (dict(weight=torch.zeros(6, 4, 3, 3)), TypeError, "weight must be int8"),
        (dict(weight=torch.zeros(6, 5, 3, 3, dtype=torch.int8)), ValueError, "channels"),
        (dict(weight_scale=torch.ones(5)), ValueError, "weight_scale"),
        (dict(x_scale=0.0), ValueError, "x_scale"),
        (dict(out_zero_point=300), ValueError, "out_zero_point"),
        (dict(residual=torch.zeros(1, 6, 4, 4, dtype=torch.uint8)), ValueError, "residual"),
        (dict(out=torch.zeros(1, 6, 5, 5)), TypeError, "out has dtype"),
        (dict(weight_max=200), ValueError, "weight_max"),
    ],
)
def test_bad_input_is_named(change, error, match):
    args = dict(
        x=torch.zeros(1, 4, 5, 5, dtype=torch.uint8),
        x_scale=0.1,
        x_zero_point=0,
        weight=torch.zeros(6, 4, 3, 3, dtype=torch.int8),
        weight_scale=torch.ones(6),
        bias=None,
        padding=1,
    )
    args.update(change)
    with pytest.raises(error, match=match):
        fastcnn.ops.qconv_bn_act(**args)


def test_cpu_without_vnni_runs_the_reference_for_8_bit_weights(monkeypatch):
    """A CPU whose int8 instructions saturate never runs full-range weights through oneDNN."""
    from fastcnn.cpu import int8

    monkeypatch.setattr(int8, "has_vnni", lambda: False)
    x, weight, ws, bias = _inputs(4, 6, 3, 5, 5, "cpu")
    expected = reference.qconv_bn_act(x, 0.05, 0, weight, ws, bias, 1, 1, out_scale=0.1)
    with fastcnn.use_backend("cpu"), fastcnn.trace() as t:
        y = fastcnn.ops.qconv_bn_act(x, 0.05, 0, weight, ws, bias, 1, 1, out_scale=0.1)
    assert t.kernels("qconv_bn_act") == {"cpu:reference"} and t.fallbacks()
    assert torch.equal(y, expected)
    small = weight.clamp(-63, 63)
    with fastcnn.use_backend("cpu"), fastcnn.trace() as t:
        fastcnn.ops.qconv_bn_act(x, 0.05, 0, small, ws, bias, 1, 1, out_scale=0.1, weight_max=63)
    assert next(iter(t.kernels("qconv_bn_act"))).startswith("cpu:onednn_int8")


_CAPPED = """
import torch, fastcnn
from fastcnn import reference
from fastcnn.cpu import int8
x = torch.full((1, 64, 5, 5), 255, dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
w = torch.full((3, 64, 1, 1), 127, dtype=torch.int8)
ws = torch.full((3,), 1.0 / (255 * 127 * 64 / 200))  # the exact sum maps to 200
expected = reference.qconv_bn_act(x, 1.0, 0, w, ws, None, 1, 0, out_scale=1.0)
with fastcnn.use_backend("cpu"), fastcnn.trace() as t:
    y = fastcnn.ops.qconv_bn_act(x, 1.0, 0, w, ws, None, 1, 0, out_scale=1.0)
print(int8.cpu_isa(), int8.isa(), int(expected.max()), int(y.max()), bool(torch.equal(y, expected)),
      sorted(t.kernels("qconv_bn_act")))
"""


@pytest.mark.parametrize("cap", ["", "AVX2", "AVX512_CORE"])
@pytest.mark.parametrize("variable", ["ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"])
def test_an_isa_cap_on_onednn_is_probed_not_read_from_cpuinfo(cap, variable):
    """ONEDNN_MAX_CPU_ISA (or DNNL_) makes oneDNN run kernels without VNNI on a VNNI CPU, whose
    u8 x s8 pair sums saturate: 127-range weights must then run the exact reference, and the
    trace must name the ISA oneDNN runs, not the CPU's."""
    from fastcnn.cpu import int8

    if int8.isa() == "none":
        pytest.skip("no oneDNN in this torch build")
    if cap and int8.cpu_isa() not in int8.VNNI_ISAS:
        pytest.skip(f"this CPU has no VNNI ({int8.cpu_isa()}): a cap changes nothing")
    env = {
        k: v for k, v in os.environ.items() if k not in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")
    }
    if cap:
        env[variable] = cap
    out = subprocess.run([sys.executable, "-c", _CAPPED], env=env, capture_output=True,
                         text=True, timeout=300, check=True).stdout.split()  # fmt: skip
    cpu, runs, expected, got, equal, kernels = out[0], out[1], out[2], out[3], out[4], out[5:]
    assert expected == "200" and equal == "True", (expected, got)
    if cap:
        assert runs == cap.lower(), (cpu, runs)
        assert "['cpu:reference']" in " ".join(kernels), kernels
    else:  # oneDNN's own ISA: exact, so oneDNN, on VNNI; the reference without it
        assert runs == cpu, (cpu, runs)
        kernel = f"cpu:onednn_int8({runs})" if runs in int8.VNNI_ISAS else "cpu:reference"
        assert f"'{kernel}']" in " ".join(kernels), kernels


_SEVEN_BIT = """
import torch, fastcnn
from fastcnn import reference
from fastcnn.cpu import int8
g = torch.Generator().manual_seed(0)
x = torch.randint(0, 256, (2, 24, 9, 7), generator=g, dtype=torch.uint8)
x = x.contiguous(memory_format=torch.channels_last)
w = torch.randint(-63, 64, (16, 24, 3, 3), generator=g, dtype=torch.int8)
w = w.contiguous(memory_format=torch.channels_last)
ws, b = torch.full((16,), 1e-4), torch.randn(16, generator=g)
args = (x, 0.05, 5, w, ws, b, 1, 1)
expected = reference.qconv_bn_act(*args, out_scale=0.02, out_zero_point=3)
def refused(*a, **k):
    raise AssertionError("torch's op ran")
int8._torch_qconv = refused
with fastcnn.use_backend("cpu"), fastcnn.trace() as t:
    y = fastcnn.ops.qconv_bn_act(*args, out_scale=0.02, out_zero_point=3, weight_max=63)
diff = (y.int() - expected.int()).abs()
print(int8.isa(), int(diff.max()), float((diff > 0).float().mean()), sorted(t.kernels()),
      [e.fallback for e in t.events])
"""


def test_7_bit_weights_run_the_direct_kernel_exactly_with_onednn_capped_at_avx2():
    """Without VNNI (here: oneDNN capped at AVX2) 7-bit weights cannot saturate: they run the
    extension's direct int8 primitive, within one step of the reference, with no fallback."""
    from fastcnn.cpu import int8

    if int8.isa() == "none" or int8.direct_extension() is None:
        pytest.skip("needs oneDNN and the extension's direct int8 convs")
    env = {k: v for k, v in os.environ.items() if k != "DNNL_MAX_CPU_ISA"}
    env["ONEDNN_MAX_CPU_ISA"] = "AVX2"
    out = subprocess.run([sys.executable, "-c", _SEVEN_BIT], env=env, capture_output=True,
                         text=True, timeout=300, check=True).stdout  # fmt: skip
    isa, most, share, kernels = out.split(" ", 3)
    assert isa == "avx2", out
    assert int(most) <= 1 and float(share) <= OFF_BY_ONE["cpu"], out
    assert "cpu:onednn_int8(avx2)" in kernels and "[None]" in kernels, out


@requires_cuda
@pytest.mark.cuda
def test_triton_int8_on_gpu_within_one_step():
    x, weight, ws, bias = _inputs(64, 96, 3, 28, 28, "cuda")
    args = (x, 0.05, 7, weight, ws, bias, 1, 1)
    expected = reference.qconv_bn_act(*args, out_scale=0.02)
    with fastcnn.use_backend("triton"):
        y = fastcnn.ops.qconv_bn_act(*args, out_scale=0.02)
    diff = (y.int() - expected.int()).abs()
    assert diff.max().item() <= 1 and (diff > 0).float().mean().item() < 1e-3, NO_GPU_REASON
