"""fastcnn.ops.add_relu: relu(x + residual), ResNet's F(x) + x, as one pass over memory.

Layers: validation here; kernels in fastcnn/triton/add_relu.py, csrc/cpu/add_relu.cpp and
csrc/cuda/add_relu.cu; the reference in fastcnn/reference.py. Registered as the torch.library ops
fastcnn::add_relu and fastcnn::add_relu_out (with fake implementations), so torch.compile and
torch.export see one opaque op.
"""

from __future__ import annotations

import torch

from fastcnn import _backend, _trace
from fastcnn.common import alloc
from fastcnn.ops import _checks
from fastcnn.ops._dispatch import extension_kernel, triton_kernel
from fastcnn.ops._registry import FusedOp

_OP = "add_relu"


def _eager(x: torch.Tensor, residual: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """reference.add_relu's arithmetic (x + r, then relu), written into out: no extra copy."""
    _trace.record(_OP, "eager", "reference")
    out = alloc.empty_like(x) if out is None else out
    return torch.add(x, residual, out=out).relu_()


def _into_buffer(backend: str, kernel):
    """A kernel that writes into out, given a buffer when the caller gave none."""

    def run(x: torch.Tensor, residual: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        _trace.record(_OP, backend, "elementwise")
        out = alloc.empty_like(x) if out is None else out
        kernel(x, residual, out)
        return out

    return run


_IMPLS = {
    "triton": _into_buffer("triton", triton_kernel("add_relu", "add_relu_out")),
    "cuda": _into_buffer("cuda", extension_kernel("add_relu_out")),
    "cpu": _into_buffer("cpu", extension_kernel("add_relu_out")),
    "eager": _eager,
}


def _validate(x: torch.Tensor, residual: torch.Tensor, out: torch.Tensor | None) -> None:
    _checks.check_tensor(_OP, "x", x)
    _checks.check_tensor(_OP, "residual", residual)
    _checks.check_dtype(_OP, "x", x)
    _checks.check_rank(_OP, "x", x, range(0, 5))
    _checks.check_like(_OP, "residual", residual, "x", x)
    if out is not None:
        _checks.check_out(_OP, out, x.shape, x)


def _run(x: torch.Tensor, residual: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is not None:  # a caller's out= may alias an input
        _checks.check_no_partial_overlap(_OP, out, x=x, residual=residual)
    return _backend.pick(_OP, x.device, _IMPLS)(x, residual, out)


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(output)


def _backward(ctx, grad: torch.Tensor):
    (output,) = ctx.saved_tensors
    g = grad * (output > 0)  # d relu(x + r) / dx = d / dr = [x + r > 0]
    return g, g


def _allocate(x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    return alloc.empty_like(x)


_op = FusedOp("add_relu", "(Tensor x, Tensor residual)", _validate, _allocate, _run)
_op.functional.register_autograd(_backward, setup_context=_setup_context)


def add_relu(
    x: torch.Tensor, residual: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """relu(x + residual) in one read of each input and one write.

    Equals ``torch.relu(x + residual)`` (fastcnn.reference.add_relu), computed in fp32 and
    rounded once to the inputs' dtype.

    Args:
        x (Tensor): float32, float16 or bfloat16, at most 4 dimensions, any memory format.
        residual (Tensor): x's shape, dtype and device, any memory format.
        out (Tensor, optional): written instead of a new tensor: any view of x's shape, dtype
            and device, e.g. a channel slice of a larger tensor, or x itself (in place).

    Returns:
        Tensor: out, or a new tensor in x's memory format.
    """
    # Type checks before the dispatcher, whose own schema error would be a RuntimeError.
    _checks.check_tensor(_OP, "x", x)
    _checks.check_tensor(_OP, "residual", residual)
    if out is not None:
        _checks.check_tensor(_OP, "out", out)
        _checks.check_out_grad(_OP, out)
    return _op(x, residual, out=out)
