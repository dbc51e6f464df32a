"""fastcnn.models against torchvision: same state_dict keys (strict loads both ways), the same
eval outputs through the fused path (randomized BN statistics), the same training behaviour
(outputs, gradients, running statistics, auxiliary heads), and fresh folds after training."""

from __future__ import annotations

import pytest
import torch
import torchvision
from fastcnn_testing import assert_logits_close, randomize_batchnorm, skip_unsupported

import fastcnn

MODELS = ["resnet18", "resnet34", "resnet50", "googlenet"]


def _pair(name: str, num_classes: int = 10, **kwargs):
    """(torchvision model, fastcnn model) with identical weights and randomized BN."""
    torch.manual_seed(0)
    extra = {"init_weights": True} if name == "googlenet" else {}
    tv = getattr(torchvision.models, name)(num_classes=num_classes, **extra, **kwargs)
    randomize_batchnorm(tv, seed=1)
    ours = getattr(fastcnn.models, name)(num_classes=num_classes, **kwargs)
    ours.load_state_dict(tv.state_dict(), strict=True)
    return tv, ours


@pytest.mark.parametrize("name", [*MODELS, "resnet101", "resnet152"])
def test_state_dict_keys_and_shapes_match_torchvision(name):
    extra = {"init_weights": True} if name == "googlenet" else {}
    tv_sd = getattr(torchvision.models, name)(**extra).state_dict()
    ours = getattr(fastcnn.models, name)()
    assert list(ours.state_dict()) == list(tv_sd)
    ours.load_state_dict(tv_sd, strict=True)  # torchvision -> fastcnn
    tv = getattr(torchvision.models, name)(**extra)
    tv.load_state_dict(ours.state_dict(), strict=True)  # fastcnn -> torchvision


@pytest.mark.parametrize("backend", ["eager", "auto"])
@pytest.mark.parametrize("name", MODELS)
def test_eval_matches_torchvision(name, backend):
    tv, ours = _pair(name)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = tv.eval()(x)
        with fastcnn.use_backend(backend), fastcnn.trace() as t:
            got = ours.eval()(x)
    assert_logits_close(got, expected, torch.float32)
    # every fused call took the backend's own kernel: no silent fallback in a whole model
    assert t.events and not t.fallbacks(), t.fallbacks()
    ran = {e.backend for e in t.events if e.op not in ("max_pool2d", "linear")}  # drop-ins
    assert ran == {"cpu" if backend == "auto" else backend}


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "googlenet"])
def test_eval_on_triton_matches_torchvision(name):
    skip_unsupported("cpu", "triton", torch.float32)
    tv, ours = _pair(name)
    x = torch.randn(1, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), fastcnn.use_backend("triton"):
        expected = tv.eval()(x)
        got = ours.eval()(x)
    assert_logits_close(got, expected, torch.float32)


def test_nchw_input_and_batch_one():
    tv, ours = _pair("resnet18")
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        assert_logits_close(ours.eval()(x), tv.eval()(x), torch.float32)


@pytest.mark.parametrize("name", MODELS)
def test_training_matches_torchvision(name):
    tv, ours = _pair(name)
    tv.train()
    ours.train()
    x = torch.randn(4, 3, 64, 64)
    target = torch.randint(0, 10, (4,))
    outputs = []
    for model in (tv, ours):
        torch.manual_seed(123)  # the same dropout masks for both
        out = model(x)
        if name == "googlenet":
            assert isinstance(out, tuple) and len(out) == 3
            loss = fastcnn.models.googlenet_loss(out, target)
        else:
            loss = torch.nn.functional.cross_entropy(out, target)
        loss.backward()
        outputs.append(out[0] if isinstance(out, tuple) else out)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)
    tv_params = dict(tv.named_parameters())
    for key, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, tv_params[key].grad, rtol=1e-4, atol=1e-5, msg=key)
    tv_buffers = dict(tv.named_buffers())
    for key, b in ours.named_buffers():
        torch.testing.assert_close(b, tv_buffers[key], rtol=1e-5, atol=1e-6, msg=key)


def test_eval_after_training_uses_fresh_folds():
    """The folded weights are cached; a training step must invalidate them."""
    tv, ours = _pair("resnet18")
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        ours.eval()(x)  # fills the fold caches
    for model in (tv, ours):
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        model(x).sum().backward()
        opt.step()
    with torch.no_grad():
        expected = tv.eval()(x)
        got = ours.eval()(x)
    assert_logits_close(got, expected, torch.float32)


def test_eval_with_gradients_trains_through_frozen_bn():
    """Eval mode with autograd on (fine-tuning with frozen BN) must give real gradients."""
    tv, ours = _pair("resnet18")
    x = torch.randn(2, 3, 48, 48)
    tv.eval()(x).sum().backward()
    ours.eval()(x).sum().backward()
    torch.testing.assert_close(ours.conv1.weight.grad, tv.conv1.weight.grad, rtol=1e-4, atol=1e-5)


def test_zero_init_residual_matches_torchvision():
    torch.manual_seed(0)
    tv = torchvision.models.resnet50(zero_init_residual=True)
    ours = fastcnn.models.resnet50(zero_init_residual=True)
    for (key, a), b in zip(tv.state_dict().items(), ours.state_dict().values(), strict=True):
        if key.endswith("bn3.weight"):
            assert (a == 0).all() and (b == 0).all(), key


def test_he_initialization_statistics():
    torch.manual_seed(0)
    model = fastcnn.models.resnet50()
    w = model.layer3[0].conv2.weight  # 256 -> 256, 3x3: fan_out = 256 * 9
    expected_std = (2.0 / (256 * 9)) ** 0.5
    assert abs(w.std().item() / expected_std - 1) < 0.05


def test_googlenet_eval_returns_logits_and_skips_aux():
    _, ours = _pair("googlenet")
    calls = []
    ours.aux1.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        out = ours.eval()(torch.randn(1, 3, 64, 64))
    assert isinstance(out, torch.Tensor) and out.shape == (1, 10)
    assert not calls, "auxiliary heads must not run at inference"


def test_googlenet_inference_has_no_concat():
    skip_unsupported("cpu", "triton", torch.float32)
    _, ours = _pair("googlenet")
    x = torch.randn(1, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), fastcnn.use_backend("triton"):
        ours.eval()(x)  # the first call folds BN and concatenates the 1x1 weights, once
        with torch.profiler.profile() as prof:
            ours(x)
    names = {e.name for e in prof.events()}
    assert "aten::cat" not in names, "Inception outputs must be written in place, not concatenated"


@pytest.mark.parametrize("transform_input", [False, True])
def test_googlenet_transform_input_and_5x5_variant(transform_input):
    tv, ours = _pair("googlenet", transform_input=transform_input)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert_logits_close(ours.eval()(x), tv.eval()(x), torch.float32)
    paper = fastcnn.models.googlenet(num_classes=10, branch3_kernel=5)
    assert paper.inception3a.branch3[1].conv.kernel_size == (5, 5)
    with torch.no_grad():
        assert paper.eval()(x).shape == (1, 10)


def test_googlenet_loss_weights_the_aux_heads():
    logits, aux2, aux1 = torch.randn(3, 4, 10).unbind(0)
    target = torch.tensor([1, 2, 3, 4])
    ce = torch.nn.functional.cross_entropy
    outputs = fastcnn.models.GoogLeNetOutputs(logits, aux2, aux1)
    expected = ce(logits, target) + 0.3 * (ce(aux1, target) + ce(aux2, target))
    torch.testing.assert_close(fastcnn.models.googlenet_loss(outputs, target), expected)
    torch.testing.assert_close(fastcnn.models.googlenet_loss(logits, target), ce(logits, target))
