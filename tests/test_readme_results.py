"""The README's results section is generated from the committed result files, never by hand."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_results_are_up_to_date():
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "results_table.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
