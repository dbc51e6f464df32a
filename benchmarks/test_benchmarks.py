"""pytest-benchmark suites (not in the default test run):

    python -m pytest benchmarks/test_benchmarks.py --benchmark-only [--benchmark-json FILE]

Op level (add_relu, conv_bn_act at ResNet-50 sizes, GoogLeNet's Inception 4a block) and model
level (resnet18, resnet50, resnet101, googlenet) for each provider of fastcnn-bench that runs on
this device. Every timed
call synchronizes the GPU, so the wall time is the kernel time plus launch overhead.
"""

from __future__ import annotations

import pytest
import torch

from fastcnn.bench import providers
from fastcnn.bench.ops import OPS, op_workload

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.float16 if DEVICE == "cuda" else torch.float32
OP_PROVIDERS = ["eager", "fastcnn"]
MODEL_PROVIDERS = ["eager", "eager-cl", "fastcnn"] + (["compile"] if DEVICE == "cuda" else [])


def _synced(fn, x):
    if DEVICE == "cuda":
        return lambda: (fn(x), torch.cuda.synchronize())
    return lambda: fn(x)


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("provider", OP_PROVIDERS)
@pytest.mark.parametrize("op", OPS)
def test_op(benchmark, op, provider, batch):
    _, built, make_input, _ = op_workload(op, [provider], DTYPE, DEVICE, torch.float64)
    with torch.inference_mode():
        benchmark(_synced(built[provider], make_input(batch, provider)))


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("provider", MODEL_PROVIDERS)
@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnet101", "googlenet"])
def test_model(benchmark, name, provider, batch):
    model = providers.make_model(name, DTYPE, DEVICE)
    x = torch.randn(batch, 3, 224, 224, device=DEVICE, dtype=DTYPE)
    if providers.channels_last(provider):
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        fn = providers.build(provider, model, x[:1])
        benchmark.pedantic(_synced(fn, x), rounds=5, warmup_rounds=2)
