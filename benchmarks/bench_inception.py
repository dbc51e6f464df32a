"""GoogLeNet's Inception blocks on a GPU: fastcnn.nn.FusedInception vs torchvision's eager block
vs the same block under torch.compile, each of the nine configurations at --batch (128),
channels_last, --dtype (float16).

Random weights with randomized BN statistics; each provider's output is checked against eager
before it is timed. torch.compile compiles each block once (it is slow: the budget
--max-seconds stops adding blocks, and the table says how many were measured).

    python benchmarks/bench_inception.py --out benchmarks/results/DIR/inception.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torchvision.models.googlenet import Inception

import fastcnn
from fastcnn.bench.providers import randomize_batchnorm
from fastcnn.bench.results import ResultFile, time_interleaved
from fastcnn.models.googlenet import INCEPTION_CONFIGS as CONFIGS

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def make_block(config, dtype, device) -> torch.nn.Module:
    torch.manual_seed(0)
    block = randomize_batchnorm(Inception(*config))
    return block.eval().to(device, dtype).to(memory_format=torch.channels_last)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--dtype", default="float16", choices=list(DTYPES))
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--max-seconds", type=float, default=300)
    parser.add_argument("--limit", type=int, help="measure only the first N blocks")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_inception: --device cuda needs a CUDA GPU (or pass --device cpu)")
    dtype = DTYPES[args.dtype]
    results = ResultFile(
        args.out,
        "inception",
        "Inception blocks",
        f"batch {args.batch}, {args.dtype}, channels_last, inference_mode; median of "
        f"{args.iters} calls, providers interleaved; speedup vs torchvision's eager block; "
        "fastcnn = the auto backend (Triton on a GPU), fastcnn-cuda = the extension's",
        device=args.device,
    )
    start = time.perf_counter()
    stopped = "yes"
    for name, (config, size) in list(CONFIGS.items())[: args.limit]:
        if time.perf_counter() - start > args.max_seconds:
            stopped = f"no: --max-seconds spent before block {name}"
            print(f"bench_inception: time budget spent before block {name}")
            break
        block = make_block(config, dtype, args.device)
        x = torch.randn(args.batch, config[0], size, size, device=args.device).to(dtype)
        x = x.contiguous(memory_format=torch.channels_last)
        fused = fastcnn.nn.FusedInception.from_module
        providers = {"eager": block, "fastcnn": fused(block)}  # the auto backend
        if args.device == "cuda":  # the extension's block beside Triton's
            providers["fastcnn-cuda"] = fused(block, backend="cuda")
        if not args.no_compile:
            providers["compile"] = torch.compile(block)
        with torch.inference_mode():
            expected = block(x).float()
            scale = max(1.0, expected.abs().max().item())
            errors = {
                p: (fn(x).float() - expected).abs().max().item() for p, fn in providers.items()
            }
            # timed round-robin, call by call, so clock drift weighs on all providers alike
            times = time_interleaved(
                {p: (lambda f=fn, x=x: f(x)) for p, fn in providers.items()}, args.iters
            )
            for provider, ms in times.items():
                results.add(
                    {
                        "block": name,
                        "provider": provider,
                        "ms": ms,
                        "speedup": times["eager"] / ms,
                        "max_rel_error": errors[provider] / scale,
                    }
                )
                print(f"{name} {provider}: {ms:.3f} ms", flush=True)
    print(results.finish(stopped))


if __name__ == "__main__":
    main()
