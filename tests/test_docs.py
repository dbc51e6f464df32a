"""The docs quote no figure by hand: every measured number in README.md, docs/ and
benchmarks/README.md sits in a block benchmarks/generate_docs.py writes from a committed file,
and those blocks are up to date. The README stays short, and its links lead somewhere."""

from __future__ import annotations

import json
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


def _run(folder: Path, date: str, rows: list[dict]) -> None:
    env = {"cpu": "Test CPU", "date": date, "git commit": "0" * 40, "torch": "2.14"}
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"environment": env, "measurements": rows}))


def _row(provider: str, ms: float, vs=None, dtype="float32") -> dict:
    return {"model": "resnet50", "batch": 1, "provider": provider, "ms": ms, "dtype": dtype,
            "speedup": 1.0, "vs_best_peer": vs}  # fmt: skip


def test_the_headline_names_each_precision_and_compares_int8_with_int8(tmp_path, monkeypatch):
    """fp32, bf16 and int8 runs each give their own line; an int8 run's line is fastcnn-int8
    against the int8 peers only (not fastcnn's fp32 row, nor an fp32 peer), and an int8 run is
    never taken for an fp32 one."""
    monkeypatch.setattr(generate_docs, "RESULTS", tmp_path)
    monkeypatch.setattr(generate_docs, "ROOT", tmp_path)
    machine = tmp_path / "cpu-test"
    _run(machine / "fp32", "2026-01-01", [_row("compile", 10.0), _row("fastcnn", 8.0, 1.25)])
    _run(machine / "bf16", "2026-01-02", [_row("openvino-bf16", 5.0, dtype="bfloat16"),
                                         _row("fastcnn", 10.0, 0.5, "bfloat16")])  # fmt: skip
    _run(machine / "int8", "2026-01-03", [_row("fastcnn-cpu", 30.0, 0.33),
                                         _row("fastcnn-int8", 9.0, 1.11),
                                         _row("openvino-int8", 10.0)])  # fmt: skip
    lines = generate_docs.headline(tmp_path / "README.md")
    assert len(lines) == 3, lines
    fp32, bf16, int8 = lines
    assert "fp32 model" in fp32 and "1.25x-1.25x" in fp32 and "/fp32/" in fp32
    assert "bf16 model" in bf16 and "0.50x-0.50x" in bf16 and "OpenVINO bf16" in bf16
    assert "int8 model" in int8 and "1.11x-1.11x" in int8 and "0.33x" not in int8
    assert "OpenVINO int8 (NNCF)" in int8 and "/int8/" in int8
