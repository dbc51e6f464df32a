"""fastcnn.cpu.int8's direct path (the extension's own oneDNN int8 primitives,
csrc/cpu/onednn_qconv.cpp): it is the path the op and the planned modules take where the
extension links oneDNN, it matches the integer reference for every quantization it bakes in or
passes per call, one pack serves every batch size of a layout, a concat's channel slice gets
the direct conv's result, scales changed in place are read anew, and where oneDNN has no kernel
torch's op runs the conv visibly."""

from __future__ import annotations

import warnings

import pytest
import torch

import fastcnn
from fastcnn import _backend, reference
from fastcnn.common import alloc
from fastcnn.cpu import int8
from fastcnn.nn.quantized import QConvBNAct, QParams

CL = torch.channels_last
POISON = 0xA5

pytestmark = pytest.mark.skipif(
    int8.direct_extension() is None or not int8.has_vnni(),
    reason="needs the extension linked with oneDNN and an int8 kernel without saturation",
)


def _u8(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8).contiguous(memory_format=CL)


def _conv(cin, cout, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-127, 128, (cout, cin, k, k), generator=g, dtype=torch.int8)
    ws = (torch.rand(cout, generator=g) + 0.5) / (cin * k * k * 40.0)
    return w.contiguous(memory_format=CL), ws, torch.randn(cout, generator=g)


def _close(actual, expected):
    diff = (actual.int() - expected.int()).abs()
    assert diff.max().item() <= 1, f"off by {diff.max().item()} steps"
    assert (diff > 0).float().mean().item() <= 1e-3


def _primitives() -> int:
    return int8.direct_extension().onednn_qconv_cached()


def _torch_op_refused(*args, **kwargs):
    raise AssertionError("torch's quantized conv op ran: the direct path fell back")


@pytest.mark.parametrize(("x_zp", "out_zp"), [(0, 0), (7, 0), (0, 3), (9, 250)])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_the_op_runs_the_direct_primitive_and_matches_the_reference(monkeypatch, x_zp, out_zp,
                                                                     residual):  # fmt: skip
    """Every zero point kind (the pack differs for an input zero point, the primitive for an
    output one) and the residual's sum post-op, with its own scale and zero point."""
    monkeypatch.setattr(int8, "_torch_qconv", _torch_op_refused)
    x = _u8((3, 13, 9, 11), 1)
    w, ws, b = _conv(13, 21, 3)
    r = _u8((3, 21, 9, 11), 2) if residual else None
    kept = None if r is None else r.clone()
    q = dict(residual=r, residual_scale=0.03, residual_zero_point=100, relu=True,
             out_scale=0.02, out_zero_point=out_zp)  # fmt: skip
    expected = reference.qconv_bn_act(x, 0.05, x_zp, w, ws, b, 1, 1, **q)
    with fastcnn.use_backend("cpu"), fastcnn.trace() as t, alloc.poisoned(POISON):
        y = fastcnn.ops.qconv_bn_act(x, 0.05, x_zp, w, ws, b, 1, 1, **q)
    assert next(iter(t.kernels("qconv_bn_act"))).startswith("cpu:onednn_int8")
    assert _primitives() > 0
    _close(y, expected)
    if r is not None:  # the caller's residual is left as it was (the sum ran on a copy)
        assert torch.equal(r, kept) and r.data_ptr() != y.data_ptr()


def test_one_pack_serves_every_batch_size_of_its_layout():
    w, ws, b = _conv(32, 48, 3, seed=3)
    int8._direct_packs.forget([w])
    layouts = set()
    for n in (1, 3, 8):
        x = _u8((n, 32, 14, 14), n)
        y = fastcnn.ops.qconv_bn_act(x, 0.05, 0, w, ws, b, 1, 1, out_scale=0.02)
        _close(y, reference.qconv_bn_act(x, 0.05, 0, w, ws, b, 1, 1, out_scale=0.02))
        layouts.add(int8.direct_pack(w, x.shape, (1, 1), (1, 1), False)[1])
    kept = int8._direct_packs.kept(w)
    assert len(kept) == len(layouts), (kept.keys(), layouts)


def test_a_concat_slice_is_written_through_a_dense_output(recwarn):
    """oneDNN's int8 convs take dense tensors only (unlike its fp32 ones): a channel slice gets
    the direct conv's dense result copied in, not torch's op (no fallback note)."""
    x = _u8((2, 16, 7, 5), 4)
    w, ws, b = _conv(16, 10, 1, seed=4)
    concat = torch.full((2, 30, 7, 5), POISON, dtype=torch.uint8).contiguous(memory_format=CL)
    piece = concat[:, 8:18]
    assert not int8._direct(int8.direct_extension(), x, 0.05, 3, w, ws, b, (1, 1), (0, 0), True,
                            0.03, 0, piece)  # fmt: skip
    with fastcnn.use_backend("cpu"):
        y = fastcnn.ops.qconv_bn_act(x, 0.05, 3, w, ws, b, 1, 0, out_scale=0.03, out=piece)
    assert y.data_ptr() == piece.data_ptr()
    _close(piece, reference.qconv_bn_act(x, 0.05, 3, w, ws, b, 1, 0, out_scale=0.03))
    assert (concat[:, :8] == POISON).all() and (concat[:, 18:] == POISON).all()
    assert not [w for w in recwarn if "no optimized int8 kernel" in str(w.message)]


def _module(seed=0):
    g = torch.Generator().manual_seed(seed)
    conv = fastcnn.nn.ConvBNAct(16, 24, 3, padding=1, relu=True)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.2)
        conv.bias.copy_(torch.randn(24, generator=g) * 0.1)
    m = QConvBNAct.from_float(conv, QParams(0.05, 7), QParams(0.03, 2), backend="cpu")
    return m.eval()


def _expected(m, x):
    xq, oq = m.x_qparams, m.out_qparams
    return reference.qconv_bn_act(x, xq.scale, xq.zero_point, m.weight, m.weight_scale, m.bias,
                                  m.stride, m.padding, None, 1.0, 0, m.relu, oq.scale,
                                  oq.zero_point)  # fmt: skip


class _Counting:
    """The extension, counting its direct int8 conv calls."""

    def __init__(self, ext):
        self._ext, self.calls = ext, 0

    def __getattr__(self, name):
        return getattr(self._ext, name)

    def onednn_qconv(self, *args):
        self.calls += 1
        return self._ext.onednn_qconv(*args)


def test_planned_calls_read_scales_and_weights_changed_in_place(monkeypatch):
    """Scales are passed per call (not packed): a weight_scale or bias changed in place is
    used by the next planned call; a weight changed in place is packed again. Each call after
    the first runs the plan's direct primitive."""
    ext = _Counting(int8.direct_extension())
    monkeypatch.setattr(int8, "direct_extension", lambda: ext)
    monkeypatch.setattr(int8, "_torch_qconv", _torch_op_refused)
    m = _module()
    x = _u8((2, 16, 9, 9), 5)
    with torch.inference_mode():
        m(x)
        assert len(m._plans) == 1
        plan = next(iter(m._plans._plans.values()))
        calls = ext.calls
        assert plan(x, None, m.weight, m.weight_scale, m.bias,
                    (m.x_qparams, m.out_qparams, m.residual_qparams)) is not None  # fmt: skip
        assert ext.calls == calls + 1
    with torch.no_grad():
        m.weight_scale.mul_(1.5)
        _close(m(x), _expected(m, x))
        m.bias.add_(0.25)
        _close(m(x), _expected(m, x))
        m.weight.copy_(-m.weight)
        _close(m(x), _expected(m, x))


class _NoKernel:
    """The extension as it answers for strides oneDNN has no optimized kernel for."""

    def __init__(self, ext):
        self._ext = ext

    def __getattr__(self, name):
        return getattr(self._ext, name)

    def onednn_qconv(self, *args):
        return False


def test_no_kernel_falls_back_to_torchs_op_visibly(monkeypatch):
    ext = _NoKernel(int8.direct_extension())
    monkeypatch.setattr(int8, "direct_extension", lambda: ext)
    x = _u8((2, 16, 9, 9), 6)
    m = _module(seed=1)
    monkeypatch.setattr(_backend, "_warned", set())  # noted once: here as if for the first time
    warns = pytest.warns(RuntimeWarning, match="no optimized int8 kernel")
    with torch.inference_mode(), fastcnn.trace() as t, warns:
        y = m(x)  # the op
    (event,) = t.events
    assert "torch's quantized conv op runs it" in event.fallback
    _close(y, _expected(m, x))
    with torch.inference_mode():
        _close(m(x), _expected(m, x))  # the plan, which falls back the same way
    assert len(m._plans) == 1


def test_no_kernel_for_a_residual_conv_leaves_the_residual_and_falls_back(monkeypatch):
    ext = _NoKernel(int8.direct_extension())
    monkeypatch.setattr(int8, "direct_extension", lambda: ext)
    x = _u8((2, 13, 9, 11), 7)
    w, ws, b = _conv(13, 21, 3, seed=7)
    r = _u8((2, 21, 9, 11), 8)
    kept = r.clone()
    q = dict(residual=r, residual_scale=0.03, residual_zero_point=100, relu=True,
             out_scale=0.02, out_zero_point=3)  # fmt: skip
    with warnings.catch_warnings(), fastcnn.use_backend("cpu"), fastcnn.trace() as t:
        warnings.simplefilter("ignore")
        y = fastcnn.ops.qconv_bn_act(x, 0.05, 0, w, ws, b, 1, 1, **q)
    assert "torch's quantized conv op runs it" in t.events[0].fallback
    _close(y, reference.qconv_bn_act(x, 0.05, 0, w, ws, b, 1, 1, **q))
    assert torch.equal(r, kept)
