"""fastcnn.nn.Linear: nn.Linear with a prepacked oneDNN weight for fp32 CPU inference
(fastcnn/cpu/linear.py), nn.Linear's own path for everything else, swapped in by optimize."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from fastcnn_testing import assert_matches, random_tensor
from torch import nn

import fastcnn
from fastcnn.cpu import linear, onednn

pytestmark = pytest.mark.skipif(
    not torch.backends.mkldnn.is_available(), reason="torch was built without oneDNN"
)


def _layer(bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(37, 23, bias=bias).eval()


def _expected(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    bias = None if layer.bias is None else layer.bias.double()
    return F.linear(x.double(), layer.weight.double(), bias)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch", [1, 3])
def test_matches_nn_linear_through_the_packed_path(batch, bias, mode):
    ref = _layer(bias)
    fast = fastcnn.nn.Linear.from_module(ref)
    x = random_tensor((batch, 37), torch.float32, "cpu", seed=batch)
    context = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with context, fastcnn.trace() as t:
        y = fast(x)
    assert_matches(y, _expected(ref, x), torch.float32)
    assert [k.kernel for k in t.counts()] == ["onednn_packed"], str(t)


def test_shares_the_parameters_and_state_dict_of_nn_linear():
    ref = _layer()
    fast = fastcnn.nn.Linear.from_module(ref)
    assert fast.weight is ref.weight and fast.bias is ref.bias
    assert fast.state_dict().keys() == ref.state_dict().keys()
    other = fastcnn.nn.Linear(37, 23)
    other.load_state_dict(ref.state_dict())
    x = random_tensor((2, 37), torch.float32, "cpu", seed=5)
    with torch.no_grad():
        assert_matches(other(x), _expected(ref, x), torch.float32)


def test_a_weight_changed_in_place_is_packed_again():
    ref = _layer()
    fast = fastcnn.nn.Linear.from_module(ref)
    x = random_tensor((2, 37), torch.float32, "cpu", seed=6)
    with torch.no_grad():
        before = fast(x)
        ref.weight.mul_(-2.0)  # the same tensor, a new version
        after = fast(x)
    assert_matches(after, _expected(ref, x), torch.float32)
    assert not torch.allclose(before, after)


def test_every_batch_size_runs_one_pack():
    fast = fastcnn.nn.Linear.from_module(_layer())
    with torch.no_grad():
        for batch in (1, 4, 33, 1):
            x = random_tensor((batch, 37), torch.float32, "cpu", seed=batch + 10)
            assert_matches(fast(x), _expected(fast, x), torch.float32)
    assert set(onednn._cache.kept(fast.weight)) == {("linear",)}


@pytest.mark.parametrize(
    "case, why",
    [
        ("grad", "autograd must record it"),
        ("float64", "not fp32 or bf16"),
        ("3d", "not a [batch, in_features] input"),
    ],
)
def test_other_calls_take_nn_linears_path_and_say_why(case, why):
    ref = _layer()
    fast = fastcnn.nn.Linear.from_module(ref)
    x = random_tensor((2, 37), torch.float32, "cpu", seed=7)
    if case == "float64":
        fast, ref, x = fast.double(), ref.double(), x.double()
    if case == "3d":
        x = random_tensor((2, 5, 37), torch.float32, "cpu", seed=8)
    with fastcnn.trace() as t:
        y = fast(x)
    (key,) = t.counts()
    assert (key.backend, key.kernel) == ("aten", "linear"), str(t)
    if case == "float64":  # aten is the path for that dtype, not a fallback from a faster one
        assert key.fallback is None
    else:
        assert why in key.fallback, str(t)
    torch.testing.assert_close(y, F.linear(x, ref.weight, ref.bias))
    if case == "grad":  # autograd recorded it: gradients reach the shared weight
        y.sum().backward()
        assert ref.weight.grad is not None


@pytest.mark.skipif(not onednn.native_bf16(), reason="oneDNN runs no native bf16 on this CPU")
@pytest.mark.parametrize("batch", [1, 5])
def test_bf16_takes_the_packed_path_where_onednn_runs_it_natively(batch):
    """bf16 in, bf16 out, fp32 accumulation: within bf16's tolerance of the fp32 layer."""
    ref = _layer()
    fast = fastcnn.nn.Linear.from_module(copy.deepcopy(ref)).to(torch.bfloat16)
    x = random_tensor((batch, 37), torch.float32, "cpu", seed=9)
    with torch.inference_mode(), fastcnn.trace() as t:
        y = fast(x.bfloat16())
    assert {(k.backend, k.kernel) for k in t.counts()} == {("cpu", "onednn_packed")}, str(t)
    assert y.dtype == torch.bfloat16
    expected = F.linear(x, ref.weight, ref.bias)
    torch.testing.assert_close(
        y.float(), expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item()
    )


def test_bf16_without_native_bf16_stays_with_aten(monkeypatch):
    monkeypatch.setattr(onednn, "native_bf16", lambda: False)
    w = torch.randn(4, 6).bfloat16()
    assert "native bf16" in linear.unsupported_reason(torch.randn(2, 6).bfloat16(), w, None)


def test_the_packed_path_refuses_what_it_cannot_take():
    w = torch.randn(4, 6)
    assert linear.unsupported_reason(torch.randn(0, 6), w, None) == "an empty batch"
    assert "in_features" in linear.unsupported_reason(torch.randn(2, 5), w, None)


def test_optimize_swaps_the_classifier_in():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=11).eval()
    fast = fastcnn.optimize(model)
    assert type(fast.fc) is fastcnn.nn.Linear
    entries = {e.path: e for e in fastcnn.report(fast).entries}
    assert entries["fc"].action == "replaced"
    x = random_tensor((2, 3, 40, 40), torch.float32, "cpu", seed=9)
    with torch.no_grad(), fastcnn.trace() as t:
        y = fast(x)
        expected = model(x)
    assert any(k.op == "linear" and k.kernel == "onednn_packed" for k in t.counts()), str(t)
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)


def test_fastcnn_models_classify_through_it():
    model = fastcnn.models.resnet18(num_classes=5).eval()
    assert type(model.fc) is fastcnn.nn.Linear


@pytest.mark.parametrize("kind", ["strided", "expanded"])
def test_a_bias_that_is_not_dense_is_read_right(kind):
    ref = _layer()
    fast = fastcnn.nn.Linear.from_module(ref)
    with torch.no_grad():
        values = ref.bias.detach().clone()
        if kind == "strided":  # every other element of a longer vector
            ref.bias = nn.Parameter(torch.stack([values, -values], 1).reshape(-1)[::2])
        else:  # one value, expanded to every output feature (stride 0)
            ref.bias = nn.Parameter(values[:1].expand(23))
    fast.bias = ref.bias
    assert not ref.bias.is_contiguous()
    x = random_tensor((3, 37), torch.float32, "cpu", seed=20)
    with torch.no_grad():
        assert_matches(fast(x), _expected(ref, x), torch.float32)


def test_a_bias_aten_broadcasts_takes_aten():
    fast = fastcnn.nn.Linear.from_module(_layer())
    fast.bias = nn.Parameter(torch.randn(1))  # one value for every output: aten broadcasts it
    x = random_tensor((3, 37), torch.float32, "cpu", seed=21)
    with torch.no_grad(), fastcnn.trace() as t:
        y = fast(x)
    assert "broadcasts" in t.fallbacks()[0].key.fallback
    torch.testing.assert_close(y, F.linear(x, fast.weight, fast.bias))


def test_autocast_and_tracers_get_nn_linears_dtype_and_ops():
    ref = _layer()
    fast = fastcnn.nn.Linear.from_module(ref)
    x = random_tensor((2, 37), torch.float32, "cpu", seed=22)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert fast(x).dtype == ref(x).dtype == torch.bfloat16
    with torch.no_grad():
        traced = torch.jit.trace(fast, x)  # no mkldnn op with a packed weight in the graph
        assert_matches(traced(x), _expected(ref, x), torch.float32)
    assert "mkldnn" not in str(traced.graph)


def test_from_module_keeps_mode_hooks_and_a_missing_bias():
    ref = _layer(bias=False).train()
    calls = []
    ref.register_forward_hook(lambda m, i, o: calls.append(o.shape))
    fast = fastcnn.nn.Linear.from_module(ref)
    assert fast.training and "bias" in fast._parameters and fast.bias is None
    with torch.no_grad():
        fast(random_tensor((2, 37), torch.float32, "cpu", seed=23))
    assert calls == [(2, 23)]


def test_a_weight_replaced_by_data_assignment_is_packed_again():
    ref = _layer()
    fast = fastcnn.nn.Linear.from_module(ref)
    x = random_tensor((2, 37), torch.float32, "cpu", seed=24)
    with torch.no_grad():
        fast(x)
        ref.weight.data = torch.randn(23, 37)  # a new storage behind the same Parameter
        assert_matches(fast(x), _expected(ref, x), torch.float32)


def test_optimize_keeps_a_linear_whose_weight_is_recomputed_every_call():
    """weight_norm (the old kind: still exactly an nn.Linear) computes a new weight tensor
    before every call: it would be packed again every call, so it stays nn.Linear."""
    model = nn.Sequential(nn.Linear(37, 23)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated for parametrizations
        nn.utils.weight_norm(model[0])
    assert type(model[0]) is nn.Linear and not isinstance(model[0].weight, nn.Parameter)
    fast = fastcnn.optimize(model, inplace=True)  # such a module cannot be deep-copied
    assert type(fast.get_submodule("0")) is nn.Linear
    x = random_tensor((2, 37), torch.float32, "cpu", seed=25)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x))
