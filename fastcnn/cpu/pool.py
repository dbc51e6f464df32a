"""Max-pooling on the CPU without indices: the extension's channels_last kernel
(csrc/cpu/max_pool.cpp), 1.1-2.5x aten's max_pool2d on GoogLeNet's pools on this project's CPU
machine, which also computes and writes int64 indices that inference never reads."""

from __future__ import annotations

import torch

from fastcnn import _extension

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def output_size(size: int, kernel: int, stride: int, padding: int, ceil_mode: bool) -> int:
    """One pooled dimension, as torch computes it (a ceil-mode window must start inside the
    input or its left padding)."""
    out = (size + 2 * padding - kernel + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


def max_pool2d(
    x: torch.Tensor, kernel: int, stride: int, padding: int, ceil_mode: bool
) -> torch.Tensor | None:
    """max_pool2d(x) by the extension, channels_last; None where it does not apply (not a
    channels_last CPU float tensor, grad needed, padding > kernel / 2, the extension not
    built): the caller then runs torch's own."""
    if (
        x.device.type != "cpu"
        or x.dim() != 4
        or x.dtype not in _DTYPES
        or not x.is_contiguous(memory_format=torch.channels_last)
        or (torch.is_grad_enabled() and x.requires_grad)
        or padding * 2 > kernel
        or torch.compiler.is_compiling()
        or _extension.load() is None
    ):
        return None
    n, c, h, w = x.shape
    ho = output_size(h, kernel, stride, padding, ceil_mode)
    wo = output_size(w, kernel, stride, padding, ceil_mode)
    if ho < 1 or wo < 1:
        return None
    out = torch.empty(n, c, ho, wo, dtype=x.dtype, memory_format=torch.channels_last)
    pair = [kernel, kernel], [stride, stride], [padding, padding]
    _extension.ops().max_pool2d_out(x, *pair, out)
    return out
