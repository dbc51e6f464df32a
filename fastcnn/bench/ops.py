"""Single-op workloads for fastcnn-bench --op: each fused op at a real network size against the
eager PyTorch it replaces.

conv_bn_act and inception are small eval-mode modules (a Conv2d -> BatchNorm2d -> ReLU of
ResNet-50's layer1; GoogLeNet's Inception 4a block) built by the same providers as the models,
so eager, eager-cl, fastcnn-*, compile and jit all apply. add_relu takes two inputs and is no
module: its providers are eager relu(x + r) and fastcnn.ops.add_relu on each backend.
"""

from __future__ import annotations

import functools

import torch

import fastcnn
from fastcnn.bench import providers as model_providers

OPS = ["add_relu", "conv_bn_act", "inception"]
# (channels, height, width) of each op's input.
_SHAPES = {"add_relu": (256, 56, 56), "conv_bn_act": (64, 56, 56), "inception": (480, 14, 14)}


def _module(op: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if op == "conv_bn_act":
        channels = _SHAPES[op][0]
        module = torch.nn.Sequential(
            torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            torch.nn.BatchNorm2d(channels),
            torch.nn.ReLU(),
        )
    else:
        from torchvision.models.googlenet import Inception

        module = Inception(480, 192, 96, 208, 16, 48, 64)  # GoogLeNet's inception4a
    return model_providers.randomize_batchnorm(module).eval()


def _add_relu_providers(provider_list, residual_for, device: str) -> dict:
    def eager(x):
        return torch.relu(x + residual_for(x))

    def fused(backend):
        def run(x):
            with fastcnn.use_backend(backend):
                return fastcnn.ops.add_relu(x, residual_for(x))

        return run

    built = {}
    for provider in provider_list:
        if provider in ("eager", "eager-cl"):
            built[provider] = eager
        elif provider.startswith("fastcnn"):
            try:
                backend = model_providers.fastcnn_backend(provider, device) or "auto"
            except RuntimeError as exc:
                built[provider] = exc
                continue
            built[provider] = fused(backend)
        elif provider.startswith("compile"):
            built[provider] = torch.compile(eager)
        else:
            built[provider] = ValueError(f"{provider} has no form for add_relu")
    return built


def op_workload(
    op: str, provider_list: list[str], dtype: torch.dtype, device: str, precise: torch.dtype
):
    """(op, {provider: a callable, or the exception that prevented one}, make_input(batch,
    provider), reference(x): the op in the `precise` dtype)."""
    channels, h, w = _SHAPES[op]
    g = torch.Generator().manual_seed(0)

    @functools.cache
    def input_for(batch):  # the same input for every provider (copied to NCHW for "eager")
        x = torch.randn(batch, channels, h, w, generator=g).to(device, dtype)
        return x.contiguous(memory_format=torch.channels_last)

    def make_input(batch, provider):
        x = input_for(batch)
        return x if model_providers.channels_last(provider) else x.contiguous()

    if op == "add_relu":

        @functools.cache
        def residual(shape):
            r = torch.randn(shape, generator=g).to(device, dtype)
            return r.contiguous(memory_format=torch.channels_last)

        def residual_for(x):
            return residual(tuple(x.shape))

        def reference(x):
            return torch.relu(x.to(precise) + residual_for(x).to(precise))

        return op, _add_relu_providers(provider_list, residual_for, device), make_input, reference
    module = _module(op).to(device, dtype)
    precise_module = _module(op).to(device, dtype).to(precise)  # the same rounded weights
    example = make_input(1, "eager-cl")
    built = {}
    for provider in provider_list:
        try:
            built[provider] = model_providers.build(provider, module, example)
        except Exception as exc:  # e.g. a backend that cannot run here: report, go on
            built[provider] = exc
    return op, built, make_input, lambda x: precise_module(x.to(precise))
