"""Each 3x3 stride-1 conv shape of ResNet-50 and GoogLeNet, alone: Winograd F(4x4, 3x3)
(csrc/cpu/winograd_conv.cpp) against oneDNN's direct kernel, both through the extension's C++
call with a prepacked weight and a kept output (no Python op, no allocation), sampled
round-robin in one process; with each one's error against float64, relative to the outputs'
scale.

    python benchmarks/cpu_winograd_convs.py --out benchmarks/results/DIR/winograd_convs.json

ONEDNN_MAX_CPU_ISA=AVX2 in the environment limits oneDNN (the direct kernels and Winograd's
matmul) to AVX2, the nearest this AVX-512 machine comes to an AVX2-only CPU (the transforms stay
compiled for the build machine).
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

import torch

from fastcnn import _extension
from fastcnn.bench.results import ResultFile, time_samples

# (batch, channels in, channels out, size): ResNet-50's 3x3 stride-1 layers at batch 1 and 8
# (the 7x7 ones at batch 1 are left to the direct path by fastcnn.cpu.winograd), and GoogLeNet's
# widest ones (its second stem conv and the 3x3 branches of inception 3b, 4e and 5b)
SHAPES = [
    (1, 64, 64, 56), (1, 128, 128, 28), (1, 256, 256, 14),
    (8, 64, 64, 56), (8, 128, 128, 28), (8, 256, 256, 14), (8, 512, 512, 7),
    (1, 64, 192, 56), (1, 128, 192, 28), (1, 160, 320, 14), (8, 192, 384, 7),
]  # fmt: skip


def _measure(ext, batch: int, c_in: int, c_out: int, size: int, calls: int) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, c_in, size, size, generator=g)
    x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(c_out, c_in, 3, 3, generator=g) * (2.0 / (c_in * 9)) ** 0.5
    bias = torch.randn(c_out, generator=g) * 0.1
    expected = torch.nn.functional.conv2d(x.double(), weight.double(), bias.double(), 1, 1)
    scale = max(expected.abs().max().item(), 1.0)
    fns, errors = {}, {}
    for name, winograd in (("direct", False), ("winograd", True)):
        packed, layout = ext.onednn_conv_pack(weight, list(x.shape), [1, 1], [1, 1], 1, winograd)
        out = torch.empty_like(expected, dtype=torch.float32).contiguous(
            memory_format=torch.channels_last
        )

        def call(packed=packed, layout=layout, out=out):
            ext.onednn_conv(x, packed, layout, list(weight.shape), bias, None, out, [1, 1],
                            [1, 1], 1, False)  # fmt: skip

        call()
        errors[name] = (out.double() - expected).abs().max().item() / scale
        fns[name] = call
    times = time_samples(fns, calls)
    direct, winograd = statistics.median(times["direct"]), statistics.median(times["winograd"])
    return {"batch": batch, "c_in": c_in, "c_out": c_out, "size": size, "direct_ms": direct,
            "winograd_ms": winograd, "speedup": direct / winograd,
            "direct_error": errors["direct"], "winograd_error": errors["winograd"]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20, help="timed calls of each, alternating")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("winograd_convs.json"))
    args = parser.parse_args()
    ext = _extension.load()
    if ext is None or not hasattr(ext, "onednn_conv"):
        raise SystemExit("the extension was built without the oneDNN library: no Winograd here")
    torch.set_num_threads(args.threads)
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "all")
    results = ResultFile(
        args.out,
        "winograd_convs",
        "Winograd F(4x4, 3x3) / oneDNN direct, each 3x3 conv alone",
        f"float32, channels_last, bias, no ReLU, {args.threads} threads, oneDNN ISA limit: {isa}; "
        f"medians of {args.calls} calls of each, alternating; errors: max |y - y64| / max |y64|",
    )
    for shape in SHAPES:
        row = _measure(ext, *shape, args.calls)
        results.add(row)
        print(f"{shape}: direct {row['direct_ms']:.3f} ms, winograd {row['winograd_ms']:.3f} ms, "
              f"{row['speedup']:.2f}x, errors {row['direct_error']:.1e} / "
              f"{row['winograd_error']:.1e}", flush=True)  # fmt: skip
    print(results.finish())


if __name__ == "__main__":
    main()
