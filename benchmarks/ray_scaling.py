"""fastcnn on Ray, on this machine (a local Ray instance on loopback with the machine's cores):

- Ray Data (offline): images/s of the plain PyTorch predictor (eager, channels_last) and of
  fastcnn's (fastcnn.ray.Predictor) through map_batches, as 1 actor x N threads and N actors x 1
  thread (N: the cores). Throughput counts from the first batch's start to the last batch's end
  (each actor's start-up is the cold-start table's);
- Ray Serve (online): requests/s and p50/p99 latency of one replica (all cores) at 1, 8 and 32
  concurrent HTTP clients on loopback, with dynamic batching (max_batch_size 16) and without
  (max_batch_size 1); each client sends preprocessed float .npy requests one after another,
  bounded in count and time;
- cold start: an actor's time from creation to a warm Predictor, with the extension already
  built (a warm cache: what every node after the first, or a baked image, sees) and with an
  empty build folder (the extension compiled in the worker).

    python benchmarks/ray_scaling.py --out benchmarks/results/DIR
writes DIR/ray_data.json, DIR/ray_serve.json and DIR/ray_cold_start.json (+ .md tables), each
row as it is measured.
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before Ray: loopback only

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fastcnn.bench.results import ResultFile  # noqa: E402
from fastcnn.ray import ModelSpec, Predictor  # noqa: E402

PREDICTORS = {"eager channels_last": False, "fastcnn": True}  # name -> ModelSpec.optimize


class TimedPredictor(Predictor):
    """Adds each batch's start and end time (the throughput window)."""

    def __call__(self, batch: dict) -> dict:
        start = time.time()
        out = super().__call__(batch)
        n = len(out["logits"])
        out["t_start"], out["t_end"] = np.full(n, start), np.full(n, time.time())
        out["pid"] = np.full(n, os.getpid())
        return out


def data_row(ray, spec, actors, threads, images, batch) -> dict:
    # one block a batch: an actor takes whole blocks, so one block would keep one actor busy
    blocks = [images[i : i + batch] for i in range(0, len(images), batch)]
    ds = ray.data.from_numpy(blocks).map_batches(
        TimedPredictor,
        fn_constructor_kwargs={
            "spec": spec,
            "threads": threads,
            "column": "data",
            "warmup": (batch,),
        },
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=threads,
        batch_size=batch,
        batch_format="numpy",
    )
    start = time.perf_counter()
    rows = ds.select_columns(["t_start", "t_end", "pid"]).take_all()
    wall = time.perf_counter() - start
    if len(rows) != len(images):
        raise RuntimeError(f"{len(rows)} rows came back of {len(images)}")
    t0 = min(r["t_start"] for r in rows)
    spans = {}  # actor pid -> [first start, last end, rows], seconds from the first start
    for r in rows:
        span = spans.setdefault(int(r["pid"]), [float("inf"), 0.0, 0])
        span[0], span[1] = min(span[0], r["t_start"] - t0), max(span[1], r["t_end"] - t0)
        span[2] += 1
    window = max(span[1] for span in spans.values())
    return {"images": len(images), "batch": batch, "actors": actors, "threads": threads,
            "images_per_s": len(images) / window, "wall_s": wall,
            "actor_spans": sorted(spans.values())}  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load(url: str, body: bytes, clients: int, requests: int, seconds: float):
    """`clients` threads posting `body` one request after another, `requests` in all or until
    `seconds` pass. Returns (latencies in s, elapsed s)."""
    latencies: list[float] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    left = [requests]
    deadline = time.perf_counter() + seconds

    def client():
        while time.perf_counter() < deadline:
            with lock:
                if left[0] == 0:
                    return
                left[0] -= 1
            request = urllib.request.Request(
                url, data=body, headers={"Content-Type": "application/x-npy"}
            )
            start = time.perf_counter()
            try:
                with urllib.request.urlopen(request, timeout=60) as answer:
                    answer.read()
            except OSError as exc:  # HTTPError included: the run is void, said by main
                with lock:
                    errors.append(exc)
                return
            with lock:
                latencies.append(time.perf_counter() - start)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, the first: {errors[0]!r}")
    return latencies, time.perf_counter() - start


def serve_rows(ray, spec, cpus, max_batch, concurrency, requests, seconds) -> list[dict]:
    from ray import serve

    from fastcnn.ray import serve_app

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = serve_app(max_batch_size=max_batch, batch_wait_timeout_s=0.01, num_cpus=cpus,
                    spec=spec, warmup=tuple(range(1, max_batch + 1)))  # fmt: skip
    handle = serve.run(app, name="bench", route_prefix="/predict")
    url = f"http://127.0.0.1:{port}/predict"
    buffer = io.BytesIO()
    np.save(buffer, np.random.default_rng(0).standard_normal((3, 224, 224), dtype=np.float32))
    body = buffer.getvalue()
    _load(url, body, max(concurrency), max(concurrency), seconds)  # warm-up, untimed
    rows = []
    for clients in concurrency:
        before = len(handle.batch_sizes.remote().result(timeout_s=60))
        latencies, elapsed = _load(url, body, clients, max(requests, 4 * clients), seconds)
        sizes = handle.batch_sizes.remote().result(timeout_s=60)[before:]
        rows.append({"max_batch": max_batch, "clients": clients, "requests": len(latencies),
                     "requests_per_s": len(latencies) / elapsed,
                     "p50_ms": 1e3 * float(np.percentile(latencies, 50)),
                     "p99_ms": 1e3 * float(np.percentile(latencies, 99)),
                     "mean_batch": float(np.mean(sizes)) if sizes else 0.0})  # fmt: skip
    serve.shutdown()
    return rows


def cold_start_row(ray, spec, cpus, build_dir: str | None) -> dict:
    """Seconds from an actor's creation to its Predictor warm, in a fresh worker process."""
    env = {"FASTCNN_BUILD_DIR": build_dir} if build_dir else {}

    @ray.remote(num_cpus=cpus, runtime_env={"env_vars": env})
    class Probe:
        def __init__(self):
            self.predictor = Predictor(spec=spec)

        def ready(self) -> float:
            return time.time()

    start = time.time()
    probe = Probe.remote()
    ready = ray.get(probe.ready.remote(), timeout=900)  # a compile takes minutes, not hours
    ray.kill(probe)
    return {"extension": "compiled in the worker" if build_dir else "already built",
            "cpus": cpus, "ready_s": ready - start}  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="the results folder")
    p.add_argument("--model", default="resnet50")
    p.add_argument("--images", type=int, default=192)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--requests", type=int, default=64, help="Serve: requests per level")
    p.add_argument("--seconds", type=float, default=60, help="Serve: at most this per level")
    p.add_argument("--skip-cold", action="store_true", help="no cold start (it compiles)")
    args = p.parse_args()

    import ray

    cpus = len(os.sched_getaffinity(0))
    ray.init(num_cpus=cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False)  # fmt: skip
    images = np.random.default_rng(0).standard_normal((args.images, 3, 224, 224), np.float32)
    notes = (f"{args.model}, 224x224 fp32, a local Ray {ray.__version__} instance with {cpus} "
             "CPUs on loopback")  # fmt: skip
    data = ResultFile(args.out / "ray_data.json", "ray_data", "Ray Data map_batches", notes)
    for actors, threads in ((1, cpus), (cpus, 1)):
        base = None
        for name, optimize in PREDICTORS.items():
            spec = ModelSpec(model=args.model, optimize=optimize)
            row = {"predictor": name, **data_row(ray, spec, actors, threads, images, args.batch)}
            base = base or row["images_per_s"]
            data.add({**row, "vs_eager": row["images_per_s"] / base})
            print(data.table.splitlines()[-1], flush=True)
    print(data.finish())

    serving = ResultFile(args.out / "ray_serve.json", "ray_serve", "Ray Serve, one replica",
                         notes + "; clients post preprocessed float .npy over HTTP")  # fmt: skip
    for max_batch in (1, 16):
        serving.add(*serve_rows(ray, ModelSpec(model=args.model), cpus, max_batch,
                                (1, 8, 32), args.requests, args.seconds))  # fmt: skip
        print(serving.table, flush=True)
    print(serving.finish())

    if not args.skip_cold:
        cold = ResultFile(args.out / "ray_cold_start.json", "ray_cold_start",
                          "Ray actor cold start", notes)  # fmt: skip
        spec = ModelSpec(model=args.model)
        cold.add(cold_start_row(ray, spec, cpus, None))
        with tempfile.TemporaryDirectory() as build_dir:
            cold.add(cold_start_row(ray, spec, cpus, build_dir))
        print(cold.finish())
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
