"""Each provider timed in processes of its own (fastcnn-bench --processes N).

Runtimes keep worker threads between calls (ONNX Runtime's spin by default, OpenVINO and
OpenMP keep theirs parked), and in one process one runtime's threads slowed the next one's
calls in round-robin timing. So here every (model, provider) runs in a fresh Python process
that builds the model, computes eager's output as the reference, builds the provider, and per
batch: checks the first call against the reference, warms up, times `iters` calls. The parent
runs those processes one after another, N rounds, each round starting one provider further on
(a machine that drifts weighs on every provider alike), and reports per (model, batch,
provider) the median of the process medians, with each process's median kept in the row.

Reusable for any provider fastcnn.bench.providers.build knows (including EXTERNAL_BUILDERS):

    rows = run_in_processes([Job("resnet50", "openvino", [1, 8])], rounds=3, iters=12,
                            threads=2)

A worker is `python -m fastcnn.bench.isolated` with one Job as JSON on stdin; it prints its
rows as one JSON line after RESULT_MARK on stdout.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time

import torch

RESULT_MARK = "fastcnn-bench-worker-rows: "


# Each runtime runs as its documentation sets it up: ONNX Runtime with allow_spinning=0, and
# OpenMP (torch's eager, Inductor and fastcnn's oneDNN convs) with whatever the caller's
# environment says (unset: GNU OpenMP's default, spin a while, then sleep). On a quiet machine
# that default is the fast one; on a machine loaded by other processes, spinning threads wait
# for preempted peers at every barrier, several times slower than sleeping ones, so run there
# with OMP_WAIT_POLICY=PASSIVE, and trust neither. The result file records the policy.
def omp_wait_policy() -> str:
    """What the workers' OpenMP threads do between parallel regions, for the result file."""
    return os.environ.get("OMP_WAIT_POLICY") or "unset (GNU OpenMP default: spin, then sleep)"


WARMUP = 3
PROCESS_TIMEOUT_S = 1800


@dataclasses.dataclass
class Job:
    model: str
    provider: str
    batches: list[int]
    dtype: str = "float32"
    size: int = 224
    iters: int = 10
    threads: int = 0  # 0: torch's default
    warmup: int = WARMUP


def measure(job: Job) -> list[dict]:
    """In this process: one row per batch of job (see the module docstring)."""
    from fastcnn.bench.measure import DTYPES, first_call, make_timer, model_input, tolerance_for
    from fastcnn.bench.providers import build, make_model, source_model
    from fastcnn.bench.results import time_samples

    if job.threads:
        torch.set_num_threads(job.threads)
    dtype = DTYPES[job.dtype]
    rows = []
    with torch.inference_mode():
        model = make_model(job.model, dtype, "cpu")
        example = model_input(1, "eager", job.size, dtype, "cpu")
        start = time.perf_counter()
        try:
            fn = build(job.provider, source_model(job.provider, model, job.model), example)
        except Exception as exc:
            fn = exc
        build_s = time.perf_counter() - start
        for batch in job.batches:
            row = {"model": job.model, "batch": batch, "dtype": job.dtype}
            row.update(provider=job.provider, device="cpu", setup_s=build_s)
            build_s = 0.0  # counted once, with the first batch
            rows.append(row)
            if isinstance(fn, Exception):
                row["status"] = f"unavailable: {fn}"
                continue
            expected = model(model_input(batch, "eager", job.size, dtype, "cpu")).float()
            x = model_input(batch, job.provider, job.size, dtype, "cpu")
            if not first_call(fn, x, expected, row, tolerance_for(job.provider, dtype)):
                continue
            cpu_start = time.process_time()
            samples = time_samples({"fn": make_timer(fn, x)}, job.iters, job.warmup)["fn"]
            cpu_ms = (time.process_time() - cpu_start) * 1e3 / (job.iters + job.warmup)
            row.update(status="ok", ms=statistics.median(samples), samples_ms=samples)
            row["cpu_ms"] = cpu_ms  # process CPU time a call, all threads: wall >> cpu/threads
            # means the process waited for the CPU (a loaded machine)
    return rows


def _spawn(job: Job) -> list[dict]:
    """measure(job) in a new Python process; its rows, or one failed row per batch."""
    env = dict(os.environ)
    if job.threads:  # OpenMP and the runtimes read these before any set_num_threads call
        env["OMP_NUM_THREADS"] = str(job.threads)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "fastcnn.bench.isolated"],
            input=json.dumps(dataclasses.asdict(job)),
            capture_output=True,
            text=True,
            env=env,
            timeout=PROCESS_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        why = f"failed: the worker process ran past {PROCESS_TIMEOUT_S} s"
    else:
        for line in reversed(done.stdout.splitlines()):
            if line.startswith(RESULT_MARK):
                return json.loads(line[len(RESULT_MARK) :])
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        why = f"failed: the worker process exited {done.returncode}: {last[:300]}"
    return [
        {"model": job.model, "batch": b, "dtype": job.dtype, "provider": job.provider,
         "device": "cpu", "status": why}
        for b in job.batches
    ]  # fmt: skip


def run_in_processes(jobs: list[Job], rounds: int, progress=None) -> list[dict]:
    """Every job in `rounds` processes (round r starts at job r, so each job leads one round);
    one row per (model, batch, provider), ordered so (by the jobs' order of models and
    providers, then batch): ms is the median of the process
    medians, process_ms every process's median, setup_s the median setup."""
    found: dict[tuple, list[dict]] = {}
    for r in range(rounds):
        k = r % len(jobs)
        for job in jobs[k:] + jobs[:k]:
            if progress is not None:
                progress.step(f"{job.model} {job.provider} (process {r + 1}/{rounds})")
            for row in _spawn(job):
                found.setdefault((row["model"], row["batch"], row["provider"]), []).append(row)
    rows = []
    for job in jobs:
        for batch in job.batches:
            runs = found[(job.model, batch, job.provider)]
            ok = [run for run in runs if run.get("status") == "ok"]
            row = dict(ok[0] if ok else runs[0])
            row.pop("samples_ms", None)
            if ok:
                row["process_ms"] = [run["ms"] for run in ok]
                row["cpu_ms"] = statistics.median(run["cpu_ms"] for run in ok)
                row["ms"] = statistics.median(row["process_ms"])
                row["setup_s"] = statistics.median(run["setup_s"] for run in ok)
                row["max_rel_error"] = max(run["max_rel_error"] for run in ok)
                row["img_per_s"] = batch / row["ms"] * 1e3
            if ok and len(ok) < len(runs):
                failed = next(run for run in runs if run.get("status") != "ok")
                row["failed_processes"] = (
                    f"{len(runs) - len(ok)} of {len(runs)}: {failed['status']}"
                )
            rows.append(row)
    models = list(dict.fromkeys(job.model for job in jobs))
    providers = list(dict.fromkeys(job.provider for job in jobs))
    rows.sort(key=lambda r: (models.index(r["model"]), r["batch"], providers.index(r["provider"])))
    return rows


def _worker() -> None:
    job = Job(**json.loads(sys.stdin.read()))
    rows = measure(job)
    print(RESULT_MARK + json.dumps(rows), flush=True)


if __name__ == "__main__":
    _worker()
