"""ConvBNAct's per-signature plans on the cpu backend (fastcnn.ops.conv_bn_act.plan, kept in a
bounded fastcnn.common.plans.Plans): later calls skip the op's checks and dispatch, grouped convs
too, and stay right when the weights or overwrite_residual change."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from fastcnn_testing import assert_matches, conv_reference64, random_tensor

import fastcnn
from fastcnn.cpu import onednn
from fastcnn.nn import ConvBNAct

pytestmark = pytest.mark.skipif(
    not onednn.supports(torch.float32), reason="this torch build has no oneDNN (mkldnn)"
)


def _module(groups=1, relu=True):
    m = ConvBNAct(16, 24, 3, padding=1, groups=groups, relu=relu, backend="cpu").eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.1)
        m.bias.copy_(torch.randn(24, generator=g) * 0.1)
    return m


def _x(batch=2, seed=1):
    return random_tensor((batch, 16, 7, 9), torch.float32, "cpu", channels_last=True, seed=seed)


@pytest.mark.parametrize("groups", [1, 8])
@pytest.mark.parametrize("with_residual", [False, True])
def test_later_calls_run_the_plan_not_the_op(groups, with_residual, monkeypatch):
    m = _module(groups)
    x = _x()
    r = random_tensor((2, 24, 7, 9), torch.float32, "cpu", channels_last=True, seed=2)
    residual = r if with_residual else None
    with torch.no_grad():
        m(x, residual)
        assert len(m._plans) == 1

        def no_op(*args, **kwargs):
            raise AssertionError("a planned call went through the op")

        monkeypatch.setattr(fastcnn.ops, "conv_bn_act", no_op)
        out = m(x, residual)
    expected = conv_reference64(x, m.weight, m.bias, 1, 1, residual, groups=groups)
    assert_matches(out, expected, torch.float32)


def test_overwriting_the_residual_through_the_plan():
    m = _module()
    m.overwrite_residual = True
    x = _x()
    with torch.no_grad():
        for _ in range(2):  # the op, then the plan
            r = random_tensor((2, 24, 7, 9), torch.float32, "cpu", channels_last=True, seed=2)
            expected = conv_reference64(x, m.weight, m.bias, 1, 1, r.clone())
            out = m(x, r)
            assert out.data_ptr() == r.data_ptr()
            assert_matches(out, expected, torch.float32)


def test_a_changed_weight_is_repacked():
    m = _module()
    x = _x()
    with torch.no_grad():
        m(x)
        m.weight.mul_(-1)  # in place: the plan's packed weight is stale
        out = m(x)
    assert_matches(out, conv_reference64(x, m.weight, m.bias, 1, 1), torch.float32)


def test_each_shape_gets_a_plan_and_copies_start_without():
    m = _module()
    with torch.no_grad():
        for b in (1, 2, 1):
            assert_matches(m(_x(b)), conv_reference64(_x(b), m.weight, m.bias, 1, 1), torch.float32)
    assert len(m._plans) == 2
    assert len(copy.deepcopy(m)._plans) == 0
    assert len(pickle.loads(pickle.dumps(m))._plans) == 0


def test_a_plan_is_made_per_backend():
    m = _module()
    m.backend = None
    x = _x()
    with torch.no_grad():
        with fastcnn.use_backend("cpu"):
            m(x)
        with fastcnn.use_backend("eager"), fastcnn.trace() as t:
            m(x)
            m(x)
    assert t.kernels("conv_bn_act") == {"eager:reference"}


def test_a_pinned_backend_plans_and_runs_on_that_backend(monkeypatch):
    # planned calls skip use_backend(): the plan itself must have been made on the pinned one
    m = _module()
    m.backend = "eager"
    x = _x()

    def no_onednn(*args, **kwargs):
        raise AssertionError("a module pinned to eager ran oneDNN")

    monkeypatch.setattr(onednn, "plan", no_onednn)
    with torch.no_grad(), fastcnn.use_backend("cpu"):
        m(x)  # plans
        out = m(x)  # runs the plan
    assert len(m._plans) == 1
    assert_matches(out, conv_reference64(x, m.weight, m.bias, 1, 1), torch.float32)


def test_changed_attributes_are_planned_anew():
    m = _module()
    x = _x()
    with torch.no_grad():
        m(x)
        m.relu = False  # a plain attribute the first plan baked in
        out = m(x)
    assert (out < 0).any()
    assert_matches(out, conv_reference64(x, m.weight, m.bias, 1, 1, relu=False), torch.float32)


def test_new_weight_tensors_are_not_served_by_an_old_plan():
    """.half() then .float() gives new (rounded) weight and bias tensors: the fp32 plan made
    before must not run the old packed weight."""
    m = _module()
    x = _x()
    with torch.no_grad():
        before = m(x)
        m.half()
        m(x.half())
        m.float()
        after = m(x)
    assert not torch.equal(after, before)
    assert_matches(after, conv_reference64(x, m.weight, m.bias, 1, 1), torch.float32)


def test_turning_overwrite_off_stops_writing_into_the_residual():
    m = _module()
    m.overwrite_residual = True
    x = _x()
    r = random_tensor((2, 24, 7, 9), torch.float32, "cpu", channels_last=True, seed=2)
    with torch.no_grad():
        m(x, r.clone())
        m.overwrite_residual = False  # as verify does when it undoes an in-place write
        kept = r.clone()
        out = m(x, kept)
    assert out.data_ptr() != kept.data_ptr() and torch.equal(kept, r)
