"""Functional fused ops: each checks its inputs, picks a backend and runs its kernel."""

from fastcnn.ops.add_relu import add_relu

__all__ = ["add_relu"]
