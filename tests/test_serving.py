"""Serving: several threads calling one optimized model at once with mixed batch sizes get the
same results as one thread, and what is kept per input shape stays within its documented bound
(fastcnn/cpu/plan.py, fastcnn/cpu/onednn.py)."""

from __future__ import annotations

import threading

import pytest
import torch
import torchvision
from fastcnn_testing import assert_logits_close, randomize_batchnorm, run_threads

import fastcnn
from fastcnn.common import plans, weight_cache
from fastcnn.cpu import inception, onednn
from fastcnn.nn import ConvBNAct

pytestmark = pytest.mark.skipif(
    not onednn.supports(torch.float32), reason="this torch build has no oneDNN (mkldnn)"
)


def _model(name):
    torch.manual_seed(0)
    kwargs = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    model = getattr(torchvision.models, name)(num_classes=10, **kwargs)
    return randomize_batchnorm(model, seed=1).eval().to(memory_format=torch.channels_last)


@pytest.mark.parametrize("name", ["resnet18", "googlenet"])
def test_threads_with_mixed_batches_get_single_thread_results(name):
    model = _model(name)
    fast = fastcnn.optimize(model, backend="cpu")
    g = torch.Generator().manual_seed(0)
    inputs = [
        torch.randn(b, 3, 40, 40, generator=g).contiguous(memory_format=torch.channels_last)
        for b in (1, 3, 2, 1, 3, 2)
    ]
    with torch.no_grad():
        expected = [model(x) for x in inputs]
    results: dict[tuple[int, int], torch.Tensor] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def serve(worker: int) -> None:
        try:
            start.wait()
            with torch.no_grad():
                for round_ in range(3):
                    for i in range(len(inputs)):
                        j = (i + worker) % len(inputs)  # each thread its own order of batches
                        results[(worker, round_ * 100 + j)] = fast(inputs[j])
        except BaseException as exc:
            errors.append(exc)

    run_threads(serve, 4, timeout=600)
    assert not errors, errors
    assert len(results) == 4 * 3 * len(inputs)
    for (_, key), y in results.items():
        assert_logits_close(y, expected[key % 100], torch.float32)


def test_what_is_kept_per_shape_is_bounded():
    """More input shapes than the bounds: plans and packed weights stay within them, and the
    results stay right."""
    model = _model("resnet18")
    fast = fastcnn.optimize(model, backend="cpu")
    convs = [m for m in fast.modules() if isinstance(m, ConvBNAct)]
    with torch.no_grad():
        for b in range(1, plans.MAX_PLANS + weight_cache.KEYS_PER_WEIGHT + 2):
            x = torch.randn(b, 3, 32, 32).contiguous(memory_format=torch.channels_last)
            assert_logits_close(fast(x), model(x), torch.float32)
    assert all(len(c._plans) <= plans.MAX_PLANS for c in convs)
    assert any(len(c._plans) == plans.MAX_PLANS for c in convs)
    assert all(len(onednn._cache.kept(c.weight)) <= weight_cache.KEYS_PER_WEIGHT for c in convs)


def test_inception_choices_are_bounded(monkeypatch):
    monkeypatch.setattr(inception, "CHOICES_PER_BLOCK", 3)
    model = _model("googlenet")
    fast = fastcnn.optimize(model, backend="cpu")
    with torch.no_grad():
        for b in range(1, inception.CHOICES_PER_BLOCK + 3):
            fast(torch.randn(b, 3, 32, 32).contiguous(memory_format=torch.channels_last))
    blocks = [m for m in fast.modules() if isinstance(m, fastcnn.nn.FusedInception)]
    assert len(blocks) == 9
    for block in blocks:
        chosen = inception._blocks.kept(block.reduce_weight)["block"].chosen
        assert len(chosen) == inception.CHOICES_PER_BLOCK


@pytest.mark.skipif(
    onednn.linked_extension() is None,
    reason="the 3x bound is the direct oneDNN path's, and this extension was built without the "
    "oneDNN library (torch's mkldnn path packs per input shape: the next test bounds it)",
)
@pytest.mark.parametrize("name", ["resnet50", "googlenet"])
def test_every_batch_size_up_to_32_keeps_packs_within_3x_the_weights(name, monkeypatch):
    """A server's dynamic batcher sends every batch size: the packs fastcnn keeps for them are
    shared across batch sizes (one per weight and layout), so serving 1..32 keeps at most 3x
    the model's fp32 weights (Winograd's transform of a 3x3 kernel is 4x its size; a conv
    taking the direct kernel at small batches and Winograd at larger ones keeps both). The
    Inception structure is fixed here: the choice per shape is timed, so nondeterministic."""
    monkeypatch.setattr(inception, "_choose", lambda run: "merged")
    torch.manual_seed(0)
    kwargs = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    model = getattr(torchvision.models, name)(**kwargs).eval()  # ImageNet's 1000 classes
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    fast = fastcnn.optimize(model, backend="cpu").to(memory_format=torch.channels_last)
    with torch.no_grad():
        fast(torch.randn(8, 3, 224, 224).contiguous(memory_format=torch.channels_last))
        one = fastcnn.cache_info(fast).packs
        for b in range(1, 33):
            fast(torch.randn(b, 3, 224, 224).contiguous(memory_format=torch.channels_last))
    every = fastcnn.cache_info(fast).packs
    assert one <= every <= 3 * weights, (one / weights, every / weights)


def test_torchs_mkldnn_path_keeps_at_most_its_keys_per_weight(monkeypatch):
    """Without the oneDNN library (as on a machine without its wheels) convs go through torch's
    mkldnn ops, whose packed layout is opaque: one pack per input shape, the last
    KEYS_PER_WEIGHT of them per weight, each the weight in a blocked layout (channel blocks
    padded, at most one weight's more)."""
    monkeypatch.setattr(onednn, "_extension_module", [None])
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    fast = fastcnn.optimize(model, backend="cpu").to(memory_format=torch.channels_last)
    with torch.no_grad():
        for b in range(1, 13):
            fast(torch.randn(b, 3, 48, 48).contiguous(memory_format=torch.channels_last))
    packs = fastcnn.cache_info(fast).packs
    bound = (weight_cache.KEYS_PER_WEIGHT + 1) * weights
    assert weights <= packs <= bound, packs / weights
