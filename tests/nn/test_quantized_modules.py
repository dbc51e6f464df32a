"""fastcnn.nn's int8 modules on the CPU: QConvBNAct's per-signature plans (the first call takes
fastcnn.ops.qconv_bn_act, later ones run the planned oneDNN primitive) agree with the op and
the integer reference, are dropped whenever what they were made for changes, and record the
same kernel; the one-pass float <-> uint8 conversions are bit-identical to the torch
expression they replace (fastcnn.nn.quantized.quantize_tensor / dequantize_tensor)."""

from __future__ import annotations

import copy

import pytest
import torch

import fastcnn
from fastcnn import reference
from fastcnn.common.plans import MAX_PLANS
from fastcnn.cpu import int8
from fastcnn.nn.quantized import (
    Dequantize,
    QConvBNAct,
    QParams,
    Quantize,
    Requantize,
    dequantize_tensor,
    quantize_tensor,
)

pytestmark = pytest.mark.skipif(int8.isa() == "none", reason="no oneDNN on this CPU build")
CL = torch.channels_last
# The weight range oneDNN sums exactly here (7 bits without VNNI: fastcnn.quantize's
# overflow_fix), so that the planned oneDNN path runs on every CPU, AVX2-only ones included.
WEIGHT_MAX = 127 if int8.has_vnni() else int8.NO_VNNI_WEIGHT_MAX


def _module(cin=16, cout=24, k=3, stride=1, residual=False, seed=0, weight_max=WEIGHT_MAX):
    g = torch.Generator().manual_seed(seed)
    conv = fastcnn.nn.ConvBNAct(cin, cout, k, stride=stride, padding=k // 2, relu=True)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.2)
        conv.bias.copy_(torch.randn(cout, generator=g) * 0.1)
    r_qp = QParams(0.04, 9) if residual else None
    m = QConvBNAct.from_float(conv, QParams(0.05, 7), QParams(0.03, 2), r_qp, weight_max, "cpu")
    return m.eval()


def _u8(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8).contiguous(memory_format=CL)


def _expected(m, x, residual=None):
    xq, oq, rq = m.x_qparams, m.out_qparams, m.residual_qparams
    return reference.qconv_bn_act(
        x, xq.scale, xq.zero_point, m.weight, m.weight_scale, m.bias, m.stride, m.padding,
        residual, rq.scale, rq.zero_point, m.relu, oq.scale, oq.zero_point,
    )  # fmt: skip


def _close(a, b):
    diff = (a.int() - b.int()).abs()
    assert diff.max().item() <= 1 and (diff > 0).float().mean().item() <= 1e-3


def _kernels(t):
    return {f"{e.backend}:{e.kernel}" for e in t.events if e.op == "qconv_bn_act"}


def test_planned_calls_match_the_op_and_record_the_kernel():
    m = _module()
    x = _u8((2, 16, 9, 11), 1)
    with torch.no_grad(), fastcnn.trace() as t:
        first = m(x)  # the op, and a plan
        assert len(m._plans) == 1
        second = m(x)  # the plan
        third = m(_u8((2, 16, 9, 11), 2))
    assert len(t.events) == 3 and _kernels(t) == {f"cpu:onednn_int8({int8.isa()})"}
    assert torch.equal(first, second)
    _close(second, _expected(m, x))
    _close(third, _expected(m, _u8((2, 16, 9, 11), 2)))


def test_one_plan_per_input_signature_and_bounded():
    m = _module(k=1)
    with torch.no_grad():
        for n in range(1, MAX_PLANS + 3):
            x = _u8((n, 16, 5, 5), n)
            _close(m(x), _expected(m, x))
    assert len(m._plans) == MAX_PLANS


@pytest.mark.parametrize("in_place", [False, True], ids=["copied", "in_place"])
def test_residual_plans(in_place):
    m = _module(k=1, residual=True)
    m.overwrite_residual = in_place
    x = _u8((2, 16, 6, 6), 3)
    with torch.no_grad():
        for seed in (4, 5):  # the second call runs the plan
            r = _u8((2, 24, 6, 6), seed)
            kept = r.clone()
            y = m(x, residual=r)
            _close(y, _expected(m, x, kept))
            assert (y is r) == in_place and (torch.equal(r, kept) != in_place)


def test_plans_follow_attribute_changes_after_the_first_call():
    """relu and overwrite_residual are plain attributes: a plan made before a change must not
    run after it (the plan key holds every attribute the plan bakes in)."""
    m = _module(k=1, residual=True)
    m.overwrite_residual = True
    x = _u8((2, 16, 6, 6), 3)
    with torch.no_grad():
        m(x, residual=_u8((2, 24, 6, 6), 4))  # plans with ReLU, in place
        m.overwrite_residual, m.relu = False, False
        for seed in (5, 6):  # the op, then the new plan
            r = _u8((2, 24, 6, 6), seed)
            kept = r.clone()
            y = m(x, residual=r)
            assert torch.equal(r, kept), "the caller's residual was overwritten"
            _close(y, _expected(m, x, kept))
    assert not m.relu and (_expected(m, x, kept) < m.out_qparams.zero_point).any()


def test_a_planned_call_refuses_a_residual_that_overlaps_x():
    """In place, the conv would write over the input it reads (the op refuses it; so does the
    plan, on every call)."""
    m = _module(k=1, cin=24, residual=True)
    m.overwrite_residual = True
    x = _u8((2, 24, 6, 6), 3)
    with torch.no_grad():
        m(x, residual=_u8((2, 24, 6, 6), 4))  # a plan for these metadata
        for _ in range(2):
            with pytest.raises(ValueError, match="overlaps x"):
                m(x, residual=x)


def test_plans_follow_weight_and_qparams_changes():
    m = _module()
    x = _u8((1, 16, 7, 7), 6)
    with torch.no_grad():
        m(x)
        m.weight.copy_(-m.weight)  # in place: a new version of the weight
        _close(m(x), _expected(m, x))
        m.x_qparams = QParams(0.07, 30)  # the packed weight depends on the input's zero point
        _close(m(x), _expected(m, x))
        m.bias = m.bias + 1.0  # a new tensor
        _close(m(x), _expected(m, x))
        m.load_state_dict(_module(seed=3).state_dict())
        _close(m(x), _expected(m, x))


def test_copies_plan_for_their_own_weights():
    m = _module()
    x = _u8((1, 16, 7, 7), 7)
    with torch.no_grad():
        m(x)
        c = copy.deepcopy(m)
        assert len(c._plans) == 0
        c.weight.copy_(-c.weight)
        _close(c(x), _expected(c, x))
        _close(m(x), _expected(m, x))


def test_no_plan_under_another_backend_or_while_tracing():
    m = _module()
    m.backend = None
    x = _u8((1, 16, 7, 7), 8)
    with torch.no_grad(), fastcnn.use_backend("eager"), fastcnn.trace() as t:
        m(x)
        m(x)
    assert _kernels(t) == {"eager:reference"} and len(m._plans) == 0
    out = torch.export.export(m, (x,)).module()(x)
    _close(out, _expected(m, x))


def _floats(shape, seed, scale):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * scale
    x.view(-1)[:6] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.5, 1.5, -2.5])
    return x


@pytest.mark.parametrize("layout", ["channels_last", "contiguous", "one_channel"])
def test_conversions_are_bit_identical_to_the_torch_expression(layout):
    qp, target = QParams(0.0371, 117), QParams(0.05, 3)
    shape = (2, 1, 9, 7) if layout == "one_channel" else (2, 19, 9, 7)
    x = _floats(shape, 0, 4.0)
    if layout == "channels_last":
        x = x.contiguous(memory_format=CL)
    ties = x * qp.scale  # exact .5 ties after the scaling round to even
    with fastcnn.trace() as t:
        for v in (x, ties):
            q = Quantize(qp)(v)
            assert q.is_contiguous(memory_format=CL) and torch.equal(q, quantize_tensor(v, qp))
        assert torch.equal(Dequantize(qp)(q), dequantize_tensor(q, qp))
        expected = quantize_tensor(dequantize_tensor(q, qp), target)
        assert torch.equal(Requantize(qp, target)(q), expected)
    kinds = {(e.op, e.backend, e.kernel) for e in t.events}
    assert kinds == {(k, "cpu", "one_pass") for k in ("quantize", "dequantize", "requantize")}


def test_conversions_fall_back_visibly():
    qp = QParams(0.1, 5)
    x = _floats((3, 8, 5, 5), 1, 2.0)[:, :, :, 1:4]  # neither contiguous nor channels_last
    q = quantize_tensor(x, qp)
    with fastcnn.trace() as t:
        d = Dequantize(qp)(q[:, :, :, 1:])
        h = Quantize(qp)(x.double())
    assert torch.equal(d, dequantize_tensor(q[:, :, :, 1:], qp))
    assert torch.equal(h, quantize_tensor(x, qp))
    assert [(e.op, e.kernel) for e in t.fallbacks()] == [
        ("dequantize", "expression"),
        ("quantize", "expression"),
    ]


def test_no_plan_where_oneDNN_could_saturate(monkeypatch):
    """A CPU without VNNI runs 8-bit weights through the reference on every call (decided at
    run time): no plan may skip that decision."""
    monkeypatch.setattr(int8, "has_vnni", lambda: False)
    m = _module(weight_max=127)
    x = _u8((1, 16, 7, 7), 9)
    with torch.no_grad(), fastcnn.trace() as t:
        y = [m(x) for _ in range(3)]
    assert len(m._plans) == 0 and _kernels(t) == {"cpu:reference"} and len(t.fallbacks()) == 3
    assert all(torch.equal(v, _expected(m, x)) for v in y)
