"""Host (Python + dispatch) time per fused call, with the GPU launch replaced by a no-op: what a
batch-1 forward pays on the CPU before any kernel runs. Needs no GPU.

The stub keeps all the host work of a real launch except the last step: the op's checks, the
backend pick, the output allocation, the launcher's argument preparation, Triton's autotuner
lookup and its JIT binder (argument specialization and the compiled-kernel cache key, computed
for an sm_90 target) run for real; only the C launcher itself (a few µs) is skipped. The "cuda"
backend's extension op is replaced by a registered no-op CPU kernel in C++, so the dispatcher
call is counted as a real call pays it, but not the op's own C++ host work (cuBLASLt plan
lookup, cuDNN). The "cpu" backend runs for real on tiny tensors (1x1 spatial, so oneDNN's
compute is negligible).

    python benchmarks/host_overhead.py --out benchmarks/results/DIR/host_overhead.json
    python benchmarks/host_overhead.py --count   # distinct Triton kernels per model and batch
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

import torch

os.environ.pop("TRITON_INTERPRET", None)  # the real JIT path, not the interpreter

from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.runtime import autotuner, jit

import fastcnn
from fastcnn import _backend
from fastcnn.bench.providers import make_model
from fastcnn.bench.results import ResultFile

TARGET = GPUTarget("cuda", 90, 32)
_binders: dict = {}
compiled_keys: set = set()  # (kernel, specialization key): what a real run would compile


class _NoLaunch:
    """What the stubbed JIT returns in place of a compiled kernel: fastcnn's launch plans then
    take their direct path (compiled.run(...)), which launches nothing here."""

    packed_metadata = ()
    function = 1

    def run(self, *args) -> None:
        return None


_NO_LAUNCH = _NoLaunch()


def _stub_run(self, *args, grid, warmup, **kwargs):
    """JITFunction.run up to the launch: the binder and the kernel-cache key, then nothing."""
    kwargs["debug"] = kwargs.get("debug", self.debug)
    if self not in _binders:  # what JITFunction.create_binder makes once per device
        backend = make_backend(TARGET)
        binder = jit.create_function_from_signature(self.signature, self.params, backend)
        _binders[self] = (binder, {})
    binder, kernel_key_cache = _binders[self]
    bound_args, specialization, options = binder(*args, **kwargs)
    key = jit.compute_cache_key(kernel_key_cache, specialization, options)
    compiled_keys.add((self.__name__, key))
    if callable(grid):
        grid(bound_args)
    return _NO_LAUNCH


def _stub_bench(self, *args, config, **meta):
    """Autotuning without a GPU: every config 'measures' the same, the first one wins."""
    return [1.0, 1.0, 1.0]


def _no_disk_cache(self, tuning_key, configs, bench_fn):
    """Autotuning results kept on disk are keyed by the GPU: none here, so tune (stubbed)."""
    bench_fn()
    return False


# The extension's CUDA ops' schemas, as C++ functions that do nothing, registered for CPU
# tensors: a planned call then pays exactly what it pays on a GPU up to the op's own C++ body
# (the dispatcher, its argument conversion). A Python no-op would add a callback into Python
# (~3 µs of re-wrapping the arguments) that the real op does not have.
_NO_OPS_SOURCE = r"""
#include <torch/library.h>
namespace {
void conv_bn_act_no_op(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                       at::IntArrayRef, at::IntArrayRef, const std::optional<at::Tensor>&, bool,
                       at::Tensor) {}
void inception_no_op(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::IntArrayRef,
                     const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                     const at::Tensor&, const at::Tensor&, int64_t, at::Tensor) {}
}  // namespace
TORCH_LIBRARY_IMPL(fastcnn_ext, CPU, m) {
  m.impl("conv_bn_act_out", &conv_bn_act_no_op);
  m.impl("inception_out", &inception_no_op);
}
"""
_CPP_NO_OPS = object()  # what _register_cpp_no_ops returns once the C++ no-ops are in


def _register_cpp_no_ops():
    """C++ no-op CPU kernels for the extension's CUDA ops (built once, ~1 min; they stay
    registered for the process), or, without a compiler, Python no-ops (then the "cuda" rows
    also count a Python callback: noted in the result file)."""
    global STUB
    try:
        from torch.utils.cpp_extension import load_inline

        load_inline("fastcnn_host_overhead_no_ops", _NO_OPS_SOURCE, is_python_module=False)
        STUB = "a C++ no-op CPU kernel"
        return _CPP_NO_OPS
    except Exception as error:  # any build failure: fall back, and say so
        print(f"C++ no-ops not built ({error}); Python no-ops instead", file=sys.stderr)
        lib = torch.library.Library("fastcnn_ext", "IMPL")
        for op in ("conv_bn_act_out", "inception_out"):
            lib.impl(op, lambda *args: None, "CPU")
        STUB = "a Python no-op CPU kernel (C++ build failed)"
        return lib


STUB = "not registered"  # what the "cuda" rows' extension op was replaced with


@contextlib.contextmanager
def stubbed_launches():
    """Triton and the extension's CUDA ops run their host work on CPU tensors, launch nothing."""
    from fastcnn.triton import conv_bn_act as kernels

    tuner = autotuner.Autotuner
    saved = (
        jit.JITFunction.run,
        tuner._bench,
        tuner.check_disk_cache,
        dict(_backend._status_cache),
    )
    jit.JITFunction.run = _stub_run
    tuner._bench = _stub_bench
    tuner.check_disk_cache = _no_disk_cache
    patched = {}
    if hasattr(kernels, "_device_limits"):  # the GPU it plans for, and its stream
        patched = {
            "_device_limits": lambda device: (90, kernels.SHARED_MEMORY_LIMIT[90]),
            "_current_stream": lambda device: 0,
        }
    saved_kernels = {name: getattr(kernels, name) for name in patched}
    for name, value in patched.items():
        setattr(kernels, name, value)
    ok = _backend.BackendStatus(True, "stubbed launch (host overhead benchmark)")
    for backend in ("triton", "cuda"):
        for device in ("cpu", "cuda"):
            _backend._status_cache[(backend, device)] = ok
    lib = None
    if fastcnn._extension.load() is not None:
        lib = _register_cpp_no_ops()
    try:
        yield
    finally:
        jit.JITFunction.run, tuner._bench, tuner.check_disk_cache = saved[:3]
        for name, value in saved_kernels.items():
            setattr(kernels, name, value)
        _backend._status_cache.clear()
        _backend._status_cache.update(saved[3])
        if lib is not None and lib is not _CPP_NO_OPS:
            lib._destroy()


def per_call_us(fn, calls: int, repeats: int) -> float:
    """Median over repeats of the mean µs per call of `calls` back-to-back calls."""
    fn()  # first call: plans, tunes (stubbed), folds weights
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(samples)


def fused_time_per_forward_us(model, x, forwards: int, repeats: int) -> float:
    """Median over repeats of the µs per forward spent inside fastcnn's fused modules (the
    unfused layers, pools and fc, do real CPU work here that a GPU would not: left out). The
    module hooks that measure it add a little of their own, so this errs high."""
    fused = tuple(fastcnn.nn.__dict__[n] for n in ("ConvBNAct", "FusedInception", "AddReLU"))
    spent = [0.0]
    started: list[float] = []
    handles = []
    for m in model.modules():
        if isinstance(m, fused):
            handles.append(
                m.register_forward_pre_hook(lambda *a: started.append(time.perf_counter()))
            )
            handles.append(
                m.register_forward_hook(
                    lambda *a: spent.__setitem__(0, spent[0] + time.perf_counter() - started.pop())
                )
            )
    try:
        model(x)
        samples = []
        for _ in range(repeats):
            spent[0] = 0.0
            for _ in range(forwards):
                model(x)
            samples.append(spent[0] / forwards * 1e6)
    finally:
        for h in handles:
            h.remove()
    return statistics.median(samples)


def _conv_inputs(dtype, spatial: int):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 64, spatial, spatial, generator=g).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    conv = torch.nn.Conv2d(64, 64, 3, padding=1, bias=False)
    bn = torch.nn.BatchNorm2d(64).eval()
    fused = fastcnn.nn.ConvBNAct.from_modules(conv, bn, torch.nn.ReLU()).to(dtype)
    return x, fused


def measure(backend: str, dtype: torch.dtype, calls: int, repeats: int) -> list[dict]:
    # a 3x3 64->64 conv (ResNet-50's layer1) at 14x14, small enough that the CPU allocator
    # serves the output from its free lists as a GPU's caching allocator would (at 56x56 the
    # CPU allocator maps fresh pages every call); on the cpu backend at 1x1 (real compute)
    spatial = 1 if backend == "cpu" else 14
    x, fused = _conv_inputs(dtype, spatial)
    weight, bias = fused.weight, fused.bias
    rows = []
    with torch.inference_mode(), fastcnn.use_backend(backend):

        def op():
            return fastcnn.ops.conv_bn_act(x, weight, bias, 1, 1)

        def module():
            return fused(x)

        rows.append({"what": "ops.conv_bn_act, 64->64 3x3", "us": per_call_us(op, calls, repeats)})
        rows.append({"what": "nn.ConvBNAct, 64->64 3x3", "us": per_call_us(module, calls, repeats)})
        model = make_model("resnet50", torch.float32, "cpu")
        fast = fastcnn.optimize(model, backend=backend).to(dtype)
        fast = fast.to(memory_format=torch.channels_last)
        size = 32  # small input: the unfused layers (pools, fc) do little real CPU work
        img = torch.randn(1, 3, size, size).to(dtype).contiguous(memory_format=torch.channels_last)
        with fastcnn.trace() as t:
            fast(img)
        fused_calls = sum(t.counts().values())
        forward_us = fused_time_per_forward_us(fast, img, max(1, calls // 50), repeats)
        rows.append({"what": f"resnet50 forward: its {fused_calls} fused calls", "us": forward_us})
    rows.append({"what": "yardstick: torch.empty_like(x)", "us": per_call_us(
        lambda: torch.empty_like(x), calls, repeats)})  # fmt: skip
    for row in rows:
        row.update(backend=backend, dtype=str(dtype).removeprefix("torch."))
    return rows


def count_kernels(models: list[str], batches: list[int], dtype: torch.dtype) -> None:
    """Distinct Triton kernels (specializations) a GPU run of each model compiles, heuristic
    configs (FASTCNN_TRITON_AUTOTUNE=0): what gpu_check.sh's cold-cache estimate is built on."""
    os.environ["FASTCNN_TRITON_AUTOTUNE"] = "0"
    with stubbed_launches(), torch.inference_mode(), fastcnn.use_backend("triton"):
        for name in models:
            fast = fastcnn.optimize(make_model(name, torch.float32, "cpu"), backend="triton")
            fast = fast.to(dtype).to(memory_format=torch.channels_last)
            for batch in batches:
                x = torch.randn(batch, 3, 224, 224).to(dtype)
                fast(x.contiguous(memory_format=torch.channels_last))
                print(f"{name} {dtype} up to batch {batch}: {len(compiled_keys)} kernels")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="triton,cuda,cpu")
    parser.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--count", action="store_true", help="count Triton kernels instead")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(1)
    if args.count:
        count_kernels(["resnet50", "googlenet"], [1, 256], dtype)
        return
    if args.out is None:
        parser.error("--out is required (or --count)")
    with stubbed_launches():
        results = ResultFile(
            args.out,
            "host_overhead",
            "Host time per fused call, GPU launch stubbed",
            f"{args.dtype}, batch 1, CPU tensors, 1 thread; median of {args.repeats} means of "
            f"{args.calls} calls (a model forward: {max(1, args.calls // 50)}); triton: JIT binder "
            "and autotuner for an sm_90 target run, the C launcher does not; cuda: the extension "
            f"op is {STUB}; cpu: oneDNN runs, on 1x1 images",
        )
        for backend in args.backends.split(","):
            status = _backend._cached_status(backend, "cpu")
            if not status:
                print(f"skipping {backend}: {status.reason}")
                continue
            rows = measure(backend, dtype, args.calls, args.repeats)
            results.add(*rows)
            for row in rows:
                print(f"{backend:7} {row['what']:50} {row['us']:9.1f} µs", flush=True)
    print(results.finish())


if __name__ == "__main__":
    sys.exit(main())
