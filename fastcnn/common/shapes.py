"""Output shapes and memory layouts, as torch computes them (for ops, backends and plans)."""

from __future__ import annotations

import torch

Pair = list[int]


def output_shape(x_shape, weight_shape, stride: Pair, padding: Pair, dilation: Pair) -> list[int]:
    """[N, Cout, Ho, Wo] of conv2d, as torch computes it."""
    n, _, h, w = x_shape
    c_out, _, kh, kw = weight_shape
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return [n, c_out, ho, wo]


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """channels_last for a channels_last (and not also NCHW-contiguous) x, else NCHW."""
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


def strides_of(shape, memory_format=torch.contiguous_format) -> tuple[int, ...]:
    """The strides torch gives a new dense [shape] tensor in memory_format (for empty_strided,
    without allocating): each dim's stride is the product of the sizes inside it in that
    format's order (arithmetic: asking torch would make a meta tensor per plan)."""
    if memory_format == torch.channels_last and len(shape) == 4:
        order = (1, 3, 2, 0)  # innermost first: C, W, H, N
    elif memory_format == torch.contiguous_format:
        order = tuple(range(len(shape) - 1, -1, -1))
    else:
        order = None
    if order is None or 0 in shape:  # torch's own rules for empty tensors differ by format
        return torch.empty(shape, device="meta", memory_format=memory_format).stride()
    strides, step = [0] * len(shape), 1
    for dim in order:
        strides[dim] = step
        step *= shape[dim]
    return tuple(strides)
