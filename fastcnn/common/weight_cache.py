"""The one cache of values derived from a weight: packed (blocked-layout) copies for oneDNN,
int8 packs, an Inception block's split copies.

Values are kept per weight tensor and per key (an input shape, a batch size, ...), the last
KEYS_PER_WEIGHT keys per weight, and made again when the weight's signature changes (its
version counter, storage, shape, strides or dtype). An entry dies with its weight tensor; it
keeps the weight's storage alive, so that the address in its signature cannot come back with
new values (`weight.data = ...`) while the entry lives. Reads take no lock; making a value does
(serving threads may make one weight's values for two shapes at once).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any, ClassVar

import torch

# Values kept per weight: oneDNN picks the blocked layout for the input shape, and a weight
# packed for another shape is reordered again on every call.
KEYS_PER_WEIGHT = 4


def signature(weight: torch.Tensor) -> tuple:
    """What a value made from `weight` depends on. Inference tensors (made under
    torch.inference_mode) have no version counter: an in-place change of their storage goes
    unnoticed; a new tensor is always noticed. The strides count too: `w.data =
    w.data.transpose(2, 3)` keeps the storage and the version."""
    version = None if weight.is_inference() else weight._version
    return (weight.data_ptr(), version, tuple(weight.shape), weight.stride(), weight.dtype)


class WeightCache:
    """id(weight) -> (signature, {key: value}, the weight's storage)."""

    instances: ClassVar[weakref.WeakSet[WeightCache]] = weakref.WeakSet()  # every cache made

    def __init__(self) -> None:
        self.entries: dict[int, tuple[tuple, dict[Any, Any], object]] = {}
        self._lock = threading.Lock()
        WeightCache.instances.add(self)

    def get(self, weight: torch.Tensor, sig: tuple, key, make: Callable[[], Any]) -> Any:
        """The value of `weight` (whose signature is `sig`) for `key`, made by make() on a miss."""
        hit = self.entries.get(id(weight))
        if hit is not None and hit[0] == sig:
            value = hit[1].get(key)
            if value is not None:
                return value
        with self._lock:
            hit = self.entries.get(id(weight))
            if hit is None:
                weakref.finalize(weight, self.entries.pop, id(weight), None)
            if hit is None or hit[0] != sig:  # a new weight, or its values changed
                hit = self.entries[id(weight)] = (sig, {}, weight.untyped_storage())
            values = hit[1]
            value = values.get(key)
            if value is None:
                value = make()
                if len(values) >= KEYS_PER_WEIGHT:
                    del values[next(iter(values))]  # the oldest key
                values[key] = value
        return value

    def kept(self, weight: torch.Tensor) -> dict:
        """{key: value} kept for `weight` now (whatever its signature), for tests."""
        hit = self.entries.get(id(weight))
        return {} if hit is None else hit[1]

    def forget(self, tensors) -> None:
        """Drop every value made from these tensors (they change where no signature sees it)."""
        with self._lock:
            for t in tensors:
                self.entries.pop(id(t), None)

    def nbytes(self, tensors=None) -> int:
        """The bytes of the values kept (for these tensors only, when given)."""
        keys = None if tensors is None else {id(t) for t in tensors}
        return sum(
            _nbytes(values)
            for key, (_, values, _) in list(self.entries.items())
            if keys is None or key in keys
        )


def _nbytes(value) -> int:
    """The memory a kept value holds: its tensors' bytes (oneDNN's opaque tensors included)."""
    if isinstance(value, torch.Tensor):
        if value.is_mkldnn:
            return int(torch.ops.mkldnn._nbytes(value))
        return value.untyped_storage().nbytes()
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    return 0
