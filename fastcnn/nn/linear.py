"""fastcnn.nn.Linear: nn.Linear whose inference on fp32 (or natively run bf16) CPU matrices
multiplies by a prepacked weight (fastcnn/cpu/linear.py); everything else is nn.Linear's own
forward."""

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
        """A Linear that is m in all but its class: the same parameters (shared, not copied),
        buffers, hooks and mode."""
        new = cls.__new__(cls)
        # each of nn.Module's dicts (parameters, buffers, hooks, ...) copied, their values shared
        new.__dict__ = {k: v.copy() if isinstance(v, dict) else v for k, v in m.__dict__.items()}
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        why = linear.unsupported_reason(x, weight, bias)
        if why is None:
            _trace.record("linear", "cpu", "onednn_packed")
            return linear.linear(x, weight, bias)
        # a fallback only where the packed path was the point: fp32 or bf16 on the CPU
        expected = x.device.type == "cpu" and x.dtype in linear.PACKED_DTYPES
        _trace.record("linear", "aten", "linear", why if expected else None)
        return super().forward(x)
