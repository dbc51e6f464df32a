"""Max-pooling on the CPU without indices: the extension's channels_last kernel
(csrc/cpu/max_pool.cpp), where aten's max_pool2d also computes and writes int64 indices that
inference never reads."""

from __future__ import annotations

import torch

from fastcnn import _extension, _trace
from fastcnn.common import alloc
from fastcnn.common.plans import Plans
from fastcnn.common.shapes import strides_of

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.uint8)  # uint8: int8 models


def output_size(size: int, kernel: int, stride: int, padding: int, ceil_mode: bool) -> int:
    """One pooled dimension, as torch computes it (a ceil-mode window must start inside the
    input or its left padding)."""
    out = (size + 2 * padding - kernel + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


def unsupported_reason(
    x: torch.Tensor, kernel: int, stride: int, padding: int, ceil_mode: bool
) -> str | None:
    """Why the extension's pool cannot take x (torch's max_pool2d runs then), or None."""
    if x.device.type != "cpu" or x.dim() != 4 or x.dtype not in _DTYPES:
        return "not a 4-d float or uint8 CPU tensor"
    if not x.is_contiguous(memory_format=torch.channels_last):
        return "the input is not channels_last"
    if torch.is_grad_enabled() and x.requires_grad:
        return "autograd must record it"
    if torch.compiler.is_compiling():
        return "torch.compile is tracing"
    if padding * 2 > kernel:
        return f"padding {padding} > kernel {kernel} / 2"
    h, w = x.shape[2:]
    if min(output_size(s, kernel, stride, padding, ceil_mode) for s in (h, w)) < 1:
        return "empty output"
    if _extension.load() is None:
        return "the C++ extension did not build"
    return None


def output_shape(x: torch.Tensor, kernel: int, stride: int, padding: int, ceil_mode: bool):
    """The pooled [n, c, ho, wo] of x."""
    n, c, h, w = x.shape
    return (n, c, *(output_size(s, kernel, stride, padding, ceil_mode) for s in (h, w)))


def max_pool2d(
    x: torch.Tensor,
    kernel: int,
    stride: int,
    padding: int,
    ceil_mode: bool,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """max_pool2d(x) by the extension, channels_last, for an x unsupported_reason accepts, into
    out (channels_last, output_shape's size) or a new tensor."""
    if out is None:
        out = alloc.empty(
            output_shape(x, kernel, stride, padding, ceil_mode), x, torch.channels_last
        )
    pair = [kernel, kernel], [stride, stride], [padding, padding]
    _extension.ops().max_pool2d_out(x, *pair, out)
    return out


def _recycled_output(outputs: Plans, x, kernel, stride, padding, ceil_mode) -> torch.Tensor:
    """The output of a pool layer's call on x: its last output at this shape where nothing
    holds it any more (see alloc.Recycled), else a new one."""
    key = (x.shape, x.dtype, kernel, stride, padding, ceil_mode)
    recycled = outputs.get(key)
    if recycled is None:
        shape = output_shape(x, kernel, stride, padding, ceil_mode)
        recycled = alloc.Recycled(shape, strides_of(shape, torch.channels_last))
        outputs.add(key, recycled)
    return recycled.get(x)


def max_pool2d_or_torch(
    x: torch.Tensor,
    kernel: int,
    stride: int,
    padding: int,
    ceil_mode: bool,
    outputs: Plans | None = None,
) -> torch.Tensor:
    """The extension's pool where it applies, else torch's (a fallback the trace records when
    x is a CPU tensor: on CUDA, torch's pool is the path). outputs: a pool layer's bounded map
    of its last outputs per input shape, reused once free (None: a new output every call)."""
    why = unsupported_reason(x, kernel, stride, padding, ceil_mode)
    if why is None:
        _trace.record("max_pool2d", "cpu", "indices_free")
        out = None
        if outputs is not None:
            out = _recycled_output(outputs, x, kernel, stride, padding, ceil_mode)
        return max_pool2d(x, kernel, stride, padding, ceil_mode, out)
    _trace.record("max_pool2d", "aten", "max_pool2d", why if x.device.type == "cpu" else None)
    if x.dtype == torch.uint8 and x.device.type == "cpu":  # aten's uint8 CPU pool rejects large
        y = torch.nn.functional.max_pool2d(x.float(), kernel, stride, padding, ceil_mode=ceil_mode)
        return y.to(torch.uint8)  # inputs; through fp32 it is exact
    return torch.nn.functional.max_pool2d(x, kernel, stride, padding, ceil_mode=ceil_mode)
