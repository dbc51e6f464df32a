"""Folded weights follow the weights they came from, for every fused module: after
load_state_dict, .half() / .float() round trips and .to(), each module's next inference uses
the new values (fastcnn.models' fold caches, GoogLeNet's merged 1x1 cache, oneDNN's prepacked
weights, optimize's ConvBNAct / FusedInception buffers)."""

from __future__ import annotations

import pytest
import torch
import torchvision
from fastcnn_testing import randomize_batchnorm

import fastcnn


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
