"""Folded weights follow the weights they came from, for every fused module: after
load_state_dict, .half() / .float() round trips and .to(), each module's next inference uses
the new values (fastcnn.models' fold caches, GoogLeNet's merged 1x1 cache, oneDNN's prepacked
weights, optimize's ConvBNAct / FusedInception buffers); after writes no version counter sees
(.data, numpy, DLPack), fastcnn.refresh(model) makes it use them."""

from __future__ import annotations

import copy

import numpy
import pytest
import torch
import torchvision
from fastcnn_testing import randomize_batchnorm

import fastcnn
from fastcnn.nn.quantized import QConvBNAct


def _fastcnn_model(name):
    torch.manual_seed(0)
    kwargs = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    return randomize_batchnorm(getattr(fastcnn.models, name)(num_classes=10, **kwargs), seed=1)


def _torchvision_model(name, seed):
    torch.manual_seed(seed)
    kwargs = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    model = getattr(torchvision.models, name)(num_classes=10, **kwargs)
    return randomize_batchnorm(model, seed=seed + 1).eval()


def _close(got, expected, tol):
    scale = max(1.0, expected.abs().max().item())
    err = (got.double() - expected.double()).abs().max().item()
    assert err <= tol * scale, f"error {err:.3g} at scale {scale:.3g}: stale weights?"


MODELS = ["resnet18", "googlenet"]


def _makers(name):
    """(how the fused model is made, the reference it must equal) for fastcnn's own model and
    for optimize's result."""
    return {
        "fastcnn.models": lambda: _fastcnn_model(name).eval(),
        "optimize": lambda: fastcnn.optimize(_torchvision_model(name, seed=0)),
    }


# GoogLeNet for its merged 1x1 cache (fastcnn.models) and FusedInception buffers (optimize),
# ResNet-18 for the rest; the cpu backend's oneDNN weight packs are the cache most at risk.
@pytest.mark.parametrize(
    ("name", "made_by", "backend"),
    [
        ("resnet18", "fastcnn.models", "cpu"),
        ("resnet18", "optimize", "eager"),
        ("googlenet", "fastcnn.models", "cpu"),
        ("googlenet", "optimize", "cpu"),
    ],
)
def test_load_state_dict_refreshes(name, made_by, backend):
    model = _makers(name)[made_by]()
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), fastcnn.use_backend(backend):
        model(x)  # warm every cache
        if made_by == "fastcnn.models":
            other = _torchvision_model(name, seed=5)
            model.load_state_dict(other.state_dict())
        else:  # optimize's buffers: load another optimized model's state
            other_fast = fastcnn.optimize(other := _torchvision_model(name, seed=5))
            model.load_state_dict(other_fast.state_dict())
        _close(model(x), other(x), 1e-4)


@pytest.mark.parametrize(
    ("name", "made_by"), [("googlenet", "fastcnn.models"), ("resnet18", "optimize")]
)
def test_half_and_back_refreshes(name, made_by):
    """.half() then .float(): the float weights come back rounded, possibly at the very address
    the old ones had; a cache keyed by address and version alone would miss the change."""
    model = _makers(name)[made_by]()
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), fastcnn.use_backend("cpu"):
        before = model(x)
        model.half()
        half = model(x.half())
        assert half.dtype == torch.float16
        model.float()
        after = model(x)
        assert not torch.equal(after, before), "the weights were rounded: the result must change"
        # the reference: the same rounded weights, computed without any cache
        fresh = _makers(name)[made_by]().half().float()
        _close(after, fresh(x), 1e-4)
        _close(half.float(), after, 2e-2)


@pytest.mark.parametrize("name", MODELS)
def test_to_double_and_back(name):
    model = _fastcnn_model(name).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), fastcnn.use_backend("eager"):
        expected = model(x)
        model.to(torch.float64)
        with fastcnn.trace() as t:  # float64 has no fused kernel: the plain modules, visibly
            _close(model(x.double()).float(), expected, 1e-4)
        convs = [e for e in t.events if e.op == "conv_bn_act"]
        assert convs and all("float64 has no fused kernel" in e.fallback for e in convs)
        model.to(torch.float32)
        _close(model(x), expected, 1e-4)


# Writes no version counter sees: through .data, a numpy view, a DLPack view.
UNSEEN_WRITES = {
    "data": lambda t: t.data.neg_(),
    "numpy": lambda t: numpy.negative(t.detach().numpy(), out=t.detach().numpy()),
    "dlpack": lambda t: torch.from_dlpack(t.detach()).neg_(),
}


def _first_conv_weight(model):
    """The weight tensor of the model's first fused (or plain) conv, whatever made it."""
    for m in model.modules():
        if isinstance(m, (fastcnn.nn.ConvBNAct, QConvBNAct, torch.nn.Conv2d)):
            return m.weight
    raise AssertionError("no conv")


def _int8_model():
    model = _torchvision_model("resnet18", seed=0)
    batches = [torch.randn(2, 3, 32, 32) for _ in range(2)]
    return fastcnn.quantize(model, batches, backend="cpu")


KINDS = {  # how the model is made, and the weights every cache is derived from
    "optimize": lambda: fastcnn.optimize(_torchvision_model("resnet18", seed=0)),
    "fastcnn.models": lambda: _fastcnn_model("resnet18").eval(),
    "int8": _int8_model,
}


def _reference(model, x):
    """model's output computed from its tensors as they are now, by a copy with no cache (a
    deep copy's tensors are new, so nothing derived from the old ones can serve it), on the
    eager backend."""
    with fastcnn.use_backend("eager"):
        return copy.deepcopy(model)(x)


@pytest.mark.parametrize("route", list(UNSEEN_WRITES))
@pytest.mark.parametrize(("kind", "backend"), [
    ("optimize", "cpu"), ("fastcnn.models", "cpu"), ("fastcnn.models", "eager"), ("int8", "cpu"),
])  # fmt: skip
def test_refresh_picks_up_writes_no_version_counter_sees(kind, backend, route):
    model = KINDS[kind]()
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    tol = 0.05 if kind == "int8" else 1e-4  # int8: a step of the output's quantization
    with torch.no_grad(), fastcnn.use_backend(backend):
        model(x)
        model(x)  # planned, packed, folded: every cache warm
        UNSEEN_WRITES[route](_first_conv_weight(model))
        expected = _reference(model, x)
        stale = model(x)
        with pytest.raises(AssertionError, match="stale weights"):
            _close(stale, expected, tol)  # the cache served the old weights: refresh is needed
        assert fastcnn.refresh(model) is model
        _close(model(x), expected, tol)
        _close(model(x), expected, tol)  # and the caches it fills again serve the new ones


def test_refresh_refuses_what_is_not_a_module():
    with pytest.raises(TypeError, match=r"expects an nn\.Module"):
        fastcnn.refresh(torch.randn(3))


def test_cache_info_counts_a_models_packs_and_refresh_drops_them():
    model = fastcnn.optimize(_torchvision_model("resnet18", seed=0))
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    assert fastcnn.cache_info(model).packs == 0
    with torch.no_grad(), fastcnn.use_backend("cpu"):
        model(x)
    assert fastcnn.cache_info(model).packs > 0
    assert fastcnn.cache_info().packs >= fastcnn.cache_info(model).packs
    fastcnn.refresh(model)
    assert fastcnn.cache_info(model).packs == 0
