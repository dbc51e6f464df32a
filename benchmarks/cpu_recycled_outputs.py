"""Recycled outputs (fastcnn.ops._alloc.Recycled) against a fresh output per call, in one
process: the same optimized model, calls alternating between the two, so a drifting machine
weighs on both alike. "fresh" replaces Recycled.get by a plain allocation for its calls.

    python benchmarks/cpu_recycled_outputs.py --out benchmarks/results/DIR/recycled_outputs.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import fastcnn
from fastcnn.bench.measure import model_input
from fastcnn.bench.providers import make_model
from fastcnn.bench.results import ResultFile
from fastcnn.ops import _alloc


def _ab(model_name: str, batch: int, calls: int) -> dict:
    model = make_model(model_name, torch.float32, "cpu")
    x = model_input(batch, "fastcnn", 224, torch.float32, "cpu")
    fused = fastcnn.optimize(model.to(memory_format=torch.channels_last))
    recycled_get, recycle = _alloc.Recycled.get, [True]

    def get(self, like):
        if recycle[0]:
            return recycled_get(self, like)
        return _alloc.empty_strided(self.shape, self.strides, like)

    _alloc.Recycled.get = get
    try:
        times: dict[bool, list[float]] = {True: [], False: []}
        with torch.inference_mode():
            for _ in range(3):
                fused(x)
            for _ in range(calls):
                for on in (False, True):
                    recycle[0] = on
                    start = time.perf_counter()
                    fused(x)
                    times[on].append((time.perf_counter() - start) * 1e3)
    finally:
        _alloc.Recycled.get = recycled_get
    fresh, recycled = statistics.median(times[False]), statistics.median(times[True])
    return {"model": model_name, "batch": batch, "fresh_ms": fresh, "recycled_ms": recycled,
            "speedup": fresh / recycled}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50,googlenet")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--calls", type=int, default=12, help="timed calls of each, alternating")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("recycled_outputs.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = ResultFile(
        args.out,
        "recycled_outputs",
        "Recycled against fresh outputs, fastcnn's cpu path",
        f"float32, 224x224, {args.threads} threads, inference_mode; medians of {args.calls} "
        "calls of each, alternating in one process",
    )
    for model in args.models.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            row = _ab(model, batch, args.calls)
            results.add(row)
            print(f"{model} b{batch}: fresh {row['fresh_ms']:.2f} ms, recycled "
                  f"{row['recycled_ms']:.2f} ms, {row['speedup']:.3f}x", flush=True)  # fmt: skip
    print(results.finish())


if __name__ == "__main__":
    main()
