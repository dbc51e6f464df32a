"""fastcnn.nn.MaxPool2d: nn.MaxPool2d whose inference on channels_last CPU tensors skips the
indices aten computes (fastcnn/cpu/pool.py); everything else is nn.MaxPool2d's own forward."""

from __future__ import annotations

import torch
from torch import nn

from fastcnn import _trace
from fastcnn.common.plans import Plans
from fastcnn.cpu import pool


class MaxPool2d(nn.MaxPool2d):
    """A drop-in nn.MaxPool2d (same arguments, no parameters). fastcnn.optimize swaps it in for
    square nn.MaxPool2d layers without dilation or return_indices; GoogLeNet and ResNet use it.
    On the extension's path it writes into its last output at the input's shape once nothing
    holds that any more (fastcnn.common.alloc.Recycled; at most MAX_PLANS shapes kept)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._outputs = Plans()  # input shape -> Recycled output; bounded, not in state_dict

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if "_outputs" not in self.__dict__:  # pickled by a fastcnn before it kept outputs
            self._outputs = Plans()

    @classmethod
    def from_module(cls, m: nn.MaxPool2d) -> MaxPool2d:
        return cls(m.kernel_size, m.stride, m.padding, m.dilation, m.return_indices, m.ceil_mode)

    @staticmethod
    def unsupported_reason(m: nn.MaxPool2d) -> str | None:
        """Why the CPU kernel can never take m's input (None: it can, on channels_last CPU)."""
        square = all(
            isinstance(v, int) or (len(set(v)) == 1)
            for v in (m.kernel_size, m.stride, m.padding, m.dilation)
        )
        if m.return_indices or not square or _first(m.dilation) != 1:
            return "return_indices, dilation or a non-square window: kept as torch's"
        return None

    def forward(self, x: torch.Tensor):
        why = self.unsupported_reason(self)
        if why is not None:
            _trace.record("max_pool2d", "aten", "max_pool2d", why)
            return super().forward(x)
        stride = self.stride if self.stride is not None else self.kernel_size
        return pool.max_pool2d_or_torch(
            x,
            _first(self.kernel_size),
            _first(stride),
            _first(self.padding),
            self.ceil_mode,
            self._outputs,
        )


def _first(v) -> int:
    return v if isinstance(v, int) else v[0]
