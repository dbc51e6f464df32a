"""fastcnn-bench (python -m fastcnn.bench): fused vs eager and peers, whole models or single ops.

With no arguments it runs a short comparison on this machine's device (a few minutes on a CPU).
Every provider's output is checked against eager before it is timed; a provider that disagrees
is reported, not timed. Writes DIR/results.json (environment + every measurement) and
DIR/results.md after every measured (workload, batch), so a run stopped early keeps what it
measured, and DIR/throughput.png at the end.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import sys
import time
from pathlib import Path

import torch

from fastcnn.bench import peers
from fastcnn.bench.isolated import Job, omp_wait_policy, run_in_processes
from fastcnn.bench.measure import DTYPES, make_timer, model_input, precision_tolerance
from fastcnn.bench.ops import OPS
from fastcnn.bench.providers import PROVIDERS, build, make_model, source_model
from fastcnn.bench.results import ResultFile, time_interleaved
from fastcnn.cpu import winograd

MODELS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "googlenet"]
# Each provider's output is compared with the model (or op) run in a higher precision (float32
# for fp16/bf16 runs, float64 for float32 ones); the error is relative to the output's scale.
# The first provider (eager) rounds after every op, 2-3 times per layer; a fused provider rounds
# 1-2 times per layer (plus once for its folded weights), so its error should not exceed
# eager's own: it "matches" within MATCH_FACTOR times eager's error, a margin for a different
# rounding pattern, and still far below the O(1) error of a wrong kernel. MATCH_FLOOR_ULPS
# units of roundoff cover an eager error that happens to be ~0 (tiny models, fp32).
MATCH_FACTOR = 4
MATCH_FLOOR_ULPS = 8
# fastcnn's CPU fp32 3x3 convs run as Winograd F(4x4, 3x3) (fastcnn.cpu.winograd), whose
# rounding error is ~10x direct's: its providers get that much more margin while it is on.
WINOGRAD_MATCH_FACTOR = 10
REFERENCE_DTYPE = {torch.float32: torch.float64, torch.float16: torch.float32}
REFERENCE_DTYPE[torch.bfloat16] = torch.float32
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def match_tolerance(dtype: torch.dtype, baseline_error: float) -> float:
    """The largest relative error at which a provider still matches the reference."""
    return max(MATCH_FACTOR * baseline_error, MATCH_FLOOR_ULPS * UNIT_ROUNDOFF[dtype])


def winograd_factor(provider: str, device: str, dtype: torch.dtype) -> float:
    """How much more error a provider may have for running Winograd (1 where it does not)."""
    cpu_fp32 = device == "cpu" and dtype == torch.float32
    if cpu_fp32 and provider.startswith("fastcnn") and winograd.enabled():
        return WINOGRAD_MATCH_FACTOR
    return 1.0


# --preset cpu: fastcnn against the runtimes CPU users pick (eager channels_last, Inductor with
# freezing, OpenVINO, ONNX Runtime) at batch 1 and 8, 2 threads, each provider in 3 processes of
# its own (see fastcnn/bench/isolated.py).
_CPU_COMPARISON = dict(device="cpu", model="resnet50,googlenet", batch="1,8", threads=2)
PRESETS = {
    "cpu": dict(
        _CPU_COMPARISON,
        dtype="float32",
        iters=12,
        processes=3,
        providers="eager-cl,compile,openvino,openvino-default,onnxruntime,fastcnn-cpu",
    ),
}
# --precision int8: fastcnn.quantize against the int8 peers (fastcnn/bench/int8.py), with
# fastcnn's own fp32 first as the reference (int8 outputs are checked against it loosely).
INT8 = dict(
    _CPU_COMPARISON,
    dtype="float32",
    iters=10,
    providers="fastcnn-cpu,fastcnn-int8,compile-int8,openvino-int8,onnxruntime-int8",
)
# --precision bf16: a bf16 model (fastcnn, Inductor, eager) against OpenVINO running bf16 and
# with its defaults (bf16 where the CPU has native bf16), checked against the fp32 model.
BF16 = dict(
    _CPU_COMPARISON,
    dtype="bfloat16",
    iters=12,
    processes=3,
    providers="eager-cl,compile,openvino-bf16,openvino-default,fastcnn-cpu",
)
DEFAULTS = {  # per device: what a bare `fastcnn-bench` runs
    "cpu": dict(
        model="resnet18,googlenet",
        batch="1,8",
        dtype="float32",
        iters=10,
        providers="eager,eager-cl,fastcnn",
    ),
    "cuda": dict(
        model="resnet50,googlenet",
        batch="1,32,256",
        dtype="float16",
        iters=30,
        providers="eager,eager-cl,fastcnn,compile",
    ),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fastcnn-bench", description=__doc__.splitlines()[0])
    parser.add_argument("--model", help=f"comma list of {', '.join(MODELS)}, or all")
    parser.add_argument(
        "--op", help=f"comma list of {', '.join(OPS)}, or all: single ops instead of models"
    )
    parser.add_argument("--batch", help="comma list of batch sizes")
    parser.add_argument("--dtype", choices=list(DTYPES))
    parser.add_argument("--device", choices=["cpu", "cuda"])
    parser.add_argument("--providers", help=f"comma list of {', '.join(PROVIDERS)}")
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    parser.add_argument("--iters", type=int, help="timed calls per measurement (median)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    parser.add_argument(
        "--preset", choices=list(PRESETS), help="cpu: fastcnn vs every CPU peer, resnet50+googlenet"
    )
    parser.add_argument(
        "--precision", choices=["fp32", "int8", "bf16"], default="fp32",
        help="int8: fastcnn.quantize vs Inductor/OpenVINO/ONNX Runtime int8; bf16: a bf16 "
        "model vs Inductor bf16 and OpenVINO bf16 and default; CPU",
    )  # fmt: skip
    parser.add_argument(
        "--processes",
        type=int,
        help="time each (model, provider) in N processes of its own and report the median "
        "(CPU, models only); default 0: all providers in this process, call by call",
    )
    parser.add_argument("--cuda-graphs", action="store_true", help="replay CUDA graphs (GPU)")
    parser.add_argument(
        "--precompile",
        action="store_true",
        help="compile the Triton kernels of the fastcnn providers on every core first (GPU)",
    )
    parser.add_argument(
        "--max-seconds",
        type=float,
        help="start no new (workload, batch) after this many seconds; the results say so",
    )
    parser.add_argument("--out", type=Path, help="result folder (default fastcnn-bench/<time>)")
    args = parser.parse_args(argv)
    by_precision = {"int8": INT8, "bf16": BF16}
    defaults = by_precision.get(args.precision) or PRESETS.get(args.preset, {})
    for key, value in defaults.items():
        if getattr(args, key) is None:  # an explicit argument still wins
            setattr(args, key, value)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible to torch")
    if args.cuda_graphs and args.device != "cuda":
        parser.error("--cuda-graphs needs --device cuda")
    if args.precompile and args.device != "cuda":
        args.precompile = False  # Triton's interpreter compiles nothing
    args.processes = args.processes or 0
    if args.processes and (args.device != "cpu" or args.op):
        parser.error("--processes runs models on the CPU only (--device cpu, no --op)")
    for key, value in DEFAULTS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.models = MODELS if args.model == "all" else args.model.split(",")
    for name in args.models:
        if name not in MODELS:
            parser.error(f"unknown model {name!r}; choose from {', '.join(MODELS)} or all")
    args.ops = [] if args.op is None else OPS if args.op == "all" else args.op.split(",")
    for name in args.ops:
        if name not in OPS:
            parser.error(f"unknown op {name!r}; choose from {', '.join(OPS)} or all")
    args.provider_list = args.providers.split(",")
    for name in args.provider_list:
        if name not in PROVIDERS:
            parser.error(f"unknown provider {name!r}; choose from {', '.join(PROVIDERS)}")
    try:
        args.batches = [int(b) for b in args.batch.split(",")]
    except ValueError:
        parser.error(f"--batch must be a comma list of integers, got {args.batch!r}")
    if min(args.batches) < 1 or args.iters < 1:
        parser.error("--batch and --iters must be positive")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    args.out = args.out or Path("fastcnn-bench") / stamp
    return args


class Progress:
    """One line on stderr that counts finished measurements (tqdm when installed)."""

    def __init__(self, total: int):
        try:
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="run", file=sys.stderr)
        except ImportError:
            self._bar = None
        self.total, self.done = total, 0

    def step(self, label: str) -> None:
        self.done += 1
        if self._bar is not None:
            self._bar.set_description(label)
            self._bar.update(1)
        else:
            print(f"\r[{self.done}/{self.total}] {label}".ljust(70), end="", file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        else:
            print(file=sys.stderr)


# Inputs are rotated through copies totalling about this many bytes, so a small input is not
# timed hot in the cache call after call (CUDA graphs capture one fixed input instead).
ROTATE_BYTES = 64 << 20
MAX_COPIES = 16


def _timer(fn, x, args):
    """A no-argument callable to time: fn over rotating copies of x, or a CUDA graph of fn(x)."""
    return make_timer(fn, x, args.cuda_graphs)


def _workloads(args, dtype, build_s: dict):
    """(name, {provider: callable}, make_input(batch, provider), reference(x)) per model or op,
    reference running it in REFERENCE_DTYPE[dtype]; the seconds each model's providers took to
    build go into build_s[(name, provider)]."""
    if args.ops:
        from fastcnn.bench.ops import op_workload

        for op in args.ops:
            yield op_workload(op, args.provider_list, dtype, args.device, REFERENCE_DTYPE[dtype])
        return
    for name in args.models:
        model = make_model(name, dtype, args.device)
        precise = copy.deepcopy(model).to(REFERENCE_DTYPE[dtype])
        example = torch.randn(1, 3, args.size, args.size, device=args.device, dtype=dtype)
        built = {}
        for provider in args.provider_list:
            start = time.perf_counter()
            try:
                built[provider] = build(provider, source_model(provider, model, name), example)
            except Exception as exc:  # e.g. a backend that cannot run here: report, go on
                built[provider] = exc
            build_s[(name, provider)] = time.perf_counter() - start

        def make_input(batch, provider):
            return model_input(batch, provider, args.size, dtype, args.device)

        if args.precompile:
            _precompile(name, built, make_input, args.batches, build_s)
        yield name, built, make_input, lambda x, m=precise: m(x.to(REFERENCE_DTYPE[dtype]))


def _precompile(name: str, built: dict, make_input, batches: list[int], build_s: dict) -> None:
    """Compile every Triton kernel the fastcnn providers will launch, on every core at once
    (fastcnn.triton.precompile), instead of one after another inside their first calls; the
    seconds count toward the providers' setup time."""
    from fastcnn.triton import precompile

    for provider, fn in built.items():
        if provider not in ("fastcnn", "fastcnn-triton") or isinstance(fn, Exception):
            continue
        start = time.perf_counter()
        with torch.inference_mode(), precompile.recording() as jobs:
            for batch in batches:
                fn(make_input(batch, provider))
        n = precompile.compile_all(jobs)
        seconds = time.perf_counter() - start
        build_s[(name, provider)] = build_s.get((name, provider), 0) + seconds
        print(f"{name} {provider}: {n} Triton kernels precompiled in {seconds:.1f} s", flush=True)


def _time_group(timers: dict, iters: int, batch: int) -> None:
    """Time every checked provider of one (workload, batch) together, round-robin, and fill in
    their rows; speedups are against the first of them (eager by default)."""
    times = time_interleaved({p: timer for p, (timer, _) in timers.items()}, iters, warmup=3)
    base_ms = None
    for provider, (_, row) in timers.items():
        ms = times[provider]
        base_ms = base_ms or ms
        row.update(status="ok", ms=ms, img_per_s=batch / ms * 1e3, speedup=base_ms / ms)


def _compare_with_best_peer(group: list[dict]) -> None:
    """vs_best_peer on each fastcnn row of one (workload, batch): the fastest other provider's
    ms over its ms (above 1: fastcnn beats every peer measured in the run)."""
    peers = [r["ms"] for r in group if "ms" in r and not r["provider"].startswith("fastcnn")]
    for r in group:
        if peers and "ms" in r and r["provider"].startswith("fastcnn"):
            r["vs_best_peer"] = min(peers) / r["ms"]


def run(args: argparse.Namespace, results: ResultFile | None = None) -> list[dict]:
    """Measure every (workload, batch, provider); each finished (workload, batch) is added to
    `results` at once (a partial file survives a run that is stopped)."""
    dtype = DTYPES[args.dtype]
    rows: list[dict] = []
    names = args.ops or args.models
    build_s: dict = {}
    progress = Progress(len(names) * len(args.batches) * len(args.provider_list))
    start = time.perf_counter()
    args.stopped_early = None
    with torch.inference_mode():
        for name, built, make_input, reference in _workloads(args, dtype, build_s):
            for batch in args.batches:
                if args.max_seconds is not None and time.perf_counter() - start > args.max_seconds:
                    args.stopped_early = (
                        f"--max-seconds {args.max_seconds:g} spent before {name} b{batch}"
                    )
                    break
                group = _measure_group(
                    args, name, built, make_input, reference, batch, dtype, build_s, progress
                )
                rows += group
                if results is not None:
                    results.add(*group)
            if args.stopped_early:
                break
    progress.close()
    return rows


def _measure_group(args, name, built, make_input, reference, batch, dtype, build_s, progress):
    """The rows of one (workload, batch): every provider's output checked against the
    higher-precision reference (within match_tolerance of the first provider's own error), then
    the checked ones timed together."""
    group: list[dict] = []
    expected = reference(make_input(batch, args.provider_list[0])).float()
    scale = max(1.0, expected.abs().max().item())
    tolerance = None  # set by the first provider that runs
    timers: dict = {}  # provider -> (callable to time, its row)
    for provider, fn in built.items():
        progress.step(f"{name} b{batch} {provider}")
        row = {
            "model": name,
            "batch": batch,
            "dtype": args.dtype,
            "provider": provider,
            "device": args.device,
        }
        group.append(row)
        if isinstance(fn, Exception):
            row["status"] = f"unavailable: {fn}"
            continue
        x = make_input(batch, provider)
        start = time.perf_counter()
        try:
            y = fn(x).float()  # the first call compiles, tunes or packs weights
        except Exception as exc:
            row["status"] = f"failed: {type(exc).__name__}: {exc}"
            continue
        # building + the first call at this batch: what a user waits for once
        row["setup_s"] = time.perf_counter() - start + build_s.pop((name, provider), 0)
        row["max_rel_error"] = (y - expected).abs().max().item() / scale
        if tolerance is None:  # the baseline (eager by default): its own rounding error
            tolerance = match_tolerance(dtype, row["max_rel_error"])
        # int8 outputs are limited by their quantization (SQNR), not by rounding, and a peer
        # running bf16 by its own choice by bf16's rounding: checked as loosely as those
        limit = tolerance * winograd_factor(provider, args.device, dtype)
        own = precision_tolerance(provider)
        if own is not None:
            limit = max(limit, own)
        if not row["max_rel_error"] <= limit:
            row["status"] = f"output differs from the reference by more than {limit:.1e}: not timed"
            continue
        timers[provider] = (_timer(fn, x, args), row)
    _time_group(timers, args.iters, batch)
    _compare_with_best_peer(group)
    return group


def run_isolated(args: argparse.Namespace, results: ResultFile | None = None) -> list[dict]:
    """Each (model, provider) in args.processes processes of its own (fastcnn.bench.isolated);
    speedups against the first provider and vs_best_peer per (model, batch)."""
    jobs = [
        Job(name, provider, args.batches, args.dtype, args.size, args.iters, args.threads or 0)
        for name in args.models
        for provider in args.provider_list
    ]
    progress = Progress(len(jobs) * args.processes)
    rows = run_in_processes(jobs, args.processes, progress)
    progress.close()
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["batch"]), []).append(r)
    for group in groups.values():
        timed = [r for r in group if "ms" in r]
        for r in timed:
            r["speedup"] = timed[0]["ms"] / r["ms"]
        _compare_with_best_peer(group)
        if results is not None:
            results.add(*group)
    args.stopped_early = None
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    reference = args.provider_list[0]
    timing = (
        f"median of {args.iters} calls in each of {args.processes} processes per provider, "
        "median of the processes"
        if args.processes
        else f"median of {args.iters} calls (providers interleaved call by call)"
    )
    results = ResultFile(
        args.out / "results.json",
        "measurements",
        "fastcnn-bench",
        f"{args.dtype}, {args.size}x{args.size}, inference_mode, {timing}"
        f"{', CUDA graphs' if args.cuda_graphs else ''}; speedup vs {reference}",
        device=args.device,
    )
    results.env["command"] = "fastcnn-bench " + " ".join(argv if argv is not None else sys.argv[1:])
    # how busy the machine was: other processes' load makes every timing noisier
    load_start = os.getloadavg()[0]
    if args.device == "cpu":
        results.env["OMP_WAIT_POLICY"] = omp_wait_policy()
    results.env.update(peers.versions(args.provider_list))
    rows = run_isolated(args, results) if args.processes else run(args, results)
    results.env["load average 1 min (start, end)"] = f"{load_start:.1f}, {os.getloadavg()[0]:.1f}"
    table = results.finish(args.stopped_early or "yes")
    from fastcnn.bench.plot import plot_throughput

    if rows:
        plot_throughput(rows, args.out / "throughput.png", results.env, args)
    print(table)
    if args.stopped_early:
        print(f"stopped early: {args.stopped_early}")
    print(f"wrote {args.out}/results.json, results.md, throughput.png")
    return 0 if all(r.get("status") == "ok" or "unavailable" in r["status"] for r in rows) else 1
