"""Max-pooling on the CPU without indices: the extension's channels_last kernel
(csrc/cpu/max_pool.cpp), 1.1-2.5x aten's max_pool2d on GoogLeNet's pools on this project's CPU
machine, which also computes and writes int64 indices that inference never reads."""

from __future__ import annotations

import torch

from fastcnn import _extension, _trace
from fastcnn.ops import _alloc

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


def max_pool2d(
    x: torch.Tensor, kernel: int, stride: int, padding: int, ceil_mode: bool
) -> torch.Tensor:
    """max_pool2d(x) by the extension, channels_last, for an x unsupported_reason accepts."""
    n, c, h, w = x.shape
    ho = output_size(h, kernel, stride, padding, ceil_mode)
    wo = output_size(w, kernel, stride, padding, ceil_mode)
    out = _alloc.empty((n, c, ho, wo), x, torch.channels_last)
    pair = [kernel, kernel], [stride, stride], [padding, padding]
    _extension.ops().max_pool2d_out(x, *pair, out)
    return out


def max_pool2d_or_torch(
    x: torch.Tensor, kernel: int, stride: int, padding: int, ceil_mode: bool
) -> torch.Tensor:
    """The extension's pool where it applies, else torch's (a fallback the trace records when
    x is a CPU tensor: on CUDA, torch's pool is the path)."""
    why = unsupported_reason(x, kernel, stride, padding, ceil_mode)
    if why is None:
        _trace.record("max_pool2d", "cpu", "indices_free")
        return max_pool2d(x, kernel, stride, padding, ceil_mode)
    _trace.record("max_pool2d", "aten", "max_pool2d", why if x.device.type == "cpu" else None)
    if x.dtype == torch.uint8 and x.device.type == "cpu":  # aten's uint8 CPU pool rejects large
        y = torch.nn.functional.max_pool2d(x.float(), kernel, stride, padding, ceil_mode=ceil_mode)
        return y.to(torch.uint8)  # inputs; through fp32 it is exact
    return torch.nn.functional.max_pool2d(x, kernel, stride, padding, ceil_mode=ceil_mode)
