"""benchmarks/gpu_check.sh rehearsed on the CPU (--rehearse: the same steps, limits, logging and
file handling at tiny sizes): a step killed by its limit must not cost the others' results.

The device tool returns at most 8 files from $OUT; the script keeps exactly three there.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from fastcnn import _extension
from fastcnn.bench.results import ResultFile

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def _rehearsal_env(tmp_path: Path, steps: str, limits: str = "") -> dict[str, str]:
    env = {
        **os.environ,
        "OUT": str(tmp_path / "out"),
        "PYTHON": sys.executable,  # this interpreter, whatever python3 is on PATH
        "GPU_CHECK_REHEARSE": "1",
        "GPU_CHECK_STEPS": steps,
        "GPU_CHECK_LIMITS": limits,
        "GPU_CHECK_RESULTS": str(tmp_path / "results"),
    }
    env.pop("TRITON_INTERPRET", None)  # the script sets it itself
    return env


def _rehearse(tmp_path: Path, steps: str, limits: str) -> tuple[subprocess.CompletedProcess, Path]:
    env = _rehearsal_env(tmp_path, steps, limits)
    done = subprocess.run(
        ["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=240
    )
    return done, Path(env["OUT"])


def _needs_the_extension() -> None:
    if _extension.load() is None:  # the rehearsal's steps load this build instead of compiling
        pytest.skip("the extension does not build here")


@pytest.mark.skipif(not shutil.which("timeout") or not shutil.which("tar"), reason="coreutils")
def test_a_killed_step_keeps_the_log_summary_and_finished_steps(tmp_path):
    _needs_the_extension()
    done, out = _rehearse(tmp_path, "env,models-fp16,conv", "models-fp16=1")
    assert done.returncode == 1, done.stdout + done.stderr  # one step failed: the run says so
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.log", "results.tgz", "summary.md"]

    log = (out / "gpu_check.log").read_text()
    assert "=== models-fp16: killed at its 1 s limit" in log
    assert "=== conv: ok" in log and "=== env: ok" in log

    summary = (out / "summary.md").read_text()
    assert "killed at its 1 s limit" in summary
    assert "| layer | shape |" in summary  # the finished conv step's table

    with tarfile.open(out / "results.tgz") as tar:
        names = tar.getnames()
        run = names[0].split("/")[0]
        assert f"{run}/conv.json" in names and f"{run}/gpu_check.log" in names
        conv = json.load(tar.extractfile(f"{run}/conv.json"))
    assert conv["environment"]["complete"] == "yes"
    assert {r["provider"] for r in conv["conv"]} >= {"eager", "fastcnn"}


@pytest.mark.skipif(not shutil.which("timeout") or not shutil.which("tar"), reason="coreutils")
def test_a_run_killed_mid_step_has_already_brought_back_the_steps_before(tmp_path):
    """What the device tool returns from a command killed at its limit: $OUT as the last
    finished step left it (the script itself gets no chance to publish again)."""
    _needs_the_extension()
    env = _rehearsal_env(tmp_path, "models-fp16,conv")  # run in the script's order
    log = Path(env["OUT"]) / "gpu_check.log"
    script = subprocess.Popen(
        ["bash", str(SCRIPT)], env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while "=== conv (limit" not in (log.read_text() if log.exists() else ""):
            assert script.poll() is None, "the rehearsal ended before its second step"
            assert time.monotonic() < deadline, "the second step did not start in 180 s"
            time.sleep(0.05)
    finally:
        os.killpg(script.pid, signal.SIGKILL)  # the script and every step under it
        script.wait()
    out = Path(env["OUT"])
    summary = (out / "summary.md").read_text()
    run = summary.splitlines()[0].split()[3]  # "# GPU check <run> (commit ..."
    assert run.startswith("rehearsal-cpu-"), summary
    assert "models-fp16      ok" in summary, summary
    with tarfile.open(out / "results.tgz") as tar:
        names = tar.getnames()
        models = json.load(tar.extractfile(f"{run}/models-fp16/results.json"))
    assert f"{run}/summary.md" in names and f"{run}/gpu_check.log" in names
    assert models["environment"]["complete"] == "yes"


def test_result_file_is_valid_after_every_row(tmp_path):
    """What a benchmark killed mid-run leaves: valid JSON and Markdown of the rows so far."""
    path = tmp_path / "r" / "conv.json"
    results = ResultFile(path, "conv", "conv+BN+ReLU", "notes")
    assert json.loads(path.read_text())["conv"] == []
    results.add({"layer": "a", "shape": "1->1", "provider": "eager", "ms": 1.0})
    data = json.loads(path.read_text())
    assert [r["layer"] for r in data["conv"]] == ["a"]
    assert data["environment"]["complete"].startswith("no")
    assert "| a | 1->1 |" in path.with_suffix(".md").read_text()
    results.finish()
    assert json.loads(path.read_text())["environment"]["complete"] == "yes"
    assert not list(path.parent.glob(".*.tmp"))  # written through a temporary, then renamed
