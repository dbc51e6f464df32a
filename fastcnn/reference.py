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
