"""add_relu: fastcnn vs eager ``torch.relu(x + r)``, as GB/s and a ratio measured in one run.

Shapes are ResNet-50's residual activations (batch 256 by default), channels_last. Providers: on
CUDA the triton and cuda backends, on CPU the extension's cpu backend. Each provider's output is
checked against eager before it is timed. Times are medians over --iters calls after a warm-up,
the providers called in turn (CUDA events on a GPU, perf_counter on the CPU). Writes a JSON
file (environment + every measurement) and a Markdown table beside it, and prints the table.

    python benchmarks/bench_add_relu.py --out benchmarks/results/DIR/add_relu.json
    python benchmarks/bench_add_relu.py --device cpu --batch 8 --dtypes float32 --out /tmp/a.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import fastcnn
from fastcnn.bench.results import ResultFile, time_interleaved

SHAPES = [(256, 256, 56, 56), (256, 512, 28, 28), (256, 1024, 14, 14), (256, 2048, 7, 7)]
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def providers(x, r):
    # Both allocate their result, as a model's forward does: like for like.
    def eager():
        return torch.relu(x + r)

    def fused(backend):
        def run():
            with fastcnn.use_backend(backend):
                return fastcnn.ops.add_relu(x, r)

        return run

    found = {"eager": eager}
    for backend in ("triton", "cuda") if x.is_cuda else ("cpu",):
        if fastcnn._backend.backend_status(backend, x.device.type):
            found[f"fastcnn-{backend}"] = fused(backend)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dtypes", default="float16,bfloat16,float32")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--out", type=Path, required=True, help="JSON result file to write")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_add_relu: --device cuda needs a CUDA GPU (or pass --device cpu)")
    results = ResultFile(
        args.out,
        "add_relu",
        "add_relu",
        f"channels_last; median of {args.iters} calls, providers interleaved; "
        "eager = torch.relu(x + r)",
        device=args.device,
    )
    for dtype_name in args.dtypes.split(","):
        dtype = DTYPES[dtype_name]
        for shape in SHAPES:
            shape = (args.batch, *shape[1:])
            g = torch.Generator(device=args.device).manual_seed(0)
            x = torch.randn(shape, device=args.device, generator=g).to(dtype)
            x = x.to(memory_format=torch.channels_last)
            r = torch.randn(shape, device=args.device, generator=g).to(dtype)
            r = r.to(memory_format=torch.channels_last)
            expected = torch.relu(x + r)
            moved = 3 * x.numel() * x.element_size()  # read x, read r, write out
            fns = providers(x, r)
            for fn in fns.values():
                torch.testing.assert_close(fn(), expected, rtol=0, atol=0)
            times = time_interleaved(fns, args.iters, warmup=10)  # round-robin, call by call
            for name, ms in times.items():
                results.add(
                    {
                        "dtype": dtype_name,
                        "shape": list(shape),
                        "shape_str": "x".join(map(str, shape)),
                        "provider": name,
                        "ms": ms,
                        "GB/s": moved / ms / 1e6,
                        "speedup_vs_eager": times["eager"] / ms,
                    }
                )
            del x, r, expected
    print(results.finish())


if __name__ == "__main__":
    main()
