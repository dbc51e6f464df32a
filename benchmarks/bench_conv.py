"""conv + BN + ReLU on a GPU: fastcnn vs the eager sequence, per distinct conv of ResNet-50 and
GoogLeNet, and the 1x1 convs vs torch.matmul (cuBLAS) on the same GEMM.

Each layer runs at --batch (256 by default), channels_last, --dtype (float16). Providers:
  eager        conv2d -> batch_norm (eval) -> relu, plus -> add -> relu where ResNet adds the
               shortcut (the bottleneck's last 1x1): what torch runs without fastcnn
  fastcnn      fastcnn.ops.conv_bn_act with the folded weights (backend auto: triton)
  fastcnn-cuda the same on the extension's backend (cuBLASLt for 1x1, cuDNN + epilogue), GPU only
  cublas       1x1 only: torch.matmul of the [M, Cin] x [Cin, Cout] GEMM, the bar for the GEMM
The layer list comes from torchvision's models (built on the meta device, so nothing is
downloaded); each fastcnn output is checked against eager before it is timed.

    python benchmarks/bench_conv.py --out benchmarks/results/DIR/conv.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import fastcnn
from fastcnn.bench.results import ResultFile, time_interleaved

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def distinct_convs(model_names: list[str]) -> list[dict]:
    """Each distinct (Cin, Cout, k, stride, padding, H, W) conv of the models, with the first
    layer name that has it and whether ResNet adds a shortcut after it (with its ReLU)."""
    import torchvision

    found: dict[tuple, dict] = {}
    for model_name in model_names:
        kwargs = {"aux_logits": False, "init_weights": False} if model_name == "googlenet" else {}
        with torch.device("meta"):
            model = getattr(torchvision.models, model_name)(weights=None, **kwargs).eval()
        hooks = []
        for name, module in model.named_modules():
            if isinstance(module, nn.Conv2d):

                def hook(mod, inputs, output, name=name, model_name=model_name):
                    _, cin, h, w = inputs[0].shape
                    key = (
                        cin,
                        mod.out_channels,
                        mod.kernel_size[0],
                        mod.stride[0],
                        mod.padding[0],
                        h,
                        w,
                    )
                    residual = model_name.startswith("resnet") and name.endswith("conv3")
                    entry = found.setdefault(
                        key, {"layer": f"{model_name}.{name}", "key": key, "residual": False}
                    )
                    entry["residual"] |= residual

                hooks.append(module.register_forward_hook(hook))
        with torch.no_grad():
            model(torch.empty(1, 3, 224, 224, device="meta"))
        for h in hooks:
            h.remove()
    return list(found.values())


def bench_layer(
    entry: dict, batch: int, dtype: torch.dtype, iters: int, dev: str, record_only: bool = False
) -> list[dict]:
    """The rows of one layer; record_only: build it and make one fastcnn call (under
    fastcnn.triton.precompile.recording, that lists its kernels), measure nothing."""
    cin, cout, k, stride, pad, h, w = entry["key"]
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(batch, cin, h, w, device=dev, generator=g).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    conv_w = torch.randn(cout, cin, k, k, device=dev, generator=g) * (2 / (cin * k * k)) ** 0.5
    conv_w = conv_w.to(dtype).contiguous(memory_format=torch.channels_last)
    mean = torch.randn(cout, device=dev, generator=g).to(dtype) * 0.1
    var = torch.rand(cout, device=dev, generator=g).to(dtype) + 0.5
    gamma, beta = torch.ones_like(mean), torch.zeros_like(mean)
    conv = nn.Conv2d(cin, cout, k, stride, pad, bias=False).to(dev, dtype)
    bn = nn.BatchNorm2d(cout).to(dev, dtype).eval()
    with torch.no_grad():
        conv.weight.copy_(conv_w)
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
    fused = fastcnn.nn.ConvBNAct.from_modules(conv, bn, nn.ReLU())
    # the extension's path (cuBLASLt / cuDNN + epilogue) beside Triton's, on a GPU
    extension = fastcnn.nn.ConvBNAct.from_modules(conv, bn, nn.ReLU(), backend="cuda")
    ho = (h + 2 * pad - k) // stride + 1
    wo = (w + 2 * pad - k) // stride + 1
    res = None
    if entry["residual"]:
        res = torch.randn(batch, cout, ho, wo, device=dev, generator=g).to(dtype)
        res = res.contiguous(memory_format=torch.channels_last)

    def eager():
        y = F.conv2d(x, conv_w, None, stride, pad)
        y = F.batch_norm(y, mean, var, gamma, beta, training=False, eps=bn.eps)
        return F.relu(y + res) if res is not None else F.relu(y)

    def fast():
        return fused(x, residual=res)

    if record_only:
        with torch.no_grad():
            fast()
        return []

    flops = 2 * batch * ho * wo * cout * cin * k * k
    providers = {"eager": eager, "fastcnn": fast}
    if dev == "cuda":
        providers["fastcnn-cuda"] = lambda: extension(x, residual=res)
    if k == 1:  # the bar for a 1x1 conv: cuBLAS on the same GEMM, no epilogue
        a = torch.randn(batch * ho * wo, cin, device=dev, generator=g).to(dtype)
        b = conv_w.reshape(cout, cin).t()
        providers["cublas"] = lambda: torch.matmul(a, b)
    common = {
        "layer": entry["layer"],
        "shape": f"{cin}->{cout} k{k}s{stride} {h}x{w}",
        "residual": res is not None,
    }
    with torch.no_grad():
        expected = eager()
        for name, fn in providers.items():
            if name.startswith("fastcnn"):
                torch.testing.assert_close(fn(), expected, rtol=2e-2, atol=2e-2)
        times = time_interleaved(providers, iters)  # round-robin: drift weighs on all alike
    rows = []
    for name, ms in times.items():
        row = {**common, "provider": name, "ms": ms, "TFLOP/s": flops / ms / 1e9}
        if name.startswith("fastcnn"):
            row["speedup"] = times["eager"] / ms
        if name == "cublas":
            row["fastcnn_vs_cublas"] = ms / times["fastcnn"]
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50,googlenet")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dtype", default="float16", choices=list(DTYPES))
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--max-seconds", type=float, default=300, help="stop adding layers after")
    parser.add_argument("--limit", type=int, help="measure only the first N distinct layers")
    parser.add_argument(
        "--precompile",
        type=int,
        default=0,
        metavar="N",
        help="GPU: compile the Triton kernels (every autotune config) of the next N layers on "
        "every core at once before measuring them",
    )
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--out", type=Path, required=True, help="JSON result file to write")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_conv: --device cuda needs a CUDA GPU (or pass --device cpu)")
    results = ResultFile(
        args.out,
        "conv",
        "conv+BN+ReLU",
        f"batch {args.batch}, {args.dtype}, channels_last; median of {args.iters} calls; "
        "speedup = eager ms / fastcnn ms; fastcnn_vs_cublas = cuBLAS ms / fastcnn ms (1x1 only)",
        device=args.device,
    )
    start = time.perf_counter()
    layers = distinct_convs(args.models.split(","))[: args.limit]
    stopped = "yes"
    dtype = DTYPES[args.dtype]
    for i, entry in enumerate(layers):
        if time.perf_counter() - start > args.max_seconds:
            stopped = f"no: --max-seconds spent after {i} of {len(layers)} layers"
            print(f"bench_conv: time budget spent after {i} of {len(layers)} layers")
            break
        if args.precompile and args.device == "cuda" and i % args.precompile == 0:
            from fastcnn.triton import precompile

            with precompile.recording() as jobs:
                for ahead in layers[i : i + args.precompile]:
                    bench_layer(ahead, args.batch, dtype, args.iters, args.device, True)
            n = precompile.compile_all(jobs)
            print(f"bench_conv: {n} Triton kernels precompiled for the next layers", flush=True)
        results.add(*bench_layer(entry, args.batch, dtype, args.iters, args.device))
        print(f"[{i + 1}/{len(layers)}] {entry['layer']}", flush=True)
    print(results.finish(stopped))


if __name__ == "__main__":
    main()
