"""Conv + bias (+ residual) + ReLU on the CPU as ONE oneDNN primitive with post-ops.

This is what PyTorch's own mkldnn fusion ops and Inductor's CPU freezing path run
(torch.ops.mkldnn._convolution_pointwise): the bias, the residual add and the ReLU are oneDNN
post-ops applied while each output block is still in registers/cache, instead of eager's separate
passes. Weights are prepacked once per input shape into oneDNN's blocked layout and repacked
only when the weight tensor changes (version counter, storage or shape; inference
tensors have no version counter, so only a new storage or shape counts for them).
"""

from __future__ import annotations

import threading
import weakref

import torch

_mkldnn = torch.ops.mkldnn

# id(weight) -> (signature, {input shape: packed weight}); entries die with their weight tensor.
_packed: dict[int, tuple[tuple, dict[tuple, torch.Tensor], object]] = {}
# Packed layouts kept per weight: oneDNN picks the blocked layout for the input shape, and a
# weight packed for another shape is reordered again on every call (measured here: ResNet-50
# packed at batch 1 and run at batch 8 took 557 ms instead of 424).
SHAPES_PER_WEIGHT = 4
_lock = threading.Lock()  # serving threads may pack the same weight for different shapes at once


def supports(dtype: torch.dtype) -> bool:
    """Can oneDNN run a convolution in this dtype on this CPU?"""
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        return True
    if dtype == torch.bfloat16:
        return bool(_mkldnn._is_mkldnn_bf16_supported())
    if dtype == torch.float16:
        return bool(_mkldnn._is_mkldnn_fp16_supported())
    return False


def signature(weight: torch.Tensor) -> tuple:
    # Inference tensors (made under torch.inference_mode) have no version counter: for them an
    # in-place change of the same storage goes unnoticed; a new tensor is always noticed.
    version = None if weight.is_inference() else weight._version
    return (weight.data_ptr(), version, tuple(weight.shape), weight.dtype)


def prepacked(weight: torch.Tensor, padding, stride, input_shape, groups: int = 1) -> torch.Tensor:
    """weight in oneDNN's blocked layout for this input shape, packed once (per weight version
    and shape; the last SHAPES_PER_WEIGHT shapes are kept)."""
    key, shape = id(weight), tuple(input_shape)
    hit = _packed.get(key)
    if hit is not None and hit[0] == signature(weight):
        packed = hit[1].get(shape)
        if packed is not None:
            return packed
    with _lock:
        hit = _packed.get(key)
        if hit is None:
            weakref.finalize(weight, _packed.pop, key, None)
        if hit is None or hit[0] != signature(weight):  # new weight, or its values changed
            # the storage is kept with the entry, so that its address (in the signature) cannot
            # be reused by new values (weight.data = ...) while the entry lives
            hit = _packed[key] = (signature(weight), {}, weight.untyped_storage())
        by_shape = hit[1]
        packed = by_shape.get(shape)
        if packed is None:
            packed = _mkldnn._reorder_convolution_weight(
                weight.contiguous(), list(padding), list(stride), [1, 1], groups, list(shape)
            )
            if len(by_shape) >= SHAPES_PER_WEIGHT:
                del by_shape[next(iter(by_shape))]  # the oldest shape
            by_shape[shape] = packed
    return packed


def residual_copy_reason(x: torch.Tensor, residual: torch.Tensor | None) -> str | None:
    """Why conv_bn_act must copy this residual first, or None. oneDNN writes the result in
    x's layout; a residual in another layout is converted once (compared by layout, not with
    x's strides: the residual has the output's shape)."""
    cl = torch.channels_last
    if residual is None or not x.is_contiguous(memory_format=cl):
        return None
    if residual.is_contiguous(memory_format=cl):
        return None
    return "the residual is not channels_last like x: copied to channels_last first"


def conv_bn_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride,
    padding,
    residual: torch.Tensor | None,
    relu: bool,
    in_place: bool = False,
    groups: int = 1,
) -> torch.Tensor:
    """relu(conv2d(x, weight, bias) + residual) as one oneDNN primitive; returns a new tensor
    (channels_last for a channels_last x), or with in_place=True the residual itself, overwritten
    with the result (as Inductor's CPU path does for ResNet's shortcut: no new allocation, whose
    page faults cost as much as a small conv). Grouped (and depthwise) convolutions are oneDNN's
    groups; dilation=1; a dtype `supports` accepts."""
    w = prepacked(weight, padding, stride, x.shape, groups)
    pad, st, dil = list(padding), list(stride), [1, 1]
    if residual is None:
        return _mkldnn._convolution_pointwise(
            x, w, bias, pad, st, dil, groups, "relu" if relu else "none", [], ""
        )
    if residual_copy_reason(x, residual) is not None:
        residual = residual.contiguous(memory_format=torch.channels_last)
        in_place = False  # the converted copy is a new tensor already
    if in_place:  # the binary add's operand is also its destination: no new output tensor
        return _mkldnn._convolution_pointwise_.binary(
            residual,
            x,
            w,
            bias,
            pad,
            st,
            dil,
            groups,
            "add",
            None,
            "relu" if relu else None,
            [],
            "",
        )
    return _mkldnn._convolution_pointwise.binary(
        x, residual, w, bias, pad, st, dil, groups, "add", None, "relu" if relu else "none", [], ""
    )
