"""pytest plugin for gpu_check.sh: the outcome of every test so far, as Markdown rewritten after
each test (so a run stopped by its time limit still says what passed and what failed).

    FASTCNN_TEST_PROGRESS=out.md python -m pytest -p benchmarks.pytest_progress ...

Under pytest-xdist the controller receives every worker's reports, so one file covers them all.
"""

from __future__ import annotations

import collections
import os
from pathlib import Path

_PATH = os.environ.get("FASTCNN_TEST_PROGRESS")
_counts: collections.Counter[str] = collections.Counter()
_failed: list[str] = []
_skips: collections.Counter[str] = collections.Counter()
_durations: list[tuple[float, str]] = []
_state = {"finished": False}


def _write() -> None:
    if not _PATH:
        return
    path = Path(_PATH)
    done = "complete" if _state["finished"] else "partial: still running or stopped"
    counts = ", ".join(f"{n} {outcome}" for outcome, n in sorted(_counts.items())) or "no test"
    lines = [f"## {path.stem}: {counts} ({done})", ""]
    lines += [f"- FAILED {line}" for line in _failed[:50]]
    lines += [f"- skipped {n}x: {reason}" for reason, n in _skips.most_common(8)]
    slowest = sorted(_durations, reverse=True)[:5]
    lines += [f"- slowest: {s:.1f} s {nodeid}" for s, nodeid in slowest]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)


def pytest_runtest_logreport(report) -> None:
    if report.when == "call":
        outcome = report.outcome
    elif report.failed:
        outcome = "error"  # in setup or teardown
    elif report.skipped:
        outcome = "skipped"  # skipped in setup (skipif marks)
    else:
        return
    _counts[outcome] += 1
    if report.failed:
        message = str(report.longrepr).strip().splitlines()[-1:] if report.longrepr else []
        _failed.append(f"{report.nodeid}: {' '.join(message)[:200]}")
    elif report.skipped and isinstance(report.longrepr, tuple):
        _skips[str(report.longrepr[2])[:150]] += 1
    _durations.append((report.duration, report.nodeid))
    _write()


def pytest_sessionfinish(session, exitstatus) -> None:
    _state["finished"] = True
    _write()
