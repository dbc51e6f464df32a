"""Argument checks shared by every op: each raises TypeError/ValueError/RuntimeError with a message
that names the op, the argument and the problem. They read only metadata, so they also run on
fake tensors when torch.compile or torch.export traces an op."""

from __future__ import annotations

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(op: str, name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"fastcnn.ops.{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def dense_vector(t: torch.Tensor | None) -> torch.Tensor | None:
    """A per-channel vector (bias, scales) with unit stride: every kernel reads it as
    `ptr + channel`, so a strided view (bias[::2], a column of a matrix) is copied first (a few
    hundred floats) rather than read wrong."""
    if t is None or t.dim() != 1 or t.stride(0) == 1 or t.numel() <= 1:
        return t
    return t.contiguous()


def check_dtype(op: str, name: str, t: torch.Tensor) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES)
        raise TypeError(f"fastcnn.ops.{op}: {name} has dtype {t.dtype}; supported: {names}")


def check_rank(op: str, name: str, t: torch.Tensor, ranks: range) -> None:
    if t.dim() not in ranks:
        want = f"{ranks.start} to {ranks.stop - 1}" if len(ranks) > 1 else str(ranks.start)
        raise ValueError(
            f"fastcnn.ops.{op}: {name} must have {want} dimensions, got {t.dim()} "
            f"(shape {tuple(t.shape)})"
        )


def check_same_kind(op: str, name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """t must have ref's dtype and device."""
    if t.device != ref.device:
        raise RuntimeError(
            f"fastcnn.ops.{op}: {name} is on {t.device} but {ref_name} is on {ref.device}"
        )
    if t.dtype != ref.dtype:
        raise TypeError(f"fastcnn.ops.{op}: {name} has dtype {t.dtype} but {ref_name} {ref.dtype}")


def check_like(op: str, name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """t must have ref's shape, dtype and device."""
    check_same_kind(op, name, t, ref_name, ref)
    if t.shape != ref.shape:
        raise ValueError(
            f"fastcnn.ops.{op}: {name} has shape {tuple(t.shape)} but {ref_name} has "
            f"{tuple(ref.shape)}"
        )


def check_no_grad(op: str, **tensors: torch.Tensor | None) -> None:
    """Inference-only ops refuse inputs that autograd is recording."""
    if not torch.is_grad_enabled():
        return
    for name, t in tensors.items():
        if t is not None and t.requires_grad:
            raise RuntimeError(
                f"fastcnn.ops.{op} is inference-only and {name} requires grad: call it under "
                "torch.no_grad() or torch.inference_mode(), or train with the torch.nn modules"
            )


def check_out(op: str, out: torch.Tensor, shape: torch.Size, like: torch.Tensor) -> None:
    """out must have the result's shape, and like's dtype and device."""
    check_tensor(op, "out", out)
    if out.device != like.device:
        raise RuntimeError(f"fastcnn.ops.{op}: out is on {out.device}, expected {like.device}")
    if out.dtype != like.dtype:
        raise TypeError(f"fastcnn.ops.{op}: out has dtype {out.dtype}, expected {like.dtype}")
    if out.shape != shape:
        raise ValueError(
            f"fastcnn.ops.{op}: out has shape {tuple(out.shape)}, expected {tuple(shape)}"
        )


def check_out_grad(op: str, out: torch.Tensor) -> None:
    """Writing into out is invisible to autograd: refuse when the caller records gradients.
    (Checked outside the torch.library op, whose kernels run with grad mode off.)"""
    if out.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(f"fastcnn.ops.{op}: out= does not support autograd (out requires grad)")


def _span(t: torch.Tensor) -> tuple[int, int]:
    """[first, last) byte addresses that t can touch."""
    start = t.data_ptr()
    extent = sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride(), strict=True)) + 1
    return start, start + extent * t.element_size()


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.numel() == 0 or b.numel() == 0:
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    a0, a1 = _span(a)
    b0, b1 = _span(b)
    return a0 < b1 and b0 < a1


def check_no_overlap(op: str, out: torch.Tensor, **inputs: torch.Tensor | None) -> None:
    """out must not share memory with any input (a kernel that reads neighbourhoods, like a
    convolution, cannot run in place). Needs real tensors: not called while tracing."""
    for name, t in inputs.items():
        if t is not None and _shares_memory(out, t):
            raise ValueError(f"fastcnn.ops.{op}: out overlaps {name}; pass a separate tensor")


def same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    """a and b are the same elements of the same memory, laid out alike."""
    return a.data_ptr() == b.data_ptr() and a.stride() == b.stride() and a.shape == b.shape


def check_no_partial_overlap(op: str, out: torch.Tensor, **inputs: torch.Tensor) -> None:
    """out may be an input itself (in place, same view) or disjoint from it, nothing in between.

    A kernel that reads an input and writes out in different orders would otherwise read values
    it has already overwritten. Needs real tensors (data pointers): not called while tracing.
    """
    for name, t in inputs.items():
        if not same_view(t, out) and _shares_memory(out, t):
            raise ValueError(
                f"fastcnn.ops.{op}: out partially overlaps {name}; pass the same view for an "
                f"in-place call, or a separate tensor"
            )
