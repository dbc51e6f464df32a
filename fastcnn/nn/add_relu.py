"""fastcnn.nn.AddReLU: the residual add + ReLU of a ResNet block as a module."""

from __future__ import annotations

import torch
from torch import nn

from fastcnn import ops


class AddReLU(nn.Module):
    """``forward(x, residual) = relu(x + residual)`` through fastcnn.ops.add_relu.

    Stateless; differentiable (so it also serves in training), fused at inference.
    """

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return ops.add_relu(x, residual)
