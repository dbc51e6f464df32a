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


def check_like(op: str, name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """t must have ref's shape, dtype and device."""
    if t.device != ref.device:
        raise RuntimeError(
            f"fastcnn.ops.{op}: {name} is on {t.device} but {ref_name} is on {ref.device}"
        )
    if t.dtype != ref.dtype:
        raise TypeError(f"fastcnn.ops.{op}: {name} has dtype {t.dtype} but {ref_name} {ref.dtype}")
    if t.shape != ref.shape:
        raise ValueError(
            f"fastcnn.ops.{op}: {name} has shape {tuple(t.shape)} but {ref_name} has "
            f"{tuple(ref.shape)}"
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


def check_no_partial_overlap(op: str, out: torch.Tensor, **inputs: torch.Tensor) -> None:
    """out may be an input itself (in place, same view) or disjoint from it, nothing in between.

    A kernel that reads an input and writes out in different orders would otherwise read values
    it has already overwritten. Needs real tensors (data pointers): not called while tracing.
    """
    if out.numel() == 0:
        return
    o0, o1 = _span(out)
    for name, t in inputs.items():
        if t.numel() == 0 or t.untyped_storage().data_ptr() != out.untyped_storage().data_ptr():
            continue
        same_view = t.data_ptr() == out.data_ptr() and t.stride() == out.stride()
        t0, t1 = _span(t)
        if not same_view and t0 < o1 and o0 < t1:
            raise ValueError(
                f"fastcnn.ops.{op}: out partially overlaps {name}; pass the same view for an "
                f"in-place call, or a separate tensor"
            )
