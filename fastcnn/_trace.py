"""fastcnn.trace (this module: fastcnn._trace): which kernel each fused op call ran, and every
fallback to a slower path.

    with fastcnn.trace() as t:          # or fastcnn.trace(model): events name the module
        y = model(x)
    t.counts()     # Counter({KernelKey("conv_bn_act", "cpu", "onednn", None): 53, ...})
    t.fallbacks()  # the events whose kernel is a fallback, each with the reason
    print(t)       # a table: op, backend, kernel, fallback reason, calls

Every op implementation reports the kernel it ran through `record`; a path slower than the
backend's own kernel (the eager reference because oneDNN has no fp16 on this CPU, cuDNN + an
epilogue pass because cuBLASLt cannot read an NCHW residual, ...) carries the reason as
`fallback`. Tests use this to assert the path they mean to check; fastcnn.report shows it for a
model run once. With no trace active, `record` costs a torch.compiler.is_compiling() call and
one ContextVar read per op call.
While torch.compile traces a model nothing is recorded: the compiled graph's fastcnn ops
record their kernels each time it runs.

Traces are per thread (and per asyncio task): a call made on another thread is not recorded
in this thread's trace.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator

import torch
from torch import nn


@dataclasses.dataclass(frozen=True)
class KernelKey:
    op: str  # "conv_bn_act", "add_relu", "inception", "max_pool2d"
    backend: str  # the backend that ran it: "triton", "cuda", "cpu", "eager" (or "aten")
    kernel: str  # e.g. "implicit_gemm", "cublaslt", "cudnn+epilogue", "onednn", "reference"
    fallback: str | None  # why this slower path ran instead of the backend's own kernel


@dataclasses.dataclass(frozen=True)
class KernelEvent:
    key: KernelKey
    module: str | None  # the innermost module running it, under trace(model); "" is the model

    def __getattr__(self, name: str):  # event.op, event.kernel, ... read through to the key
        return getattr(self.key, name)


class Trace:
    """The kernel events recorded inside one `with fastcnn.trace():` block, in call order."""

    def __init__(self) -> None:
        self.events: list[KernelEvent] = []
        self._modules: list[str] = []  # the module stack under trace(model)
        self._pending: dict[str, str] = {}  # op -> why "auto" skipped a backend, for the next call

    def counts(self, op: str | None = None) -> collections.Counter[KernelKey]:
        return collections.Counter(e.key for e in self.events if op is None or e.key.op == op)

    def kernels(self, op: str | None = None) -> set[str]:
        """{"backend:kernel", ...} of the calls of `op` (of every op when None)."""
        return {f"{k.backend}:{k.kernel}" for k in self.counts(op)}

    def fallbacks(self) -> list[KernelEvent]:
        return [e for e in self.events if e.key.fallback is not None]

    def by_module(self) -> dict[str, collections.Counter[KernelKey]]:
        found: dict[str, collections.Counter[KernelKey]] = {}
        for e in self.events:
            found.setdefault(e.module or "", collections.Counter())[e.key] += 1
        return found

    def _record(self, op: str, backend: str, kernel: str, fallback: str | None) -> None:
        skipped = self._pending.pop(op, None)
        if skipped is not None:
            fallback = skipped if fallback is None else f"{skipped}; {fallback}"
        module = self._modules[-1] if self._modules else None
        self.events.append(KernelEvent(KernelKey(op, backend, kernel, fallback), module))

    def __str__(self) -> str:
        lines = ["op            backend  kernel              calls  fallback"]
        for key, n in sorted(self.counts().items(), key=lambda kv: (kv[0].op, -kv[1])):
            lines.append(
                f"{key.op:<13} {key.backend:<8} {key.kernel:<19} {n:>5}  {key.fallback or '-'}"
            )
        return "\n".join(lines)


_current: contextvars.ContextVar[Trace | None] = contextvars.ContextVar(
    "fastcnn_trace", default=None
)


def _current_trace() -> Trace | None:
    """The trace recording on this thread, or None; always None while torch.compile traces a
    module: an event is a kernel that ran, and the compiled graph's fastcnn ops record theirs
    when it runs. (Dynamo 2.11 cannot trace ContextVar.get under fullgraph=True either.)"""
    if torch.compiler.is_compiling():
        return None
    return _current.get()


def active() -> bool:
    """Is a trace recording on this thread? (Lets a backend skip work only a trace needs.)"""
    return _current_trace() is not None


def record(op: str, backend: str, kernel: str, fallback: str | None = None) -> None:
    """Called by every op implementation with the kernel it runs (see KernelKey)."""
    t = _current_trace()
    if t is not None:
        t._record(op, backend, kernel, fallback)


def note_skipped(op: str, reason: str) -> None:
    """fastcnn._backend.pick under "auto": the next `record` of `op` is a fallback because a
    preferred backend could not run (the reason)."""
    t = _current_trace()
    if t is not None:
        t._pending[op] = reason


@contextlib.contextmanager
def trace(model: nn.Module | None = None) -> Iterator[Trace]:
    """Record the kernel of every fastcnn op called in the block (on this thread). With a model,
    each event also names the innermost submodule of `model` that was running."""
    t = Trace()
    handles = []
    if model is not None:
        for name, module in model.named_modules():
            handles.append(module.register_forward_pre_hook(_push(t, name)))
            handles.append(module.register_forward_hook(_pop(t), always_call=True))
    token = _current.set(t)
    try:
        yield t
    finally:
        _current.reset(token)
        for h in handles:
            h.remove()


def _push(t: Trace, name: str):
    def hook(module, args):
        t._modules.append(name)

    return hook


def _pop(t: Trace):
    def hook(module, args, output):
        t._modules.pop()

    return hook
