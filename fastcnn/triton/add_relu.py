"""relu(x + residual) in Triton: one read of each input, one write, fp32 arithmetic.

Two kernels, one launcher:
- flat: x, residual and out share one dense layout (both NCHW-contiguous, both channels_last,
  ...), so their storage is walked as one array whatever the memory format;
- strided: anything else (mixed formats, out a channel slice of a larger tensor), a 4-D index
  ordered by out's strides so stores stay coalesced.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastcnn.common.env import interpreting

_MAX_DIMS = 4


@triton.jit
def _relu_keep_nan(v):
    return tl.where(v < 0.0, 0.0, v)  # NaN < 0 is false: NaN stays NaN, as in torch.relu


@triton.jit
def _add_relu_flat_kernel(x_ptr, r_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    r = tl.load(r_ptr + offs, mask=mask).to(tl.float32)
    v = _relu_keep_nan(x + r)
    tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _add_relu_strided_kernel(
    x_ptr, r_ptr, out_ptr, n,
    size1, size2, size3,
    xs0, xs1, xs2, xs3,
    rs0, rs1, rs2, rs3,
    os0, os1, os2, os3,
    BLOCK: tl.constexpr,
):  # fmt: skip
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    i3 = offs % size3
    rest = offs // size3
    i2 = rest % size2
    rest = rest // size2
    i1 = rest % size1
    i0 = rest // size1
    x = tl.load(x_ptr + i0 * xs0 + i1 * xs1 + i2 * xs2 + i3 * xs3, mask=mask).to(tl.float32)
    r = tl.load(r_ptr + i0 * rs0 + i1 * rs1 + i2 * rs2 + i3 * rs3, mask=mask).to(tl.float32)
    v = _relu_keep_nan(x + r)
    dst = out_ptr + i0 * os0 + i1 * os1 + i2 * os2 + i3 * os3
    tl.store(dst, v.to(out_ptr.dtype.element_ty), mask=mask)


def _same_dense_layout(*tensors: torch.Tensor) -> bool:
    first = tensors[0]
    dense = first.is_contiguous() or (
        first.dim() == 4 and first.is_contiguous(memory_format=torch.channels_last)
    )
    return dense and all(t.stride() == first.stride() for t in tensors[1:])


def _strided_plan(x: torch.Tensor, residual: torch.Tensor, out: torch.Tensor):
    """Sizes and strides padded to 4 dims, ordered by out's strides (largest first)."""
    order = sorted(range(out.dim()), key=lambda d: -out.stride(d))
    pad = _MAX_DIMS - out.dim()
    sizes = [1] * pad + [out.size(d) for d in order]
    strides = [[0] * pad + [t.stride(d) for d in order] for t in (x, residual, out)]
    return sizes, strides


def add_relu_out(x: torch.Tensor, residual: torch.Tensor, out: torch.Tensor) -> None:
    """Write relu(x + residual) into out. Arguments are validated by fastcnn.ops.add_relu."""
    n = out.numel()
    if n == 0:
        return
    # The interpreter runs each program in Python over numpy arrays: few, large programs are fast.
    block = 16384 if interpreting() else 1024
    grid = (triton.cdiv(n, block),)
    if _same_dense_layout(x, residual, out):
        _add_relu_flat_kernel[grid](x, residual, out, n, BLOCK=block, num_warps=4)
        return
    sizes, (xs, rs, os_) = _strided_plan(x, residual, out)
    _add_relu_strided_kernel[grid](
        x, residual, out, n, *sizes[1:], *xs, *rs, *os_, BLOCK=block, num_warps=4
    )
