"""ConvBNAct's plans on the cuda backend, without a GPU: the extension's conv_bn_act_out gets a
CPU kernel for the test (the float64 reference, written into out) and the backend is marked
available for CPU tensors, so a planned call runs its real host path (output allocation, the
extension's conv_bn_act_out_planned binding, the dispatcher) up to that kernel. What is checked:
the arguments reach the kernel as torch.ops would pass them, and the results are right."""

from __future__ import annotations

import pytest
import torch
from fastcnn_testing import assert_matches, conv_reference64, random_tensor

import fastcnn
from fastcnn import _backend, _extension
from fastcnn.nn import ConvBNAct

pytestmark = pytest.mark.skipif(
    _extension.load() is None, reason="the extension did not build here"
)


@pytest.fixture
def cpu_stand_in(monkeypatch):
    """The cuda backend on CPU tensors; yields the list of each kernel call's arguments."""
    calls = []

    def kernel(x, weight, bias, stride, padding, residual, relu, out):
        calls.append((list(stride), list(padding), relu, residual is not None, out.data_ptr()))
        y = fastcnn.reference.conv_bn_act(x, weight, bias, stride, padding, 1, residual, relu)
        out.copy_(y)

    lib = torch.library.Library("fastcnn_ext", "IMPL")
    lib.impl("conv_bn_act_out", kernel, "CPU")
    ok = _backend.BackendStatus(True, "CPU stand-in for the CUDA kernel (test)")
    for device in ("cpu", "cuda"):  # ("cuda", "cuda"): what use_backend("cuda") requires
        monkeypatch.setitem(_backend._status_cache, ("cuda", device), ok)
    try:
        yield calls
    finally:
        lib._destroy()


def _module(stride=1):
    m = ConvBNAct(16, 24, 3, stride=(stride, 1), padding=(1, 2), backend="cuda").eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.1)
        m.bias.copy_(torch.randn(24, generator=g) * 0.1)
    return m


def _not_planned(*args, **kwargs):
    raise AssertionError("a planned call went through the op")


@pytest.mark.parametrize("in_place", [False, True])
def test_planned_calls_pass_the_arguments_through_the_binding(cpu_stand_in, in_place, monkeypatch):
    m = _module(stride=2)
    m.overwrite_residual = in_place
    x = random_tensor((2, 16, 9, 7), torch.float32, "cpu", channels_last=True, seed=1)
    r = random_tensor((2, 24, 5, 9), torch.float32, "cpu", channels_last=True, seed=2)
    expected = conv_reference64(x, m.weight, m.bias, (2, 1), (1, 2), r)
    with torch.no_grad():
        for _ in range(3):  # the first plans; the later ones run the plan
            residual = r.clone()
            out = m(x, residual)
            assert_matches(out, expected, torch.float32)
            assert (out.data_ptr() == residual.data_ptr()) == in_place
            monkeypatch.setattr(fastcnn.ops, "conv_bn_act", _not_planned)
    assert len(m._plans) == 1
    assert [c[:4] for c in cpu_stand_in] == [([2, 1], [1, 2], True, True)] * 3
    assert cpu_stand_in[-1][4] == out.data_ptr()


def test_the_binding_dispatches_as_torch_ops_does(cpu_stand_in):
    """conv_bn_act_out_planned reaches the kernel of the tensors' device, none other: with no
    kernel for a device, it fails as torch.ops does."""
    planned = _extension.load().conv_bn_act_out_planned
    x = random_tensor((1, 16, 5, 5), torch.float32, "cpu", channels_last=True, seed=3)
    w = random_tensor((8, 16, 1, 1), torch.float32, "cpu", seed=4)
    out = torch.full((1, 8, 5, 5), float("nan")).contiguous(memory_format=torch.channels_last)
    planned(x, w, None, 1, 1, 0, 0, None, False, out)
    assert_matches(out, conv_reference64(x, w, None, 1, 0, relu=False), torch.float32)
    assert cpu_stand_in == [([1, 1], [0, 0], False, False, out.data_ptr())]
    meta = [t.to("meta") for t in (x, w, out)]
    with pytest.raises(NotImplementedError, match="conv_bn_act_out"):
        torch.ops.fastcnn_ext.conv_bn_act_out(meta[0], meta[1], None, [1, 1], [0, 0], None,
                                              False, meta[2])  # fmt: skip
    with pytest.raises(NotImplementedError, match="conv_bn_act_out"):
        planned(meta[0], meta[1], None, 1, 1, 0, 0, None, False, meta[2])
