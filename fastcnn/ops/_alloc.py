"""Where every op allocates the tensors its kernels write: one place, so that tests can poison
them. With poisoning on (tests/conftest.py turns it on for the whole suite), each new buffer is
filled with NaN before the kernel runs, so an element a kernel forgets to write stays NaN and
fails the comparison, on a GPU too, where the caching allocator could otherwise hand a kernel a
block that still holds another backend's correct result."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

_poison: float | None = None


def _fill(t: torch.Tensor) -> torch.Tensor:
    # uint8 (int8 models) cannot hold NaN: a byte pattern no test input makes marks it instead
    return t.fill_(_poison if t.is_floating_point() else 0xA5)


def empty(shape, like: torch.Tensor, memory_format=torch.contiguous_format) -> torch.Tensor:
    t = torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=memory_format)
    return t if _poison is None else _fill(t)


def empty_strided(shape, strides, like: torch.Tensor) -> torch.Tensor:
    """A [shape] tensor with these strides in like's dtype and device: the cheapest allocation
    (about half of torch.empty(..., memory_format=...)'s host time), for launch plans that
    computed the strides once."""
    t = like.new_empty_strided(shape, strides)
    return t if _poison is None else _fill(t)


def strides_of(shape, memory_format=torch.contiguous_format) -> tuple[int, ...]:
    """The strides torch gives a new dense [shape] tensor in memory_format (for empty_strided:
    computed once when planning, without allocating)."""
    return torch.empty(shape, device="meta", memory_format=memory_format).stride()


def empty_like(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """x's shape and strides (x dense), in x's dtype unless `dtype` is given."""
    t = torch.empty_like(x, dtype=dtype)
    return t if _poison is None else _fill(t)


@contextlib.contextmanager
def poisoned(value: float = float("nan")) -> Iterator[None]:
    """Fill every buffer an op allocates with `value` (NaN) inside the block (for tests)."""
    global _poison
    before, _poison = _poison, value
    try:
        yield
    finally:
        _poison = before
