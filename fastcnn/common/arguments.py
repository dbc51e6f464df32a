"""The argument checks fastcnn.optimize and fastcnn.quantize share, with one wording."""

from __future__ import annotations

from torch import nn

from fastcnn import _backend


def check_model(caller: str, model: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller} expects an nn.Module, got {type(model).__name__}")


def check_backend(caller: str, backend: str | None) -> None:
    """backend is None (the one in force when the model runs) or a known backend that can run
    here (else the error says why)."""
    if backend is None:
        return
    name = _backend._validate(backend, caller)
    if name != "auto":
        _backend._require_somewhere(name)


def verify_tolerance(caller: str, verify: object, default):
    """verify= as a tolerance: None for False/None (no verification), `default` for True, the
    value itself for a positive float."""
    if verify is None or verify is False:
        return None
    if verify is True:
        return default
    if isinstance(verify, float) and verify > 0:
        return verify
    raise ValueError(f"{caller}: verify must be a bool or a positive float, got {verify!r}")
