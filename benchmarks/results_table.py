"""Regenerate the README's results section from the committed files under benchmarks/results/.

The README quotes no figure by hand: everything between its "results:start" and "results:end"
markers is written here, one table per result file, each naming its machine, date and commit.

    python benchmarks/results_table.py          # rewrite README.md
    python benchmarks/results_table.py --check  # exit 1 if README.md is out of date
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's fastcnn (its table columns), not another install

from fastcnn.bench.results import table_lines  # noqa: E402

START, END = "<!-- results:start -->", "<!-- results:end -->"


def _machine(env: dict) -> str:
    gpu = env.get("GPU", "none")
    return f"GPU {gpu} (driver {env.get('CUDA driver')})" if gpu != "none" else f"CPU {env['cpu']}"


def section() -> str:
    files = sorted((ROOT / "benchmarks" / "results").rglob("*.json"))
    parts = [START, ""]
    if not files:
        parts.append("No result file is committed yet.")
    for path in files:
        data = json.loads(path.read_text())
        env = data["environment"]
        kind = next(k for k in data if k != "environment")
        rows = data[kind]
        if kind == "add_relu":  # one dtype keeps the table short; the file has them all
            rows = [r for r in rows if r["dtype"] == rows[0]["dtype"]]
        rel = path.relative_to(ROOT).as_posix()
        parts += [
            f"**{rel}**: {_machine(env)}, torch {env['torch']}, {env['date'][:10]}, "
            f"commit {env['git commit'][:12]} ([table]({rel.removesuffix('.json')}.md))",
            "",
            *table_lines(kind, rows),
            "",
        ]
    parts.append(END)
    return "\n".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check, write nothing")
    args = parser.parse_args()
    readme_path = ROOT / "README.md"
    readme = readme_path.read_text()
    if START not in readme or END not in readme:
        sys.exit(f"README.md has no {START} ... {END} markers")
    head, rest = readme.split(START, 1)
    updated = head + section() + rest.split(END, 1)[1]
    if args.check:
        if updated != readme:
            print("README.md results are out of date: run python benchmarks/results_table.py")
            return 1
        return 0
    readme_path.write_text(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
