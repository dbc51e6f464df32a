"""Where a CPU forward's time goes, fastcnn against OpenVINO: the convolution kernels, and
everything else (pools, concats, the classifier, allocation, Python, the calls between layers).

Per (model, batch), each in processes of its own (as fastcnn-bench times them), alternating:
- fastcnn, timed: fastcnn.optimize(model) on channels_last input, as fastcnn-bench's "fastcnn"
  provider builds it, under inference_mode; the median forward.
- fastcnn, profiled: the same, run with ONEDNN_VERBOSE=profile_exec: the sum of oneDNN's own
  execution times of the convolution primitives a forward ran (its extension's library; torch's
  oneDNN reads the variable too), median over forwards. The verbose log slows the forward, so
  its total is not used.
- OpenVINO, profiled: compiled as the openvino provider compiles it, with PERF_COUNT=True: the
  median forward, and its Convolution layers' share of the layers' real times applied to that
  forward (the layers' times add up to about the forward, but in some processes to far more:
  seen 52 ms of layers in a 41 ms forward). PERF_COUNT adds a little to the forward; the
  provider's own timing is in fastcnn-bench's results.
"rest" is the forward minus its convolution kernels. With --precision bf16: fastcnn on the
model in bf16, OpenVINO on the fp32 model with the bf16 precision hint (as fastcnn-bench's
bf16 comparison builds them).

    python benchmarks/cpu_breakdown.py --out benchmarks/results/DIR/cpu_breakdown.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from fastcnn.bench.results import ResultFile

KINDS = ("fastcnn", "fastcnn-verbose", "openvino")
MARK = "cpu-breakdown-result: "
START, END = "cpu-breakdown-forwards-start", "cpu-breakdown-forwards-end"


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _worker(model_name: str, batch: int, kind: str, calls: int, threads: int,
            precision: str = "fp32") -> dict:  # fmt: skip
    from fastcnn.bench.measure import model_input
    from fastcnn.bench.peers import openvino_request
    from fastcnn.bench.providers import build, make_model

    torch.set_num_threads(threads)
    with torch.inference_mode():
        dtype = DTYPES[precision]
        if kind == "openvino":  # the fp32 model, in the precision asked
            model = make_model(model_name, torch.float32, "cpu")
            x = model_input(batch, "openvino", 224, torch.float32, "cpu")
            hint = "bf16" if precision == "bf16" else "f32"
            request = openvino_request(model, x, threads, hint, PERF_COUNT=True)
            totals, convs = [], []
            for i in range(calls + 5):
                start = time.perf_counter()
                request.infer({0: x.numpy()}, share_inputs=True)
                if i >= 5:
                    totals.append((time.perf_counter() - start) * 1e3)
                    # the layers' times add up to a little more or less than the forward
                    # (and in some processes to far more): their convolutions' share of
                    # them, applied to the forward
                    layers = {p.node_name: p for p in request.get_profiling_info()}.values()
                    conv = sum(p.real_time.total_seconds() for p in layers
                               if p.node_type == "Convolution")  # fmt: skip
                    every = sum(p.real_time.total_seconds() for p in layers)
                    convs.append(totals[-1] * conv / every)
            return {"total_ms": statistics.median(totals), "conv_ms": statistics.median(convs)}
        model = make_model(model_name, dtype, "cpu")
        x = model_input(batch, "fastcnn", 224, dtype, "cpu")
        fn = build("fastcnn", model, x)
        for _ in range(5):
            fn(x)
        totals = []
        print(START, flush=True)  # the verbose log's forwards start here
        for _ in range(calls):
            start = time.perf_counter()
            fn(x)
            totals.append((time.perf_counter() - start) * 1e3)
        print(END, flush=True)
        return {"total_ms": statistics.median(totals)}


def _verbose_conv_ms(stdout: str, calls: int) -> tuple[float, float]:
    """(oneDNN convolution time a forward, convolution primitives a forward) from the
    profile_exec lines between the markers."""
    lines = stdout.split(START, 1)[1].split(END, 1)[0].splitlines()
    times = [
        float(line.rsplit(",", 1)[1])
        for line in lines
        if line.startswith("onednn_verbose,") and ",exec,cpu,convolution," in line
    ]
    return sum(times) / calls, len(times) / calls


def _spawn(model: str, batch: int, kind: str, calls: int, threads: int, precision: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    if kind == "fastcnn-verbose":
        env["ONEDNN_VERBOSE"] = "profile_exec"
    job = json.dumps([model, batch, kind, calls, threads, precision])
    done = subprocess.run(
        [sys.executable, __file__, "--worker", job],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
        check=False,
    )
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(MARK):
            result = json.loads(line[len(MARK) :])
            if kind == "fastcnn-verbose":
                result["conv_ms"], result["conv_calls"] = _verbose_conv_ms(done.stdout, calls)
            return result
    raise RuntimeError(f"{model} b{batch} {kind}: worker failed: {done.stderr[-600:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50,googlenet")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--calls", type=int, default=20, help="timed forwards a process")
    parser.add_argument("--rounds", type=int, default=3, help="processes per kind")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--out", type=Path, default=Path("cpu_breakdown.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(MARK + json.dumps(_worker(*json.loads(args.worker))), flush=True)
        return
    results = ResultFile(
        args.out,
        "cpu_breakdown",
        "Convolution kernels and the rest of a forward, fastcnn and OpenVINO",
        f"{args.precision}, 224x224, {args.threads} threads; medians of {args.calls} forwards "
        f"in each of {args.rounds} processes per runtime (median of the processes); fastcnn's "
        "convolution time from oneDNN's profile_exec log in separate processes, OpenVINO's "
        "from PERF_COUNT (its total includes the counters)",
    )
    for model in args.models.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            runs: dict[str, list[dict]] = {kind: [] for kind in KINDS}
            for r in range(args.rounds):
                for kind in KINDS[r % 3 :] + KINDS[: r % 3]:
                    runs[kind].append(
                        _spawn(model, batch, kind, args.calls, args.threads, args.precision)
                    )

            def med(kind, key, runs=runs):
                return statistics.median(run[key] for run in runs[kind])

            ours_total, ours_conv = med("fastcnn", "total_ms"), med("fastcnn-verbose", "conv_ms")
            ov_total, ov_conv = med("openvino", "total_ms"), med("openvino", "conv_ms")
            for runtime, total, conv in (
                ("fastcnn", ours_total, ours_conv),
                ("openvino", ov_total, ov_conv),
            ):
                row = {"model": model, "batch": batch, "runtime": runtime,
                       "precision": args.precision, "total_ms": total,
                       "conv_ms": conv, "rest_ms": total - conv}  # fmt: skip
                if runtime == "fastcnn":
                    row["conv_calls"] = med("fastcnn-verbose", "conv_calls")
                results.add(row)
            print(f"{model} b{batch}: fastcnn {ours_total:.2f} ms (convs {ours_conv:.2f}), "
                  f"openvino {ov_total:.2f} ms (convs {ov_conv:.2f})", flush=True)  # fmt: skip
    print(results.finish())


if __name__ == "__main__":
    main()
