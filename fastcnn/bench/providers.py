"""What fastcnn-bench compares: each provider turns an eval-mode torchvision model into a callable
(building it may compile), so all of them are timed on the same weights and inputs."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

import fastcnn
from fastcnn.bench import peers
from fastcnn.bench.int8 import INT8_PROVIDERS, build_int8

PROVIDERS = {
    "eager": "torchvision's model, NCHW",
    "eager-cl": "torchvision's model, channels_last",
    "fastcnn": "fastcnn.optimize(model), channels_last, backend auto",
    "fastcnn-triton": "fastcnn.optimize(model, backend='triton'), channels_last",
    "fastcnn-cuda": "fastcnn.optimize(model, backend='cuda'), channels_last",
    "fastcnn-cpu": "fastcnn.optimize(model, backend='cpu'), channels_last",
    "compile": "torch.compile(model) with Inductor freezing, channels_last",
    "compile-max": "torch.compile(model, mode='max-autotune-no-cudagraphs') with freezing "
    "(compiles slowly; --cuda-graphs replays it from a graph, as it does fastcnn)",
    "jit": "torch.jit.freeze + optimize_for_inference of the traced model, channels_last",
    **peers.PEERS,  # fastcnn/bench/peers.py: NCHW in, each converts the layout itself
    **INT8_PROVIDERS,  # fastcnn/bench/int8.py: --precision int8
}


def channels_last(provider: str) -> bool:
    """Does provider take a channels_last input? (NCHW for eager and the fp32 peers.)"""
    return provider != "eager" and provider not in peers.PEERS


def make_model(name: str, dtype: torch.dtype, device: str) -> torch.nn.Module:
    """torchvision's `name` with random weights and randomized BatchNorm statistics (fresh BN
    would make folding trivially right), in eval mode. Nothing is downloaded."""
    try:
        import torchvision
    except ImportError as exc:
        raise SystemExit(
            "fastcnn-bench compares against torchvision's models: pip install "
            "torchvision (or pip install -e '.[test]')"
        ) from exc
    torch.manual_seed(0)
    extra = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    model = getattr(torchvision.models, name)(weights=None, **extra)
    return randomize_batchnorm(model).eval().to(device, dtype)


def source_model(provider: str, model: torch.nn.Module, name: str) -> torch.nn.Module:
    """The model `provider` is built from: the run's model (make_model's in the run's dtype),
    except for the OpenVINO and ONNX Runtime peers in a run that is not fp32: they take the fp32
    model, as their users convert it, and run the precision they are told (the same seeded
    weights, not rounded to the run's dtype first)."""
    fp32 = all(p.dtype == torch.float32 for p in model.parameters())
    if provider not in peers.PEERS or fp32:
        return model
    return make_model(name, torch.float32, next(model.parameters()).device.type)


def randomize_batchnorm(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """model with random BatchNorm running statistics (in place), so folding them matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


def fastcnn_backend(provider: str, device: str) -> str | None:
    """The backend a fastcnn-* provider pins (None for "fastcnn": auto). Raises RuntimeError
    with the reason when that backend cannot run `device` tensors here, so the provider is
    reported unavailable instead of failing at its first call."""
    backend = provider.partition("-")[2] or None
    if backend is not None:
        status = fastcnn._backend.backend_status(backend, device)
        if not status:
            raise RuntimeError(f"backend {backend!r} cannot run {device} tensors: {status.reason}")
    return backend


def build(provider: str, model: torch.nn.Module, example: torch.Tensor) -> Callable:
    """A callable for `provider` (see PROVIDERS); model is left unchanged."""
    if provider == "eager":
        return model
    if provider in peers.PEERS:
        return peers.build(provider, model)
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    if provider == "eager-cl":
        return cl
    if provider in INT8_PROVIDERS:
        return build_int8(provider, cl, example)
    if provider.startswith("fastcnn"):
        return fastcnn.optimize(cl, backend=fastcnn_backend(provider, example.device.type))
    if provider in ("compile", "compile-max"):
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
        torch._dynamo.reset()
        # max-autotune without Inductor's own CUDA graphs: fastcnn runs without one unless
        # --cuda-graphs wraps every provider alike
        mode = "max-autotune-no-cudagraphs" if provider == "compile-max" else None
        # dynamic=False: one static graph per batch size, as a deployment compiles it (the
        # default would recompile with dynamic shapes at the second batch size)
        return torch.compile(cl, mode=mode, dynamic=False)
    if provider == "jit":
        traced = torch.jit.trace(cl, example, check_trace=False)
        return torch.jit.optimize_for_inference(torch.jit.freeze(traced))
    raise ValueError(f"unknown provider {provider!r}; choose from {', '.join(PROVIDERS)}")
