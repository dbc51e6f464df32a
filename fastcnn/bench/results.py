"""Timing, the environment block and result files: shared by fastcnn-bench and benchmarks/."""

from __future__ import annotations

import datetime
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

import torch

from fastcnn import collect_env


def git_commit() -> str:
    """FASTCNN_COMMIT (the GPU machine gets a copy of the tree without .git), else git's HEAD."""
    if os.environ.get("FASTCNN_COMMIT"):
        return os.environ["FASTCNN_COMMIT"]
    root = Path(__file__).resolve().parents[2]  # the checkout, when installed editable
    try:
        done = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True)
    except OSError:
        return "unknown"
    return done.stdout.decode().strip() or "unknown"


def time_ms(fn, iters: int, warmup: int = 10) -> float:
    """Median milliseconds per call: CUDA events around each call on a GPU, else perf_counter."""
    return time_interleaved({"fn": fn}, iters, warmup)["fn"]


def time_interleaved(fns: dict, iters: int, warmup: int = 3) -> dict[str, float]:
    """Median milliseconds per call of each fn, sampled round-robin (see time_samples)."""
    return {name: statistics.median(t) for name, t in time_samples(fns, iters, warmup).items()}


def time_samples(fns: dict, iters: int, warmup: int = 3) -> dict[str, list[float]]:
    """Milliseconds of each of `iters` calls of each fn, sampled round-robin (one call of each,
    then the next round), so that a machine whose speed drifts during the run (a shared CPU, GPU
    clocks) weighs on every provider alike instead of on whichever ran in the slow minute. Each
    round starts one provider further on: the place in a round matters too (on a CPU, a large
    output is slower to produce first in a round than after another provider's)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    names = list(fns)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for i in range(iters):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            samples[name].append(_call_ms(fns[name]))
    return samples


def _call_ms(fn) -> float:
    """One call's milliseconds: CUDA events around it on a GPU, else perf_counter."""
    if not torch.cuda.is_available():
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def environment() -> dict[str, str]:
    """collect_env's facts plus the date and the commit, for every result file."""
    env = {k: str(v) for k, v in collect_env.collect().items()}
    env["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    env["git commit"] = git_commit()
    return env


def machine(env: dict[str, str], device: str) -> str:
    if device == "cuda":
        return f"{env['GPU']} (driver {env['CUDA driver']})"
    return f"CPU {env['cpu']}, {torch.get_num_threads()} threads"


# Per result kind (the JSON's measurement key): the table columns, (header, row format). One
# home for both the Markdown written beside each result file and the README's results section.
COLUMNS = {
    "add_relu": [
        ("dtype", "{dtype}"),
        ("shape", "{shape_str}"),
        ("provider", "{provider}"),
        ("ms", "{ms:.4f}"),
        ("GB/s", "{GB/s:.0f}"),
        ("vs eager", "{speedup_vs_eager:.2f}x"),
    ],
    "cpu": [
        ("model", "{model}"),
        ("provider", "{provider}"),
        ("ms", "{ms:.1f}"),
        ("img/s", "{img/s:.1f}"),
        ("vs eager", "{speedup:.2f}x"),
        ("vs best peer", "{vs_best_peer:.2f}x"),
        ("setup s", "{setup_s:.1f}"),
        ("rel. error", "{max_rel_error:.1e}"),
    ],
    "conv": [
        ("layer", "{layer}"),
        ("shape", "{shape}"),
        ("+res", "{residual}"),
        ("provider", "{provider}"),
        ("ms", "{ms:.4f}"),
        ("TFLOP/s", "{TFLOP/s:.1f}"),
        ("vs eager", "{speedup:.2f}x"),
        ("vs cuBLAS", "{fastcnn_vs_cublas:.2f}"),
    ],
    "cpu_breakdown": [
        ("model", "{model}"),
        ("batch", "{batch}"),
        ("runtime", "{runtime}"),
        ("forward ms", "{total_ms:.2f}"),
        ("conv kernels ms", "{conv_ms:.2f}"),
        ("rest ms", "{rest_ms:.2f}"),
        ("conv calls", "{conv_calls:.0f}"),
    ],
    "recycled_outputs": [
        ("model", "{model}"),
        ("batch", "{batch}"),
        ("fresh outputs ms", "{fresh_ms:.2f}"),
        ("recycled outputs ms", "{recycled_ms:.2f}"),
        ("speedup", "{speedup:.3f}x"),
    ],
    "inception_overhead": [
        ("model", "{model}"),
        ("batch", "{batch}"),
        ("blocks", "{blocks}"),
        ("block calls ms", "{block_ms:.2f}"),
        ("their convs alone ms", "{conv_ms:.2f}"),
        ("overhead ms", "{overhead_ms:.2f}"),
    ],
    "cpu_ab": [
        ("model", "{model}"),
        ("batch", "{batch}"),
        ("on / off", "{switch}"),
        ("off ms", "{off_ms:.2f}"),
        ("on ms", "{on_ms:.2f}"),
        ("speedup", "{speedup:.3f}x"),
    ],
    "batch_cycling": [
        ("model", "{model}"),
        ("provider", "{provider}"),
        ("batch sizes", "{batches}"),
        ("weights MB", "{weights_mb:.0f}"),
        ("packs MB", "{packs_mb:.0f}"),
        ("packs / weights", "{packs_x:.2f}x"),
        ("RSS growth MB", "{rss_growth_mb:.0f}"),
        ("RSS growth / weights", "{rss_growth_x:.2f}x"),
        ("RSS growth / eager's", "{rss_vs_eager:.2f}x"),
        ("kept outputs MB", "{outputs_mb:.0f}"),
        ("steady ms/img", "{steady_ms_per_image:.2f}"),
        ("cycling ms/img", "{cycling_ms_per_image:.2f}"),
        ("cycling / steady", "{cycling_vs_steady:.3f}x"),
    ],
    "ray_data": [
        ("predictor", "{predictor}"),
        ("actors x threads", "{actors} x {threads}"),
        ("images", "{images}"),
        ("batch", "{batch}"),
        ("images/s", "{images_per_s:.1f}"),
        ("vs eager", "{vs_eager:.2f}x"),
        ("job wall s (with actor start)", "{wall_s:.1f}"),
    ],
    "ray_serve": [
        ("max batch", "{max_batch}"),
        ("clients", "{clients}"),
        ("requests", "{requests}"),
        ("requests/s", "{requests_per_s:.1f}"),
        ("p50 ms", "{p50_ms:.0f}"),
        ("p99 ms", "{p99_ms:.0f}"),
        ("mean batch", "{mean_batch:.1f}"),
    ],
    "ray_cold_start": [
        ("extension", "{extension}"),
        ("actor CPUs", "{cpus}"),
        ("creation to warm predictor s", "{ready_s:.1f}"),
    ],
    "compare_runs": [
        ("model", "{model}"),
        ("batch", "{batch}"),
        ("provider / baseline", "{provider} / {baseline}"),
        ("before", "{before:.3f}x"),
        ("after", "{after:.3f}x"),
        ("after / before", "{change:.3f}x"),
        ("ms before", "{before_ms:.1f}"),
        ("ms after", "{after_ms:.1f}"),
        ("ms before / after", "{ms_change:.3f}x"),
        ("runs", "{runs}"),
    ],
    "winograd_convs": [
        ("batch", "{batch}"),
        ("channels", "{c_in} -> {c_out}"),
        ("size", "{size}x{size}"),
        ("direct ms", "{direct_ms:.3f}"),
        ("Winograd ms", "{winograd_ms:.3f}"),
        ("speedup", "{speedup:.2f}x"),
        ("direct error", "{direct_error:.1e}"),
        ("Winograd error", "{winograd_error:.1e}"),
    ],
    "host_overhead": [
        ("backend", "{backend}"),
        ("dtype", "{dtype}"),
        ("call", "{what}"),
        ("host µs", "{us:.1f}"),
    ],
    "inception": [
        ("block", "{block}"),
        ("provider", "{provider}"),
        ("ms", "{ms:.4f}"),
        ("vs eager", "{speedup:.2f}x"),
        ("rel. error", "{max_rel_error:.1e}"),
    ],
    "int8_accuracy": [
        ("model", "{model}"),
        ("data", "{data}"),
        ("observer", "{observer}"),
        ("fp32 top-1 %", "{fp32_top1:.2f}"),
        ("int8 top-1 %", "{int8_top1:.2f}"),
        ("points lost", "{points_lost:.2f}"),
        ("agreement %", "{agreement:.2f}"),
        ("logits SQNR dB", "{sqnr_db:.1f}"),
        ("int8 convs", "{int8_convs}/{convs}"),
    ],
    "bf16_accuracy": [
        ("model", "{model}"),
        ("data", "{data}"),
        ("fp32 top-1 %", "{fp32_top1:.2f}"),
        ("bf16 top-1 %", "{bf16_top1:.2f}"),
        ("points lost", "{points_lost:.2f}"),
        ("agreement %", "{agreement:.2f}"),
        ("logits SQNR dB", "{sqnr_db:.1f}"),
        ("logits rel. error", "{rel_error:.1e}"),
    ],
    "measurements": [
        ("model", "{model}"),
        ("batch", "{batch}"),
        ("provider", "{provider}"),
        ("img/s", "{img_per_s:.1f}"),
        ("latency ms", "{ms:.3f}"),
        ("CPU ms", "{cpu_ms:.1f}"),
        ("speedup", "{speedup:.2f}x"),
        ("vs best peer", "{vs_best_peer:.2f}x"),
        ("setup s", "{setup_s:.1f}"),
        ("rel. error", "{max_rel_error:.1e}"),
        ("status", "{status}"),
    ],
}


def table_lines(kind: str, rows: list[dict]) -> list[str]:
    """The Markdown table of rows under COLUMNS[kind]; a value a row lacks is left blank."""
    columns = COLUMNS[kind]
    lines = [
        "| " + " | ".join(header for header, _ in columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for row in rows:
        if isinstance(row.get("shape"), list):  # older add_relu files have no shape_str
            row = {"shape_str": "x".join(map(str, row["shape"])), **row}
        cells = []
        for _, fmt in columns:
            try:
                cells.append(fmt.format(**row))
            except (KeyError, TypeError, ValueError):
                cells.append("")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _replace_text(path: Path, text: str) -> None:
    """Write path atomically (a temporary beside it, then rename): a reader, or a process killed
    mid-write, never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_results(
    path: Path, kind: str, rows: list[dict], env: dict, title: str, notes: str
) -> str:
    """Write path (JSON: environment + rows under `kind`) and path.md (its table), each
    atomically; return the table."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _replace_text(path, json.dumps({"environment": env, kind: rows}, indent=1))
    lines = [
        f"# {title} ({env['date']}, commit {env['git commit'][:12]})",
        "",
        f"torch {env['torch']}, triton {env['triton']}; {notes}",
        "",
        *table_lines(kind, rows),
    ]
    table = "\n".join(lines) + "\n"
    _replace_text(path.with_suffix(".md"), table)
    return table


class ResultFile:
    """A result file (JSON + its Markdown table) that is valid after every row: each add()
    rewrites both atomically, so a benchmark killed by a time limit leaves everything it measured
    so far. The environment's "complete" entry says "no" until finish() is called.

        results = ResultFile(path, "conv", title, notes)
        for layer in layers:
            results.add(*measure(layer))
        print(results.finish())
    """

    def __init__(self, path: Path, kind: str, title: str, notes: str, device: str = "cpu"):
        self.path, self.kind, self.notes = Path(path), kind, notes
        self.env = environment()
        self.title = f"{title} on {machine(self.env, device)}"
        self.env["complete"] = "no (partial: still running, or stopped by a time limit)"
        self.rows: list[dict] = []
        self.table = self._write()

    def add(self, *rows: dict) -> None:
        self.rows.extend(rows)
        self.table = self._write()

    def finish(self, note: str = "yes") -> str:
        """Mark the file complete (or say why not, e.g. a budget that stopped it) and return
        its table."""
        self.env["complete"] = note
        self.table = self._write()
        return self.table

    def _write(self) -> str:
        return write_results(self.path, self.kind, self.rows, self.env, self.title, self.notes)
