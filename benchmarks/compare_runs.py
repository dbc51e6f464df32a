"""Two sets of fastcnn-bench runs compared (e.g. two commits): a provider's speed relative to a
baseline provider timed in the same run, before and after, so that a machine's drift between
runs cancels out. Runs of the two sets are best made alternately.

    python benchmarks/compare_runs.py --before DIR [DIR ...] --after DIR [DIR ...] \\
        --provider fastcnn --baseline eager-cl --out FILE

Per (model, batch): the median over each set's runs of baseline ms / provider ms, and the ratio
of the two medians (above 1: faster after); and the provider's own median ms before and after,
with their ratio (on a machine whose baseline is noisier than the provider, the steadier one).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fastcnn.bench.results import ResultFile  # noqa: E402


def _timings(runs: list[Path], provider: str, baseline: str) -> dict[tuple, list[tuple]]:
    """{(model, batch): [(provider ms, baseline ms) of each run]}."""
    found: dict[tuple, list[tuple]] = {}
    for run in runs:
        rows = json.loads((run / "results.json").read_text())["measurements"]
        ms = {(r["model"], r["batch"], r["provider"]): r["ms"] for r in rows if r.get("ms")}
        for (model, batch, name), t in ms.items():
            if name == provider and (model, batch, baseline) in ms:
                found.setdefault((model, batch), []).append((t, ms[(model, batch, baseline)]))
    return found


def _commits(runs: list[Path]) -> str:
    commits = {
        json.loads((r / "results.json").read_text())["environment"]["git commit"][:7] for r in runs
    }
    return ", ".join(sorted(commits))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, nargs="+", required=True)
    parser.add_argument("--after", type=Path, nargs="+", required=True)
    parser.add_argument("--provider", default="fastcnn")
    parser.add_argument("--baseline", default="eager-cl")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    before = _timings(args.before, args.provider, args.baseline)
    after = _timings(args.after, args.provider, args.baseline)
    notes = (
        f"{args.provider}'s speed relative to {args.baseline} in the same run, median over "
        f"runs; before: commit {_commits(args.before)} ({len(args.before)} runs), after: commit "
        f"{_commits(args.after)} ({len(args.after)} runs)"
    )
    results = ResultFile(args.out, "compare_runs", "Before / after", notes)
    for key in before:
        if key not in after:
            continue
        b = statistics.median(base / t for t, base in before[key])
        a = statistics.median(base / t for t, base in after[key])
        b_ms = statistics.median(t for t, _ in before[key])
        a_ms = statistics.median(t for t, _ in after[key])
        results.add({
            "model": key[0], "batch": key[1], "provider": args.provider,
            "baseline": args.baseline, "before": b, "after": a, "change": a / b,
            "before_ms": b_ms, "after_ms": a_ms, "ms_change": b_ms / a_ms,
            "before_runs": before[key], "after_runs": after[key],
            "runs": f"{len(before[key])} / {len(after[key])}",
        })  # fmt: skip
    print(results.finish())
    return 0


if __name__ == "__main__":
    sys.exit(main())
