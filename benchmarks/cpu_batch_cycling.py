"""A server's view of one optimized model on the CPU: every batch size from 1 to --top in turn,
as a dynamic batcher sends them. Per model, in a process of its own:

- memory: resident memory after one warm call at batch 1, and after every batch size has been
  served, against the model's fp32 weights; fastcnn's packs (fastcnn.cache_info) beside them;
- speed: each batch size timed when repeated (steady: the same size as the call before) and
  when the sizes cycle (each call a different size than the one before, second pass through
  them), both as ms per image over all sizes, and their ratio: above 1 means cycling rebuilds
  something on each call.

    python benchmarks/cpu_batch_cycling.py --out benchmarks/results/DIR/batch_cycling.json
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(model_name: str, provider: str, top: int, size: int, repeats: int) -> dict:
    """One model, in this process: fastcnn.optimize's, or the plain model (eager, the baseline
    a user would otherwise serve)."""
    import torch

    import fastcnn
    from fastcnn.bench.measure import model_input
    from fastcnn.bench.providers import make_model

    model = make_model(model_name, torch.float32, "cpu")
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    model = model.to(memory_format=torch.channels_last)
    fast = fastcnn.optimize(model) if provider == "fastcnn" else model
    inputs = {b: model_input(b, "fastcnn", size, torch.float32, "cpu") for b in range(1, top + 1)}
    with torch.inference_mode():
        fast(inputs[1])
        fast(inputs[1])
        rss_warm = _rss_mb()
        steady = {}
        for b, x in inputs.items():
            fast(x)  # plans, packs, chooses
            start = time.perf_counter()
            for _ in range(repeats):
                fast(x)
            steady[b] = (time.perf_counter() - start) / repeats
        cycle = dict.fromkeys(inputs, 0.0)
        for _ in range(repeats):
            for b, x in inputs.items():
                start = time.perf_counter()
                fast(x)
                cycle[b] += (time.perf_counter() - start) / repeats
        rss_all = _rss_mb()
    images = sum(inputs)
    info = fastcnn.cache_info(fast)
    return {
        "model": model_name,
        "provider": provider,
        "batches": f"1..{top}",
        "weights_mb": weights,
        "rss_growth_mb": rss_all - rss_warm,
        "rss_growth_x": (rss_all - rss_warm) / weights,
        "packs_mb": info.packs / 2**20,
        "packs_x": info.packs / 2**20 / weights,
        "outputs_mb": info.outputs / 2**20,
        "budget_mb": info.budget / 2**20,
        "steady_ms_per_image": 1e3 * sum(steady.values()) / images,
        "cycling_ms_per_image": 1e3 * sum(cycle.values()) / images,
        "cycling_vs_steady": sum(cycle.values()) / sum(steady.values()),
        "steady_ms": {str(b): 1e3 * t for b, t in steady.items()},
        "cycling_ms": {str(b): 1e3 * t for b, t in cycle.items()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50,googlenet")
    parser.add_argument(
        "--providers", default="eager,fastcnn", help="eager: the plain model (channels_last)"
    )
    parser.add_argument("--top", type=int, default=32, help="the largest batch size")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # one model, printed as JSON
    args = parser.parse_args()
    if args.worker:
        import json

        import torch

        torch.set_num_threads(args.threads)
        model_name, provider = args.worker.split(":")
        print(json.dumps(measure(model_name, provider, args.top, args.size, args.repeats)))
        return 0
    import json

    from fastcnn.bench.results import ResultFile

    notes = (
        f"fp32, {args.size}x{args.size}, channels_last, {args.threads} threads, "
        f"inference_mode, fastcnn.optimize (cpu) or the plain model (eager), each model and "
        f"provider in a process of its own; "
        f"{args.repeats} timed calls per size"
    )
    # what else decides resident memory: the kept-output budget and glibc's malloc tunables
    named = ("MALLOC_", "GLIBC_TUNABLES", "FASTCNN_CACHE_BUDGET")
    tunables = sorted(f"{k}={v}" for k, v in os.environ.items() if k.startswith(named))
    if tunables:
        notes += "; " + ", ".join(tunables)
    results = ResultFile(args.out, "batch_cycling", "Every batch size in turn", notes)
    for name in args.models.split(","):
        eager = None  # the plain model's row, the baseline of fastcnn's memory growth
        for provider in args.providers.split(","):
            if provider not in ("eager", "fastcnn"):
                parser.error(f"--providers: eager or fastcnn, got {provider!r}")
            command = [sys.executable, __file__, "--worker", f"{name}:{provider}",
                       "--top", str(args.top), "--size", str(args.size),
                       "--repeats", str(args.repeats), "--threads", str(args.threads),
                       "--out", str(args.out)]  # fmt: skip
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            row = json.loads(done.stdout.strip().splitlines()[-1])
            if provider == "eager":
                eager = row
            elif eager is not None:
                row["rss_vs_eager"] = row["rss_growth_mb"] / eager["rss_growth_mb"]
            results.add(row)
    print(results.finish())
    return 0


if __name__ == "__main__":
    sys.exit(main())
