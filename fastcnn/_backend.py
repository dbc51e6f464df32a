"""Backend selection: which implementation of an op runs for a given device.

Backends:
  "triton" - the Triton kernels (CUDA tensors; CPU tensors too under TRITON_INTERPRET=1),
  "cuda"   - the C++ extension's CUDA kernels (CUDA tensors),
  "cpu"    - the C++ extension's CPU kernels (CPU tensors),
  "eager"  - fastcnn.reference, plain PyTorch (any device),
  "auto"   - CUDA tensors: triton, else cuda, else eager; CPU tensors: cpu, else eager.

The process-wide choice comes from set_backend() or env FASTCNN_BACKEND; use_backend() overrides
it for the current thread/task only (a ContextVar), so concurrent callers keep their own choice.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import os
import warnings
from collections.abc import Callable, Iterator, Mapping

import torch

from fastcnn import _trace
from fastcnn.common.env import interpreting

BACKENDS = ("auto", "triton", "cuda", "cpu", "eager")
CONCRETE_BACKENDS = ("triton", "cuda", "cpu", "eager")
ENV_VAR = "FASTCNN_BACKEND"

_default: str | None = None  # None: read ENV_VAR (default "auto")
_override: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "fastcnn_backend", default=None
)
_warned: set[tuple[str, str]] = set()
# pick() runs on every op call: remember each (backend, device type) answer for the process.
_status_cache: dict[tuple[str, str], BackendStatus] = {}


@dataclasses.dataclass(frozen=True)
class BackendStatus:
    """Whether a backend can run here, and why (or why not). Truthy when available."""

    available: bool
    reason: str

    def __bool__(self) -> bool:
        return self.available


def _validate(name: object, source: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(
            f"unknown fastcnn backend {name!r} (from {source}); choose one of {BACKENDS}"
        )
    return name.lower()


def set_backend(name: str) -> None:
    """Set the process-wide backend ("auto", "triton", "cuda", "cpu" or "eager").

    A concrete backend must be available for at least one device; otherwise this raises a
    RuntimeError that says why (e.g. the extension failed to build, Triton is not installed).
    """
    global _default
    name = _validate(name, "set_backend")
    if name != "auto":
        _require_somewhere(name)
    _default = name


def get_backend() -> str:
    """The backend in force: use_backend() override, else set_backend(), else FASTCNN_BACKEND."""
    override = _override.get()
    if override is not None:
        return override
    if _default is not None:
        return _default
    return _env_backend()


@functools.cache
def _env_backend() -> str:
    """FASTCNN_BACKEND, read once (get_backend runs on every op call)."""
    return _validate(os.environ.get(ENV_VAR, "auto") or "auto", f"env {ENV_VAR}")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Run the enclosed block with another backend; the previous choice is restored on exit."""
    name = _validate(name, "use_backend")
    if name != "auto":
        _require_somewhere(name)
    token = _override.set(name)
    try:
        yield name
    finally:
        _override.reset(token)


def _triton_status(device_type: str) -> BackendStatus:
    try:
        import triton
    except ImportError as exc:
        return BackendStatus(False, f"triton is not installed ({exc})")

    if device_type == "cuda":
        if not torch.cuda.is_available():
            return BackendStatus(False, "no CUDA device")
        return BackendStatus(True, f"triton {triton.__version__} on {torch.cuda.get_device_name()}")
    if device_type == "cpu":
        if interpreting():
            return BackendStatus(
                True, f"triton {triton.__version__} interpreter (TRITON_INTERPRET=1)"
            )
        return BackendStatus(False, "CPU tensors need TRITON_INTERPRET=1 (Triton's interpreter)")
    return BackendStatus(False, f"triton does not run on {device_type} tensors")


def _extension_status(backend: str, device_type: str) -> BackendStatus:
    from fastcnn import _extension

    want = "cuda" if backend == "cuda" else "cpu"
    if device_type != want:
        return BackendStatus(False, f"backend {backend!r} runs {want} tensors, not {device_type}")
    state = _extension.status(build=True)
    if not state.built:
        return BackendStatus(False, f"the C++ extension did not build: {state.short_error()}")
    if want == "cuda":
        if not state.with_cuda:
            return BackendStatus(False, f"the extension was built without CUDA ({state.cuda_note})")
        if not torch.cuda.is_available():
            return BackendStatus(False, "no CUDA device")
    return BackendStatus(True, f"C++ extension {want} kernels ({state.build_dir})")


def backend_status(backend: str, device_type: str) -> BackendStatus:
    """Can `backend` (a concrete one) run tensors on `device_type` ("cpu" or "cuda") here?"""
    if backend == "eager":
        return BackendStatus(True, "PyTorch reference (fastcnn.reference)")
    if backend == "triton":
        return _triton_status(device_type)
    return _extension_status(backend, device_type)


def _cached_status(backend: str, device_type: str) -> BackendStatus:
    key = (backend, device_type)
    status = _status_cache.get(key)
    if status is None:
        status = _status_cache[key] = backend_status(backend, device_type)
    return status


def _natural_device(backend: str) -> str:
    if backend == "cpu":
        return "cpu"
    if backend == "triton" and not torch.cuda.is_available():
        return "cpu"  # the interpreter
    return "cuda"


def available_backends() -> dict[str, BackendStatus]:
    """{"triton": ..., "cuda": ..., "cpu": ..., "eager": ...}, each truthy when it can run here."""
    return {b: backend_status(b, _natural_device(b)) for b in CONCRETE_BACKENDS}


def _require_somewhere(name: str) -> None:
    devices = ("cuda", "cpu") if name == "triton" else (_natural_device(name),)
    statuses = [_cached_status(name, d) for d in devices]
    if not any(statuses):
        reasons = "; ".join(s.reason for s in statuses)
        raise RuntimeError(f"fastcnn backend {name!r} is not available: {reasons}")


def note_once(key: tuple[str, str], message: str) -> None:
    """Warn (RuntimeWarning) the first time `key` comes up in this process, then stay quiet."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


# What "auto" tries, in order, per device type.
_AUTO_ORDER = {"cuda": ("triton", "cuda", "eager"), "cpu": ("cpu", "eager")}


def pick(op: str, device: torch.device, impls: Mapping[str, Callable]) -> Callable:
    """The implementation of `op` to run for tensors on `device`, under the backend in force.

    An explicit backend that cannot run here (or has no kernel for this op) raises RuntimeError
    with the reason; "auto" falls back down its order with one warning per (op, backend).
    """
    chosen = get_backend()
    dev = device.type
    if chosen != "auto":
        if chosen not in impls:
            raise RuntimeError(f"fastcnn.ops.{op}: backend {chosen!r} has no kernel for this op")
        status = _cached_status(chosen, dev)
        if not status:
            raise RuntimeError(
                f"fastcnn.ops.{op}: backend {chosen!r} cannot run here: {status.reason}"
            )
        return impls[chosen]
    unavailable = []  # backends skipped because they cannot run here: worth one warning
    for candidate in _AUTO_ORDER.get(dev, ("eager",)):
        if candidate not in impls:
            continue  # this op has no kernel there by design: nothing to warn about
        status = _cached_status(candidate, dev)
        if status:
            if unavailable:
                _trace.note_skipped(op, "; ".join(unavailable))
                note_once(
                    (op, dev),
                    f"fastcnn.ops.{op} on {dev}: using {candidate!r} because "
                    + "; ".join(unavailable),
                )
            return impls[candidate]
        unavailable.append(f"{candidate!r} is unavailable ({status.reason})")
    raise RuntimeError(
        f"fastcnn.ops.{op}: no backend can run {dev} tensors: {'; '.join(unavailable)}"
    )
