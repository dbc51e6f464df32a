"""fastcnn.nn.AddReLU: the residual add + ReLU of a ResNet block as a module."""

from __future__ import annotations

import torch
from torch import nn

from fastcnn import _backend, ops


class AddReLU(nn.Module):
    """``forward(x, residual) = relu(x + residual)`` through fastcnn.ops.add_relu.

    Stateless; differentiable (so it also serves in training), fused at inference. ``backend``
    pins the backend it runs on (None: the one in force).
    """

    def __init__(self, backend: str | None = None):
        super().__init__()
        self.backend = backend

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        if self.backend is not None:
            with _backend.use_backend(self.backend):
                return ops.add_relu(x, residual)
        return ops.add_relu(x, residual)
