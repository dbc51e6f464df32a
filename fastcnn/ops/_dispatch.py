"""Backend implementations of an op, as the callables fastcnn._backend.pick chooses from.

Triton launchers are imported on first call (Triton is optional, and TRITON_INTERPRET is read
when kernels are decorated); extension kernels build the extension on first call.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch

from fastcnn import _extension


def can_skip_dispatcher(*tensors: torch.Tensor | None) -> bool:
    """True when an op may call its implementation directly instead of through torch.ops.

    Going through the torch.library dispatcher costs tens of microseconds a call, which adds up
    over the ~70 fused ops of a ResNet-50 at small batch. It is needed only when something must
    see the op: torch.compile/export tracing, fake or functional tensors (subclasses), a
    dispatch mode such as make_fx, or autograd. Plain tensors without grad skip it.
    """
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0:
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:  # a plain loop: this runs on every fused call
        if t is not None and (type(t) is not torch.Tensor or (grad and t.requires_grad)):
            return False
    return True


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
