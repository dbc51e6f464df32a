"""Backend implementations of an op, as the callables fastcnn._backend.pick chooses from.

Triton launchers are imported on first call (Triton is optional, and TRITON_INTERPRET is read
when kernels are decorated); extension kernels build the extension on first call.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from fastcnn import _extension


def triton_kernel(module: str, function: str) -> Callable:
    """The launcher fastcnn.triton.<module>.<function>, imported when first called."""

    found = []  # the launcher, once imported

    def resolve() -> Callable:
        if not found:
            found.append(getattr(importlib.import_module(f"fastcnn.triton.{module}"), function))
        return found[0]

    def run(*args, **kwargs):
        return (found[0] if found else resolve())(*args, **kwargs)

    run.__qualname__ = f"triton:{module}.{function}"
    run.resolve = resolve  # the launcher itself, for launch plans that call it directly
    return run


def extension_kernel(name: str) -> Callable:
    """torch.ops.fastcnn_ext.<name>: the extension's CPU or CUDA kernel, by the tensors' device."""

    def run(*args, **kwargs):
        return getattr(_extension.ops(), name)(*args, **kwargs)

    run.__qualname__ = f"extension:{name}"
    return run
