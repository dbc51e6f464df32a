"""Whole models on a GPU: torchvision's eager model vs fastcnn.optimize(model) on each fused
backend, channels_last, as images per second, per batch size and dtype.

Weights are random with randomized BatchNorm statistics (nothing is downloaded); each optimized
model's logits are checked against eager before it is timed. Triton convs use the heuristic
config (FASTCNN_TRITON_AUTOTUNE=0 unless set): autotuning every layer at every batch size would
take longer than the GPU check has; bench_conv.py reports the autotuned per-layer speeds.

    python benchmarks/bench_models.py --out benchmarks/results/DIR/models.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("FASTCNN_TRITON_AUTOTUNE", "0")

import torch
import torchvision
from bench_common import environment, machine, time_ms, write_results

import fastcnn

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def make_model(name: str, dtype: torch.dtype, device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    extra = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    model = getattr(torchvision.models, name)(weights=None, **extra)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval().to(device, dtype).to(memory_format=torch.channels_last)


def fused_backends(device: str) -> list[str]:
    candidates = ("triton", "cuda") if device == "cuda" else ("cpu", "triton")
    return [b for b in candidates if fastcnn._backend.backend_status(b, device)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50,googlenet")
    parser.add_argument("--batches", default="1,32,256")
    parser.add_argument("--dtypes", default="float16,bfloat16")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--max-seconds", type=float, default=300)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_models: --device cuda needs a CUDA GPU (or pass --device cpu)")
    start = time.perf_counter()
    rows = []
    for dtype_name in args.dtypes.split(","):
        dtype = DTYPES[dtype_name]
        for name in args.models.split(","):
            eager = make_model(name, dtype, args.device)
            variants = {"eager": eager}
            for backend in fused_backends(args.device):
                variants[f"fastcnn-{backend}"] = fastcnn.optimize(eager, backend=backend)
            for batch in map(int, args.batches.split(",")):
                if time.perf_counter() - start > args.max_seconds:
                    print("bench_models: time budget spent, stopping")
                    break
                x = torch.randn(batch, 3, args.size, args.size, device=args.device).to(dtype)
                x = x.contiguous(memory_format=torch.channels_last)
                with torch.inference_mode():
                    expected = eager(x).float()
                    base = None
                    for provider, model in variants.items():
                        try:
                            got = model(x).float()
                        except RuntimeError as exc:  # e.g. a backend without a conv kernel
                            print(f"{name} {provider}: skipped ({exc})")
                            continue
                        err = (got - expected).abs().max().item()
                        scale = max(1.0, expected.abs().max().item())
                        ok = err <= 0.05 * scale
                        ms = time_ms(lambda m=model, x=x: m(x), args.iters, warmup=3)
                        base = ms if provider == "eager" else base
                        rows.append(
                            {
                                "model": name,
                                "dtype": dtype_name,
                                "batch": batch,
                                "provider": provider,
                                "ms": ms,
                                "img/s": batch / ms * 1e3,
                                "speedup": base / ms if base else None,
                                "max_rel_error": err / scale,
                                "matches_eager": ok,
                            }
                        )
                        print(f"{name} {dtype_name} b{batch} {provider}: {ms:.3f} ms", flush=True)
    env = environment()
    table = write_results(
        args.out,
        "models",
        rows,
        env,
        f"models on {machine(env, args.device)}",
        f"channels_last, inference_mode, {args.size}x{args.size}; median of {args.iters} calls; "
        "speedup vs eager torchvision; Triton with heuristic configs (no autotuning)",
        [
            ("model", "{model}"),
            ("dtype", "{dtype}"),
            ("batch", "{batch}"),
            ("provider", "{provider}"),
            ("ms", "{ms:.3f}"),
            ("img/s", "{img/s:.0f}"),
            ("vs eager", "{speedup:.2f}x"),
            ("rel. error", "{max_rel_error:.1e}"),
            ("ok", "{matches_eager}"),
        ],
    )
    print(table)


if __name__ == "__main__":
    main()
