"""Eager PyTorch versions of every fastcnn op: the test oracle and the "eager" backend.

Each function states the PyTorch expression the fused kernels must equal.
"""

from __future__ import annotations

import torch


def add_relu(x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """relu(x + residual), in the inputs' dtype, output in x's memory format."""
    return torch.relu(x + residual)
