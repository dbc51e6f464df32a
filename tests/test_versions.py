"""The declared torch range is the tested one: pyproject.toml's floors are the GPU machine's
versions, which CI's second leg installs (.ci/gpu-machine-versions.txt), and collect_env names
the releases CI runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fastcnn import collect_env

ROOT = Path(__file__).resolve().parent.parent


def _pins() -> dict[str, str]:
    """{package: version} of the GPU-versions leg's constraints (== pins, * kept)."""
    lines = (ROOT / ".ci" / "gpu-machine-versions.txt").read_text().splitlines()
    pins = [re.match(r"([\w-]+)==([\d.*]+)$", ln.strip()) for ln in lines]
    return {m[1]: m[2] for m in pins if m}


def _floor(package: str) -> str:
    text = (ROOT / "pyproject.toml").read_text()
    found = re.findall(rf'"{package}>=([\d.]+)', text)
    assert len(found) == 1, f"pyproject.toml: {package}'s floor {found}"
    return found[0]


def test_the_floors_are_the_gpu_machines_versions_ci_runs():
    pins = _pins()
    assert pins["torch"].startswith(f"{_floor('torch')}.")  # 2.11 <- 2.11.0
    assert pins["triton"] == f"{_floor('triton')}.*"
    assert _floor("torch") == collect_env.TESTED_TORCH[0]
    assert ".ci/gpu-machine-versions.txt" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize(
    ("version", "says"),
    [
        ("2.11.0+cu130", "tested (CI tests 2.11 and 2.14)"),
        ("2.14.1", "tested"),
        ("2.12.1", "between the tested releases, not run by CI"),
        ("2.4.0", "older than the oldest tested, unsupported"),
        ("2.15.0.dev20270101", "newer than the newest tested, untested"),
        ("3.0.0", "newer than the newest tested"),
    ],
)
def test_collect_env_says_where_a_torch_stands(version, says):
    assert collect_env.torch_support(version).startswith(says)


def test_collect_env_checks_the_torch_a_ci_leg_expects(monkeypatch, capsys):
    monkeypatch.setattr(collect_env.torch, "__version__", "2.11.0+cu130")
    assert collect_env.main(["--expect-tested", "oldest"]) == 0
    assert collect_env.main(["--expect-tested", "newest"]) == 1
    assert "the newest tested is 2.14" in capsys.readouterr().err
