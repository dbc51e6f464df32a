"""Single-op workloads for fastcnn-bench --op: a ResNet-50-sized call of each fused op against
its eager PyTorch sequence."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

import fastcnn

# (channels, height, width) of the activation each op is timed on: ResNet-50's layer1.
_SHAPES = {"add_relu": (256, 56, 56), "conv_bn_act": (64, 56, 56)}


def _eager(op: str, params):
    if op == "add_relu":
        return lambda x: torch.relu(x + params["residual"](x))
    w, mean, var, gamma, beta = params["conv"]
    return lambda x: F.relu(
        F.batch_norm(F.conv2d(x, w, None, 1, 1), mean, var, gamma, beta, False, 0.0, 1e-5)
    )


def _fused(op: str, params, backend: str | None):
    def run(x):
        with fastcnn.use_backend(backend or "auto"):
            if op == "add_relu":
                return fastcnn.ops.add_relu(x, params["residual"](x))
            return fastcnn.ops.conv_bn_act(x, params["weight"], params["bias"], 1, 1)

    return run


def op_workload(op: str, providers: list[str], dtype: torch.dtype, device: str):
    channels, h, w = _SHAPES[op]
    g = torch.Generator().manual_seed(0)
    params: dict = {}

    @functools.cache
    def residual_for(shape):
        return (
            torch.randn(shape, generator=g)
            .to(device, dtype)
            .contiguous(memory_format=torch.channels_last)
        )

    params["residual"] = lambda x: residual_for(tuple(x.shape))
    if op == "conv_bn_act":
        conv = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        bn = torch.nn.BatchNorm2d(channels).eval()
        with torch.no_grad():
            bn.running_mean.normal_(0, 0.1)
            bn.running_var.uniform_(0.5, 1.5)
        conv, bn = conv.to(device, dtype), bn.to(device, dtype)
        weight, bias = fastcnn.fold_bn(conv, bn)
        params["weight"] = weight.contiguous(memory_format=torch.channels_last)
        params["bias"] = bias
        params["conv"] = (
            conv.weight.detach(),
            bn.running_mean,
            bn.running_var,
            bn.weight.detach(),
            bn.bias.detach(),
        )
    built = {}
    for provider in providers:
        if provider in ("eager", "eager-cl"):
            built[provider] = _eager(op, params)
        elif provider.startswith("fastcnn"):
            built[provider] = _fused(op, params, provider.partition("-")[2] or None)
        elif provider.startswith("compile"):
            built[provider] = torch.compile(_eager(op, params))
        else:
            built[provider] = ValueError(f"{provider} has no single-op form")

    @functools.cache
    def input_for(batch):  # the same input for every provider
        x = torch.randn(batch, channels, h, w, generator=g).to(device, dtype)
        return x.contiguous(memory_format=torch.channels_last)

    def make_input(batch, provider):
        return input_for(batch)

    return op, built, make_input
