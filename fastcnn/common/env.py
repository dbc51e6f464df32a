"""Environment switches read on both sides of a backend (the backend picker, the kernels, tests)."""

from __future__ import annotations

import os


def interpreting() -> bool:
    """True under Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def onednn_isa_cap() -> str:
    """The ISA cap oneDNN honours (ONEDNN_MAX_CPU_ISA, else DNNL_MAX_CPU_ISA), lower case as
    oneDNN names it ("avx2", "avx512_core", ...); "" where none is set."""
    return (
        os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or ""
    ).lower()
