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
