"""When a fused call may skip the torch.library dispatcher (ops, planned modules, backends)."""

from __future__ import annotations

import torch


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
