"""fastcnn.nn.Linear: nn.Linear whose inference on fp32 CPU matrices multiplies by a prepacked
weight (fastcnn/cpu/linear.py); everything else is nn.Linear's own forward."""

from __future__ import annotations

import torch
from torch import nn

from fastcnn import _trace
from fastcnn.cpu import linear


class Linear(nn.Linear):
    """A drop-in nn.Linear (same arguments, parameters and state_dict). fastcnn.optimize swaps it
    in for nn.Linear layers; fastcnn.models' classifiers are one. Training and autograd take
    nn.Linear's path."""

    @classmethod
    def from_module(cls, m: nn.Linear) -> Linear:
        """A Linear on m's own parameters (shared, not copied)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = m.in_features, m.out_features
        new.weight, new.bias = m.weight, m.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        why = linear.unsupported_reason(x, weight, bias)
        if why is None:
            _trace.record("linear", "cpu", "onednn_packed")
            return linear.linear(x, weight, bias)
        _trace.record("linear", "aten", "linear", why if x.device.type == "cpu" else None)
        return super().forward(x)
