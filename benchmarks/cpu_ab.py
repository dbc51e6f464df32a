"""One fastcnn CPU feature against its plain counterpart, in one process: the same optimized
model, calls alternating between the feature off and on, so a drifting machine weighs on both
alike (separate processes on a shared VM differ by up to 20%).

  recycled  planned outputs reuse their last memory (fastcnn.common.alloc.Recycled: convs,
            Inception blocks, max-pools) / off: a fresh output every call
  linear    fastcnn.nn.Linear (oneDNN, prepacked weight) / off: nn.Linear's forward (aten)
  winograd  3x3 convs as Winograd F(4x4, 3x3) where fastcnn.cpu.winograd chooses it / off:
            every conv through oneDNN's direct kernels
  int8-direct  a fastcnn.quantize'd model's int8 convs through the extension's own oneDNN
            primitives (fastcnn.cpu.int8's direct path) / off: torch's quantized conv ops
  program   an optimized model's forward as one program per input signature
            (fastcnn/optimize/program.py) / off: module by module

    python benchmarks/cpu_ab.py --switch linear --out benchmarks/results/DIR/cpu_ab_linear.json
    python benchmarks/cpu_ab.py --switch program --dtype bfloat16 \
        --out benchmarks/results/DIR/cpu_ab_program_bf16.json

(benchmarks/cpu_recycled_outputs.py, which made recycled_outputs.json, became --switch recycled.)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

import fastcnn
from fastcnn.bench.int8 import calibration_batches
from fastcnn.bench.measure import model_input
from fastcnn.bench.providers import make_model
from fastcnn.bench.results import ResultFile, time_samples
from fastcnn.common import alloc
from fastcnn.cpu import int8, winograd


@contextlib.contextmanager
def _recycled(on: list[bool]) -> Iterator[None]:
    recycled_get = alloc.Recycled.get

    def get(self, like):
        if on[0]:
            return recycled_get(self, like)
        return alloc.empty_strided(self.shape, self.strides, like)

    alloc.Recycled.get = get
    try:
        yield
    finally:
        alloc.Recycled.get = recycled_get


@contextlib.contextmanager
def _linear(on: list[bool]) -> Iterator[None]:
    packed_forward = fastcnn.nn.Linear.forward

    def forward(self, x):
        return packed_forward(self, x) if on[0] else nn.Linear.forward(self, x)

    fastcnn.nn.Linear.forward = forward
    try:
        yield
    finally:
        fastcnn.nn.Linear.forward = packed_forward


@contextlib.contextmanager
def _winograd(on: list[bool]) -> Iterator[None]:
    enabled = winograd.enabled  # read per call by the pack lookup (its key) and the choice

    winograd.enabled = lambda: on[0]
    try:
        yield
    finally:
        winograd.enabled = enabled


def _optimized(model: nn.Module, x: torch.Tensor, on: list[bool]) -> nn.Module:
    return fastcnn.optimize(model.to(memory_format=torch.channels_last))


def _int8_direct(model: nn.Module, x: torch.Tensor, on: list[bool]) -> Callable:
    """Two fastcnn.quantize'd copies of the model, called by on[0]: one whose plans run the
    direct primitives, one planned while the direct path was hidden (torch's ops, for good)."""
    batches = calibration_batches(x)
    direct = fastcnn.quantize(model, batches, backend="cpu")
    torch_ops = fastcnn.quantize(model, batches, backend="cpu")
    found = int8.direct_extension
    int8.direct_extension = lambda: None
    try:
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch_ops(x)  # plans every conv for x
    finally:
        int8.direct_extension = found
    return lambda x: direct(x) if on[0] else torch_ops(x)


def _program(model: nn.Module, x: torch.Tensor, on: list[bool]) -> Callable:
    """The optimized model, its programs set aside while on[0] is False."""
    fast = _optimized(model, x, on)
    programs = fast._fastcnn_programs

    checked = []

    def call(x):
        fast.__dict__["_fastcnn_programs"] = programs if on[0] else None
        y = fast(x)
        if on[0] and not checked:  # "on" must time the program, not the module path again
            why = programs.reason(x)
            if why is not None:
                raise SystemExit(f"no program runs for {tuple(x.shape)}: {why}")
            checked.append(True)
        return y

    return call


# name -> (what it compares, a context manager switching it by on[0], the model it runs)
SWITCHES = {
    "recycled": ("recycled outputs / fresh outputs", _recycled, _optimized),
    "linear": ("fastcnn.nn.Linear (prepacked) / nn.Linear", _linear, _optimized),
    "winograd": ("Winograd F(4x4, 3x3) / oneDNN direct 3x3 convs", _winograd, _optimized),
    "int8-direct": (
        "direct oneDNN int8 primitives / torch's quantized conv ops (fastcnn.quantize)",
        lambda on: contextlib.nullcontext(),
        _int8_direct,
    ),
    "program": (
        "one program per input signature / module by module",
        lambda on: contextlib.nullcontext(),
        _program,
    ),
}


MODEL_KIND = {"int8-direct": "int8 model (fastcnn.quantize), float32 input"}


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _ab(switch: str, model_name: str, batch: int, calls: int, dtype: str = "float32") -> dict:
    # the earlier rows' models (cycles: a graph module's closures) with their kept outputs and
    # programs, gone: each row starts with the whole output budget, as a process of its own
    gc.collect()
    model = make_model(model_name, DTYPES[dtype], "cpu")
    x = model_input(batch, "fastcnn", 224, DTYPES[dtype], "cpu")
    what, switched, build = SWITCHES[switch]
    on = [True]
    fused = build(model, x, on)

    def forward(state: bool):
        def call():
            on[0] = state
            fused(x)

        return call

    with switched(on), torch.inference_mode():
        times = time_samples({"off": forward(False), "on": forward(True)}, calls)
    off, on_ms = statistics.median(times["off"]), statistics.median(times["on"])
    return {"model": model_name, "batch": batch, "switch": what, "off_ms": off, "on_ms": on_ms,
            "speedup": off / on_ms}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--switch", choices=sorted(SWITCHES), required=True)
    parser.add_argument("--models", default="resnet50,googlenet")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--calls", type=int, default=12, help="timed calls of each, alternating")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--out", type=Path, default=Path("cpu_ab.json"))
    args = parser.parse_args()
    if args.switch == "int8-direct" and args.dtype != "float32":
        parser.error("--switch int8-direct quantizes a float32 model: no --dtype")
    torch.set_num_threads(args.threads)
    results = ResultFile(
        args.out,
        "cpu_ab",
        f"{SWITCHES[args.switch][0]}, fastcnn's cpu path",
        f"{MODEL_KIND.get(args.switch, args.dtype)}, 224x224, {args.threads} threads, "
        f"inference_mode; medians of {args.calls} "
        "calls of each, alternating in one process",
    )
    for model in args.models.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            row = _ab(args.switch, model, batch, args.calls, args.dtype)
            results.add(row)
            print(f"{model} b{batch}: off {row['off_ms']:.2f} ms, on {row['on_ms']:.2f} ms, "
                  f"{row['speedup']:.3f}x", flush=True)  # fmt: skip
    print(results.finish())


if __name__ == "__main__":
    main()
