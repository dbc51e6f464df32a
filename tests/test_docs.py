"""The docs quote no figure by hand: every measured number in README.md, docs/ and
benchmarks/README.md sits in a block benchmarks/generate_docs.py writes from a committed file,
and those blocks are up to date. The README stays short, and its links lead somewhere."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import generate_docs  # noqa: E402

# A measurement: a ratio with decimals (1.04x, 1.3×, 1.3 times), a time, a size, a rate, a
# percentage, an error in e-notation, or a table row of decimals. Integer multiples (4x fewer
# multiplies, 3x3 kernels) are arithmetic.
FIGURE = re.compile(
    r"(?<![\w.])(\d+\.\d+\s?(x|×|times)(?!\w)"
    r"|\d+(\.\d+)?\s?(ms|µs|us|s|min|MB|GB|MiB|GiB|KB|%|img/s|GFLOP/s)(?![\w/])"
    r"|\d(\.\d+)?e-\d+)"
    r"|^\|.*\d\.\d.*\|\s*$",
    re.M,
)


def _prose(text: str) -> str:
    """text with its generated blocks and fenced code blanked out (their lines kept, so that
    line numbers still count the file's)."""

    def blank(match: re.Match) -> str:
        return "\n" * match[0].count("\n")

    text = generate_docs.BLOCK.sub(blank, text)
    return re.sub(r"^```.*?^```", blank, text, flags=re.M | re.S)


def test_generated_blocks_are_up_to_date():
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "generate_docs.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("doc", generate_docs.docs(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_figure_typed_by_hand(doc):
    typed = [
        f"line {text[: m.start()].count(chr(10)) + 1}: {m[0]!r}"
        for text in [_prose(doc.read_text())]
        for m in FIGURE.finditer(text)
    ]
    assert typed == [], "move these into a generated block (or a result file)"


def test_the_checker_sees_a_typed_figure():
    for typed in [
        "fastcnn is 1.04x the best peer",
        "1.3× faster",
        "1.3 times faster",
        "it takes 12.5 ms",
        "it takes 45 s",
        "in 2 min",
        "| resnet50 | 12.4 | 13.1 |",
    ]:
        assert FIGURE.search(typed) is not None, typed
    for arithmetic in [
        "a 3x3 conv, 4x fewer multiplies, batch 8",
        "torch 2.11 and 2.14",
        "sm_80",
        "Python 3.12",
        "| `cpu` | CPU tensors |",
    ]:
        assert FIGURE.search(arithmetic) is None, arithmetic


@pytest.mark.parametrize("doc", generate_docs.docs(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_lead_to_files(doc):
    missing = [
        target
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", doc.read_text())
        if not (doc.parent / target).exists()
    ]
    assert missing == []


def test_the_readme_stays_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250
