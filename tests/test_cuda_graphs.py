"""fastcnn.cuda_graphs / optimize(cuda_graphs=True): one CUDA graph per input signature, replayed.

Without a GPU only the refusals and the wrapper's bookkeeping run; the GPU tests check that a
replay computes what the model computes, on fresh inputs, that a returned tensor survives later
calls, that the graphs are bounded, that a weight changed in place is seen, and that
torch.compile(mode="reduce-overhead") works over an optimized model.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torchvision
from fastcnn_testing import (
    assert_logits_close,
    random_tensor,
    randomize_batchnorm,
    requires_cuda,
)

import fastcnn

GPU_BACKENDS = ["triton", "cuda"]


def _resnet18(device: str = "cpu", dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    model = randomize_batchnorm(torchvision.models.resnet18(num_classes=10)).eval()
    return model.to(device=device, dtype=dtype).to(memory_format=torch.channels_last)


def test_a_cpu_input_is_refused_by_name():
    graphed = fastcnn.cuda_graphs(torch.nn.Conv2d(3, 4, 3))
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA input, got one on cpu"):
        graphed(torch.randn(1, 3, 8, 8))
    with pytest.raises(TypeError, match="the input must be a tensor"):
        graphed([torch.randn(1, 3, 8, 8)])


def test_optimize_refuses_cuda_graphs_for_a_model_off_the_gpu():
    with pytest.raises(ValueError, match="cuda_graphs=True needs a model on a CUDA device"):
        fastcnn.optimize(_resnet18(), cuda_graphs=True)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_max_graphs_must_be_a_positive_int(bad):
    with pytest.raises(ValueError, match="max_graphs must be an int >= 1"):
        fastcnn.cuda_graphs(torch.nn.ReLU(), max_graphs=bad)
    with pytest.raises(TypeError, match=r"expects an nn\.Module"):
        fastcnn.cuda_graphs(lambda x: x)


def test_copies_and_pickles_start_without_graphs():
    graphed = fastcnn.cuda_graphs(torch.nn.Conv2d(3, 4, 3), max_graphs=2)
    for other in (copy.deepcopy(graphed), pickle.loads(pickle.dumps(graphed))):
        assert other.num_graphs == 0 and other.max_graphs == 2
        assert torch.equal(other.model.weight, graphed.model.weight)
    assert bool(graphed)  # no __len__: an empty wrapper is still truthy


def test_optimize_of_a_wrapper_optimizes_the_model_inside():
    graphed = fastcnn.optimize(fastcnn.cuda_graphs(_resnet18(), max_graphs=3))
    assert isinstance(graphed, fastcnn.CUDAGraphed) and graphed.max_graphs == 3
    assert any(isinstance(m, fastcnn.nn.ConvBNAct) for m in graphed.model.modules())
    assert not isinstance(graphed.model, fastcnn.CUDAGraphed)  # one wrapper, not two
    assert fastcnn.report(graphed).entries


def _graphed(backend: str, dtype=torch.float16, max_graphs: int = 8):
    model = _resnet18("cuda", dtype)
    fast = fastcnn.optimize(model, backend=backend)
    return model, fast, fastcnn.cuda_graphs(fast, max_graphs=max_graphs)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_replays_compute_what_the_model_computes_on_fresh_inputs(backend):
    model, _, graphed = _graphed(backend)
    outputs = []
    with torch.no_grad():
        for seed in range(3):
            x = random_tensor((1, 3, 64, 64), torch.float16, "cuda", channels_last=True, seed=seed)
            y = graphed(x)
            assert_logits_close(y, model(x), torch.float16)
            outputs.append(y)
    assert graphed.num_graphs == 1
    assert not torch.equal(outputs[0], outputs[1]), "a replay returned a stale output"


@requires_cuda
@pytest.mark.cuda
def test_a_returned_output_survives_later_calls():
    _, _, graphed = _graphed("triton")
    with torch.no_grad():
        x1 = random_tensor((1, 3, 64, 64), torch.float16, "cuda", channels_last=True, seed=1)
        x2 = random_tensor((1, 3, 64, 64), torch.float16, "cuda", channels_last=True, seed=2)
        first = graphed(x1)
        kept = first.clone()
        graphed(x2)
    assert torch.equal(first, kept)


@requires_cuda
@pytest.mark.cuda
def test_each_shape_gets_a_graph_within_the_bound():
    model, _, graphed = _graphed("triton", max_graphs=1)
    with torch.no_grad():
        for size in (64, 96, 64):
            x = random_tensor((1, 3, size, size), torch.float16, "cuda", channels_last=True)
            assert_logits_close(graphed(x), model(x), torch.float16)
            assert graphed.num_graphs == 1


@requires_cuda
@pytest.mark.cuda
def test_autocast_and_inference_mode_get_graphs_of_their_own():
    model, _, graphed = _graphed("triton", dtype=torch.float32)
    x = random_tensor((1, 3, 64, 64), torch.float32, "cuda", channels_last=True)
    with torch.no_grad():
        plain = graphed(x)
        with torch.autocast("cuda", dtype=torch.float16):
            autocast = graphed(x)
    with torch.inference_mode():
        inference = graphed(x)
    with torch.no_grad():
        again = graphed(x)  # the no_grad graph again: its buffers are not inference tensors
    assert graphed.num_graphs == 3
    assert autocast.dtype == torch.float16 and plain.dtype == torch.float32
    assert torch.equal(plain, again) and torch.equal(plain, inference)
    with torch.no_grad():
        assert_logits_close(plain, model(x), torch.float32)


@requires_cuda
@pytest.mark.cuda
def test_a_weight_changed_in_place_is_captured_anew():
    model, fast, graphed = _graphed("triton", dtype=torch.float32)
    x = random_tensor((1, 3, 64, 64), torch.float32, "cuda", channels_last=True)
    with torch.no_grad():
        before = graphed(x)
        fc = fast.get_submodule("fc")
        fc.weight.mul_(2)  # the graph read the old values by address: it must be recaptured
        model.fc.weight.mul_(2)
        after = graphed(x)
    assert not torch.equal(before, after)
    assert_logits_close(after, model(x), torch.float32)


@requires_cuda
@pytest.mark.cuda
def test_optimize_with_cuda_graphs_wraps_and_reports():
    model = _resnet18("cuda", torch.float16)
    graphed = fastcnn.optimize(model, cuda_graphs=True)
    assert isinstance(graphed, fastcnn.CUDAGraphed)
    assert any("cuda_graphs" in note for note in fastcnn.report(graphed).notes)
    x = random_tensor((2, 3, 64, 64), torch.float16, "cuda", channels_last=True)
    with torch.no_grad():
        assert_logits_close(graphed(x), model(x), torch.float16)


class _Block(torch.nn.Module):
    """A ResNet basic block: small enough that torch.compile takes seconds, not a minute."""

    def __init__(self, channels: int = 16):
        super().__init__()
        self.c1 = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.b1 = torch.nn.BatchNorm2d(channels)
        self.c2 = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.b2 = torch.nn.BatchNorm2d(channels)

    def forward(self, x):
        return torch.relu(self.b2(self.c2(torch.relu(self.b1(self.c1(x))))) + x)


@requires_cuda
@pytest.mark.cuda
def test_reduce_overhead_compile_over_an_optimized_model():
    model = randomize_batchnorm(_Block()).eval().to("cuda", torch.float16)
    compiled = torch.compile(fastcnn.optimize(model), mode="reduce-overhead")
    with torch.no_grad():
        for seed in range(3):
            x = random_tensor((1, 16, 28, 28), torch.float16, "cuda", channels_last=True, seed=seed)
            assert_logits_close(compiled(x).clone(), model(x), torch.float16)
