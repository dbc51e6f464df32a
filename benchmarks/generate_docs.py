"""Regenerate every generated block of the docs from committed files: no figure is typed by hand.

README.md, docs/*.md and benchmarks/README.md hold blocks

    <!-- generated: KIND [ARG] -->
    ...
    <!-- /generated -->

whose contents this script writes. KIND is one of
    headline      per machine, fastcnn against the fastest peer in its latest fp32, bf16 and
                  int8 model runs
    latest        per machine, the latest fp32 model run: fastcnn against the fastest peer, plot
    file PATH     one result file's table (PATH under benchmarks/results/)
    runs          every committed result file: machine, kind, date, commit, command
    tolerances    the test suite's per-dtype tolerance table (tests/fastcnn_testing.py)

    python benchmarks/generate_docs.py          # rewrite the blocks
    python benchmarks/generate_docs.py --check  # exit 1 if a block is out of date
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))  # this checkout's fastcnn (its table columns), not another install

from fastcnn.bench.results import table_lines  # noqa: E402

# what a headline compares fastcnn with
PEERS = {"compile", "jit", "openvino", "openvino-bf16", "openvino-default", "onnxruntime"}
INT8_PEERS = {"compile-int8", "openvino-int8", "onnxruntime-int8"}
BLOCK = re.compile(r"(<!-- generated: ([^>]*?) -->\n)(.*?)(<!-- /generated -->)", re.S)
PEER_NAMES = {
    "eager": "eager",
    "eager-cl": "eager channels_last",
    "compile": "Inductor",
    "openvino": "OpenVINO f32",
    "openvino-bf16": "OpenVINO bf16",
    "openvino-default": "OpenVINO default",
    "onnxruntime": "ONNX Runtime",
    "jit": "TorchScript",
    "compile-int8": "Inductor int8 (PT2E)",
    "openvino-int8": "OpenVINO int8 (NNCF)",
    "onnxruntime-int8": "ONNX Runtime int8 (QDQ)",
}
# the precision each run's dtype names (OpenVINO's own: its provider names it)
PRECISIONS = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def peer_name(provider: str, env: dict) -> str:
    """A provider as the docs name it, OpenVINO with the precision it ran (its default's as
    the run recorded it: bf16 on CPUs with native bf16)."""
    name = PEER_NAMES.get(provider, provider)
    if provider == "openvino-default":
        name += f" ({env.get('openvino default precision', 'precision not recorded')})"
    return name


def docs() -> list[Path]:
    """The files whose generated blocks this script owns."""
    return [ROOT / "README.md", ROOT / "benchmarks" / "README.md",
            *sorted((ROOT / "docs").glob("*.md"))]  # fmt: skip


def _load(path: Path) -> tuple[dict, str, list[dict]]:
    data = json.loads(path.read_text())
    kind = next(k for k in data if k != "environment")
    return data["environment"], kind, data[kind]


def _rel(path: Path, doc: Path) -> str:
    """path as a link from doc's folder."""
    return Path(
        *([".."] * len(doc.parent.relative_to(ROOT).parts)), path.relative_to(ROOT)
    ).as_posix()


def _machine(path: Path) -> str:
    return path.relative_to(RESULTS).parts[0]


def _source(path: Path, env: dict, doc: Path) -> str:
    """**file**: the machine, torch, date and commit (the line above every table)."""
    gpu = env.get("GPU", "none")
    where = f"GPU {gpu} (driver {env.get('CUDA driver')})" if gpu != "none" else f"CPU {env['cpu']}"
    return (
        f"[{path.relative_to(RESULTS).as_posix()}]({_rel(path, doc)}): {where}, torch "
        f"{env['torch']}, {env['date'][:10]}, commit {env['git commit'][:12]}"
        + (f", `{env['command']}`" if env.get("command") else "")
        + ("" if env.get("complete", "yes") == "yes" else f" ({env['complete']})")
    )


def _model_runs(precision: str = "float32") -> dict[str, tuple[Path, dict, list[dict]]]:
    """{machine: its latest fastcnn-bench model run against peers in this precision (a dtype,
    or "int8": a run with int8 providers)}."""
    latest: dict[str, tuple[Path, dict, list[dict]]] = {}
    for path in sorted(RESULTS.rglob("results.json")):
        env, kind, rows = _load(path)
        if kind != "measurements" or not rows or "model" not in rows[0]:
            continue
        providers = {r["provider"] for r in rows}
        if precision == "int8":
            wanted = bool(providers & INT8_PEERS)
        else:  # peers (not an A/B of fastcnn against itself), no int8, one dtype
            wanted = bool(providers & PEERS) and not any(p.endswith("int8") for p in providers)
            wanted = wanted and all(r.get("dtype") == precision for r in rows)
        if not wanted:
            continue
        machine = _machine(path)
        if machine not in latest or env["date"] > latest[machine][1]["date"]:
            latest[machine] = (path, env, rows)
    return latest


def headline(doc: Path) -> list[str]:
    """Per machine, its latest fp32 run, then its latest bf16 and int8 runs, each naming its
    precision and every peer's (int8: fastcnn's int8 model against the int8 peers)."""
    lines = []
    for precision in ("float32", "bfloat16", "int8"):
        for machine, (path, env, rows) in _fast_first(_model_runs(precision)):
            ours = [r for r in rows if r.get("vs_best_peer")
                    and (precision != "int8" or r["provider"] == "fastcnn-int8")]  # fmt: skip
            if not ours:
                continue
            ratios = [r["vs_best_peer"] for r in ours]
            peers = sorted({peer_name(r["provider"], env) for r in rows
                            if not r["provider"].startswith("fastcnn")})  # fmt: skip
            models = ", ".join(dict.fromkeys(r["model"] for r in ours))
            batches = " and ".join(str(b) for b in dict.fromkeys(r["batch"] for r in ours))
            what = "int8 model" if precision == "int8" else f"{PRECISIONS.get(precision)} model"
            lines.append(
                f"- **{machine}** ({env['cpu']}, {what}, {models}, batch {batches}): "
                f"fastcnn {min(ratios):.2f}x-{max(ratios):.2f}x the fastest of "
                f"{', '.join(peers)} ([{path.parent.name}]({_rel(path, doc)}), "
                f"{env['date'][:10]}, commit {env['git commit'][:7]})"
            )
    return lines or ["No model run is committed yet."]


def _fast_first(runs: dict) -> list:
    """Machines with the newest run first."""
    return sorted(runs.items(), key=lambda item: item[1][1]["date"], reverse=True)


def _versus(rows: list[dict], env: dict) -> list[str]:
    """fastcnn's rows against the fastest other provider of the same (model, batch), and
    against the run's baseline (its first provider, which every speedup is relative to)."""
    baseline = peer_name(rows[0]["provider"], env)
    lines = [
        "| model | batch | fastcnn ms | fastest peer | its ms | fastcnn vs fastest peer "
        f"| fastcnn vs {baseline} |",
        "|---" * 7 + "|",
    ]
    for r in rows:
        if not r.get("vs_best_peer"):
            continue
        peers = [p for p in rows if (p["model"], p["batch"]) == (r["model"], r["batch"])
                 and not p["provider"].startswith("fastcnn") and p.get("ms")]  # fmt: skip
        best = min(peers, key=lambda p: p["ms"])
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['ms']:.1f} | "
            f"{peer_name(best['provider'], env)} | {best['ms']:.1f} | "
            f"{r['vs_best_peer']:.2f}x | {r['speedup']:.2f}x |"
        )
    return lines


def latest(doc: Path) -> list[str]:
    lines = []
    for machine, (path, env, rows) in _fast_first(_model_runs()):
        lines += [f"### {machine}", "", _source(path, env, doc), "", *_versus(rows, env), ""]
        plot = path.parent / "throughput.png"
        if plot.exists():
            lines += [f"![{machine} throughput]({_rel(plot, doc)})", ""]
    return lines[:-1] if lines else ["No model run is committed yet."]


def file(doc: Path, name: str) -> list[str]:
    path = RESULTS / name
    env, kind, rows = _load(path)
    if kind == "add_relu":  # one dtype keeps the table short; the file has them all
        rows = [r for r in rows if r["dtype"] == rows[0]["dtype"]]
    return [_source(path, env, doc), "", *table_lines(kind, rows)]


def runs(doc: Path) -> list[str]:
    lines = [
        "| result file | kind | CPU / GPU | date | commit | command |",
        "|---|---|---|---|---|---|",
    ]
    for path in sorted(RESULTS.rglob("*.json")):
        env, kind, _ = _load(path)
        device = env.get("GPU") if env.get("GPU", "none") != "none" else env.get("cpu", "")
        command = f"`{env['command']}`" if env.get("command") else ""
        lines.append(
            f"| [{path.relative_to(RESULTS).as_posix()}]({_rel(path, doc)}) | {kind} | {device} "
            f"| {env['date'][:10]} | {env['git commit'][:7]} | {command} |"
        )
    return lines


def tolerances(doc: Path) -> list[str]:
    sys.path.insert(0, str(ROOT / "tests"))
    import fastcnn_testing

    lines = ["| dtype | rtol | atol |", "|---|---|---|"]
    for dtype, (rtol, atol) in fastcnn_testing.TOLERANCES.items():
        lines.append(f"| {str(dtype).removeprefix('torch.')} | {rtol:g} | {atol:g} |")
    lines += ["", f"Winograd convs (`cpu:winograd`): {fastcnn_testing.WINOGRAD_RTOL:g} of the "
              "outputs' scale (`WINOGRAD_RTOL`)."]  # fmt: skip
    return lines


KINDS = {"headline": headline, "latest": latest, "file": file, "runs": runs,
         "tolerances": tolerances}  # fmt: skip


def render(doc: Path, text: str) -> str:
    def block(match: re.Match) -> str:
        kind, *args = match[2].split()
        if kind not in KINDS:
            sys.exit(f"{doc.relative_to(ROOT)}: unknown generated block {kind!r}")
        body = "\n".join(KINDS[kind](doc, *args))
        return f"{match[1]}{body}\n{match[4]}"

    return BLOCK.sub(block, text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check, write nothing")
    args = parser.parse_args()
    stale = []
    for doc in docs():
        text = doc.read_text()
        updated = render(doc, text)
        if updated != text:
            stale.append(doc.relative_to(ROOT).as_posix())
            if not args.check:
                doc.write_text(updated)
    if args.check and stale:
        print(f"generated blocks out of date in {', '.join(stale)}: run {Path(__file__).name}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
