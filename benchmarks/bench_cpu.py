"""Whole models on the CPU: fastcnn vs every CPU peer, all measured in one run.

Providers (fp32 unless --dtype, channels_last, torch.inference_mode, --threads threads):
  eager      torchvision's model, channels_last
  jit        torch.jit.freeze + torch.jit.optimize_for_inference (traced)
  inductor   torch.compile with Inductor's freezing (torch._inductor.config.freezing = True)
  fastcnn    fastcnn.optimize(model) on the "cpu" backend: oneDNN conv + bias (+ residual) + ReLU
             primitives with prepacked weights
Random weights with randomized BN statistics; each provider's logits are checked against eager
before timing. Compile times are reported separately and not counted in the timings.

    python benchmarks/bench_cpu.py --out benchmarks/results/cpu-DATE/cpu.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import fastcnn
from fastcnn.bench import providers
from fastcnn.bench.results import environment, machine, time_ms, write_results

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def make_model(name: str, dtype: torch.dtype) -> torch.nn.Module:
    return providers.make_model(name, dtype, "cpu").to(memory_format=torch.channels_last)


def build(provider: str, model: torch.nn.Module, x: torch.Tensor):
    if provider == "eager":
        return model
    if provider == "jit":
        traced = torch.jit.trace(model, x, check_trace=False)
        return torch.jit.optimize_for_inference(torch.jit.freeze(traced))
    if provider == "inductor":
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
        torch._dynamo.reset()
        return torch.compile(model)
    if provider == "fastcnn":
        return fastcnn.optimize(model, backend="cpu")
    raise ValueError(f"unknown provider {provider!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50,googlenet")
    parser.add_argument("--providers", default="eager,jit,inductor,fastcnn")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    rows = []
    for name in args.models.split(","):
        model = make_model(name, dtype)
        x = torch.randn(args.batch, 3, args.size, args.size).to(dtype)
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            expected = model(x).float()
            base = None
            for provider in args.providers.split(","):
                start = time.perf_counter()
                fn = build(provider, model, x)
                got = fn(x).float()  # the first call compiles / packs
                setup_s = time.perf_counter() - start
                err = (got - expected).abs().max().item() / max(1.0, expected.abs().max().item())
                ms = time_ms(lambda f=fn, x=x: f(x), args.iters, warmup=2)
                base = ms if provider == "eager" else base
                rows.append(
                    {
                        "model": name,
                        "provider": provider,
                        "ms": ms,
                        "img/s": args.batch / ms * 1e3,
                        "speedup": base / ms,
                        "setup_s": setup_s,
                        "max_rel_error": err,
                    }
                )
                print(f"{name} {provider}: {ms:.1f} ms (setup {setup_s:.1f} s)", flush=True)
        best_peer = min(r["ms"] for r in rows if r["model"] == name and r["provider"] != "fastcnn")
        for r in rows:
            if r["model"] == name and r["provider"] == "fastcnn":
                r["vs_best_peer"] = best_peer / r["ms"]
    env = environment()
    table = write_results(
        args.out,
        "cpu",
        rows,
        env,
        f"models on {machine(env, 'cpu')}",
        f"batch {args.batch}, {args.size}x{args.size}, {args.dtype}, channels_last, "
        f"inference_mode, {args.threads} threads; median of {args.iters} calls after warm-up; "
        "speedup vs eager; vs best peer = best of eager/jit/inductor ms / fastcnn ms",
    )
    print(table)


if __name__ == "__main__":
    main()
