"""Eager PyTorch versions of every fastcnn op: the test oracle and the "eager" backend.

Each function states the PyTorch expression the fused kernels must equal.
"""

from __future__ import annotations

import torch


def add_relu(x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """relu(x + residual), in the inputs' dtype, output in x's memory format."""
    return torch.relu(x + residual)


def conv_bn_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride=1,
    padding=0,
    groups: int = 1,
    residual: torch.Tensor | None = None,
    relu: bool = True,
    dilation=1,
) -> torch.Tensor:
    """relu(conv2d(x, weight, bias) + residual): with BN folded into weight and bias (fold_bn),
    Conv2d -> BatchNorm2d (-> add residual) (-> ReLU) in eval mode."""
    y = torch.nn.functional.conv2d(x, weight, bias, stride, padding, dilation, groups)
    if residual is not None:
        y = y + residual
    return torch.relu(y) if relu else y


def inception(
    x: torch.Tensor,
    reduce_weight: torch.Tensor,
    reduce_bias: torch.Tensor,
    widths: list[int],
    w2: torch.Tensor,
    b2: torch.Tensor,
    w3: torch.Tensor,
    b3: torch.Tensor,
    w4: torch.Tensor,
    b4: torch.Tensor,
    pool: int = 3,
) -> torch.Tensor:
    """An eval-mode Inception block with BN folded into every conv: the concat on channels of
    relu(conv1x1(x)), relu(conv_k2(relu(conv1x1(x)))), relu(conv_k3(relu(conv1x1(x)))) and
    relu(conv1x1(max_pool2d(x, pool, 1, pool // 2, ceil_mode=True))), where the three 1x1 convs on
    x are given as one weight [c1 + c2red + c3red, Cin, 1, 1] split by widths."""
    relu, conv2d = torch.relu, torch.nn.functional.conv2d
    y1, y2, y3 = relu(conv2d(x, reduce_weight, reduce_bias)).split(list(widths), 1)
    y2 = relu(conv2d(y2, w2, b2, padding=w2.shape[-1] // 2))
    y3 = relu(conv2d(y3, w3, b3, padding=w3.shape[-1] // 2))
    pooled = torch.nn.functional.max_pool2d(x, pool, 1, pool // 2, ceil_mode=True)
    y4 = relu(conv2d(pooled, w4, b4))
    return torch.cat([y1, y2, y3, y4], 1)


def requantize_multiplier(x_scale: float, weight_scale: torch.Tensor) -> torch.Tensor:
    """x_scale * weight_scale[c] in fp32: what turns an int32 conv sum into real units. Every
    int8 kernel reads this one tensor, so they all round the same products."""
    return (weight_scale.double() * x_scale).float()


def round_half_even(t: torch.Tensor) -> torch.Tensor:
    """torch.round (ties to even), the rounding of every int8 requantize step."""
    return torch.round(t)


def qconv_bn_act(
    x: torch.Tensor,
    x_scale: float,
    x_zero_point: int,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    stride=1,
    padding=0,
    residual: torch.Tensor | None = None,
    residual_scale: float = 1.0,
    residual_zero_point: int = 0,
    relu: bool = True,
    out_scale: float = 1.0,
    out_zero_point: int = 0,
) -> torch.Tensor:
    """The int8 conv_bn_act, in exact integer arithmetic (emulated in float64, exact for these
    magnitudes), then the fp32 epilogue every int8 kernel follows in this order:

        acc = sum((x - x_zero_point) * weight)                       int32, exact
        y = float32(acc) * requantize_multiplier(x_scale, weight_scale) + bias
        y = y + (residual - residual_zero_point) * residual_scale      (fp32)
        y = relu(y)
        out = clamp(round_half_even(y * float32(1 / out_scale)) + out_zero_point, 0, 255)

    x, residual: uint8 [N, C, H, W] (real value = scale * (q - zero_point)); weight: int8
    [Cout, Cin, KH, KW], symmetric per output channel (real = weight_scale[c] * q); bias fp32.
    Returns uint8 in x's memory format. Padding is real zero (x_zero_point)."""
    f32 = torch.float32
    xs = x.double() - x_zero_point
    acc = torch.nn.functional.conv2d(xs, weight.double(), None, stride, padding)
    y = acc.to(f32) * requantize_multiplier(x_scale, weight_scale).view(1, -1, 1, 1)
    if bias is not None:
        y = y + bias.to(f32).view(1, -1, 1, 1)
    if residual is not None:
        r_scale = torch.tensor(residual_scale, dtype=f32)
        y = y + (residual.to(f32) - residual_zero_point) * r_scale
    if relu:
        y = torch.relu(y)
    inv = torch.tensor(1.0 / out_scale, dtype=f32)
    q = round_half_even(y * inv) + out_zero_point
    out = q.clamp_(0, 255).to(torch.uint8)
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out
