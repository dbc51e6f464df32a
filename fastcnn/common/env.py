"""Environment switches read on both sides of a backend (the backend picker, the kernels, tests)."""

from __future__ import annotations

import os


def interpreting() -> bool:
    """True under Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
